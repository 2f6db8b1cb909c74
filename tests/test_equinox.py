"""``bnjax.equinox.BatchNorm`` against ``equinox.nn.BatchNorm`` running live, and a float64 oracle.

The scenarios of Equinox's own BatchNorm tests (per-example inputs of rank 1 to 3 under a named
``vmap``, NameError without one, an unnamed outer ``vmap``, two named ``vmap``s, inference
leaving the state alone, zero training steps, ``Sequential``, serialisation), written anew, plus
step-by-step agreement of outputs, state and gradients in both modes, accuracy at a large
offset, and 8 devices.
"""

import dataclasses
import io
import subprocess
import sys
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import multidevice
from flax_compare import assert_centred_close
from jax.sharding import PartitionSpec as P
from oracle import moments as oracle_moments
from tolerances import FLOOR, SAME_FORMULA, assert_close

import bnjax.equinox
from bnjax import conventions

MODES = ["batch", "ema"]
MOMENTUM = 0.99


@pytest.fixture(autouse=True)
def warnings_are_errors():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    yield


def batched(layer, axis_name="batch"):
  return jax.vmap(layer, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


def pair(mode, size=5, **ours):
  """(ours, our state, Equinox's, its state), built the same way."""
  mine, mine_state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    size, "batch", mode=mode, **ours
  )
  with jax.numpy_dtype_promotion("standard"):
    theirs, theirs_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(size, "batch", mode=mode)
  return mine, mine_state, theirs, theirs_state


def run_equinox(fn, *args):
  """Equinox's layer relies on implicit promotion (Python-float momentum times arrays)."""
  with jax.numpy_dtype_promotion("standard"):
    return fn(*args)


def steps_data(shape, steps=3, offset=20.0):
  rng = np.random.default_rng(0)
  return [
    (rng.standard_normal(shape) * (1 + s) + offset * (s + 1)).astype(np.float32)
    for s in range(steps)
  ]


def state_leaves(state):
  return [np.asarray(v) for v in jax.tree.leaves(state)]


def layout(state):
  return [(v.shape, v.dtype, v.weak_type) for v in jax.tree.leaves(state)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
  "example_shape", [(5,), (5, 6), (5, 3, 4)], ids=["rank1", "rank2", "rank3"]
)
@pytest.mark.slow
def test_outputs_state_and_gradients_match_equinox(mode, example_shape):
  mine, mine_state, theirs, theirs_state = pair(mode, debias_initial_var=0.0)
  n = 8 * int(np.prod(example_shape[1:]))
  offset_over_std = 60.0 / 1.0
  for x in steps_data((8, *example_shape)):
    y, mine_state = batched(mine)(x, mine_state)
    y_ref, theirs_state = run_equinox(batched(theirs), x, theirs_state)
    assert_centred_close(y, y_ref, n, "y", offset_over_std=offset_over_std)
    for ours, ref in zip(state_leaves(mine_state), state_leaves(theirs_state)):
      if ours.dtype == np.float32:
        np.testing.assert_allclose(
          ours,
          ref,
          rtol=SAME_FORMULA["float32"]["rtol"] * 4,
          atol=SAME_FORMULA["float32"]["atol"] * 60,
        )
      else:
        np.testing.assert_array_equal(ours, ref)
  assert layout(mine_state) == layout(theirs_state)

  # Inference: the state, debiased in batch mode by Equinox's formula (debias_initial_var=0).
  x = steps_data((8, *example_shape))[0]
  y, after = batched(eqx.nn.inference_mode(mine))(x, mine_state)
  y_ref, _ = run_equinox(batched(eqx.nn.inference_mode(theirs)), x, theirs_state)
  assert_centred_close(y, y_ref, n, "inference y", offset_over_std=offset_over_std)
  for a, b in zip(state_leaves(after), state_leaves(mine_state)):
    np.testing.assert_array_equal(a, b)

  # Gradients of a loss that mixes the outputs, w.r.t. the weight, the bias (filter_grad) and x.
  rng = np.random.default_rng(1)
  dy = rng.standard_normal((8, *example_shape)).astype(np.float32)

  def loss(layer, x, state):
    return jnp.sum(batched(layer)(x, state)[0] * dy)

  g_mine = eqx.filter_grad(loss)(mine, x, mine_state)
  g_theirs = run_equinox(eqx.filter_grad(loss), theirs, x, theirs_state)
  for name in ("weight", "bias"):
    ours, ref = getattr(g_mine, name), getattr(g_theirs, name)
    assert_centred_close(ours, ref, n, name, offset_over_std=offset_over_std)
  dx = jax.grad(loss, argnums=1)(mine, x, mine_state)
  dx_ref = run_equinox(jax.grad(loss, argnums=1), theirs, x, theirs_state)
  assert_centred_close(dx, dx_ref, n, "dx", offset_over_std=offset_over_std)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("channelwise_affine", [True, False])
def test_same_fields_and_state_as_equinox(mode, dtype, channelwise_affine):
  mine, mine_state, theirs, theirs_state = (
    pair(mode)
    if dtype is None and channelwise_affine
    else (
      *eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
        4, "batch", mode=mode, dtype=dtype, channelwise_affine=channelwise_affine
      ),
      *eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        4, "batch", mode=mode, dtype=dtype, channelwise_affine=channelwise_affine
      ),
    )
  )
  theirs_fields = {f.name for f in dataclasses.fields(eqx.nn.BatchNorm)}
  assert theirs_fields <= {f.name for f in dataclasses.fields(bnjax.equinox.BatchNorm)}
  for name in theirs_fields - {
    "ema_first_time_index",
    "ema_state_index",
    "batch_counter",
    "batch_state_index",
  }:
    a, b = getattr(mine, name), getattr(theirs, name)
    if isinstance(b, jax.Array):
      assert (a.shape, a.dtype) == (b.shape, b.dtype), name
    else:
      assert a == b, name
  assert jax.tree.structure(mine_state) == jax.tree.structure(theirs_state)
  assert layout(mine_state) == layout(theirs_state)
  for name in ("ema_first_time_index", "ema_state_index", "batch_counter", "batch_state_index"):
    assert (getattr(mine, name) is None) == (getattr(theirs, name) is None), name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
def test_equinox_scenarios(mode):
  rng = np.random.default_rng(2)
  x1, x2, x3 = (
    rng.uniform(size=s).astype(np.float32) for s in ((10, 5), (10, 5, 6), (10, 5, 7, 8))
  )
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(5, "batch", mode=mode)
  index = bn.ema_state_index if mode == "ema" else bn.batch_state_index

  # One state through examples of three ranks.
  for x in (x1, x2, x3):
    y, state = batched(bn)(x, state)
    assert y.shape == x.shape
    assert [v.shape for v in state.get(index)] == [(5,), (5,)]

  # No named axis: a NameError that says what to do, mapped or not.
  _, fresh = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(5, "batch", mode=mode)
  with pytest.raises(NameError, match="`axis_name`='batch' is not bound"):
    jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(x1, fresh)
  with pytest.raises(NameError, match="is not bound"):
    bn(x1[0], fresh)

  # An unnamed outer vmap maps the state too.
  y, mapped = jax.vmap(
    jax.vmap(bn, axis_name="batch", in_axes=(1, None), out_axes=(1, None)),
    in_axes=(0, None),
  )(x2, fresh)
  assert y.shape == x2.shape
  assert [v.shape for v in mapped.get(index)] == [(10, 5), (10, 5)]

  # Two named vmaps share statistics over both (exact psum combine); the oracle over both axes.
  two, two_state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    6, ("batch1", "batch2"), mode=mode, channelwise_affine=False
  )
  x = rng.standard_normal((4, 3, 6)).astype(np.float32) * 2 + 1e3
  inner = jax.vmap(two, axis_name="batch2", in_axes=(0, None), out_axes=(0, None))
  y, two_state = jax.vmap(inner, axis_name="batch1", in_axes=(0, None), out_axes=(0, None))(
    x, two_state
  )
  mean, var, _ = oracle_moments(x, (0, 1))
  assert_close(y, (x - mean) / np.sqrt(var + 1e-5), jnp.float32, 12, "two axes")

  # It normalizes (no affine), and training moves the statistics.
  plain, plain_state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    5, "batch", mode=mode, channelwise_affine=False
  )
  x = rng.standard_normal((10, 5)).astype(np.float32)
  y, plain_state = batched(plain)(x, plain_state)
  mean, var, _ = oracle_moments(x, (0,))
  assert_close(y, (x - mean) / np.sqrt(var + 1e-5), jnp.float32, 10, "normalized")
  _, moved = batched(plain)(3 * x1 + 10, plain_state)
  before, after = (
    plain_state.get(plain.ema_state_index if mode == "ema" else plain.batch_state_index)
    for plain_state in (plain_state, moved)
  )
  assert not np.allclose(before[0], after[0]) and not np.allclose(before[1], after[1])

  # Inference leaves the state alone; a batch of one differentiates, silently.
  _, same = batched(eqx.nn.inference_mode(plain))(4 * x1 + 20, moved)
  for a, b in zip(state_leaves(same), state_leaves(moved)):
    np.testing.assert_array_equal(a, b)
  g = jax.grad(lambda x: jnp.sum(batched(plain)(x, moved)[0]))(rng.standard_normal((1, 5)))
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize("debias_initial_var", [1.0, 0.0])
def test_zero_training_steps_is_the_identity(debias_initial_var):
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    3, "foo", mode="batch", inference=True, debias_initial_var=debias_initial_var
  )
  x = np.random.default_rng(3).standard_normal((5, 3)).astype(np.float32)
  y, _ = jax.vmap(bn, in_axes=(0, None), axis_name="foo")(x, state)
  np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.slow
def test_batch_mode_inference_removes_the_initial_variance():
  """Equinox divides the averages by 1 - m^t; the variance started at 1, not 0, so it keeps
  m^t / (1 - m^t) of that start (99 after one step). bnjax removes it by default."""
  mine, mine_state, theirs, theirs_state = pair("batch")
  xs = steps_data((16, 5), steps=4, offset=1.0)
  batch_vars = []
  for x in xs:
    _, mine_state = batched(mine)(x, mine_state)
    _, theirs_state = run_equinox(batched(theirs), x, theirs_state)
    batch_vars.append(oracle_moments(x, (0,))[1][0])
  t = len(xs)
  weights = (1 - MOMENTUM) * MOMENTUM ** np.arange(t - 1, -1, -1) / (1 - MOMENTUM**t)
  debiased_var = np.einsum("t,tc->c", weights, np.asarray(batch_vars))
  probe = np.zeros((1, 5), np.float32) + np.asarray(xs[-1]).mean(0)  # y = (probe - mean) * inv

  def inference_inv(layer, state):
    y, _ = batched(eqx.nn.inference_mode(layer))(probe + 1.0, state)
    y0, _ = batched(eqx.nn.inference_mode(layer))(probe, state)
    return np.asarray(y - y0, np.float64)[0]  # = rsqrt(var_I + eps)

  ours = 1 / inference_inv(mine, mine_state) ** 2 - 1e-5
  np.testing.assert_allclose(ours, debiased_var, rtol=1e-4)
  equinox_var = 1 / run_equinox(inference_inv, theirs, theirs_state) ** 2 - 1e-5
  overstated = MOMENTUM**t / (1 - MOMENTUM**t)
  np.testing.assert_allclose(equinox_var - debiased_var, overstated, rtol=1e-4)


@pytest.mark.slow
def test_sequential_make_with_state_and_serialisation():
  def make(key):
    k1, k2 = jax.random.split(key)
    return eqx.nn.Sequential(
      [
        eqx.nn.Linear(2, 4, key=k1),
        bnjax.equinox.BatchNorm(4, axis_name="batch", mode="batch"),
        eqx.nn.Linear(4, 3, key=k2),
      ]
    )

  model, state = eqx.nn.make_with_state(make)(jax.random.key(0))
  x = np.random.default_rng(4).standard_normal((6, 2)).astype(np.float32)
  y, state = batched(model)(x, state)
  assert y.shape == (6, 3)
  buffer = io.BytesIO()
  eqx.tree_serialise_leaves(buffer, (model, state))
  buffer.seek(0)
  like = eqx.nn.make_with_state(make)(jax.random.key(1))
  model2, state2 = eqx.tree_deserialise_leaves(buffer, like)
  np.testing.assert_array_equal(batched(model2)(x, state2)[0], batched(model)(x, state)[0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
def test_more_accurate_than_equinox_at_a_large_offset(mode):
  """x = 1e4 + N(0, 1): Equinox's float32 x - mean carries ~1e-3 of the offset; bnjax's shift
  from the data keeps y at the float32 floor of the float64 result."""
  mine, mine_state, theirs, theirs_state = pair(mode, size=4)
  x = (np.random.default_rng(5).standard_normal((64, 4, 8)) + 1e4).astype(np.float32)
  y, _ = batched(mine)(x, mine_state)
  y_ref, _ = run_equinox(batched(theirs), x, theirs_state)
  mean, var, _ = oracle_moments(x, (0, 2))
  exact = (np.asarray(x, np.float64) - mean) / np.sqrt(var + 1e-5)
  ours = np.abs(np.asarray(y, np.float64) - exact).max() / np.abs(exact).max()
  equinox = np.abs(np.asarray(y_ref, np.float64) - exact).max() / np.abs(exact).max()
  assert ours <= FLOOR["y"], ours
  assert equinox > 100 * ours, (equinox, ours)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transform", ["pmap", "shard_map"])
@pytest.mark.slow
@multidevice
def test_eight_devices_match_one(mode, transform):
  """8 fake devices, 2 examples each, a vmap inside: statistics over ("d", "batch") equal one
  vmap over the whole batch, and Equinox's layer agrees. In JAX 0.10, collectives over a vmap
  axis inside shard_map need an Auto mesh and check_vma=False (for Equinox's pmean too).
  Equinox's ema mode cannot run here (its State.set refuses the first-step flag it builds, in
  JAX 0.10); bnjax's runs, and is compared with Equinox where Equinox runs."""
  devices = 8
  x = (np.random.default_rng(6).standard_normal((16, 3, 4)) * 2 + 5).astype(np.float32)
  whole, whole_state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(3, "batch", mode=mode)
  split, split_state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(3, ("d", "batch"), mode=mode)
  with jax.numpy_dtype_promotion("standard"):
    theirs, theirs_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, ("d", "batch"), mode=mode)

  if transform == "pmap":

    def sharded(layer):
      per_device = jax.pmap(batched(layer), axis_name="d", in_axes=(0, None), out_axes=(0, None))
      return lambda x, s: (lambda y, s: (y.reshape(x.shape), s))(
        *per_device(x.reshape((devices, -1, *x.shape[1:])), s)
      )
  else:
    mesh = jax.make_mesh((devices,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

    def sharded(layer):
      return jax.jit(
        jax.shard_map(
          batched(layer),
          mesh=mesh,
          in_specs=(P("d"), P()),
          out_specs=(P("d"), P()),
          check_vma=False,
        )
      )

  for step in range(2):
    xs = x * (step + 1) - step
    y_whole, whole_state = batched(whole)(xs, whole_state)
    y_split, split_state = sharded(split)(xs, split_state)
    np.testing.assert_allclose(y_split, y_whole, **SAME_FORMULA["float32"])
    if mode == "batch":
      y_theirs, theirs_state = run_equinox(sharded(theirs), xs, theirs_state)
      assert_centred_close(y_split, y_theirs, 64, "y vs equinox", offset_over_std=5.0)
    for a, b in zip(state_leaves(split_state), state_leaves(whole_state)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  grads = eqx.filter_grad(lambda m, x, s: jnp.sum(jnp.sin(sharded(m)(x, s)[0])))(
    split, x, split_state
  )
  grads_whole = eqx.filter_grad(lambda m, x, s: jnp.sum(jnp.sin(batched(m)(x, s)[0])))(
    whole, x, whole_state
  )
  np.testing.assert_allclose(grads.weight, grads_whole.weight, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads.bias, grads_whole.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_convention_runs_that_frameworks_arithmetic():
  """convention=PYTORCH: momentum 0.9 (torch's 0.1), unbiased stored variance, eps 1e-5, and
  inference with the stored statistics as they are; the same numbers as bnjax.batch_norm."""
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    3, "batch", convention=conventions.PYTORCH
  )
  assert bn.mode == "batch" and bn.momentum == 0.9
  x = (np.random.default_rng(7).standard_normal((6, 3, 2, 2)) + 3).astype(np.float32)
  y, state = batched(bn)(x, state)
  params, stats = conventions.PYTORCH.init(3)
  y_ref, stats_ref = bnjax.batch_norm(
    x, params, stats, training=True, **conventions.PYTORCH.options()
  )
  np.testing.assert_allclose(y, y_ref, **SAME_FORMULA["float32"])
  mean, var = state.get(bn.batch_state_index)
  np.testing.assert_allclose(mean, stats_ref["mean"], rtol=1e-6)
  np.testing.assert_allclose(var, stats_ref["var"], rtol=1e-6)
  assert int(state.get(bn.batch_counter)) == 1
  y_eval, _ = batched(eqx.nn.inference_mode(bn))(x, state)
  y_eval_ref, _ = bnjax.batch_norm(
    x, params, stats_ref, training=False, **conventions.PYTORCH.options()
  )
  np.testing.assert_allclose(y_eval, y_eval_ref, **SAME_FORMULA["float32"])


@pytest.mark.parametrize(
  "make, error, pattern",
  [
    (
      lambda: bnjax.equinox.BatchNorm(3, "b", mode="welford"),
      ValueError,
      r"bnjax.equinox.BatchNorm: `mode` must be one of \('ema', 'batch'\)",
    ),
    (
      lambda: bnjax.equinox.BatchNorm(3, "b", mode="ema", convention=conventions.PYTORCH),
      ValueError,
      r"needs mode='batch'",
    ),
    (
      lambda: bnjax.equinox.BatchNorm(3, "b", momentum=1.5, mode="batch"),
      ValueError,
      r"`momentum` must be in \[0, 1\)",
    ),
    (
      lambda: bnjax.equinox.BatchNorm(
        3, "b", mode="batch", momentum=0.5, convention=conventions.PYTORCH
      ),
      ValueError,
      r"`momentum`=0.5 conflicts with `convention` 'torch.nn.BatchNorm'.*replace\(momentum=0.5\)",
    ),
    (
      lambda: bnjax.equinox.BatchNorm(3, "b", mode="batch", debias_initial_var=0.5),
      ValueError,
      r"`debias_initial_var` must be 1.0 or 0.0",
    ),
    (
      lambda: bnjax.equinox.BatchNorm(3, "b", mode="batch", dtype=jnp.int32),
      TypeError,
      r"`dtype` must be a floating dtype",
    ),
    (
      lambda: bnjax.equinox.BatchNorm(
        3, "b", mode="batch", convention=conventions.tf_keras(fused=False, renorm=True)
      ),
      ValueError,
      r"sets \['renorm'\], which this module does not take",
    ),
  ],
  ids=["mode", "convention-ema", "momentum", "convention-conflict", "debias", "dtype", "renorm"],
)
def test_construction_errors(make, error, pattern):
  with pytest.raises(error, match=pattern):
    make()


@pytest.mark.slow
def test_call_errors_and_the_legacy_mode_warning():
  with pytest.warns(UserWarning, match="`mode` was not given and defaults to 'ema'"):
    legacy = bnjax.equinox.BatchNorm(3, "batch")
  assert legacy.mode == "ema"
  bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(3, "batch", mode="batch")
  with pytest.raises(ValueError, match=r"`input_size`=3 channels on axis 0, got shape \(4,\)"):
    batched(bn)(np.ones((2, 4), np.float32), state)
  keras, keras_state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
    3, "batch", convention=conventions.KERAS
  )
  with pytest.raises(
    ValueError,
    match=r"features on axis -1, this module on `axis`=1.*"
    r"convention.replace\(axis=1\)`\.(\n|$)",
  ):
    batched(keras)(np.ones((2, 3, 4, 4), np.float32), keras_state)
  _y, _ = batched(keras)(np.ones((2, 3), np.float32), keras_state)  # (N, C): the same axis
  ema, ema_state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(3, "batch", mode="ema")
  with pytest.raises(TypeError, match="mode='ema' takes real input"):
    batched(ema)(np.ones((2, 3), np.complex64), ema_state)


def test_missing_equinox_says_which_extra():
  code = (
    "import sys; sys.modules['equinox'] = None\n"
    "try:\n  import bnjax.equinox\nexcept ImportError as e:\n  print(e)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
  )
  assert "bnjax.equinox needs equinox: pip install 'bnjax[equinox]'" in out.stdout, out.stderr
