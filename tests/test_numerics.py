"""Numerically hard input: large offsets, constant channels, one sample, half and double."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import LAYOUTS, random_inputs
from oracle import batch_norm as oracle_batch_norm
from tolerances import LARGE_OFFSET_VARIANCE_RTOL, assert_close

import bnjax
import bnjax.diagnostics

ACCURATE = ["two_pass", "shifted"]


@pytest.fixture(scope="module")
def large_offset():
  """x = 1e4 + N(0, 1) in float32, shape (64, 28, 28, 64): the issue's accuracy case."""
  x = 1e4 + jax.random.normal(jax.random.key(0), (64, 28, 28, 64), jnp.float32)
  return x, np.asarray(x, np.float64).var((0, 1, 2))


@pytest.mark.parametrize("variance", ACCURATE)
@pytest.mark.slow
def test_large_offset_variance_is_accurate(large_offset, variance):
  x, exact_var = large_offset
  params, stats = bnjax.init(64)
  _, var = bnjax.moments(x, (0, 1, 2), variance=variance)
  assert np.max(np.abs(var - exact_var) / exact_var) <= LARGE_OFFSET_VARIANCE_RTOL
  y, new_stats = jax.jit(
    lambda x: bnjax.batch_norm(x, params, stats, training=True, variance=variance)
  )(x)
  assert bool(jnp.all(jnp.isfinite(y)))
  # The normalized output has unit variance per channel, not the 316x of a cancelled variance.
  np.testing.assert_allclose(np.asarray(y, np.float64).std((0, 1, 2)), 1.0, rtol=1e-3)
  expected_running = 0.99 * 1.0 + 0.01 * exact_var
  np.testing.assert_allclose(new_stats["var"], expected_running, rtol=LARGE_OFFSET_VARIANCE_RTOL)


def test_fast_variance_limits_are_as_documented(large_offset):
  # 'fast' is E[x^2] - E[x]^2: exact for centered data, useless at mean/std ~ 1e4 in float32,
  # and never negative thanks to the clamp.
  x, exact_var = large_offset
  _, var = bnjax.moments(x, (0, 1, 2), variance="fast")
  assert bool(jnp.all(var >= 0))
  assert np.max(np.abs(var - exact_var) / exact_var) > 0.1
  centered = x - 1e4
  _, var_centered = bnjax.moments(centered, (0, 1, 2), variance="fast")
  exact_centered = np.asarray(centered, np.float64).var((0, 1, 2))
  np.testing.assert_allclose(var_centered, exact_centered, rtol=1e-4)


@pytest.mark.parametrize("variance", ["two_pass", "shifted", "fast"])
@pytest.mark.parametrize("value", [0.0, 3.0, 1e4])
@pytest.mark.slow
def test_constant_channel_gives_bias(variance, value):
  x = jnp.full((8, 4, 4, 2), value, jnp.float32)
  params = {"scale": jnp.asarray([2.0, 3.0]), "bias": jnp.asarray([-1.0, 5.0])}
  _, stats = bnjax.init(2)
  y, new_stats = bnjax.batch_norm(x, params, stats, training=True, variance=variance)
  mean, var = bnjax.moments(x, (0, 1, 2), variance=variance)
  np.testing.assert_array_equal(var, 0.0)
  np.testing.assert_array_equal(mean, value)
  np.testing.assert_array_equal(y, jnp.broadcast_to(params["bias"], x.shape))
  assert bool(jnp.all(new_stats["var"] >= 0))


@pytest.mark.parametrize("running_variance", ["biased", "unbiased"])
def test_single_element_per_channel(running_variance):
  # One element per channel: variance 0, y = bias, silently (Flax and Equinox do not warn;
  # bnjax.diagnostics.check_batch reports it). The unbiased estimate n/(n-1) is undefined at
  # n=1; bnjax uses n/max(n-1, 1) like TF's fused kernel.
  x = jnp.asarray([[1.0, -2.0, 7.0]])
  params = {"bias": jnp.asarray([0.5, 0.0, -0.5])}
  _, stats = bnjax.init(3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    y, new_stats = bnjax.batch_norm(
      x, params, stats, training=True, momentum=0.9, running_variance=running_variance
    )
  np.testing.assert_array_equal(y, params["bias"][None])
  np.testing.assert_allclose(new_stats["mean"], 0.1 * x[0], rtol=1e-6)
  np.testing.assert_allclose(new_stats["var"], 0.9, rtol=1e-6)
  (problem,) = bnjax.diagnostics.check_batch(x.shape)
  assert problem.check == "batch" and "one element per channel" in problem.message


@pytest.mark.parametrize(
  "shape, options, expected",
  [
    ((1, 3), {}, 1),
    ((2, 3), {}, 0),
    ((1, 3), {"devices": 2}, 0),
    ((1, 4, 4, 3), {}, 0),
    ((3, 1), {"axis": 0}, 1),
    ((3, 2), {"axis": 0}, 0),
    ((1, 3, 1, 1), {"axis": 1}, 1),
    ((8, 3), {"virtual_batch_size": 1}, 1),
    ((8, 3), {"virtual_batch_size": 2}, 0),
    ((5,), {}, 1),
  ],
)
def test_check_batch_finds_one_element_per_channel(shape, options, expected):
  assert len(bnjax.diagnostics.check_batch(shape, **options)) == expected


def test_channel_with_no_valid_element_keeps_running_stats():
  x, params, stats = random_inputs(LAYOUTS["nhwc"])
  mask = jnp.broadcast_to(jnp.arange(3) != 1, x.shape)
  y, new_stats = bnjax.batch_norm(x, params, stats, training=True, mask=mask)
  assert bool(jnp.all(jnp.isfinite(y)))
  for key in ("mean", "var"):
    assert new_stats[key][1] == stats[key][1]
    assert bool(jnp.all(new_stats[key][::2] != stats[key][::2]))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_precision(dtype, training):
  # Statistics and running statistics in float32; the output in the input's dtype.
  layout = LAYOUTS["nhwc"]
  x, params, stats = random_inputs(layout, dtype=dtype, offset=100.0)
  y, new_stats = bnjax.batch_norm(x, params, stats, training=training, momentum=0.9)
  assert y.dtype == dtype
  assert all(new_stats[k].dtype == jnp.float32 for k in ("mean", "var"))
  y_ref, stats_ref = oracle_batch_norm(
    np.asarray(x.astype(jnp.float32)), params, stats, training=training, momentum=0.9
  )
  assert_close(y, y_ref, dtype, what="y")
  for key in ("mean", "var"):
    assert_close(new_stats[key], stats_ref[key], jnp.float32, layout.reduction_size(), key)
  mean, var = bnjax.moments(x, (0, 1, 2))
  assert mean.dtype == var.dtype == jnp.float32


def test_output_dtype_option():
  x, params, stats = random_inputs(LAYOUTS["nhwc"], dtype=jnp.bfloat16)
  y, _ = bnjax.batch_norm(x, params, stats, training=True, dtype=jnp.float32)
  y_bf16, _ = bnjax.batch_norm(x, params, stats, training=True)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(y.astype(jnp.bfloat16), y_bf16)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float64(training):
  layout = LAYOUTS["nchw"]
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=layout.shape) + 3.0, jnp.float64)
  params, stats = bnjax.init(3, dtype=jnp.float64)
  assert stats["mean"].dtype == jnp.float64
  y, new_stats = bnjax.batch_norm(x, params, stats, training=training, axis=1)
  assert y.dtype == jnp.float64 and new_stats["var"].dtype == jnp.float64
  y_ref, stats_ref = oracle_batch_norm(np.asarray(x), params, stats, training=training, axis=1)
  assert_close(y, y_ref, jnp.float64, layout.reduction_size())
  assert_close(new_stats["var"], stats_ref["var"], jnp.float64, layout.reduction_size())


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize(
  "x_dtype, stats_dtype",
  [(jnp.float64, jnp.float32)],
  ids=["f64-x-f32-stats"],
)
def test_running_stats_keep_their_dtype(x_dtype, stats_dtype):
  # Regression: the update mixed dtypes in jnp.where, which strict promotion rejects.
  x, params, stats = random_inputs(LAYOUTS["dense"], dtype=x_dtype)
  stats = {k: v.astype(stats_dtype) for k, v in stats.items()}
  _, new_stats = bnjax.batch_norm(x, params, stats, training=True, momentum=0.5)
  _, expected = oracle_batch_norm(np.asarray(x), params, stats, training=True, momentum=0.5)
  for key in ("mean", "var"):
    assert new_stats[key].dtype == stats_dtype
    assert_close(new_stats[key], expected[key].astype(stats_dtype), stats_dtype, what=key)


@pytest.mark.parametrize(
  "case",
  ["outlier-first-element", "outlier-first-example", "outlier-first-row", "offset-1e4-small-batch"],
)
def test_shifted_variance_is_accurate_even_when_the_leading_part_is_an_outlier(case):
  # 'shifted' sums about the mean of the leading 1/64 of the first reduced axis. Whatever that
  # part holds, its mean is within sqrt(63) standard deviations of the batch mean, so the
  # cancellation stays within ~64 float32 ulps: the adversarial layouts below are as accurate
  # as ordinary data, where a shift by the first element alone lost everything.
  rng = np.random.default_rng(3)
  if case == "outlier-first-element":  # one far pixel, the very first: K = x[0] lost 1e-4
    x = 1e4 + rng.normal(size=(32, 8, 8, 16))
    x[0, 0, 0] += 1e3
    axes = (0, 1, 2)
  elif case == "outlier-first-example":  # NHWC, the first image far from the rest
    x = 1e4 + rng.normal(size=(32, 8, 8, 16))
    x[0] += 1e6
    axes = (0, 1, 2)
  elif case == "outlier-first-row":  # dense, (4096, C): the leading part is 64 rows
    x = rng.normal(size=(4096, 16)) * 1e-2 + 5e3
    x[:64] = -5e3
    axes = (0,)
  else:  # two examples: the leading part is the first of them
    x = 1e4 + rng.normal(size=(2, 16, 16, 8))
    axes = (0, 1, 2)
  x32 = jnp.asarray(x, jnp.float32)
  exact = np.asarray(x32, np.float64).var(axes)
  _, var = bnjax.moments(x32, axes, variance="shifted")
  assert np.max(np.abs(np.asarray(var, np.float64) - exact) / exact) <= LARGE_OFFSET_VARIANCE_RTOL


@pytest.mark.parametrize(
  "backend, algorithm", [("cpu", "two_pass"), ("gpu", "shifted"), ("tpu", "shifted")]
)
def test_auto_variance_is_two_pass_on_cpu_and_shifted_on_accelerators(
  monkeypatch, backend, algorithm
):
  x, params, stats = random_inputs(LAYOUTS["nhwc"], offset=300.0)
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  auto = bnjax.batch_norm(x, params, stats, training=True)
  explicit = bnjax.batch_norm(x, params, stats, training=True, variance=algorithm)
  for got, want in zip(jax.tree.leaves(auto), jax.tree.leaves(explicit)):
    np.testing.assert_array_equal(got, want)
  assert bnjax._stats.resolve_variance("auto") == algorithm
