"""TensorFlow's training-only features, live: renorm, virtual batches, adjustment, zero-debias.

Each test runs the real tf_keras / Keras 3 layer (or TF's moving-average op) and bnjax side by
side over several training steps, then in inference: outputs, gradients (through
tf.GradientTape with a given dy) and every running statistic after every step.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close, tf_zero_debias_rtol

import bnjax

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")

pytestmark = [
  pytest.mark.live,
  # TensorFlow and Keras warn about their own deprecations on import and first use.
  pytest.mark.filterwarnings("ignore::DeprecationWarning"),
  pytest.mark.filterwarnings("ignore::FutureWarning"),
  pytest.mark.filterwarnings("ignore::UserWarning:keras.*"),
  pytest.mark.usefixtures("standard_promotion"),
]

STEPS = 3
C = 3
STAT_NAMES = {  # bnjax key -> Keras weight name
  "mean": "moving_mean",
  "var": "moving_variance",
  "stddev": "moving_stddev",
  "renorm_mean": "renorm_mean",
  "renorm_stddev": "renorm_stddev",
}


def _batches(shape, seed=0):
  """Batches whose mean and spread drift from step to step, so r and d move and clip."""
  rng = np.random.default_rng(seed)
  return [
    (rng.normal(size=shape) * (1.0 + 0.6 * t) + 0.8 * t - 0.3).astype(np.float32)
    for t in range(STEPS)
  ]


def _keras_weights(layer):
  return {w.name.split("/")[-1].split(":")[0]: w for w in layer.weights}


def _run_keras(layer, batches, dys, *, params):
  """Trains `layer` on the batches; returns per-step (y, dx, dgamma, dbeta, stats) and eval y."""
  layer.build(batches[0].shape)
  weights = _keras_weights(layer)
  # With virtual batches tf_keras keeps its weights as (1, ..., 1, C); bnjax's are (C,).
  weights["gamma"].assign(np.reshape(params["scale"], weights["gamma"].shape))
  weights["beta"].assign(np.reshape(params["bias"], weights["beta"].shape))
  steps = []
  for x, dy in zip(batches, dys):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=True)
    dx, dgamma, dbeta = tape.gradient(
      y, [x, weights["gamma"], weights["beta"]], output_gradients=dy
    )
    stats = {k: weights[v].numpy().reshape(-1) for k, v in STAT_NAMES.items() if v in weights}
    steps.append(
      (y.numpy(), dx.numpy(), dgamma.numpy().reshape(-1), dbeta.numpy().reshape(-1), stats)
    )
  return steps, layer(tf.constant(batches[-1] * 0.5 + 1.0), training=False).numpy()


def _run_bnjax(batches, dys, *, params, stats, **options):
  def step(x, params, stats, dy):
    (y, new_stats), pull = jax.vjp(
      lambda x, p: bnjax.batch_norm(x, p, stats, training=True, **options), x, params
    )
    dx, dparams = pull((dy, jax.tree.map(jnp.zeros_like, new_stats)))
    return y, dx, dparams["scale"], dparams["bias"], new_stats

  steps = []
  for x, dy in zip(batches, dys):
    y, dx, dscale, dbias, stats = step(jnp.asarray(x), params, stats, jnp.asarray(dy))
    steps.append((y, dx, dscale, dbias, stats))
  y_eval, _ = bnjax.batch_norm(
    jnp.asarray(batches[-1] * 0.5 + 1.0),
    params,
    stats,
    training=False,
    epsilon=options.get("epsilon", 1e-5),
  )
  return steps, y_eval


def _compare(ours, theirs, n):
  (steps, y_eval), (ref_steps, ref_eval) = ours, theirs
  for t, (step, ref) in enumerate(zip(steps, ref_steps)):
    for what, a, b in zip(("y", "dx", "dscale", "dbias"), step[:4], ref[:4]):
      assert_close(a, b, jnp.float32, n, f"step {t}: {what}")
    for key, value in ref[4].items():
      assert_close(step[4][key], value, jnp.float32, n, f"step {t}: stats[{key!r}]")
  assert_close(y_eval, ref_eval, jnp.float32, n, "inference")


def _params(seed=1):
  rng = np.random.default_rng(seed)
  return {
    "scale": rng.uniform(0.5, 1.5, C).astype(np.float32),
    "bias": rng.normal(size=C).astype(np.float32),
  }


RENORM = dict(
  renorm=True,
  renorm_clipping={"rmax": 1.4, "rmin": 0.8, "dmax": 0.6},
  renorm_momentum=0.7,
  momentum=0.8,
  epsilon=1e-3,
)


@pytest.mark.parametrize("keras_flavour", ["tf_keras", "keras3"])
def test_renorm_matches_keras(keras_flavour):
  shape = (8, 4, 4, C)
  batches, dys = _batches(shape), _batches(shape, seed=5)
  params = _params()
  module = tf_keras if keras_flavour == "tf_keras" else tf.keras
  layer = module.layers.BatchNormalization(**RENORM)
  theirs = _run_keras(layer, batches, dys, params=params)
  _, stats = bnjax.init(C, renorm=True)
  ours = _run_bnjax(batches, dys, params=jax.tree.map(jnp.asarray, params), stats=stats, **RENORM)
  _compare(ours, theirs, 8 * 4 * 4)
  # The clipping bit: r or d sat at a bound in some step (else the test would not cover it).
  r_values = [s[4]["renorm_stddev"] for s in theirs[0]]
  assert not np.allclose(r_values[0], r_values[-1])


@pytest.mark.parametrize("layout", ["nhwc", "dense"])
def test_virtual_batches_match_tf_keras(layout):
  shape = (16, 3, 2, C) if layout == "nhwc" else (16, C)
  batches, dys = _batches(shape), _batches(shape, seed=6)
  params = _params()
  options = dict(virtual_batch_size=4, momentum=0.8, epsilon=1e-3)
  layer = tf_keras.layers.BatchNormalization(fused=False, **options)
  theirs = _run_keras(layer, batches, dys, params=params)
  _, stats = bnjax.init(C)
  ours = _run_bnjax(batches, dys, params=jax.tree.map(jnp.asarray, params), stats=stats, **options)
  _compare(ours, theirs, 4 * int(np.prod(shape[1:-1])))


def test_virtual_batches_group_examples_with_a_stride():
  # tf_keras reshapes (N, ...) to (size, N // size, ...): example i joins group i % (N // size).
  x = np.zeros((8, 1), np.float32)
  x[0::2] = 10.0  # examples 0, 2, 4, 6 form group 0 when size=4
  y, _ = bnjax.batch_norm(jnp.asarray(x), {}, bnjax.init(1)[1], training=True, virtual_batch_size=4)
  np.testing.assert_array_equal(y, 0.0)  # each group is constant


def test_adjustment_and_renorm_compose_like_tf_keras():
  shape = (12, 2, 2, C)
  batches, dys = _batches(shape), _batches(shape, seed=7)
  params = _params()
  # Per-example adjustment, as in tf_keras's docstring example: shape (N, 1, 1, C).
  adj_scale = (1.0 + 0.02 * np.arange(12 * C)).reshape(12, 1, 1, C).astype(np.float32)
  adj_bias = (0.05 * np.arange(C) - 0.1).reshape(1, 1, 1, C).astype(np.float32)
  shapes_seen = []

  def tf_adjustment(shape):
    shapes_seen.append(tuple(int(d) for d in shape))
    return tf.constant(adj_scale), tf.constant(adj_bias)

  layer = tf_keras.layers.BatchNormalization(fused=False, adjustment=tf_adjustment, **RENORM)
  theirs = _run_keras(layer, batches, dys, params=params)
  _, stats = bnjax.init(C, renorm=True)
  jax_shapes = []

  def jax_adjustment(shape):
    jax_shapes.append(shape)
    return adj_scale, adj_bias

  ours = _run_bnjax(
    batches,
    dys,
    params=jax.tree.map(jnp.asarray, params),
    stats=stats,
    adjustment=jax_adjustment,
    **RENORM,
  )
  assert jax_shapes[0] == shapes_seen[0] == shape
  _compare(ours, theirs, 12 * 2 * 2)


def test_renorm_with_virtual_batches_matches_tf_keras():
  shape = (12, 2, 2, C)
  batches, dys = _batches(shape), _batches(shape, seed=8)
  params = _params()
  options = dict(RENORM, virtual_batch_size=3)
  layer = tf_keras.layers.BatchNormalization(fused=False, **options)
  theirs = _run_keras(layer, batches, dys, params=params)
  _, stats = bnjax.init(C, renorm=True)
  ours = _run_bnjax(batches, dys, params=jax.tree.map(jnp.asarray, params), stats=stats, **options)
  _compare(ours, theirs, 3 * 2 * 2)


@pytest.mark.parametrize("momentum", [0.9, 0.999])
def test_zero_debias_matches_tf_assign_moving_average(momentum):
  # tf.contrib's zero_debias_moving_mean used moving_averages.assign_moving_average(
  # zero_debias=True), which needs graph mode for its hidden accumulator and step.
  from tensorflow.python.training import moving_averages

  batches = _batches((6, 5, C), seed=3)
  graph = tf.Graph()
  with graph.as_default():
    with tf.compat.v1.variable_scope("bn"):
      var = tf.compat.v1.get_variable(
        "mean", initializer=np.zeros(C, np.float32), use_resource=True
      )
      batch = tf.compat.v1.placeholder(tf.float32, (6, 5, C))
      mean, _ = tf.nn.moments(batch, axes=[0, 1])
      update = moving_averages.assign_moving_average(var, mean, momentum, zero_debias=True)
    with tf.compat.v1.Session(graph=graph) as session:
      session.run(tf.compat.v1.global_variables_initializer())
      expected = [session.run(update, {batch: x}) for x in batches]
  _, stats = bnjax.init(C, track_count=True)
  exact = np.zeros(C)
  for t, x in enumerate(batches):
    _, stats = bnjax.batch_norm(
      jnp.asarray(x), {}, stats, training=True, momentum=momentum, zero_debias="mean"
    )
    np.testing.assert_array_equal(stats["count"], t + 1)
    # float64: the EMA from 0, divided by 1 - m^(t+1)
    exact = momentum * exact + (1 - momentum) * np.asarray(x, np.float64).mean((0, 1))
    assert_close(stats["mean"], exact / (1 - momentum ** (t + 1)), jnp.float32, 30, f"step {t}")
    np.testing.assert_allclose(
      stats["mean"],
      expected[t],
      err_msg=f"TF, step {t}",
      rtol=tf_zero_debias_rtol(momentum, t + 1),
      atol=tf_zero_debias_rtol(momentum, t + 1) * np.abs(exact).max(),
    )
  # The variance is a plain EMA from 1 with 'mean'; 'mean_and_var' debiases it too.
  first = jnp.asarray(batches[0])
  _, fresh = bnjax.init(C, track_count=True)
  _, debiased = bnjax.batch_norm(
    first, {}, fresh, training=True, momentum=momentum, zero_debias="mean_and_var"
  )
  assert_close(debiased["var"], np.asarray(first, np.float64).var((0, 1)), jnp.float32, 30)
