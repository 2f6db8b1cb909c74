"""bnjax.nnx.BatchNorm against flax.nnx.BatchNorm: state, numbers, train/eval, jit, grad, errors.

Flax's own module is run under the standard promotion rules (it mixes bfloat16 and float32
implicitly); bnjax's adapter runs under the strict rules set by conftest.
"""

import doctest

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import Layout
from flax import nnx
from flax_compare import (
  MAX_DIFF,
  assert_centred_close,
  assert_close,
  assert_trees_close,
  data,
  flat,
  flax_promotion,
)
from oracle import training_grads
from tolerances import assert_close as assert_close_n
from tolerances import offset_atol, tolerance

import bnjax.nnx


@pytest.fixture(autouse=True, scope="module")
def report_max_differences():
  """Prints the largest differences from Flax seen in this file (visible with pytest -s)."""
  MAX_DIFF.clear()
  yield
  print(f"\nbnjax.nnx vs flax.nnx, per dtype (max abs diff, max rel diff): {MAX_DIFF}")


def state_layout(model):
  return {
    path: (type(v).__name__, v.shape, jnp.dtype(v.dtype).name)
    for path, v in nnx.to_flat_state(nnx.state(model))
  }


def make_mask(shape, seed):
  if shape is None:
    return None
  mask = np.random.default_rng(100 + seed).random(shape) < 0.6
  mask[0] = True  # every channel sees at least one element
  return mask


@nnx.jit
def forward(model, x, mask):
  return model(x, mask=mask)


def run(model, x_shape, x_dtype, mask_shape, steps=3, offset=100.0):
  """`steps` training steps after `model.train()`, then `model.eval()`; all under nnx.jit.

  Returns ([state after each step], [y of each step..., y of eval]).
  """
  states, ys = [], []
  model.train()
  for step in range(steps):
    ys.append(forward(model, data(x_shape, x_dtype, step, offset), make_mask(mask_shape, step)))
    states.append(nnx.clone(nnx.state(model)))
  model.eval()
  ys.append(forward(model, data(x_shape, x_dtype, 7, offset), None))
  return states, ys


# id, input shape, constructor kwargs for both modules (num_features is the last axis' size
# unless given), input dtype, mask shape (or None)
CASES = [
  ("nhwc-axis-1", (4, 5, 5, 3), dict(), np.float32, None),
  ("nchw-axis1", (4, 3, 5, 5), dict(axis=1, num_features=3), np.float32, None),
  ("2d-momentum0.9-eps1e-3", (16, 6), dict(momentum=0.9, epsilon=1e-3), np.float32, None),
  ("mask-per-example", (8, 4, 3), dict(), np.float32, (8, 1, 1)),
  ("bf16-input", (4, 5, 5, 3), dict(), jnp.bfloat16, None),
  ("no-scale", (8, 6), dict(use_scale=False), np.float32, None),
  ("no-scale-no-bias", (8, 6), dict(use_scale=False, use_bias=False), np.float32, None),
  ("param-dtype-bf16", (8, 6), dict(param_dtype=jnp.bfloat16), np.float32, None),
  (
    "custom-init",
    (8, 6),
    dict(
      scale_init=jax.nn.initializers.normal(1.0),
      bias_init=jax.nn.initializers.uniform(2.0),
    ),
    np.float32,
    None,
  ),
]


def build(cls, x_shape, kwargs, **extra):
  kwargs = {"num_features": x_shape[-1], **kwargs, **extra}
  return cls(**kwargs, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "x_shape, kwargs, x_dtype, mask_shape",
  [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_same_state_and_numbers_as_flax(x_shape, kwargs, x_dtype, mask_shape):
  ours = build(bnjax.nnx.BatchNorm, x_shape, kwargs)
  with flax_promotion():
    theirs = build(nnx.BatchNorm, x_shape, kwargs, use_fast_variance=False)
  assert state_layout(ours) == state_layout(theirs)
  assert_trees_close(nnx.state(ours), nnx.state(theirs), "initial state ")

  ours_states, ours_ys = run(ours, x_shape, x_dtype, mask_shape)
  with flax_promotion():
    flax_states, flax_ys = run(theirs, x_shape, x_dtype, mask_shape)
  for step, (o, t) in enumerate(zip(ours_states, flax_states)):
    assert_trees_close(o, t, f"state after step {step} ")
  *train_ys, eval_y = zip(ours_ys, flax_ys)
  n = Layout(x_shape, kwargs.get("axis", -1)).reduction_size()
  for step, (o, t) in enumerate(train_ys):
    assert_centred_close(o, t, n, f"y at step {step}")
  assert_close(*eval_y, "y in evaluation")
  assert not np.allclose(flax_states[-1]["mean"][...], 0.0)  # the statistics did move


@pytest.mark.parametrize(
  "kwargs",
  [
    pytest.param(dict(), id="default"),
    pytest.param(dict(use_scale=False), id="no-scale"),
    pytest.param(dict(use_bias=False, param_dtype=jnp.bfloat16), id="no-bias-bf16-params"),
    pytest.param(dict(scale_metadata={"tag": "gamma"}), id="scale-metadata"),
  ],
)
def test_identical_state_tree(kwargs):
  ours = bnjax.nnx.BatchNorm(5, **kwargs, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(5, **kwargs, rngs=nnx.Rngs(0))
  assert state_layout(ours) == state_layout(theirs)
  assert (ours.scale is None) == (theirs.scale is None)
  assert (ours.bias is None) == (theirs.bias is None)
  if "scale_metadata" in kwargs:
    assert ours.scale.get_metadata()["tag"] == "gamma"


@pytest.mark.parametrize(
  "x_dtype, kwargs",
  [
    pytest.param(np.float32, dict(), id="f32"),
    pytest.param(jnp.bfloat16, dict(), id="bf16-input"),
    pytest.param(jnp.bfloat16, dict(param_dtype=jnp.bfloat16), id="bf16-input-bf16-params"),
    pytest.param(jnp.bfloat16, dict(dtype=jnp.bfloat16), id="bf16-input-bf16-dtype"),
    pytest.param(np.float32, dict(dtype=jnp.bfloat16), id="f32-input-bf16-dtype"),
    pytest.param(jnp.bfloat16, dict(dtype=jnp.float32), id="bf16-input-f32-dtype"),
  ],
)
@pytest.mark.parametrize("use_running_average", [False, True], ids=["train", "eval"])
def test_output_dtype_matches_flax(x_dtype, kwargs, use_running_average):
  x = jax.ShapeDtypeStruct((4, 3), x_dtype)
  call = lambda m, x: m(x, use_running_average)
  ours = nnx.eval_shape(lambda: bnjax.nnx.BatchNorm(3, **kwargs, rngs=nnx.Rngs(0)))
  with flax_promotion():
    theirs = nnx.eval_shape(lambda: nnx.BatchNorm(3, **kwargs, rngs=nnx.Rngs(0)))
    expected = jax.eval_shape(call, theirs, x).dtype
  assert jax.eval_shape(call, ours, x).dtype == expected


@pytest.mark.slow
def test_tuple_axis_matches_flax_linen():
  # flax.nnx.BatchNorm takes one feature axis; bnjax's takes a tuple, as flax.linen's does.
  x_shape, axis = (4, 3, 5, 2), (1, 3)
  ours = bnjax.nnx.BatchNorm((3, 2), axis=axis, rngs=nnx.Rngs(0))
  assert state_layout(ours)[("mean",)] == ("BatchStat", (3, 2), "float32")
  ours_states, ours_ys = run(ours, x_shape, np.float32, None, steps=2)
  linen = fnn.BatchNorm(axis=axis, use_fast_variance=False)
  x0, x1, x_eval = (data(x_shape, seed=s) for s in (0, 1, 7))
  with flax_promotion():
    variables = linen.init(jax.random.key(0), x0, use_running_average=False)
    y0, u0 = linen.apply(variables, x0, use_running_average=False, mutable=["batch_stats"])
    y1, u1 = linen.apply(
      {**variables, **u0}, x1, use_running_average=False, mutable=["batch_stats"]
    )
    y_eval = linen.apply({**variables, **u1}, x_eval, use_running_average=True)
  n = Layout(x_shape, axis).reduction_size()
  for o, t in zip(ours_ys[:2], [y0, y1]):
    assert_centred_close(o, t, n)
  assert_close(ours_ys[2], y_eval)
  assert_close(ours_states[-1]["var"][...], u1["batch_stats"]["var"])


def test_use_fast_variance_true_matches_flax_default():
  x_shape = (8, 5, 3)
  ours = bnjax.nnx.BatchNorm(3, use_fast_variance=True, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  # near-centred data, where E[x^2] - E[x]^2 is accurate and its two codings agree
  ours_states, ours_ys = run(ours, x_shape, np.float32, None, offset=1.0)
  with flax_promotion():
    flax_states, flax_ys = run(theirs, x_shape, np.float32, None, offset=1.0)
  for o, t in zip(ours_states, flax_states):
    assert_trees_close(o, t)
  for o, t in zip(ours_ys, flax_ys):
    assert_close(o, t)


def test_grad_matches_flax():
  x = data((8, 4, 3))
  # Centred cotangents: with dy ~ 100, Flax's dscale = sum(dy * xhat) multiplies its float32
  # mean's error by sum(dy) and is 1% off float64 (bnjax: 5e-6, checked against the oracle).
  weights = data((8, 4, 3), seed=3, offset=0.0)

  @nnx.jit
  def grads(model, x):
    def loss(model, x):
      return jnp.sum(model(x) * weights)

    return nnx.grad(loss, argnums=(0, 1))(model, x)

  ours = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(3, use_fast_variance=False, rngs=nnx.Rngs(0))
  ours_model_grad, ours_x_grad = grads(ours, x)
  with flax_promotion():
    flax_model_grad, flax_x_grad = grads(theirs, x)
  # bnjax's closed-form backward against Flax's autodiff: different formulas, and Flax's
  # centred values carry its float32 mean's error, so compared as training outputs are.
  assert sorted(flat(ours_model_grad)) == [("bias",), ("scale",)]
  for key, value in flat(ours_model_grad).items():
    assert_centred_close(value, flat(flax_model_grad)[key], x.size // 3, str(key))
  # through the batch statistics: the input gradient is far from the naive scale / std
  assert_centred_close(ours_x_grad, flax_x_grad, x.size // 3, "dx")
  dx_ref, dscale_ref, dbias_ref = training_grads(x, weights)
  assert_close_n(ours_x_grad, dx_ref, jnp.float32, x.size // 3, "dx vs float64")
  assert_close_n(ours_model_grad["scale"][...], dscale_ref, jnp.float32, x.size // 3, "dscale")
  assert_close_n(ours_model_grad["bias"][...], dbias_ref, jnp.float32, x.size // 3, "dbias")
  # the running statistics were updated inside grad, as Flax's
  assert_trees_close(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat))


def test_traced_flag_and_view():
  x = data((8, 4, 3))
  model = bnjax.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
  forward(model, data((8, 4, 3), seed=1), None)  # move the statistics away from 0 and 1

  @nnx.jit
  def step(model, x, flag):
    return model(x, flag)

  for flag in (False, True):
    traced_model, static_model = nnx.clone(model), nnx.clone(model)
    traced_y = step(traced_model, x, jnp.asarray(flag))
    static_y = forward(nnx.view(static_model, use_running_average=flag), x, None)
    assert_close(traced_y, static_y, f"flag={flag} ")
    assert_trees_close(nnx.state(traced_model), nnx.state(static_model), f"flag={flag} ")
  # evaluation left the statistics alone, training moved them
  assert_trees_close(nnx.state(static_model), nnx.state(model))
  assert not np.allclose(nnx.state(traced_model)["mean"][...], 0.0)


def test_momentum_none_is_cumulative_average():
  model = bnjax.nnx.BatchNorm(3, momentum=None, epsilon=1e-3, rngs=nnx.Rngs(0))
  assert state_layout(model)[("count",)] == ("BatchStat", (), "int32")
  batches = [data((6, 4, 3), seed=s) for s in range(3)]
  for x in batches:
    forward(model, x, None)
  x64 = [np.asarray(x, np.float64).reshape(-1, 3) for x in batches]
  expected_mean = np.mean([x.mean(0) for x in x64], 0)
  expected_var = np.mean([x.var(0) for x in x64], 0)
  assert int(model.count[...]) == 3
  np.testing.assert_allclose(model.mean[...], expected_mean, **tolerance(jnp.float32, 24))
  np.testing.assert_allclose(model.var[...], expected_var, **tolerance(jnp.float32, 24))
  model.eval()
  x_eval = data((6, 4, 3), seed=9)
  y_ref = (x_eval.astype(np.float64) - expected_mean) / np.sqrt(expected_var + 1e-3)
  atol = offset_atol(
    jnp.float32,
    24,
    max_abs_output=np.abs(y_ref).max(),
    offset_over_std=np.abs(x_eval).max() / np.sqrt(expected_var.min()),
  )
  np.testing.assert_allclose(forward(model, x_eval, None), y_ref, rtol=0, atol=atol)


def test_errors():
  with pytest.raises(ValueError, match=r"`use_fast_variance=True` means variance='fast'"):
    bnjax.nnx.BatchNorm(3, use_fast_variance=True, variance="shifted", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"bnjax\.nnx\.BatchNorm: `variance` must be one of"):
    bnjax.nnx.BatchNorm(3, variance="welford", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"bnjax\.nnx\.BatchNorm: `running_variance` must be one"):
    bnjax.nnx.BatchNorm(3, running_variance="bessel", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\).*PyTorch"):
    bnjax.nnx.BatchNorm(3, momentum=1.0, rngs=nnx.Rngs(0))
  model = bnjax.nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="No `use_running_average` argument"):
    model(jnp.ones((4, 3)))
  with pytest.raises(
    TypeError, match=r"bnjax\.nnx\.BatchNorm: `x` must have a floating or complex"
  ):
    model(jnp.ones((4, 3), jnp.int32), use_running_average=True)
  with pytest.raises(TypeError, match=r"`use_running_average` must be a Python bool or a boolean"):
    model(jnp.ones((4, 3)), use_running_average=jnp.zeros((2,), bool))
  with pytest.raises(ValueError, match=r"`params\['scale'\]` must have the shape"):
    model(jnp.ones((4, 5)), use_running_average=True)


@pytest.mark.slow
def test_docstring_example_runs():
  result = doctest.testmod(bnjax.nnx, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_renorm_and_zero_debias_keep_their_statistics_as_batch_stats():
  # The numbers are checked against TensorFlow in test_tf_features_live.py; here the wiring.
  options = dict(renorm=True, renorm_clipping={"rmax": 1.5}, momentum=0.9)
  model = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **options)
  assert sorted(k for k, v in state_layout(model).items() if v[0] == "BatchStat") == [
    ("mean",),
    ("renorm_mean",),
    ("renorm_stddev",),
    ("stddev",),
    ("var",),
  ]
  params, stats = bnjax.init(3, renorm=True)
  for step in range(2):
    x = data((8, 3), seed=step, offset=2.0)
    y = model(x)
    y_ref, stats = bnjax.batch_norm(x, params, stats, training=True, **options)
    assert_close(y, y_ref, f"step {step} ")
    for key in stats:
      assert_close(getattr(model, key)[...], stats[key], f"step {step} {key} ")
  debiased = bnjax.nnx.BatchNorm(3, zero_debias="mean", rngs=nnx.Rngs(0))
  assert state_layout(debiased)[("count",)] == ("BatchStat", (), "int32")


@pytest.mark.slow
def test_backward_option_is_checked_and_reaches_batch_norm():
  with pytest.raises(ValueError, match=r"bnjax\.nnx\.BatchNorm.*`backward`"):
    bnjax.nnx.BatchNorm(3, backward="numeric", rngs=nnx.Rngs(0))
  model = bnjax.nnx.BatchNorm(3, backward="autodiff", rngs=nnx.Rngs(0))
  x = data((6, 3))
  graphdef, state = nnx.split(model)
  _, tangent = jax.jvp(
    lambda x, state: nnx.merge(graphdef, state)(x),
    (x, state),
    (jnp.ones_like(x), jax.tree.map(jnp.zeros_like, state)),
  )
  np.testing.assert_allclose(tangent, 0.0, atol=1e-5)


def test_a_tf1_frozen_preset_keeps_the_running_statistics():
  options = bnjax.conventions.tf_v1_layers(fused=True, trainable=False).options()
  model = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **options)
  x = data((6, 3))
  before = flat(nnx.state(model, nnx.BatchStat))
  y = model(x)
  expected, _ = bnjax.batch_norm(
    x,
    {"scale": model.scale[...], "bias": model.bias[...]},
    {"mean": model.mean[...], "var": model.var[...]},
    training=True,
    **options,
  )
  np.testing.assert_array_equal(y, expected)
  for key, value in flat(nnx.state(model, nnx.BatchStat)).items():
    np.testing.assert_array_equal(value, before[key])
  with pytest.raises(
    TypeError, match=r"bnjax\.nnx\.BatchNorm: `update_stats` must be a Python bool"
  ):
    bnjax.nnx.BatchNorm(3, update_stats=1, rngs=nnx.Rngs(0))
