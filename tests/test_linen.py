"""bnjax.linen.BatchNorm against flax.linen.BatchNorm: variables, numbers, transforms, errors.

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
from devices import device_mesh, multidevice
from flax_compare import (
  MAX_DIFF,
  assert_centred_close,
  assert_close,
  assert_trees_close,
  data,
  flat,
  flax_promotion,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tolerances import offset_atol, tolerance

import bnjax.linen


@pytest.fixture(autouse=True, scope="module")
def report_max_differences():
  """Prints the largest differences from Flax seen in this file (visible with pytest -s)."""
  MAX_DIFF.clear()
  yield
  print(f"\nbnjax.linen vs flax.linen, per dtype (max abs diff, max rel diff): {MAX_DIFF}")


def layout(tree):
  return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), tree)


# id, input shape, kwargs for both modules, input dtype, mask shape (or None)
CASES = [
  ("nhwc-axis-1", (4, 5, 5, 3), dict(axis=-1), jnp.float32, None),
  ("nchw-axis1", (4, 3, 5, 5), dict(axis=1), jnp.float32, None),
  ("tuple-axis-1-3", (4, 3, 5, 2), dict(axis=(1, 3)), jnp.float32, None),
  ("2d-momentum0.9-eps1e-3", (16, 6), dict(momentum=0.9, epsilon=1e-3), jnp.float32, None),
  ("5d-ndhwc", (2, 3, 4, 5, 3), dict(), jnp.float32, None),
  ("mask-per-example", (8, 4, 3), dict(), jnp.float32, (8, 1, 1)),
  ("mask-elementwise", (8, 4, 3), dict(), jnp.float32, (8, 4, 3)),
  ("bf16-input", (4, 5, 5, 3), dict(), jnp.bfloat16, None),
  ("bf16-input-bf16-params", (4, 5, 5, 3), dict(param_dtype=jnp.bfloat16), jnp.bfloat16, None),
  ("f32-input-bf16-output", (4, 5, 5, 3), dict(dtype=jnp.bfloat16), jnp.float32, None),
  ("no-scale", (8, 6), dict(use_scale=False), jnp.float32, None),
  ("no-bias", (8, 6), dict(use_bias=False), jnp.float32, None),
  ("no-scale-no-bias", (8, 6), dict(use_scale=False, use_bias=False), jnp.float32, None),
  (
    "custom-init",
    (8, 6),
    dict(
      scale_init=jax.nn.initializers.normal(1.0),
      bias_init=jax.nn.initializers.uniform(2.0),
    ),
    jnp.float32,
    None,
  ),
  ("param-dtype-bf16", (8, 6), dict(param_dtype=jnp.bfloat16), jnp.float32, None),
]


def make_mask(shape, seed):
  if shape is None:
    return None
  mask = np.random.default_rng(100 + seed).random(shape) < 0.6
  mask[0] = True  # every channel sees at least one element
  return mask


def run(module, x_shape, x_dtype, mask_shape, *, steps=3, variables=None, offset=100.0):
  """Init, `steps` training steps (a `lax.scan`), then evaluation, in one small jit.

  Returns (variables after init and after each step, [y of each step..., y of eval]), as lists.
  """
  xs = np.stack([data(x_shape, x_dtype, step, offset) for step in range(steps)])
  masks = None if mask_shape is None else np.stack([make_mask(mask_shape, s) for s in range(steps)])
  x_eval = data(x_shape, x_dtype, 7, offset)

  @jax.jit
  def go(variables, xs, masks, x_eval):
    if variables is None:
      variables = module.init(jax.random.key(42), xs[0], use_running_average=False)

    def train_step(variables, x_and_mask):
      x, mask = x_and_mask
      y, updates = module.apply(
        variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
      )
      variables = {**variables, **updates}
      return variables, (variables, y)

    final, (history, ys) = jax.lax.scan(train_step, variables, (xs, masks))
    return variables, history, ys, module.apply(final, x_eval, use_running_average=True)

  first, history, ys, y_eval = jax.device_get(go(variables, xs, masks, x_eval))
  unstack = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
  return (
    [first] + [unstack(history, i) for i in range(steps)],
    [ys[i] for i in range(steps)] + [y_eval],
  )


@pytest.mark.parametrize(
  "x_shape, kwargs, x_dtype, mask_shape",
  [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
@pytest.mark.slow
def test_same_variables_and_numbers_as_flax(x_shape, kwargs, x_dtype, mask_shape):
  ours_history, ours_ys = run(bnjax.linen.BatchNorm(**kwargs), x_shape, x_dtype, mask_shape)
  with flax_promotion():
    flax_history, flax_ys = run(
      fnn.BatchNorm(use_fast_variance=False, **kwargs), x_shape, x_dtype, mask_shape
    )
  assert layout(ours_history[0]) == layout(flax_history[0])
  for stage, (ours, theirs) in enumerate(zip(ours_history, flax_history)):
    assert_trees_close(ours, theirs, f"variables after {stage} training steps ")
  *train_ys, eval_y = zip(ours_ys, flax_ys)
  n = Layout(x_shape, kwargs.get("axis", -1)).reduction_size()
  for step, (ours, theirs) in enumerate(train_ys):
    assert_centred_close(ours, theirs, n, f"y at step {step}")
  assert_close(*eval_y, "y in evaluation")
  # the statistics moved, so the comparison above is not vacuous
  assert not np.allclose(flax_history[-1]["batch_stats"]["mean"], 0.0)


@pytest.mark.parametrize(
  "kwargs",
  [
    pytest.param(dict(), id="default"),
    pytest.param(dict(axis=(1, 3)), id="tuple-axis"),
    pytest.param(dict(axis=(3, 1)), id="tuple-axis-unsorted"),
    pytest.param(dict(use_scale=False, param_dtype=jnp.bfloat16), id="bf16-params-no-scale"),
  ],
)
def test_identical_variable_tree(kwargs):
  x = jax.ShapeDtypeStruct((2, 3, 4, 5), jnp.float32)
  init = lambda bn: jax.eval_shape(bn.init, jax.random.key(0), x)
  ours = init(bnjax.linen.BatchNorm(use_running_average=False, **kwargs))
  with flax_promotion():
    theirs = init(fnn.BatchNorm(use_running_average=False, **kwargs))
  assert layout(ours) == layout(theirs)


def test_init_does_not_update_statistics():
  # as Flax: the data seen by init does not move the running statistics
  variables = jax.jit(bnjax.linen.BatchNorm(use_running_average=False).init)(
    jax.random.key(0), data((4, 3))
  )
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)


def test_flax_checkpoint_loads_unchanged():
  x_shape = (8, 4, 4, 3)
  with flax_promotion():
    flax_bn = fnn.BatchNorm(use_fast_variance=False, momentum=0.8)
    (*_, checkpoint), _ = run(flax_bn, x_shape, jnp.float32, None, steps=2)
  ours_bn = bnjax.linen.BatchNorm(momentum=0.8)
  x = data(x_shape, seed=5)
  for flag in (True, False):
    with flax_promotion():
      theirs = flax_bn.apply(checkpoint, x, use_running_average=flag, mutable=["batch_stats"])
    ours = ours_bn.apply(checkpoint, x, use_running_average=flag, mutable=["batch_stats"])
    if flag:  # evaluation: the same formula, elementwise
      assert_trees_close(ours, theirs, f"use_running_average={flag} ")
      continue
    # Training: bnjax sums over a collapsed (128, 3) view, Flax over (8, 4, 4, 3). At mean 100
    # the summation order moves the mean by a few float32 ulps of 100, and y by that over the
    # std (4e-6 seen; bnjax is 1.8e-6 from float64, Flax 5.8e-6), so Flax is matched within
    # the large-offset tolerance that the float64 oracle gets.
    assert flat(ours).keys() == flat(theirs).keys()
    n = x.size // x_shape[-1]
    for key, value in flat(ours).items():
      np.testing.assert_allclose(
        value,
        flat(theirs)[key],
        rtol=0,
        err_msg=str(key),
        atol=offset_atol(
          jnp.float32, n, max_abs_output=float(np.abs(value).max()), offset_over_std=100 / 6.5
        ),
      )


def test_use_fast_variance_true_matches_flax_default():
  # near-centred data, where E[x^2] - E[x]^2 is accurate and its two codings agree
  x_shape = (8, 5, 3)
  with flax_promotion():
    flax_history, flax_ys = run(fnn.BatchNorm(), x_shape, jnp.float32, None, offset=1.0)
  ours_history, ours_ys = run(
    bnjax.linen.BatchNorm(use_fast_variance=True), x_shape, jnp.float32, None, offset=1.0
  )
  assert_trees_close(ours_history, flax_history)
  assert_trees_close(ours_ys, flax_ys)


def test_mutable_batch_stats_train_updates_and_eval_leaves_unchanged():
  bn = bnjax.linen.BatchNorm()
  x = data((8, 3))
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  _, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  assert set(updates) == {"batch_stats"}
  expected_mean = 0.01 * np.asarray(x, np.float64).mean(0)
  np.testing.assert_allclose(
    updates["batch_stats"]["mean"], expected_mean, **tolerance(jnp.float32, 8)
  )
  trained = {**variables, **updates}
  _, unchanged = bn.apply(trained, x, use_running_average=True, mutable=["batch_stats"])
  assert_trees_close(unchanged, updates)
  # evaluation needs no mutable collection
  y = bn.apply(trained, x, use_running_average=True)
  assert y.shape == x.shape


def test_traced_flag_under_jit_matches_static():
  bn = bnjax.linen.BatchNorm(momentum=0.9)
  x = data((8, 4, 3))
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  variables = {
    **variables,
    **bn.apply(
      variables, data((8, 4, 3), seed=1), use_running_average=False, mutable=["batch_stats"]
    )[1],
  }

  traces = []

  @jax.jit
  def step(variables, x, use_running_average):
    traces.append(use_running_average)
    return bn.apply(variables, x, use_running_average, mutable=["batch_stats"])

  for flag in (False, True):
    traced = step(variables, x, jnp.asarray(flag))
    static = bn.apply(variables, x, use_running_average=flag, mutable=["batch_stats"])
    assert_trees_close(traced, static, f"flag={flag} ")
  # One trace, so one compilation, served both modes. (Counted here rather than with jit's
  # private _cache_size(), which read 0 after these calls in one xdist worker's order.)
  assert len(traces) == 1


def test_traced_flag_needs_mutable_batch_stats():
  bn = bnjax.linen.BatchNorm()
  x = data((8, 3))
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(
    ValueError,
    match=r"bnjax.linen.BatchNorm: training writes .*'batch_stats'"
    r".*mutable=\['batch_stats'\]",
  ):
    jax.jit(bn.apply)(variables, x, jnp.asarray(True))


@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast-variance"])
@multidevice
def test_axis_name_under_shard_map_matches_flax(fast):
  # Flax averages the devices' means, bnjax weights them by count: equal in exact arithmetic,
  # rounded differently. Near-centred data keeps that below the float32 tolerance (at mean 100
  # it is an ulp of the mean, 7.6e-6).
  mesh = device_mesh("batch")
  x = data((16, 5, 3), seed=1, offset=3.0)
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
  variables = fnn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)

  def sharded(module):
    def step(variables, x):
      return module.apply(variables, x, mutable=["batch_stats"])

    return jax.jit(
      jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
    )

  ours = sharded(
    bnjax.linen.BatchNorm(use_running_average=False, axis_name="batch", use_fast_variance=fast)
  )(variables, x_sharded)
  with flax_promotion():
    theirs = sharded(
      fnn.BatchNorm(use_running_average=False, axis_name="batch", use_fast_variance=fast)
    )(variables, x_sharded)
  assert_trees_close(ours, theirs)
  # and both equal the single-device result over the whole batch
  whole = bnjax.linen.BatchNorm(use_running_average=False, use_fast_variance=fast).apply(
    variables, x, mutable=["batch_stats"]
  )
  assert_trees_close(ours, whole)


@multidevice
def test_axis_index_groups_under_shard_map_matches_flax():
  mesh = device_mesh("batch")
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  x = data((16, 3), seed=2, offset=3.0)  # near-centred: see the test above
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
  variables = fnn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)

  def sharded(module):
    def step(variables, x):
      y, updates = module.apply(variables, x, mutable=["batch_stats"])
      return y, jax.tree.map(lambda s: s[None], updates)  # one row of statistics per device

    return jax.jit(
      jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P("batch")), out_specs=P("batch"), check_vma=False
      )
    )

  kwargs = dict(use_running_average=False, axis_name="batch", axis_index_groups=groups)
  ours = sharded(bnjax.linen.BatchNorm(**kwargs))(variables, x_sharded)
  with flax_promotion():
    theirs = sharded(fnn.BatchNorm(use_fast_variance=False, **kwargs))(variables, x_sharded)
  assert_trees_close(ours, theirs)
  means = np.asarray(ours[1]["batch_stats"]["mean"])
  assert not np.allclose(means[0], means[4])  # the two groups did differ


def test_momentum_none_is_cumulative_average():
  bn = bnjax.linen.BatchNorm(momentum=None, epsilon=1e-3)
  batches = [data((6, 4, 3), seed=s) for s in range(3)]
  variables = bn.init(jax.random.key(0), batches[0], use_running_average=False)
  assert layout(variables["batch_stats"]) == {
    "mean": ((3,), "float32"),
    "var": ((3,), "float32"),
    "count": ((), "int32"),
  }
  assert int(variables["batch_stats"]["count"]) == 0
  for x in batches:
    _, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    variables = {**variables, **updates}
  x64 = [np.asarray(x, np.float64).reshape(-1, 3) for x in batches]
  expected_mean = np.mean([x.mean(0) for x in x64], 0)
  expected_var = np.mean([x.var(0) for x in x64], 0)
  stats = variables["batch_stats"]
  assert int(stats["count"]) == 3
  np.testing.assert_allclose(stats["mean"], expected_mean, **tolerance(jnp.float32, 24))
  np.testing.assert_allclose(stats["var"], expected_var, **tolerance(jnp.float32, 24))
  x_eval = np.asarray(data((6, 4, 3), seed=9), np.float64)
  y = bn.apply(variables, x_eval.astype(np.float32), use_running_average=True)
  y_ref = (x_eval - expected_mean) / np.sqrt(expected_var + 1e-3)
  atol = offset_atol(
    jnp.float32,
    24,
    max_abs_output=np.abs(y_ref).max(),
    offset_over_std=np.abs(x_eval).max() / np.sqrt(expected_var.min()),
  )
  np.testing.assert_allclose(y, y_ref, rtol=0, atol=atol)


def test_running_variance_unbiased():
  bn = bnjax.linen.BatchNorm(momentum=0.0, running_variance="unbiased")
  x = data((5, 3))
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  _, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_allclose(
    updates["batch_stats"]["var"],
    np.asarray(x, np.float64).var(0, ddof=1),
    **tolerance(jnp.float32, 5),
  )


def test_init_with_use_running_average_true():
  x = data((4, 5, 3))
  ours_bn = bnjax.linen.BatchNorm(use_running_average=True)
  flax_bn = fnn.BatchNorm(use_running_average=True)
  ours_vars = ours_bn.init(jax.random.key(0), x)
  with flax_promotion():
    flax_vars = flax_bn.init(jax.random.key(0), x)
    flax_y = flax_bn.apply(flax_vars, x)
  assert_trees_close(ours_vars, flax_vars)
  assert_close(ours_bn.apply(ours_vars, x), flax_y)


def test_init_ignores_axis_name_like_flax():
  # Flax does not reduce across devices during init, so no mapped axis is needed there.
  x = data((4, 3))
  variables = bnjax.linen.BatchNorm(use_running_average=False, axis_name="batch").init(
    jax.random.key(0), x
  )
  assert layout(variables["batch_stats"]) == {"mean": ((3,), "float32"), "var": ((3,), "float32")}


def test_errors_surface():
  x = data((4, 3))
  variables = bnjax.linen.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(
    TypeError, match=r"bnjax\.linen\.BatchNorm: `x` must have a floating or complex"
  ):
    bnjax.linen.BatchNorm().apply(variables, jnp.ones((4, 3), jnp.int32), use_running_average=True)
  with pytest.raises(ValueError, match=r"bnjax\.linen\.BatchNorm: `axis`=5 is out of range"):
    bnjax.linen.BatchNorm(axis=5).init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(ValueError, match=r"`use_fast_variance=True` means variance='fast'"):
    bnjax.linen.BatchNorm(use_fast_variance=True, variance="shifted").init(
      jax.random.key(0), x, use_running_average=False
    )
  with pytest.raises(ValueError, match=r"bnjax\.batch_norm: `variance` must be one of"):
    bnjax.linen.BatchNorm(variance="welford").init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(TypeError, match=r"`use_running_average` must be a Python bool or a boolean"):
    bnjax.linen.BatchNorm().apply(variables, x, use_running_average=jnp.ones(()))
  with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\)"):
    bnjax.linen.BatchNorm(momentum=1.5).init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(ValueError, match="passed to the constructor and at call time"):
    bnjax.linen.BatchNorm(use_running_average=True).apply(variables, x, use_running_average=True)


def test_docstring_example_runs():
  result = doctest.testmod(bnjax.linen, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


TF_FEATURES = {
  "renorm": dict(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5}, renorm_momentum=0.9),
  "virtual-batches": dict(virtual_batch_size=2),
  "zero-debias": dict(zero_debias="mean_and_var"),
  "adjustment": dict(
    adjustment=lambda shape: (jnp.full(shape[-1:], 1.5), jnp.full(shape[-1:], 0.1))
  ),
}


@pytest.mark.parametrize("options", TF_FEATURES.values(), ids=TF_FEATURES.keys())
def test_tf_features_are_wired_to_the_pure_function(options):
  # The numbers themselves are checked against TensorFlow in test_tf_features_live.py; here:
  # the module keeps the extra statistics bnjax.init lays out and threads every option.
  bn = bnjax.linen.BatchNorm(momentum=0.9, **options)
  x = data((8, 3), offset=2.0)
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  params, stats = bnjax.init(
    3, renorm=options.get("renorm", False), track_count="zero_debias" in options
  )
  assert layout(variables["batch_stats"]) == layout(stats)
  for step in range(2):
    x_step = data((8, 3), seed=step, offset=2.0)
    y, updates = bn.apply(variables, x_step, use_running_average=False, mutable=["batch_stats"])
    variables = {**variables, **updates}
    y_ref, stats = bnjax.batch_norm(x_step, params, stats, training=True, momentum=0.9, **options)
    assert_close(y, y_ref, f"step {step} ")
    assert_trees_close(variables["batch_stats"], stats, f"step {step} ")


@pytest.mark.slow
def test_backward_option_reaches_batch_norm():
  # backward='autodiff' allows forward mode through the module; the default closed form refuses it.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
  for backward, works in (("autodiff", True), ("closed_form", False)):
    model = bnjax.linen.BatchNorm(use_running_average=False, backward=backward)
    variables = model.init(jax.random.PRNGKey(0), x)

    def f(x, model=model, variables=variables):
      return model.apply(variables, x, mutable=["batch_stats"])[0]

    if works:
      _, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
      np.testing.assert_allclose(tangent, 0.0, atol=1e-5)  # a shift is normalized away
    else:
      with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (x,), (jnp.ones_like(x),))


def test_a_tf1_frozen_preset_normalizes_with_batch_statistics_and_keeps_the_running_ones():
  # tf.compat.v1.layers with trainable=False: its preset passes update_stats=False.
  options = bnjax.conventions.tf_v1_layers(fused=True, trainable=False).options()
  assert options["update_stats"] is False
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)) * 3 + 2, jnp.float32)
  model = bnjax.linen.BatchNorm(use_running_average=False, **options)
  variables = model.init(jax.random.PRNGKey(0), x)
  y, updates = model.apply(variables, x, mutable=["batch_stats"])
  expected, _ = bnjax.batch_norm(
    x, variables["params"], variables["batch_stats"], training=True, **options
  )
  np.testing.assert_array_equal(y, expected)
  for key in ("mean", "var"):
    np.testing.assert_array_equal(updates["batch_stats"][key], variables["batch_stats"][key])
  with pytest.raises(TypeError, match=r"`update_stats` must be a Python bool"):
    bnjax.linen.BatchNorm(use_running_average=False, update_stats="no").init(
      jax.random.PRNGKey(0), x
    )
