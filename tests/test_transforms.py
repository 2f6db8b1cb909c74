"""One matrix of transforms (eager, jit, vmap, shard_map, pmap, vmap with an axis name) over the
same cases, plus the multi-device contract: count-weighted, one collective, none in eval."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import LAYOUTS, random_inputs
from devices import DEVICES, device_mesh, multidevice
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from oracle import batch_norm as oracle_batch_norm
from tolerances import assert_close

import bnjax

LAYOUT = LAYOUTS["nhwc"]._replace(shape=(16, 5, 6, 3))
N = LAYOUT.reduction_size()


def _global_case(seed=0):
  x, params, stats = random_inputs(LAYOUT, seed=seed)
  # Per-example mask leaving devices 0..7 with 2, 1, 0, 2, 1, 1, 2, 2 valid examples.
  valid = np.array([1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1], bool)
  return x, params, stats, jnp.asarray(valid.reshape(16, 1, 1, 1))


def _on_mesh(*arrays, spec=P("d")):
  return [jax.device_put(a, NamedSharding(device_mesh(), spec)) for a in arrays]


def _synced(transform, x, params, stats, mask, **options):
  """Runs batch_norm with axis_name='d' over 8 shards of x (and mask) under `transform`."""

  def step(x, mask):
    return bnjax.batch_norm(x, params, stats, training=True, mask=mask, axis_name="d", **options)

  if transform == "shard_map":
    fn = jax.shard_map(step, mesh=device_mesh(), in_specs=(P("d"), P("d")), out_specs=(P("d"), P()))
    y, new_stats = jax.jit(fn)(*_on_mesh(x, mask))
    return np.asarray(y), new_stats
  split = lambda a: a.reshape((DEVICES, -1, *a.shape[1:]))
  mapped = {
    "pmap": functools.partial(jax.pmap, axis_name="d"),
    "vmap": functools.partial(jax.vmap, axis_name="d"),
  }[transform]
  y, new_stats = mapped(step)(split(x), split(mask))
  for key in new_stats:  # every device holds the same statistics
    np.testing.assert_array_equal(
      new_stats[key], jnp.broadcast_to(new_stats[key][0], new_stats[key].shape)
    )
  return np.asarray(y).reshape(x.shape), jax.tree.map(lambda v: v[0], new_stats)


TRANSFORMS = [
  "eager",
  "jit",
  "vmap-batches",
  pytest.param("shard_map", marks=multidevice),
  pytest.param("pmap", marks=multidevice),
  "vmap",
]


@pytest.mark.parametrize("masked", [False, True], ids=["full", "uneven-mask"])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.slow
def test_transform_matrix_matches_global_oracle(transform, masked):
  x, params, stats, mask = _global_case()
  mask = mask if masked else jnp.ones_like(mask)
  if transform in ("eager", "jit"):
    run = lambda x, mask: bnjax.batch_norm(x, params, stats, training=True, mask=mask)
    y, new_stats = (jax.jit(run) if transform == "jit" else run)(x, mask)
  elif transform == "vmap-batches":  # no axis name: each of 4 batches is normalized on its own
    batched = lambda a: a.reshape((4, -1, *a.shape[1:]))
    run = jax.vmap(lambda x, m: bnjax.batch_norm(x, params, stats, training=True, mask=m))
    y, new_stats = run(batched(x), batched(mask))
    for i in range(4):
      y_ref, stats_ref = oracle_batch_norm(
        batched(x)[i], params, stats, training=True, mask=batched(mask)[i]
      )
      assert_close(y[i], y_ref, jnp.float32, N // 4)
      assert_close(new_stats["var"][i], stats_ref["var"], jnp.float32, N // 4)
    return
  else:
    y, new_stats = _synced(transform, x, params, stats, mask)
  y_ref, stats_ref = oracle_batch_norm(x, params, stats, training=True, mask=mask)
  assert_close(y, y_ref, jnp.float32, N, "y")
  for key in ("mean", "var"):
    assert_close(new_stats[key], stats_ref[key], jnp.float32, N, key)


@multidevice
def test_uneven_counts_differ_from_a_mean_of_means():
  # The check above would pass for a mean of per-device means only if counts were equal.
  x, params, stats, mask = _global_case()
  shard_means = [
    np.asarray(x[2 * d : 2 * d + 2])[np.asarray(mask[2 * d : 2 * d + 2, 0, 0, 0])].mean((0, 1, 2))
    for d in range(DEVICES)
    if mask[2 * d : 2 * d + 2].any()
  ]
  _, new_stats = _synced("shard_map", x, params, stats, mask, momentum=0.0)
  exact = np.asarray(x)[np.asarray(mask[:, 0, 0, 0])].mean((0, 1, 2))
  assert_close(new_stats["mean"], exact, jnp.float32, N)
  assert np.max(np.abs(np.mean(shard_means, 0) - exact)) > 1e-2


@multidevice
def test_axis_index_groups_normalize_each_group_alone():
  x, params, stats, _ = _global_case()
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

  def step(x):
    return bnjax.batch_norm(
      x, params, stats, training=True, axis_name="d", axis_index_groups=groups
    )

  fn = jax.shard_map(step, mesh=device_mesh(), in_specs=P("d"), out_specs=(P("d"), P("d")))
  y, new_stats = jax.jit(fn)(*_on_mesh(x))
  for g, half in enumerate((slice(0, 8), slice(8, 16))):
    y_ref, stats_ref = oracle_batch_norm(x[half], params, stats, training=True)
    assert_close(np.asarray(y)[half], y_ref, jnp.float32, N // 2)
    assert_close(
      np.asarray(new_stats["var"]).reshape(DEVICES, -1)[4 * g],
      stats_ref["var"],
      jnp.float32,
      N // 2,
    )


@pytest.mark.slow
@multidevice
def test_gradients_under_shard_map_equal_global_gradients():
  x, params, stats, mask = _global_case()
  dy = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

  def local_loss(x, params, mask, dy):
    y, _ = bnjax.batch_norm(x, params, stats, training=True, mask=mask, axis_name="d")
    return jax.lax.psum(jnp.sum(y * dy), "d")

  sharded = jax.shard_map(
    local_loss, mesh=device_mesh(), in_specs=(P("d"), P(), P("d"), P("d")), out_specs=P()
  )
  x_s, mask_s, dy_s = _on_mesh(x, mask, dy)
  params_s = jax.tree.map(lambda v: _on_mesh(v, spec=P())[0], params)
  grads = jax.jit(jax.grad(sharded, argnums=(0, 1)))(x_s, params_s, mask_s, dy_s)
  global_loss = lambda x, params: jnp.sum(
    bnjax.batch_norm(x, params, stats, training=True, mask=mask)[0] * dy
  )
  expected = jax.grad(global_loss, argnums=(0, 1))(x, params)
  assert_close(grads[0], expected[0], jnp.float32, N, "dx")
  for key in params:
    assert_close(grads[1][key], expected[1][key], jnp.float32, N, key)


def _collectives(hlo: str) -> dict[str, int]:
  ops = ["all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute"]
  return {op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for op in ops}


@pytest.mark.parametrize("training", [True, False, "traced"])
@multidevice
def test_one_collective_in_training_none_in_eval(training):
  x, params, stats, _mask = _global_case()

  def step(x, flag):
    flag = flag if training == "traced" else training
    return bnjax.batch_norm(x, params, stats, training=flag, axis_name="d")

  fn = jax.jit(
    jax.shard_map(step, mesh=device_mesh(), in_specs=(P("d"), P()), out_specs=(P("d"), P()))
  )
  hlo = fn.lower(*_on_mesh(x), jnp.asarray(True)).compile().as_text()
  counts = _collectives(hlo)
  expected = 0 if training is False else 1
  assert counts["all-gather"] == expected, counts
  assert sum(counts.values()) == expected, counts


@pytest.mark.parametrize("value", [True, False])
def test_traced_training_flag_matches_static(value):
  x, params, stats = random_inputs(LAYOUTS["nchw"])
  traced = jax.jit(lambda x, flag: bnjax.batch_norm(x, params, stats, training=flag, axis=1))
  y, new_stats = traced(x, jnp.asarray(value))
  y_static, stats_static = bnjax.batch_norm(x, params, stats, training=value, axis=1)
  assert_close(y, y_static, jnp.float32, LAYOUTS["nchw"].reduction_size())
  for key in stats:
    assert_close(new_stats[key], stats_static[key], jnp.float32, LAYOUTS["nchw"].reduction_size())
  hlo = traced.lower(x, jnp.asarray(value)).compile().as_text()
  assert "conditional(" in hlo  # eval runs its own branch: no batch moments computed


@multidevice
def test_jit_over_sharded_batch_needs_no_axis_name():
  # Under plain jit, x's sharding is an annotation: the math is global, and XLA adds the
  # cross-device reduction itself. axis_name is only for per-device code (shard_map, pmap).
  x, params, stats, _ = _global_case()
  (x_sharded,) = _on_mesh(x)
  y, new_stats = jax.jit(lambda x: bnjax.batch_norm(x, params, stats, training=True))(x_sharded)
  y_ref, stats_ref = oracle_batch_norm(x, params, stats, training=True)
  assert_close(y, y_ref, jnp.float32, N)
  assert_close(new_stats["var"], stats_ref["var"], jnp.float32, N)
