"""bnjax.interop against live Keras 3, tf_keras and PyTorch: exact round trips, the converted
layer's outputs in training and inference, and every error.

Skips the Keras tests without TensorFlow and the PyTorch tests without torch; CI has both.
"""

import subprocess
import sys

import jax.numpy as jnp
import live_frameworks as lf
import numpy as np
import pytest
from tolerances import cross_framework

import bnjax
import bnjax.interop.keras as bk
import bnjax.interop.torch as bt
from bnjax import conventions as cv
from bnjax.interop import Converted

pytestmark = pytest.mark.live  # compares with TensorFlow, Keras or PyTorch


def test_importing_interop_imports_no_framework():
  heavy = ["tensorflow", "tf_keras", "keras", "torch", "flax"]
  code = (
    "import sys, bnjax.interop, bnjax.interop.keras, bnjax.interop.torch; "
    f"print([m for m in {heavy!r} if m in sys.modules])"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def _random(shape, seed, low=None, high=None):
  rng = np.random.default_rng(seed)
  if low is None:
    return rng.standard_normal(shape).astype(np.float32)
  return rng.uniform(low, high, shape).astype(np.float32)


def _assert_same(tree, other):
  assert sorted(tree) == sorted(other)
  for key in tree:
    assert jnp.asarray(tree[key]).dtype == jnp.asarray(other[key]).dtype, key
    np.testing.assert_array_equal(
      np.asarray(tree[key], np.float64), np.asarray(other[key], np.float64), err_msg=key
    )


def _train_and_eval(convention, params, stats, x, *, frozen=False):
  """bnjax: one training-mode call (inference if ``frozen``), then one inference call."""
  y_train, new = bnjax.batch_norm(
    jnp.asarray(x), params, stats, training=not frozen, **convention.options()
  )
  y_eval, _ = bnjax.batch_norm(jnp.asarray(x), params, new, training=False, **convention.options())
  return np.asarray(y_train), new, np.asarray(y_eval)


def _close(actual, expected, n, what):
  tol = cross_framework(np.float32, n)
  np.testing.assert_allclose(
    np.asarray(actual, np.float64),
    np.asarray(expected, np.float64),
    rtol=tol["rtol"],
    atol=tol["atol"] * 10,
    err_msg=what,
  )


# ---------------------------------------------------------------------------------------------
# Keras 3 and tf_keras


@pytest.fixture(scope="module")
def tf():
  pytest.importorskip("tensorflow")
  return lf.tf()


KERAS_WEIGHTS = (
  "gamma",
  "beta",
  "moving_mean",
  "moving_variance",
  "moving_stddev",
  "renorm_mean",
  "renorm_stddev",
)
POSITIVE_WEIGHTS = ("gamma", "moving_variance", "moving_stddev", "renorm_stddev")


def _keras_layer(library, shape, seed=0, **kwargs):
  """A built layer of ``library`` with random weights (so a conversion can't pass by luck)."""
  module = lf.tf().keras if library == "keras" else lf.tf_keras()
  layer = module.layers.BatchNormalization(**kwargs)
  layer.build(shape)
  for i, name in enumerate(KERAS_WEIGHTS):
    if getattr(layer, name, None) is not None:
      low, high = (0.5, 2.0) if name in POSITIVE_WEIGHTS else (None, None)
      getattr(layer, name).assign(_random(getattr(layer, name).shape, seed + i, low, high))
  return layer


def _reduction_size(x, axis):
  axes = (axis,) if isinstance(axis, int) else axis
  return x.size // int(np.prod([x.shape[a] for a in axes]))


KERAS_LAYERS = {
  # id: (library, input shape, layer arguments, expected convention)
  "keras-nhwc": ("keras", (4, 3, 2, 5), dict(momentum=0.9), cv.keras(momentum=0.9)),
  "keras-nchw-no-center": (
    "keras",
    (4, 5, 2, 2),
    dict(axis=1, center=False, epsilon=1e-4),
    cv.keras(axis=1, epsilon=1e-4),
  ),
  "keras-synchronized": ("keras", (6, 5), dict(synchronized=True), cv.keras(synchronized=True)),
  "tf_keras-fused-nchw": (
    "tf_keras",
    (2, 5, 3, 2),
    dict(axis=1, momentum=0.5),
    cv.tf_keras(fused=True, axis=1, momentum=0.5),
  ),
  "tf_keras-unfused-2d-no-scale": ("tf_keras", (6, 5), dict(scale=False), cv.TF_KERAS_UNFUSED),
  "tf_keras-two-axes": (
    "tf_keras",
    (4, 3, 2, 5),
    dict(axis=[1, 3]),
    cv.tf_keras(fused=False, axis=(1, -1)),
  ),
  # renorm: three more running statistics; virtual batches: (1, ..., C) weights
  "keras-renorm": (
    "keras",
    (6, 5),
    dict(
      renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5}, renorm_momentum=0.9, momentum=0.8
    ),
    cv.keras(
      momentum=0.8, renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5}, renorm_momentum=0.9
    ),
  ),
  "tf_keras-renorm-nhwc": (
    "tf_keras",
    (4, 3, 2, 5),
    dict(renorm=True, renorm_clipping={"rmin": 0.7, "rmax": 1.5}, momentum=0.9),
    cv.tf_keras(fused=False, momentum=0.9, renorm=True, renorm_clipping={"rmin": 0.7, "rmax": 1.5}),
  ),
  "tf_keras-renorm-unclipped-no-center": (
    "tf_keras",
    (6, 5),
    dict(renorm=True, center=False),
    cv.tf_keras(fused=False, renorm=True),
  ),
  "tf_keras-virtual-batch-nhwc": (
    "tf_keras",
    (8, 3, 2, 5),
    dict(virtual_batch_size=4, momentum=0.9),
    cv.tf_keras(fused=False, momentum=0.9, virtual_batch_size=4),
  ),
  "tf_keras-virtual-batch-ncl-renorm": (
    "tf_keras",
    (6, 5, 2),
    dict(
      axis=1, virtual_batch_size=3, renorm=True, renorm_clipping={"dmax": 0.5}, renorm_momentum=0.5
    ),
    cv.tf_keras(
      fused=False,
      axis=1,
      virtual_batch_size=3,
      renorm=True,
      renorm_clipping={"dmax": 0.5},
      renorm_momentum=0.5,
    ),
  ),
}
KERAS_FEATURES = ("renorm", "renorm_clipping", "renorm_momentum", "virtual_batch_size")


@pytest.mark.usefixtures("tf")
@pytest.mark.parametrize(
  "library, shape, kwargs, convention", KERAS_LAYERS.values(), ids=KERAS_LAYERS.keys()
)
def test_keras_round_trips_lose_nothing(library, shape, kwargs, convention):
  layer = _keras_layer(library, shape, **kwargs)
  params, stats, got = bk.from_keras(layer)
  assert got == convention
  assert ("bias" in params) == kwargs.get("center", True)
  assert ("scale" in params) == kwargs.get("scale", True)
  if kwargs.get("renorm"):
    assert sorted(stats) == ["mean", "renorm_mean", "renorm_stddev", "stddev", "var"]
  assert all(v.shape == (5,) for v in params.values()) or kwargs.get("axis") == [1, 3]
  back = bk.to_keras(params, stats, got, input_shape=shape, library=library)
  for name in KERAS_WEIGHTS:
    mine, theirs = getattr(back, name, None), getattr(layer, name, None)
    assert (mine is None) == (theirs is None), name
    if mine is not None:
      np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=name)
  for attribute in (
    "axis",
    "momentum",
    "epsilon",
    "center",
    "scale",
    "synchronized",
    *KERAS_FEATURES,
  ):
    assert getattr(back, attribute, None) == getattr(layer, attribute, None), attribute
  if library == "tf_keras":
    assert back.fused == layer.fused
  again = bk.from_keras(back)
  _assert_same(again.params, params)
  _assert_same(again.stats, stats)
  assert again.convention == got


@pytest.mark.usefixtures("tf")
@pytest.mark.parametrize(
  "library, shape, kwargs, convention",
  [v for k, v in KERAS_LAYERS.items() if k != "keras-synchronized"],
  ids=[k for k in KERAS_LAYERS if k != "keras-synchronized"],
)
def test_converted_keras_layer_gives_keras_outputs(library, shape, kwargs, convention):
  """One training call then one inference call: outputs and every running statistic (renorm's
  too) as Keras'."""
  layer = _keras_layer(library, shape, **kwargs)
  converted = bk.from_keras(layer)
  x = _random(shape, 10) * 2 + 0.5
  y_train, new, y_eval = _train_and_eval(converted.convention, converted.params, converted.stats, x)
  n = _reduction_size(x, converted.convention.axis)
  _close(y_train, layer(x, training=True).numpy(), n, "training output")
  trained = bk.from_keras(layer).stats
  assert sorted(new) == sorted(trained)
  for key in trained:
    _close(new[key], trained[key], n, f"stats[{key!r}] after the training call")
  _close(y_eval, layer(x, training=False).numpy(), n, "inference output")


def test_tf_keras_adjustment_needs_a_jax_twin_and_round_trips():
  """``adjustment`` is a TensorFlow function, not a weight: from_keras takes a JAX function that
  computes the same, and to_keras the TensorFlow one back."""
  tf = lf.tf()
  shape = (6, 2, 2, 5)
  a = (1.0 + 0.05 * np.arange(6 * 5)).reshape(6, 1, 1, 5).astype(np.float32)
  b = (0.1 * np.arange(5) - 0.2).reshape(1, 1, 1, 5).astype(np.float32)
  shapes = []

  def tf_adjustment(s):
    return tf.constant(a), tf.constant(b)

  def jax_adjustment(s):
    shapes.append(s)
    return jnp.asarray(a), jnp.asarray(b)

  layer = _keras_layer("tf_keras", shape, adjustment=tf_adjustment, momentum=0.9)
  params, stats, convention = bk.from_keras(layer, adjustment=jax_adjustment)
  assert convention == cv.tf_keras(fused=False, momentum=0.9, adjustment=jax_adjustment)
  assert convention.options()["adjustment"] is jax_adjustment
  back = bk.to_keras(
    params, stats, convention, input_shape=shape, library="tf_keras", adjustment=tf_adjustment
  )
  assert back.adjustment is tf_adjustment and not back.fused
  again = bk.from_keras(back, adjustment=jax_adjustment)
  _assert_same(again.params, params)
  _assert_same(again.stats, stats)
  assert again.convention == convention
  x = _random(shape, 13) * 2 + 0.5
  y_train, new, y_eval = _train_and_eval(convention, params, stats, x)
  assert shapes == [shape]  # called once, in training, with the input's shape
  _close(y_train, layer(x, training=True).numpy(), 24, "training output")
  _close(new["mean"], layer.moving_mean.numpy(), 24, "moving mean")
  _close(new["var"], layer.moving_variance.numpy(), 24, "moving variance")
  _close(y_eval, layer(x, training=False).numpy(), 24, "inference output")
  assert np.abs(y_train - y_eval).max() > 0.1  # the adjustment shows in training only


@pytest.mark.usefixtures("tf")
@pytest.mark.parametrize("library", ["keras", "tf_keras"])
def test_frozen_keras_layer_is_inference_mode(library):
  """trainable=False is not in the weights: bnjax reproduces it with training=False."""
  layer = _keras_layer(library, (4, 3, 2, 5))
  layer.trainable = False
  params, stats, convention = bk.from_keras(layer)
  x = _random((4, 3, 2, 5), 11)
  y, _, _ = _train_and_eval(convention, params, stats, x, frozen=True)
  _close(y, layer(x, training=True).numpy(), 24, "frozen layer's training-mode call")


# ---------------------------------------------------------------------------------------------
# PyTorch


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def _torch_module(torch, cls, features, seed=0, **kwargs):
  module = getattr(torch.nn, cls)(features, **kwargs)
  with torch.no_grad():
    for i, (name, tensor) in enumerate(sorted(module.state_dict().items())):
      if name == "num_batches_tracked":
        tensor.fill_(7)
      else:
        positive = name in ("weight", "running_var")
        tensor.copy_(
          torch.from_numpy(
            _random(tuple(tensor.shape), seed + i, *((0.5, 2.0) if positive else (None, None)))
          )
        )
  return module


TORCH_MODULES = {
  # id: (class, input shape, module arguments)
  "bn1d": ("BatchNorm1d", (4, 5), dict()),
  "bn1d-ncl-cumulative": ("BatchNorm1d", (4, 5, 3), dict(momentum=None)),
  "bn2d-momentum0.3-eps1e-3": ("BatchNorm2d", (2, 5, 3, 2), dict(momentum=0.3, eps=1e-3)),
  "bn3d-not-affine": ("BatchNorm3d", (2, 5, 2, 1, 2), dict(affine=False)),
}


@pytest.mark.parametrize("cls, shape, kwargs", TORCH_MODULES.values(), ids=TORCH_MODULES.keys())
def test_torch_round_trips_lose_nothing(torch, cls, shape, kwargs):
  module = _torch_module(torch, cls, shape[1], **kwargs)
  converted = bt.from_torch(module)
  assert converted.convention == cv.pytorch(momentum=module.momentum, eps=module.eps)
  assert int(converted.stats["count"]) == 7 and converted.stats["count"].dtype == jnp.int32
  back = bt.to_torch(*converted, ndim=len(shape))
  assert type(back) is type(module)
  assert (back.momentum, back.eps, back.affine) == (module.momentum, module.eps, module.affine)
  theirs, mine = module.state_dict(), back.state_dict()
  assert mine.keys() == theirs.keys()
  for key in theirs:
    assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key
  again = bt.from_torch(back)
  _assert_same(again.params, converted.params)
  _assert_same(again.stats, converted.stats)
  assert again.convention == converted.convention


def test_torch_state_dict_with_prefix_and_16_bit_dtypes(torch):
  model = torch.nn.Sequential(torch.nn.Linear(3, 4), _torch_module(torch, "BatchNorm1d", 4))
  model[1].to(torch.bfloat16)
  params, stats, convention = bt.from_torch(
    model.state_dict(), prefix="1.", momentum=0.01, eps=1e-3
  )
  assert params["scale"].dtype == jnp.bfloat16 and stats["mean"].dtype == jnp.bfloat16
  assert convention == cv.pytorch(momentum=0.01, eps=1e-3)
  state = bt.to_state_dict(params, stats, prefix="1.")
  for key, value in state.items():
    assert value.dtype == model.state_dict()[key].dtype
    assert torch.equal(value, model.state_dict()[key]), key
  model.load_state_dict({**model.state_dict(), **state})
  assert (
    bt.to_state_dict(params, {"mean": stats["mean"], "var": stats["var"]})[
      "num_batches_tracked"
    ].item()
    == 0
  )


@pytest.mark.parametrize("cls, shape, kwargs", TORCH_MODULES.values(), ids=TORCH_MODULES.keys())
def test_converted_torch_module_gives_torch_outputs(torch, cls, shape, kwargs):
  module = _torch_module(torch, cls, shape[1], **kwargs)
  params, stats, convention = bt.from_torch(module)
  x = _random(shape, 12) * 2 + 0.5
  y_train, new, y_eval = _train_and_eval(convention, params, stats, x)
  n = x.size // shape[1]
  module.train()
  _close(y_train, module(torch.from_numpy(x)).detach().numpy(), n, "training output")
  _close(new["mean"], module.running_mean.numpy(), n, "running mean")
  _close(new["var"], module.running_var.numpy(), n, "running variance")
  assert int(new["count"]) == module.num_batches_tracked.item() == 8
  module.eval()
  _close(y_eval, module(torch.from_numpy(x)).detach().numpy(), n, "inference output")


# ---------------------------------------------------------------------------------------------
# Errors


def _keras_errors():
  layer = lambda **kw: _keras_layer("keras", (4, 3), **kw)
  tf_keras_layer = lambda **kw: _keras_layer("tf_keras", (4, 3), **kw)
  adjust = lambda shape: (1.0, 0.0)
  params, stats, convention = Converted(
    {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
    {"mean": jnp.zeros(3), "var": jnp.ones(3)},
    cv.KERAS,
  )
  return {
    "not-a-layer": (
      lambda: bk.from_keras(object()),
      TypeError,
      (
        r"interop.keras.from_keras: `layer` must be a Keras 3 or tf_keras"
        r" BatchNormalization, got builtins.object"
      ),
    ),
    "other-layer": (
      lambda: bk.from_keras(lf.tf().keras.layers.LayerNormalization()),
      TypeError,
      r"got keras.*LayerNormalization",
    ),
    "not-built": (
      lambda: bk.from_keras(lf.tf().keras.layers.BatchNormalization()),
      ValueError,
      r"`layer` is not built.*layer.build\(input_shape\)",
    ),
    "adjustment": (
      lambda: bk.from_keras(tf_keras_layer(adjustment=adjust)),
      ValueError,
      (
        r"`layer.adjustment` is a TensorFlow function, not a weight, so it cannot be"
        r" converted. Hint: .*from_keras\(layer, adjustment=fn\)"
      ),
    ),
    "adjustment-not-on-layer": (
      lambda: bk.from_keras(layer(), adjustment=adjust),
      ValueError,
      r"`adjustment` is given, but the keras layer has none",
    ),
    "adjustment-not-callable": (
      lambda: bk.from_keras(tf_keras_layer(adjustment=adjust), adjustment=1.0),
      TypeError,
      (
        r"`adjustment` must be a callable shape -> \(scale, bias\),"
        r" got float"
      ),
    ),
    "to-keras-library": (
      lambda: bk.to_keras(params, stats, convention, input_shape=(4, 3), library="keras2"),
      ValueError,
      r"`library` must be one of \('keras', 'tf_keras'\)",
    ),
    "to-keras-not-convention": (
      lambda: bk.to_keras(params, stats, {"axis": -1}, input_shape=(4, 3)),
      TypeError,
      r"`convention` must be a bnjax.conventions.Convention, got dict",
    ),
    "to-keras-unbiased": (
      lambda: bk.to_keras(params, stats, cv.PYTORCH, input_shape=(4, 3, 2)),
      ValueError,
      (
        r"keras BatchNormalization cannot reproduce"
        r" running_variance='unbiased' \(Keras 3 stores"
      ),
    ),
    "to-keras-cumulative": (
      lambda: bk.to_keras(
        params, stats, cv.PYTORCH_CUMULATIVE, input_shape=(4, 3), library="tf_keras"
      ),
      ValueError,
      (
        r"tf_keras BatchNormalization cannot reproduce"
        r" momentum=None \(a cumulative average\)"
      ),
    ),
    "to-keras-shifted": (
      lambda: bk.to_keras(params, stats, cv.KERAS.replace(variance="shifted"), input_shape=(4, 3)),
      ValueError,
      r"variance='shifted'",
    ),
    "to-keras-extra": (
      lambda: bk.to_keras(
        params,
        stats,
        cv.TF_V1_LAYERS_UNFUSED.replace(extra={"update_stats": False}),
        input_shape=(4, 3),
        library="tf_keras",
      ),
      ValueError,
      r"extra options \{'update_stats': False\}",
    ),
    "to-keras-fast-unbiased": (
      lambda: bk.to_keras(
        params,
        stats,
        cv.TF_KERAS_FUSED.replace(variance="fast"),
        input_shape=(4, 3, 2, 3),
        library="tf_keras",
      ),
      ValueError,
      r"variance='fast' \(synchronized\) with the unbiased",
    ),
    "to-keras-virtual-batch": (
      lambda: bk.to_keras(
        params, stats, cv.tf_keras(fused=False, virtual_batch_size=2), input_shape=(4, 3)
      ),
      ValueError,
      (
        r"keras BatchNormalization cannot reproduce virtual_batch_size"
        r" \(Keras 3 has no such argument; tf_keras has\)"
      ),
    ),
    "to-keras-two-axes": (
      lambda: bk.to_keras(params, stats, cv.KERAS.replace(axis=(1, -1)), input_shape=(4, 3, 2)),
      ValueError,
      r"axis=\(1, -1\) \(Keras 3 takes one feature axis",
    ),
    "to-keras-clipping-without-renorm": (
      lambda: bk.to_keras(
        params,
        stats,
        cv.KERAS.replace(extra={"renorm_clipping": {"rmax": 2.0}}),
        input_shape=(4, 3),
      ),
      ValueError,
      (
        r"renorm_clipping or renorm_momentum without"
        r" renorm=True"
      ),
    ),
    "to-keras-unbiased-renorm": (
      lambda: bk.to_keras(
        params,
        stats,
        cv.TF_KERAS_FUSED.replace(extra={"renorm": True}),
        input_shape=(4, 3, 2, 3),
        library="tf_keras",
      ),
      ValueError,
      (
        r"running_variance='unbiased' with \['renorm'\] \(tf_keras"
        r" stores the unbiased variance only when fused"
      ),
    ),
    "to-keras-adjustment-missing": (
      lambda: bk.to_keras(
        params,
        stats,
        cv.tf_keras(fused=False, adjustment=adjust),
        input_shape=(4, 3),
        library="tf_keras",
      ),
      ValueError,
      (
        r"adjustment without its TensorFlow version.*"
        r"to_keras\(..., adjustment=tf_fn\)"
      ),
    ),
    "to-keras-adjustment-unexpected": (
      lambda: bk.to_keras(params, stats, cv.KERAS, input_shape=(4, 3), adjustment=adjust),
      ValueError,
      (
        r"`adjustment` is given, but the convention"
        r" has none"
      ),
    ),
    "assign-lacks": (
      lambda: bk.assign_to_keras(layer(), {"scale": jnp.ones(3)}, stats),
      ValueError,
      r"`params` lacks 'bias' but the layer has `beta`.*center=False",
    ),
    "assign-has": (
      lambda: bk.assign_to_keras(layer(center=False), params, stats),
      ValueError,
      r"`params` has 'bias' but the layer has no `beta`",
    ),
    "assign-shape": (
      lambda: bk.assign_to_keras(layer(), params, {"mean": jnp.zeros(4), "var": jnp.ones(3)}),
      ValueError,
      (
        r"`stats\['mean'\]` has shape \(4,\), the layer's"
        r" `moving_mean` has \(3,\)"
      ),
    ),
    "assign-renorm-lacks": (
      lambda: bk.assign_to_keras(layer(renorm=True), params, stats),
      ValueError,
      (
        r"`stats` lacks 'stddev' but the layer has"
        r" `moving_stddev`.*bnjax.init\(C, renorm=True\)"
      ),
    ),
    "assign-renorm-has": (
      lambda: bk.assign_to_keras(layer(), params, cv.keras(renorm=True).init(3)[1]),
      ValueError,
      r"`stats` has 'stddev' but the layer has no `moving_stddev`",
    ),
    "assign-virtual-batch-shape": (
      lambda: bk.assign_to_keras(
        tf_keras_layer(virtual_batch_size=2), params, {"mean": jnp.zeros(4), "var": jnp.ones(3)}
      ),
      ValueError,
      (
        r"`stats\['mean'\]` has shape \(4,\), the"
        r" layer's `moving_mean` has \(3,\)"
        r" \(stored as \(1, 1, 3\)\)"
      ),
    ),
    "assign-not-built": (
      lambda: bk.assign_to_keras(lf.tf().keras.layers.BatchNormalization(), params, stats),
      ValueError,
      r"assign_to_keras: `layer` is not built",
    ),
    "assign-not-a-layer": (
      lambda: bk.assign_to_keras("layer", params, stats),
      TypeError,
      r"assign_to_keras: `layer` must be a Keras 3 or tf_keras",
    ),
  }


KERAS_ERRORS = [
  "not-a-layer",
  "other-layer",
  "not-built",
  "adjustment",
  "adjustment-not-on-layer",
  "adjustment-not-callable",
  "to-keras-library",
  "to-keras-not-convention",
  "to-keras-unbiased",
  "to-keras-cumulative",
  "to-keras-shifted",
  "to-keras-extra",
  "to-keras-fast-unbiased",
  "to-keras-virtual-batch",
  "to-keras-two-axes",
  "to-keras-clipping-without-renorm",
  "to-keras-unbiased-renorm",
  "to-keras-adjustment-missing",
  "to-keras-adjustment-unexpected",
  "assign-lacks",
  "assign-has",
  "assign-shape",
  "assign-renorm-lacks",
  "assign-renorm-has",
  "assign-virtual-batch-shape",
  "assign-not-built",
  "assign-not-a-layer",
]


@pytest.mark.usefixtures("tf")
@pytest.mark.parametrize("name", KERAS_ERRORS)
def test_keras_errors(name):
  call, error, pattern = _keras_errors()[name]
  with pytest.raises(error, match=pattern):
    call()


def _torch_errors(torch):
  module = lambda **kw: torch.nn.BatchNorm1d(3, **kw)
  params = {"scale": jnp.ones(3), "bias": jnp.zeros(3)}
  stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
  state = module().state_dict()
  return {
    "not-batch-norm": (
      lambda: bt.from_torch(torch.nn.InstanceNorm1d(3)),
      TypeError,
      (
        r"interop.torch.from_torch: `module_or_state_dict` must be a torch"
        r" BatchNorm module or a state dict, got InstanceNorm1d"
      ),
    ),
    "not-a-module": (lambda: bt.from_torch([1, 2]), TypeError, r"got list"),
    "no-running-stats": (
      lambda: bt.from_torch(module(track_running_stats=False)),
      ValueError,
      r"track_running_stats=False.*training=True, update_stats=False",
    ),
    "prefix-with-module": (
      lambda: bt.from_torch(module(), prefix="bn."),
      ValueError,
      r"`prefix` is for state dicts, got prefix='bn.' with a module",
    ),
    "unknown-key": (
      lambda: bt.from_torch({**state, "weights": state["weight"]}),
      ValueError,
      r"unexpected keys under prefix '': \['weights'\]",
    ),
    "missing-running": (
      lambda: bt.from_torch({"weight": state["weight"], "bias": state["bias"]}),
      ValueError,
      r"lacks \['running_mean', 'running_var'\]",
    ),
    "weight-without-bias": (
      lambda: bt.from_torch({k: v for k, v in state.items() if k != "bias"}),
      ValueError,
      r"lacks \['bias'\]",
    ),
    "wrong-prefix": (
      lambda: bt.from_torch(state, prefix="bn1."),
      ValueError,
      r"lacks \['bn1.running_mean', 'bn1.running_var'\]",
    ),
    "count-overflow": (
      lambda: bt.from_torch({**state, "num_batches_tracked": torch.tensor(2**31)}),
      ValueError,
      r"num_batches_tracked=2147483648 does not fit",
    ),
    "state-unpaired": (
      lambda: bt.to_state_dict({"scale": jnp.ones(3)}, stats),
      ValueError,
      r"to_state_dict: PyTorch's affine parameters come in pairs",
    ),
    "state-missing-var": (
      lambda: bt.to_state_dict(params, {"mean": jnp.zeros(3)}),
      ValueError,
      r"`stats` lacks \['var'\]",
    ),
    "to-torch-axis": (
      lambda: bt.to_torch(params, stats, cv.PYTORCH.replace(axis=-1), ndim=4),
      ValueError,
      r"torch.nn.BatchNorm2d cannot reproduce axis=-1",
    ),
    "to-torch-biased": (
      lambda: bt.to_torch(params, stats, cv.KERAS.replace(axis=1), ndim=2),
      ValueError,
      r"running_variance='biased' \(PyTorch stores the unbiased",
    ),
    "to-torch-fast": (
      lambda: bt.to_torch(params, stats, cv.PYTORCH.replace(variance="fast"), ndim=3),
      ValueError,
      r"variance='fast'",
    ),
    "to-torch-extra": (
      lambda: bt.to_torch(params, stats, cv.PYTORCH.replace(extra={"update_stats": False}), ndim=3),
      ValueError,
      r"extra options",
    ),
    "to-torch-ndim": (
      lambda: bt.to_torch(params, stats, cv.PYTORCH, ndim=6),
      ValueError,
      r"`ndim` \(the input's rank\) must be 2, 3, 4 or 5, got 6",
    ),
    "to-torch-not-convention": (
      lambda: bt.to_torch(params, stats, "torch", ndim=2),
      TypeError,
      r"`convention` must be a bnjax.conventions.Convention, got str",
    ),
    "to-torch-two-feature-axes": (
      lambda: bt.to_torch(
        params | {"scale": jnp.ones((3, 2)), "bias": jnp.zeros((3, 2))},
        {"mean": jnp.zeros((3, 2)), "var": jnp.ones((3, 2))},
        cv.PYTORCH,
        ndim=4,
      ),
      ValueError,
      (
        r"PyTorch has one feature axis; `stats\['mean'\]` has shape"
        r" \(3, 2\)"
      ),
    ),
  }


TORCH_ERRORS = [
  "not-batch-norm",
  "not-a-module",
  "no-running-stats",
  "prefix-with-module",
  "unknown-key",
  "missing-running",
  "weight-without-bias",
  "wrong-prefix",
  "count-overflow",
  "state-unpaired",
  "state-missing-var",
  "to-torch-axis",
  "to-torch-biased",
  "to-torch-fast",
  "to-torch-extra",
  "to-torch-ndim",
  "to-torch-not-convention",
  "to-torch-two-feature-axes",
]


@pytest.mark.parametrize("name", TORCH_ERRORS)
def test_torch_errors(torch, name):
  call, error, pattern = _torch_errors(torch)[name]
  with pytest.raises(error, match=pattern):
    call()


def test_error_lists_are_complete(torch, tf):
  assert sorted(TORCH_ERRORS) == sorted(_torch_errors(torch))
  assert sorted(KERAS_ERRORS) == sorted(_keras_errors())
