"""Whole-model interop against live PyTorch, Keras 3 and tf_keras: every batch norm of a model
into a Flax-layout tree by a name mapping and back, each layer's convention, the ResNet port of
examples/port_torch_resnet.py both ways (logits and running statistics), and every error.
"""

import jax.numpy as jnp
import live_frameworks as lf
import numpy as np
import pytest
from test_examples import load_script
from tolerances import WHOLE_MODEL_RTOL, cross_framework

import bnjax
from bnjax import conventions as cv
from bnjax.interop import (
  PortedModel,
  assign_to_keras_model,
  from_keras_model,
  from_torch_model,
  to_torch_state_dict,
)
from bnjax.interop.torch import default_flax_path

pytestmark = pytest.mark.live


# --- PyTorch ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def _torch_net(torch, *, affine=True):
  """conv -> bn -> (block: conv -> bn) -> linear -> bn1d, statistics moved by training."""
  torch.manual_seed(0)
  net = torch.nn.Sequential()
  net.add_module("conv", torch.nn.Conv2d(3, 4, 3))
  net.add_module("bn", torch.nn.BatchNorm2d(4, momentum=0.3, eps=1e-3))
  block = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4, affine=affine))
  net.add_module("block", block)
  net.add_module("flatten", torch.nn.Flatten())
  net.add_module("fc", torch.nn.Linear(4 * 4 * 4, 5))
  net.add_module("head", torch.nn.BatchNorm1d(5, momentum=None))
  net.train()
  for seed in range(3):
    net(torch.from_numpy(np.random.default_rng(seed).normal(size=(6, 3, 6, 6)).astype(np.float32)))
  return net


def test_default_flax_path():
  assert default_flax_path("bn1") == "bn1"
  assert default_flax_path("layer1.0.bn1") == "layer1_0/bn1"
  assert default_flax_path("layer2.0.downsample.1") == "layer2_0/downsample_1"
  assert default_flax_path("0") == "0"  # a top-level index has no name to join


def test_from_torch_model_collects_every_batch_norm_with_its_convention(torch):
  net = _torch_net(torch)
  ported = from_torch_model(net)
  assert isinstance(ported, PortedModel)
  assert sorted(ported.conventions) == ["block_1", "bn", "head"]
  assert ported.conventions["bn"] == cv.pytorch(momentum=0.3, eps=1e-3)
  assert ported.conventions["head"] == cv.pytorch(momentum=None)
  for flax_path, torch_path in (("bn", "bn"), ("block_1", "block.1"), ("head", "head")):
    module = net.get_submodule(torch_path)
    stats = ported.variables["batch_stats"][flax_path]
    params = ported.variables["params"][flax_path]
    np.testing.assert_array_equal(stats["mean"], module.running_mean.numpy())
    np.testing.assert_array_equal(stats["var"], module.running_var.numpy())
    assert int(stats["count"]) == int(module.num_batches_tracked) == 3
    np.testing.assert_array_equal(params["scale"], module.weight.detach().numpy())
    np.testing.assert_array_equal(params["bias"], module.bias.detach().numpy())


def test_from_torch_model_names_by_dict_and_by_callable(torch):
  net = _torch_net(torch)
  names = {"bn": "stem/norm", "block.1": "block/norm", "head": "head_norm"}
  ported = from_torch_model(net, names=names)
  assert sorted(ported.conventions) == ["block/norm", "head_norm", "stem/norm"]
  assert set(ported.variables["batch_stats"]["stem"]) == {"norm"}
  by_rule = from_torch_model(net, names=lambda path: "bn_" + path.replace(".", "_"))
  assert sorted(by_rule.variables["batch_stats"]) == ["bn_block_1", "bn_bn", "bn_head"]


def test_torch_model_round_trip_is_exact(torch):
  net = _torch_net(torch, affine=False)
  ported = from_torch_model(net)
  assert "block_1" not in ported.variables["params"]  # affine=False: no scale, no bias
  moved = {
    path: {**stats, "mean": stats["mean"] + 1.5, "count": stats["count"] + 4}
    for path, stats in ported.variables["batch_stats"].items()
  }
  state = to_torch_state_dict({"params": ported.variables["params"], "batch_stats": moved}, net)
  assert all(key.split(".")[-1] != "weight" for key in state if key.startswith("block.1."))
  result = net.load_state_dict(state, strict=False)
  assert result.unexpected_keys == []
  again = from_torch_model(net)
  for path, stats in moved.items():
    for key, value in stats.items():
      np.testing.assert_array_equal(again.variables["batch_stats"][path][key], value)


def test_ported_torch_layers_normalize_as_torch_does(torch):
  net = _torch_net(torch)
  ported = from_torch_model(net)
  module = net.get_submodule("bn")
  x = np.random.default_rng(7).normal(size=(5, 4, 3, 3)).astype(np.float32)
  convention = ported.conventions["bn"]
  params, stats = ported.variables["params"]["bn"], ported.variables["batch_stats"]["bn"]
  module.eval()
  expected = module(torch.from_numpy(x)).detach().numpy()
  y, _ = bnjax.batch_norm(jnp.asarray(x), params, stats, training=False, **convention.options())
  np.testing.assert_allclose(y, expected, **cross_framework(np.float32, 1))


def test_resnet_port_both_ways_matches_torch(torch):
  pytest.importorskip("flax")
  example = load_script("examples/port_torch_resnet.py")
  results = example.main(["--batch-size", "4", "--image-size", "8", "--warmup-steps", "2"])
  for name in ("torch_to_flax_eval_logits", "torch_to_flax_train_logits"):
    assert results[name] <= WHOLE_MODEL_RTOL, (name, results[name])
  assert results["flax_to_torch_eval_logits"] <= WHOLE_MODEL_RTOL
  # The running statistics: one update on each side (within the table's rounding), and
  # bit for bit once written back into torch.
  assert results["torch_to_flax_running_stats"] <= cross_framework(np.float32, 4 * 8 * 8)["rtol"]
  assert results["flax_to_torch_running_stats"] == 0.0


def test_to_torch_state_dict_checks_shapes_and_affine(torch):
  net = _torch_net(torch)
  ported = from_torch_model(net)
  params, stats = ported.variables["params"], ported.variables["batch_stats"]
  wrong = {**stats, "bn": {**stats["bn"], "mean": jnp.zeros(3)}}
  with pytest.raises(
    ValueError, match=r"bn.running_mean has shape \(4,\) in the model, got \(3,\)"
  ):
    to_torch_state_dict({"params": params, "batch_stats": wrong}, net)
  no_params = {k: v for k, v in params.items() if k != "head"}
  with pytest.raises(ValueError, match=r"`variables\['params'\]` has nothing at 'head'"):
    to_torch_state_dict({"params": no_params, "batch_stats": stats}, net)
  extra = {**params, "block_1": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}
  plain = _torch_net(torch, affine=False)
  with pytest.raises(ValueError, match=r"'block.1' has affine=False"):
    to_torch_state_dict({"params": extra, "batch_stats": stats}, plain)
  with pytest.raises(TypeError, match=r"`variables` must be \{'params': ..., 'batch_stats': ...\}"):
    to_torch_state_dict({"params": params}, net)
  with pytest.raises(ValueError, match=r"`variables` at 'bn' must hold a batch norm's dicts"):
    to_torch_state_dict({"params": params, "batch_stats": {**stats, "bn": 3.0}}, net)


@pytest.mark.parametrize(
  "names, error, pattern",
  [
    ({"bn": "a", "head": "c"}, ValueError, r"must map every batch norm.*\['block.1'\]"),
    ({"bn": "a", "block.1": "b", "head": "c", "fc": "d"}, ValueError, r"maps \['fc'\]"),
    ({"bn": "a", "block.1": "a", "head": "c"}, ValueError, r"the same Flax path 'a'"),
    ({"bn": "a//b", "block.1": "b", "head": "c"}, ValueError, r"a Flax path such as"),
    (["bn"], TypeError, r"`names` must be None, a dict or a callable, got list"),
  ],
  ids=["partial", "unknown", "duplicate", "empty-scope", "not-a-mapping"],
)
def test_name_mapping_errors(torch, names, error, pattern):
  with pytest.raises(error, match=r"bnjax.interop.torch.from_torch_model: .*" + pattern):
    from_torch_model(_torch_net(torch), names=names)


def test_torch_model_errors(torch):
  with pytest.raises(
    TypeError, match=r"^bnjax.interop.torch.from_torch_model: `model` must be a torch.nn.Module"
  ):
    from_torch_model({})
  with pytest.raises(ValueError, match=r"^bnjax.interop.torch.from_torch_model: .* no BatchNorm"):
    from_torch_model(torch.nn.Linear(2, 2))


# --- Keras 3 and tf_keras ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras():
  pytest.importorskip("tensorflow")
  return lf.tf().keras


def _keras_net(module):
  """Conv -> BN -> a nested Sequential (Dense -> BN), so paths have a scope."""
  inner = module.Sequential(
    [module.layers.Dense(3), module.layers.BatchNormalization(name="bn", momentum=0.5)],
    name="head",
  )
  net = module.Sequential(
    [
      module.Input((4, 4, 2)),
      module.layers.Conv2D(3, 3, name="conv"),
      module.layers.BatchNormalization(name="stem_bn", epsilon=1e-4),
      module.layers.Flatten(),
      inner,
    ]
  )
  rng = np.random.default_rng(0)
  for layer, shape in ((net.get_layer("stem_bn"), (3,)), (inner.get_layer("bn"), (3,))):
    layer.moving_mean.assign(rng.normal(size=shape).astype(np.float32))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape).astype(np.float32))
  return net


def test_from_keras_model_paths_and_conventions(keras):
  net = _keras_net(keras)
  ported = from_keras_model(net)
  assert sorted(ported.conventions) == ["head/bn", "stem_bn"]
  assert ported.conventions["stem_bn"] == cv.keras(epsilon=1e-4)
  assert ported.conventions["head/bn"] == cv.keras(momentum=0.5)
  np.testing.assert_array_equal(
    ported.variables["batch_stats"]["head"]["bn"]["var"],
    net.get_layer("head").get_layer("bn").moving_variance.numpy(),
  )


def test_tf_keras_model_layers_keep_their_own_fused_convention():
  tf_keras = lf.tf_keras()
  net = tf_keras.Sequential(
    [
      tf_keras.Input((4, 4, 2)),
      tf_keras.layers.BatchNormalization(name="image_bn"),  # 4-D: fused
      tf_keras.layers.Flatten(),
      tf_keras.layers.BatchNormalization(name="flat_bn"),  # 2-D: unfused
    ]
  )
  ported = from_keras_model(net, names={"image_bn": "BatchNorm_0", "flat_bn": "BatchNorm_1"})
  assert ported.conventions["BatchNorm_0"] == cv.TF_KERAS_FUSED
  assert ported.conventions["BatchNorm_1"] == cv.TF_KERAS_UNFUSED


def test_keras_model_round_trip_and_inference(keras):
  net = _keras_net(keras)
  ported = from_keras_model(net)
  stats = ported.variables["batch_stats"]
  moved = {
    "stem_bn": {**stats["stem_bn"], "mean": stats["stem_bn"]["mean"] * 2.0},
    "head": {"bn": {**stats["head"]["bn"], "var": stats["head"]["bn"]["var"] + 0.25}},
  }
  assign_to_keras_model(net, {"params": ported.variables["params"], "batch_stats": moved})
  again = from_keras_model(net).variables["batch_stats"]
  np.testing.assert_array_equal(again["stem_bn"]["mean"], moved["stem_bn"]["mean"])
  np.testing.assert_array_equal(again["head"]["bn"]["var"], moved["head"]["bn"]["var"])
  # The ported layer normalizes as the Keras layer does, in inference.
  layer = net.get_layer("stem_bn")
  x = np.random.default_rng(3).normal(size=(2, 2, 2, 3)).astype(np.float32)
  expected = np.asarray(layer(x, training=False))
  convention = from_keras_model(net).conventions["stem_bn"]
  y, _ = bnjax.batch_norm(
    jnp.asarray(x),
    ported.variables["params"]["stem_bn"],
    again["stem_bn"],
    training=False,
    **convention.options(),
  )
  np.testing.assert_allclose(y, expected, **cross_framework(np.float32, 1))


def test_keras_model_errors(keras):
  with pytest.raises(
    TypeError, match=r"^bnjax.interop.keras.from_keras_model: `model` must be a Keras 3 or tf_keras"
  ):
    from_keras_model(object())
  plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
  with pytest.raises(ValueError, match=r"has no BatchNormalization layers"):
    from_keras_model(plain)
  net = _keras_net(keras)
  params = from_keras_model(net).variables["params"]
  with pytest.raises(ValueError, match=r"`variables\['batch_stats'\]` has nothing at 'stem_bn'"):
    assign_to_keras_model(net, {"params": params, "batch_stats": {}})
  with pytest.raises(ValueError, match=r"`variables\['params'\]` has nothing at 'stem_bn'"):
    assign_to_keras_model(net, {"params": {}, "batch_stats": {}})
