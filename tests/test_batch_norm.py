"""batch_norm against the float64 oracle over layouts, modes and options, eager and jitted."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import LAYOUTS, random_inputs
from oracle import batch_norm as oracle_batch_norm
from tolerances import assert_close, tolerance

import bnjax
from bnjax import _normalize


def _check(layout, *, training, options, mask=None, jit=False, steps=3):
  x, params, stats = random_inputs(layout)
  if options.get("momentum", 0.99) is None or options.get("zero_debias"):
    stats["count"] = jnp.zeros((), jnp.int32)
  if options.get("renorm"):  # start away from bnjax.init's values, so r and d are not 1, 0
    stats["renorm_mean"], stats["renorm_stddev"] = stats["mean"] * 0.5, stats["var"] + 0.5
    stats["stddev"] = jnp.sqrt(stats["var"] + 0.3)
  run = lambda x, stats: bnjax.batch_norm(
    x, params, stats, training=training, axis=layout.axis, mask=mask, **options
  )
  run = jax.jit(run) if jit else run
  expected_stats = {k: np.asarray(v) for k, v in stats.items()}
  n = layout.reduction_size()
  for step in range(steps):
    x_step = x + step  # the statistics change from step to step
    y, stats = run(x_step, stats)
    y_ref, expected_stats = oracle_batch_norm(
      np.asarray(x_step),
      params,
      expected_stats,
      training=training,
      axis=layout.axis,
      mask=mask,
      **options,
    )
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y_ref, jnp.float32, n, f"y at step {step}")
    assert set(stats) == set(expected_stats)
    for key in stats:
      assert stats[key].dtype == expected_stats[key].dtype or key != "count"
      assert_close(stats[key], expected_stats[key], jnp.float32, n, f"stats[{key}] at step {step}")


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.slow
def test_layouts(layout, training, jit):
  _check(layout, training=training, options={"momentum": 0.9}, jit=jit)


OPTIONS = {
  "unbiased": {"running_variance": "unbiased", "momentum": 0.8},
  "cumulative": {"momentum": None},
  "cumulative-unbiased": {"momentum": None, "running_variance": "unbiased"},
  "momentum-0": {"momentum": 0.0},
  "no-update": {"update_stats": False},
  "epsilon-0.1": {"epsilon": 0.1},
  "shifted": {"variance": "shifted"},
  "fast": {"variance": "fast"},
  "renorm": {
    "renorm": True,
    "renorm_clipping": {"rmin": 0.9, "rmax": 1.1, "dmax": 0.2},
    "renorm_momentum": 0.5,
    "momentum": 0.7,
  },
  "renorm-unclipped-unbiased": {"renorm": True, "running_variance": "unbiased"},
  "virtual-batches": {"virtual_batch_size": 2, "momentum": 0.8},
  "virtual-batches-renorm-unbiased": {
    "virtual_batch_size": 2,
    "renorm": True,
    "running_variance": "unbiased",
  },
  "adjustment": {
    "adjustment": lambda shape: (
      np.linspace(0.5, 2.0, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1)),
      np.float32(0.25),
    )
  },
  "zero-debias-mean": {"zero_debias": "mean", "momentum": 0.9},
  "zero-debias-mean-and-var": {"zero_debias": "mean_and_var", "momentum": 0.999},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("layout", [LAYOUTS["nhwc"], LAYOUTS["nchw"]], ids=["nhwc", "nchw"])
@pytest.mark.slow
def test_options(layout, options):
  _check(layout, training=True, options=options)


MASKS = {
  "per-example": lambda shape: (
    np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1)) % 3 != 1
  ),
  "elementwise": lambda shape: np.random.default_rng(1).uniform(size=shape) < 0.6,
  "one-channel-empty": lambda shape: np.broadcast_to(np.arange(shape[-1]) != 0, shape),
}


@pytest.mark.parametrize("make_mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("variance", ["two_pass", "shifted", "fast"])
def test_masks(make_mask, variance):
  layout = LAYOUTS["nhwc"]
  mask = make_mask(layout.shape)
  _check(
    layout, training=True, options={"momentum": 0.9, "variance": variance}, mask=jnp.asarray(mask)
  )


def test_training_false_returns_stats_unchanged():
  x, params, stats = random_inputs(LAYOUTS["nhwc"])
  _, new_stats = bnjax.batch_norm(x, params, stats, training=False)
  assert new_stats.keys() == stats.keys()
  for key in stats:
    np.testing.assert_array_equal(new_stats[key], stats[key])


def test_update_stats_false_normalizes_with_batch_statistics():
  # The TF1 `tf.layers` trainable=False case: batch statistics, running statistics untouched.
  x, params, stats = random_inputs(LAYOUTS["nhwc"])
  y, new_stats = bnjax.batch_norm(x, params, stats, training=True, update_stats=False)
  y_updating, _ = bnjax.batch_norm(x, params, stats, training=True)
  np.testing.assert_array_equal(y, y_updating)
  for key in stats:
    np.testing.assert_array_equal(new_stats[key], stats[key])


@pytest.mark.parametrize("drop", ["scale", "bias", "both"])
def test_missing_params_mean_one_and_zero(drop):
  x, params, stats = random_inputs(LAYOUTS["nhwc"])
  kept = {k: v for k, v in params.items() if drop not in (k, "both")}
  full = {"scale": jnp.ones(3), "bias": jnp.zeros(3)} | kept
  y, _ = bnjax.batch_norm(x, kept, stats, training=True)
  y_full, _ = bnjax.batch_norm(x, full, stats, training=True)
  np.testing.assert_array_equal(y, y_full)


def test_init_layout_matches_flax_names():
  params, stats = bnjax.init(7)
  assert jax.tree.map(lambda v: (v.shape, v.dtype.name), (params, stats)) == (
    {"scale": ((7,), "float32"), "bias": ((7,), "float32")},
    {"mean": ((7,), "float32"), "var": ((7,), "float32")},
  )
  np.testing.assert_array_equal(params["scale"], 1)
  np.testing.assert_array_equal(params["bias"], 0)
  np.testing.assert_array_equal(stats["mean"], 0)
  np.testing.assert_array_equal(stats["var"], 1)


def test_init_options():
  params, stats = bnjax.init((3, 4), use_scale=False, dtype=jnp.bfloat16, track_count=True)
  assert set(params) == {"bias"} and params["bias"].shape == (3, 4)
  assert params["bias"].dtype == jnp.bfloat16
  assert stats["mean"].dtype == jnp.float32  # running statistics stay in float32
  assert stats["count"].shape == () and stats["count"].dtype == jnp.int32
  assert bnjax.init(2, use_scale=False, use_bias=False)[0] == {}


def test_moments_match_oracle():
  x, _, _ = random_inputs(LAYOUTS["nchw"])
  mean, var = bnjax.moments(x, (0, 2, 3))
  x64 = np.asarray(x, np.float64)
  assert mean.shape == (3,)
  assert_close(mean, x64.mean((0, 2, 3)), jnp.float32, 4 * 5 * 6)
  assert_close(var, x64.var((0, 2, 3)), jnp.float32, 4 * 5 * 6)


def test_moments_all_axes_and_mask():
  x = jnp.asarray(np.arange(12.0).reshape(3, 4), jnp.float32)
  mean, var = bnjax.moments(x, (0, 1), mask=x < 6)
  assert mean.shape == ()
  np.testing.assert_allclose(
    [mean, var], [2.5, np.var(np.arange(6.0))], **tolerance(jnp.float32, 12)
  )


@pytest.mark.parametrize(
  "shape, axes, collapsed, collapsed_axes",
  [
    ((8, 6, 6, 16), (0, 1, 2), (288, 16), (0,)),  # NHWC
    ((8, 16, 6, 6), (0, 2, 3), (8, 16, 36), (0, 2)),  # NCHW
    ((32, 64), (0,), (32, 64), (0,)),  # dense: unchanged
    ((4, 2, 8, 6, 6, 16), (0, 2, 3, 4), (4, 2, 288, 16), (0, 2)),  # virtual batches
    ((5, 7, 3), (1,), (5, 7, 3), (1,)),  # features on both sides
    ((5, 7, 3), (0, 2), (5, 7, 3), (0, 2)),
  ],
)
def test_collapsed_view_merges_adjacent_axes_of_one_kind(shape, axes, collapsed, collapsed_axes):
  view = _normalize._CollapsedView.of(shape, axes)
  assert (view.shape, view.axes) == (collapsed, collapsed_axes)
  assert view.moments_shape == tuple(1 if a in axes else n for a, n in enumerate(shape))
  # A per-channel value lands on the view's kept axes, in order.
  channels = np.arange(math.prod(view.moments_shape), dtype=np.float32)
  on_view = view.per_channel(channels.reshape(view.moments_shape))
  np.testing.assert_array_equal(np.asarray(on_view).ravel(), channels)
  assert on_view.shape == tuple(1 if a in view.axes else n for a, n in enumerate(view.shape))
