"""Synchronized batch norm through the Flax modules on 8 devices, and data-parallel training.

tests/test_transforms.py covers ``bnjax.batch_norm`` itself under every transform; this file
covers what sits on top: the linen and nnx modules under shard_map, pmap and vmap over several
steps (running statistics), groups, the data-parallel example against single-device training,
and the sync benchmark's smoke test. tests/test_multihost.py runs the example as 2 processes.
"""

import importlib.util
import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from devices import DEVICES, device_mesh, multidevice
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from multihost_worker import STEPS, load_example, one_process_run, xdist_shared_dir
from oracle import batch_norm as oracle_batch_norm
from tolerances import DATA_PARALLEL, assert_close

import bnjax.linen
import bnjax.nnx

ROOT = Path(__file__).resolve().parent.parent
pytestmark = multidevice
SHAPE = (16, 4, 3)  # (batch, length, channels): 2 examples per device
MOMENTUM = 0.9
# Per-example mask: devices 0..7 hold 2, 1, 0, 2, 1, 1, 2, 2 valid examples.
UNEVEN = np.array([1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1], bool)


def batches(steps=3):
  """Global batches with a different offset and spread each step, so the running statistics
  move; the offset keeps a mean of per-device means visibly wrong under the uneven mask."""
  rng = np.random.default_rng(0)
  return [(rng.standard_normal(SHAPE) * (1 + s) + 2.0 * s).astype(np.float32) for s in range(steps)]


def oracle_steps(xs, mask, params, stats):
  """Float64 outputs and running statistics after each step, over the whole global batch."""
  ys, all_stats = [], []
  for x in xs:
    y, stats = oracle_batch_norm(x, params, stats, training=True, momentum=MOMENTUM, mask=mask)
    ys.append(y)
    all_stats.append(stats)
  return ys, all_stats


def split(a):
  return a.reshape((DEVICES, -1, *a.shape[1:]))


def linen_step(transform, **bn_options):
  """``step(variables, x, mask) -> (y, new_batch_stats)`` over 8 shards under ``transform``.

  The statistics come back replicated under shard_map without groups, otherwise one row per
  device (pmap and vmap always; shard_map with groups, where they differ between groups).
  """
  bn = bnjax.linen.BatchNorm(
    use_running_average=False, momentum=MOMENTUM, axis_name="d", **bn_options
  )

  def step(variables, x, mask):
    y, updates = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
    return y, updates["batch_stats"]

  if transform == "shard_map":
    if "axis_index_groups" in bn_options:
      body = lambda v, x, m: jax.tree.map(lambda a: a[None], step(v, x, m))
      fn = jax.shard_map(
        body, mesh=device_mesh(), in_specs=(P(), P("d"), P("d")), out_specs=P("d"), check_vma=False
      )
    else:
      fn = jax.shard_map(
        step, mesh=device_mesh(), in_specs=(P(), P("d"), P("d")), out_specs=(P("d"), P())
      )
    fn = jax.jit(fn)
    on_mesh = lambda a: jax.device_put(a, NamedSharding(device_mesh(), P("d")))
    return lambda v, x, m: fn(v, on_mesh(x), on_mesh(m))
  mapped = {
    "pmap": jax.pmap(step, axis_name="d", in_axes=(None, 0, 0)),
    "vmap": jax.jit(jax.vmap(step, axis_name="d", in_axes=(None, 0, 0))),
  }[transform]
  return lambda v, x, m: mapped(v, split(x), split(m))


@pytest.mark.parametrize("transform", ["shard_map", "pmap", "vmap"])
@pytest.mark.slow
def test_linen_module_synced_over_steps_matches_global_oracle(transform):
  # The uneven mask: devices hold 0, 1 or 2 valid examples; a mean of per-device means fails.
  xs, mask = batches(), UNEVEN.reshape(-1, 1, 1)
  bn = bnjax.linen.BatchNorm(use_running_average=False, momentum=MOMENTUM)
  variables = bn.init(jax.random.key(0), xs[0])
  variables["params"]["scale"] = jnp.asarray([0.5, 1.0, 2.0], jnp.float32)
  variables["params"]["bias"] = jnp.asarray([-1.0, 0.0, 1.0], jnp.float32)
  ys_ref, stats_ref = oracle_steps(xs, mask, variables["params"], variables["batch_stats"])
  step = linen_step(transform)
  n = int(mask.sum()) * SHAPE[1]
  for k, x in enumerate(xs):
    y, stats = step(variables, x, mask)
    if transform != "shard_map":  # one row per device, all equal
      for value in stats.values():
        np.testing.assert_array_equal(value, np.broadcast_to(value[0], value.shape))
      stats = jax.tree.map(lambda s: s[0], stats)
    assert_close(np.asarray(y).reshape(SHAPE), ys_ref[k], jnp.float32, n, f"y, step {k + 1}")
    for key in ("mean", "var"):
      assert_close(stats[key], stats_ref[k][key], jnp.float32, n, f"{key}, step {k + 1}")
    variables = {"params": variables["params"], "batch_stats": stats}


@pytest.mark.parametrize("transform", ["shard_map", "pmap"])
def test_linen_groups_with_uneven_mask_match_per_group_oracle(transform):
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  (x,), mask = batches(1), UNEVEN.reshape(-1, 1, 1)
  bn = bnjax.linen.BatchNorm(use_running_average=False, momentum=MOMENTUM)
  variables = bn.init(jax.random.key(0), x)
  y, stats = linen_step(transform, axis_index_groups=groups)(variables, x, mask)
  y, stats = np.asarray(y).reshape(SHAPE), jax.tree.map(np.asarray, stats)
  for g, rows in enumerate((slice(0, 8), slice(8, 16))):
    y_ref, stats_ref = oracle_batch_norm(
      x[rows],
      variables["params"],
      variables["batch_stats"],
      training=True,
      momentum=MOMENTUM,
      mask=mask[rows],
    )
    n = int(mask[rows].sum()) * SHAPE[1]
    assert_close(y[rows], y_ref, jnp.float32, n, f"y, group {g}")
    for device in groups[g]:
      for key in ("mean", "var"):
        assert_close(stats[key][device], stats_ref[key], jnp.float32, n, f"{key}, device {device}")


def test_nnx_module_under_shard_map_with_uneven_mask_matches_global_oracle():
  xs, mask = batches(2), UNEVEN.reshape(-1, 1, 1)
  model = bnjax.nnx.BatchNorm(3, momentum=MOMENTUM, axis_name="d", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = {"scale": np.ones(3), "bias": np.zeros(3)}
  ys_ref, stats_ref = oracle_steps(xs, mask, params, {"mean": np.zeros(3), "var": np.ones(3)})

  def step(state, x, mask):
    module = nnx.merge(graphdef, state)
    y = module(x, mask=mask)
    return y, nnx.state(module)

  fn = jax.jit(
    jax.shard_map(step, mesh=device_mesh(), in_specs=(P(), P("d"), P("d")), out_specs=(P("d"), P()))
  )
  n = int(mask.sum()) * SHAPE[1]
  for k, x in enumerate(xs):
    y, state = fn(
      state, *(jax.device_put(a, NamedSharding(device_mesh(), P("d"))) for a in (x, mask))
    )
    assert_close(y, ys_ref[k], jnp.float32, n, f"y, step {k + 1}")
    module = nnx.merge(graphdef, state)
    assert_close(module.mean[...], stats_ref[k]["mean"], jnp.float32, n, "mean")
    assert_close(module.var[...], stats_ref[k]["var"], jnp.float32, n, "var")


def doc_blocks():
  """The ```python blocks of docs/multi_device.md, but the one calling
  jax.distributed.initialize (it needs other processes)."""
  text = (ROOT / "docs" / "multi_device.md").read_text()
  blocks = re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)
  return [b for b in blocks if "jax.distributed.initialize(" not in b]


@pytest.mark.usefixtures("standard_promotion")  # as a user runs them
@pytest.mark.parametrize("index", range(len(doc_blocks())), ids=lambda i: f"block{i + 1}")
def test_multi_device_doc_code_blocks_run(index):
  code = compile(doc_blocks()[index], f"docs/multi_device.md block {index + 1}", "exec")
  exec(code, {})


# Data-parallel training: examples/data_parallel.py on 8 devices against one device.


@pytest.fixture(scope="module")
def example():
  for package in ("flax", "optax", "sklearn", "tqdm"):
    pytest.importorskip(package)
  return load_example()


@pytest.fixture(scope="module")
def one_process(example, tmp_path_factory):
  """``(metrics, states)``: the example on this process's 8 devices, once per session."""
  return one_process_run(xdist_shared_dir(tmp_path_factory))


def single_device_training(example, initial, steps):
  """Plain optax + flax.linen on one device, the whole global batch at once: no axis name, no
  shard_map, no bnjax.training. Returns the host state after each step."""
  config = example.Config()
  x_train, _, y_train, _ = example.load_data(config)
  model = example.CNN(bn_momentum=config.bn_momentum, axis_name=None)
  tx = optax.adam(config.learning_rate)

  @jax.jit
  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates["batch_stats"]

    (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  device = jax.devices()[0]
  params, batch_stats = jax.device_put((initial.params, initial.batch_stats), device)
  opt_state = tx.init(params)
  states = []
  for k in range(steps):
    rows = example.batch_indices(config, len(x_train), k)
    params, batch_stats, opt_state = step(
      params, batch_stats, opt_state, x_train[rows], y_train[rows]
    )
    states.append(jax.device_get({"params": params, "batch_stats": batch_stats}))
  return states


def assert_trees_match(actual, expected, what):
  flat_a = jax.tree_util.tree_leaves_with_path(actual)
  flat_e = jax.tree_util.tree_leaves_with_path(expected)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_e], what
  for (path, a), (_, e) in zip(flat_a, flat_e):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(e), err_msg=f"{what}{jax.tree_util.keystr(path)}", **DATA_PARALLEL
    )


@pytest.mark.usefixtures("standard_promotion")  # Flax and optax rely on standard promotion
@pytest.mark.slow
def test_data_parallel_example_matches_single_device_training(example, one_process):
  metrics, states = one_process
  assert metrics["devices"] == DEVICES and metrics["processes"] == 1
  assert sorted(states) == list(range(STEPS + 1))
  reference = single_device_training(example, states[0], STEPS)
  for k in (1, STEPS // 2, STEPS):
    ours = {"params": states[k].params, "batch_stats": states[k].batch_stats}
    assert_trees_match(ours, reference[k - 1], f"step {k}: ")
    assert int(states[k].step) == k
  # Training did move: the comparison is not between two copies of the initial state.
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), states[STEPS].params, states[0].params)
  assert min(jax.tree.leaves(moved)) > 100 * DATA_PARALLEL["atol"], moved
  assert math.isfinite(metrics["eval_accuracy"]) and metrics["eval_accuracy"] > 0.5


@pytest.mark.usefixtures("standard_promotion")
def test_per_device_batch_norm_with_averaged_statistics_would_fail_the_match(example, one_process):
  # The alternative to synchronized BN: each device normalizes its own 8 examples and the
  # running statistics are averaged over devices. For the first layer (same input either way)
  # the mean is right for equal shards, but the variance misses the spread of the device means,
  # and later layers see differently normalized inputs: after one step the statistics are off
  # by up to ~2e-3, far outside DATA_PARALLEL's tolerance.
  _, states = one_process
  config = example.Config()
  x_train, _, _, _ = example.load_data(config)
  images = x_train[example.batch_indices(config, len(x_train), 0)]
  local = example.CNN(bn_momentum=config.bn_momentum, axis_name=None)
  variables = {"params": states[0].params, "batch_stats": states[0].batch_stats}

  def per_device(images):
    return local.apply(variables, images, train=True, mutable=["batch_stats"])[1]["batch_stats"]

  averaged = jax.tree.map(lambda s: s.mean(0), jax.jit(jax.vmap(per_device))(split(images)))
  synced = states[1].batch_stats  # one data-parallel step from the same state, same batch
  np.testing.assert_allclose(
    averaged["BatchNorm_0"]["mean"], synced["BatchNorm_0"]["mean"], **DATA_PARALLEL
  )
  gaps = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), averaged, synced)
  assert gaps["BatchNorm_0"]["var"] > DATA_PARALLEL["atol"], gaps
  assert max(jax.tree.leaves(gaps)) > 10 * DATA_PARALLEL["atol"], gaps


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--global-batch-size", "60"], "must be a multiple of the 8 devices"),
    (["--global-batch-size", "2000"], "must be at most 1347"),
  ],
  ids=["batch-not-multiple-of-devices", "batch-larger-than-data"],
)
def test_data_parallel_rejects_bad_batch_size(example, argv, message):
  with pytest.raises(ValueError, match=message):
    example.main([*argv, "--no-progress"])


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--steps", "0"], "expected --steps >= 1, got 0"),
    (["--step-timeout", "0"], "expected --step-timeout > 0, got 0.0"),
    (["--coordinator", "127.0.0.1:1"], "expected --coordinator, --num-processes and"),
    (["--num-processes", "2", "--process-id", "0"], "expected --coordinator, --num-processes"),
  ],
  ids=["zero-steps", "zero-step-timeout", "coordinator-alone", "no-coordinator"],
)
def test_data_parallel_rejects_bad_flags(example, capsys, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    example.main(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def _bench_sync():
  pytest.importorskip("tqdm")
  spec = importlib.util.spec_from_file_location("bench_sync", ROOT / "benchmarks" / "bench_sync.py")
  bench = importlib.util.module_from_spec(spec)
  sys.modules["bench_sync"] = bench  # dataclasses look their module up while it executes
  spec.loader.exec_module(bench)
  return bench


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--rounds", "0"], "--rounds and --reps must be >= 1, got 0 and 2"),
    (["--devices", "0"], "--devices must be >= 1, got [0]"),
    (["--devices", "8", "3"], "--devices [8, 3]: each must divide every batch, [16]"),
  ],
)
def test_bench_sync_rejects_bad_flags(capsys, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    _bench_sync().main(["--quick", *argv])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_bench_sync_worker_checks_its_device_count(monkeypatch, tmp_path):
  bench = _bench_sync()
  monkeypatch.setenv(bench._WORKER, str(jax.device_count() + 1))  # the parent asked for more
  with pytest.raises(RuntimeError, match=f"expected {jax.device_count() + 1} CPU devices, got"):
    bench.main(["--quick", "--devices", "1", "--json", str(tmp_path / "w.json")])


@pytest.mark.slow
def test_bench_sync_quick(tmp_path):
  bench = _bench_sync()
  output = tmp_path / "sync.md"
  flags = ["--quick", "--rounds", "1", "--reps", "1", "--no-progress"]
  assert bench.main([*flags, "--output", str(output)]) == output
  text = output.read_text()
  assert text.startswith("# Synchronized vs local batch norm on 8 and 2 devices")
  assert "## Environment" in text and "| XLA_FLAGS |" in text
  # Structure, not timing: one all-gather per synced forward, no collective when local.
  rows = [line for line in text.splitlines() if re.search(r"\| (train|train\+grad) \|", line)]
  assert len(rows) == 2 * 2 * len(bench.QUICK_SHAPES), text  # 2 passes on 8 and 2 devices
  assert {row.split("|")[1].strip() for row in rows} == {"8", "2"}, text
  for row in rows:
    synced, local = [c.strip() for c in row.strip().strip("|").split("|")][-2:]
    assert local == "none", row
    if "| train |" in row:
      assert synced == "all-gather x1", row
    else:  # the backward pass adds its own (the gather's transpose), never the forward's
      assert synced.startswith("all-gather x1") and synced != "all-gather x1", row
