"""Faults contained: non-finite batches, skipped train steps, damaged checkpoints, overflow.

docs/RELIABILITY.md lists what bnjax guarantees; each guarantee is tested here (bad-input errors
are in tests/test_errors.py). References: the float64 oracle on the clean channels.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from devices import device_mesh, multidevice
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from oracle import batch_norm as oracle_batch_norm
from tolerances import assert_close

import bnjax
import bnjax.diagnostics
import bnjax.equinox
import bnjax.linen
import bnjax.nnx
from bnjax import training

# orbax leaves asyncio tasks behind when a restore of damaged files fails; pytest reports them
# later as unraisable-exception warnings, which the project's filter would turn into errors.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = pathlib.Path(__file__).resolve().parent.parent
MOMENTUM = 0.9
BAD_CHANNEL = 1


def clean(shape=(16, 3), seed=0):
  return (np.random.default_rng(seed).standard_normal(shape) * 2 + 3).astype(np.float32)


def poisoned(value, position, shape=(16, 3)):
  x = clean(shape)
  index = {"first": 0, "middle": shape[0] // 2, "last": shape[0] - 1}[position]
  x[index, BAD_CHANNEL] = value
  return x


def assert_clean_channels_updated(x, new_stats, stats, mask=None):
  """The other channels moved as the oracle says; the poisoned one kept its values."""
  good = [c for c in range(x.shape[-1]) if c != BAD_CHANNEL]
  _, expected = oracle_batch_norm(
    x[:, good],
    {},
    {k: np.asarray(v)[good] for k, v in stats.items()},
    training=True,
    momentum=MOMENTUM,
    mask=None if mask is None else mask[:, good],
  )
  for key in ("mean", "var"):
    assert_close(np.asarray(new_stats[key])[good], expected[key], jnp.float32, x.shape[0], key)
    np.testing.assert_array_equal(
      np.asarray(new_stats[key])[BAD_CHANNEL], np.asarray(stats[key])[BAD_CHANNEL]
    )


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_non_finite_element_keeps_its_channels_running_statistics(value, position, jit):
  x = poisoned(value, position)
  params, stats = bnjax.init(3)

  def step(x):
    return bnjax.batch_norm(x, params, stats, training=True, momentum=MOMENTUM)

  y, new = (jax.jit(step) if jit else step)(x)
  assert_clean_channels_updated(x, new, stats)
  assert not np.all(np.isfinite(np.asarray(y)[:, BAD_CHANNEL]))  # the batch's own output shows it
  assert np.all(np.isfinite(np.delete(np.asarray(y), BAD_CHANNEL, axis=1)))


def test_one_bad_batch_then_fifty_clean_ones_evaluate_finite():
  """The scenario that poisons every framework: one NaN element, then clean training."""
  params, stats = bnjax.init(3)
  step = jax.jit(lambda x, s: bnjax.batch_norm(x, params, s, training=True, momentum=MOMENTUM))
  _, stats = step(poisoned(np.nan, "middle"), stats)
  for seed in range(50):
    _, stats = step(clean(seed=seed + 1), stats)
  y, _ = bnjax.batch_norm(clean(), params, stats, training=False)
  assert np.all(np.isfinite(np.asarray(y)))
  _, propagated = bnjax.batch_norm(
    poisoned(np.nan, "middle"), params, bnjax.init(3)[1], training=True, on_nonfinite="propagate"
  )
  assert np.isnan(np.asarray(propagated["mean"])[BAD_CHANNEL])  # PyTorch's, Flax's behaviour


def test_raise_reports_the_channel_at_run_time():
  params, stats = bnjax.init(3)
  step = jax.jit(lambda x: bnjax.batch_norm(x, params, stats, training=True, on_nonfinite="raise"))
  step(clean())[0].block_until_ready()  # a clean batch passes
  with pytest.raises(Exception, match=r"NaN or inf mean or variance in channels \[1\]"):
    jax.block_until_ready(step(poisoned(np.inf, "first")))


def test_masked_out_non_finite_values_change_nothing_and_valid_ones_are_kept():
  x = poisoned(np.nan, "middle")
  params, stats = bnjax.init(3)
  mask = np.ones((16, 1), bool)
  mask[8] = False  # the poisoned row
  _, new = bnjax.batch_norm(x, params, stats, training=True, momentum=MOMENTUM, mask=mask)
  _, expected = oracle_batch_norm(
    np.where(mask, x, 0), {}, stats, training=True, momentum=MOMENTUM, mask=mask
  )
  for key in ("mean", "var"):
    assert_close(new[key], expected[key], jnp.float32, 15, key)
  full_mask = np.ones((16, 3), bool)
  _, kept = bnjax.batch_norm(x, params, stats, training=True, momentum=MOMENTUM, mask=full_mask)
  assert_clean_channels_updated(x, kept, stats, mask=full_mask)


@multidevice
def test_eight_devices_keep_the_poisoned_channel_everywhere():
  mesh = device_mesh()
  x = poisoned(np.nan, "last")  # on the last device only
  params, stats = bnjax.init(3)
  step = jax.jit(
    jax.shard_map(
      lambda x: bnjax.batch_norm(x, params, stats, training=True, momentum=MOMENTUM, axis_name="d"),
      mesh=mesh,
      in_specs=P("d"),
      out_specs=(P("d"), P()),
    )
  )
  _, new = step(jax.device_put(x, NamedSharding(mesh, P("d"))))
  assert_clean_channels_updated(x, new, stats)


@pytest.mark.slow
def test_the_modules_keep_by_default_and_propagate_when_asked():
  x = poisoned(np.nan, "first")
  linen = bnjax.linen.BatchNorm(momentum=MOMENTUM, use_running_average=False)
  variables = linen.init(jax.random.key(0), x)
  _, updates = linen.apply(variables, x, mutable=["batch_stats"])
  assert_clean_channels_updated(x, updates["batch_stats"], variables["batch_stats"])
  model = bnjax.nnx.BatchNorm(3, momentum=MOMENTUM, on_nonfinite="propagate", rngs=nnx.Rngs(0))
  model(x)
  assert np.isnan(np.asarray(model.mean[...])[BAD_CHANNEL])
  for mode in ("batch", "ema"):
    layer, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(3, "b", mode=mode)
    index = layer.batch_state_index if mode == "batch" else layer.ema_state_index
    _, state = jax.vmap(layer, axis_name="b", in_axes=(0, None), out_axes=(0, None))(x, state)
    mean, var = state.get(index)
    assert np.all(np.isfinite(np.asarray(mean))) and np.all(np.isfinite(np.asarray(var)))


def test_sums_of_squares_past_float32_show_nan_not_bias():
  """std 1e18 over 1024 elements: the float32 sum of squares overflows. The output says so
  (NaN, where the variance alone would give bias silently) and the running statistics stay."""
  x = (np.random.default_rng(1).standard_normal((1024, 2)) * 1e18).astype(np.float32)
  params, stats = bnjax.init(2)
  y, new = bnjax.batch_norm(x, params, stats, training=True)
  assert np.all(np.isnan(np.asarray(y)))
  jax.tree.map(np.testing.assert_array_equal, new, stats)
  y, _ = bnjax.batch_norm(x / 1e3, params, stats, training=True)  # 1e15: within the limit
  assert np.all(np.isfinite(np.asarray(y)))
  np.testing.assert_allclose(np.asarray(y).std(0), 1.0, rtol=1e-4)


def test_constant_channels_at_float32s_limit():
  x = np.full((64, 2), 1e38, np.float32)
  x[:, 1] = -3e38
  bias = np.asarray([0.5, -1.0], np.float32)
  y, new = bnjax.batch_norm(x, {"bias": bias}, bnjax.init(2)[1], training=True, momentum=0.9)
  np.testing.assert_array_equal(y, np.broadcast_to(bias, x.shape))
  np.testing.assert_allclose(new["mean"], [1e37, -3e37], rtol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9, rtol=1e-6)


# --- train steps -------------------------------------------------------------------------------


def model(params, batch_stats, x, *, training):
  h = x @ params["w"]
  y, new = bnjax.batch_norm(
    h, params["bn"], batch_stats["bn"], training=training, momentum=MOMENTUM
  )
  return y, {"bn": new}


def mse(outputs, targets):
  return jnp.mean((outputs - targets) ** 2)


def initial_state(tx):
  params = {"w": jnp.asarray(np.random.default_rng(2).standard_normal((4, 3)), jnp.float32)}
  bn_params, bn_stats = bnjax.init(3)
  return training.create_train_state({**params, "bn": bn_params}, {"bn": bn_stats}, tx)


@pytest.mark.usefixtures("standard_promotion")  # optax.adam promotes int32 step counts implicitly
@pytest.mark.parametrize("bad", ["input", "target"])
def test_a_non_finite_step_is_skipped_whole(bad):
  tx = optax.adam(1e-2)
  step = training.make_train_step(model, tx, loss_fn=mse)
  state = initial_state(tx)
  x, y = clean((8, 4)), clean((8, 3), seed=3)
  state, metrics = step(state, x, y)
  assert float(metrics["skipped"]) == 0.0
  if bad == "input":
    x = x.copy()
    x[2, 0] = np.nan
  else:
    y = y.copy()
    y[0, 0] = np.inf
  after, metrics = step(state, x, y)
  assert float(metrics["skipped"]) == 1.0
  assert int(after.step) == int(state.step) + 1
  for part in ("params", "batch_stats", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, part), getattr(state, part))
  history = [{"skipped": 0.0}, metrics, {"skipped": 0.0}]
  (problem,) = bnjax.diagnostics.check_skipped(history)
  assert problem.check == "skipped" and problem.message.startswith("1 of 3 train steps")
  assert bnjax.diagnostics.check_skipped([{"skipped": 0.0}]) == []


def test_skipping_with_apply_if_finite_keeps_its_count_and_can_be_turned_off():
  tx = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=5)
  step = training.make_train_step(model, tx, loss_fn=mse)
  state = initial_state(tx)
  x, y = clean((8, 4)), clean((8, 3), seed=3)
  x[0, 0] = np.nan
  after, metrics = step(state, x, y)
  assert float(metrics["skipped"]) == 1.0
  assert int(after.opt_state.notfinite_count) == 1  # apply_if_finite counted it
  jax.tree.map(np.testing.assert_array_equal, after.batch_stats, state.batch_stats)
  unguarded = training.make_train_step(model, optax.sgd(0.1), loss_fn=mse, skip_nonfinite=False)
  poisoned_state, _ = unguarded(initial_state(optax.sgd(0.1)), x, y)
  assert not np.all(np.isfinite(np.asarray(poisoned_state.params["w"])))


# --- checkpoints -------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
  state = initial_state(optax.sgd(0.1))
  state = state._replace(
    batch_stats={
      "bn": {"mean": jnp.asarray([1.5, -2.0, 3.25]), "var": jnp.asarray([0.5, 2.0, 4.0])}
    }
  )
  return state, training.save_checkpoint(tmp_path / "ckpt", state)


def data_files(path):
  return sorted(p for p in path.rglob("*") if p.is_file() and p.parent.name == "d")


def test_a_checkpoint_restores_exactly_with_its_manifest(saved):
  state, path = saved
  manifest = json.loads((path / "bnjax_manifest.json").read_text())
  assert "batch_stats/bn/mean" in manifest["arrays"]
  assert manifest["arrays"]["batch_stats/bn/mean"]["dtype"] == "float32"
  restored = training.restore_checkpoint(path, like=initial_state(optax.sgd(0.1)))
  jax.tree.map(np.testing.assert_array_equal, restored, state)


@pytest.mark.slow
def test_a_flipped_byte_is_damage_not_data(saved):
  """Every single-bit flip in every data file either raises CheckpointDamagedError or leaves
  the restored arrays exactly as saved (a byte no array is read from): never other values."""
  state, path = saved
  like = initial_state(optax.sgd(0.1))
  files = data_files(path)
  assert files
  detected = 0
  for file in files:
    original = file.read_bytes()
    for offset in range(0, len(original), max(1, len(original) // 16)):
      damaged = bytearray(original)
      damaged[offset] ^= 0x01
      file.write_bytes(bytes(damaged))
      try:
        restored = training.restore_checkpoint(path, like=like)
      except training.CheckpointDamagedError as error:
        assert f"checkpoint at {path} is damaged" in str(error)
        detected += 1
      else:
        jax.tree.map(np.testing.assert_array_equal, restored, state)
    file.write_bytes(original)
  assert detected > 0
  jax.tree.map(np.testing.assert_array_equal, training.restore_checkpoint(path, like=like), state)


def test_a_changed_array_is_named(saved):
  _, path = saved
  manifest_path = path / "bnjax_manifest.json"
  manifest = json.loads(manifest_path.read_text())
  manifest["arrays"]["batch_stats/bn/mean"]["sha256"] = "0" * 64
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(
    training.CheckpointDamagedError, match=r"damaged: batch_stats/bn/mean checksum mismatch"
  ):
    training.restore_checkpoint(path, like=initial_state(optax.sgd(0.1)))


def test_a_truncated_file_is_damage(saved):
  """Each data file cut to half its size, in turn: the restore raises CheckpointDamagedError or,
  where orbax does not read that file (its data directory keeps files the restore never
  opens), returns the saved state exactly. Some truncation must raise."""
  state, path = saved
  raised = 0
  for data_file in data_files(path):
    content = data_file.read_bytes()
    data_file.write_bytes(content[: len(content) // 2])
    try:
      restored = training.restore_checkpoint(path, like=initial_state(optax.sgd(0.1)))
    except training.CheckpointDamagedError as error:
      assert "its files cannot be read" in str(error) or "checksum mismatch" in str(error)
      raised += 1
    else:
      jax.tree.map(np.testing.assert_array_equal, restored, state)
    data_file.write_bytes(content)
  assert raised >= 1


def test_missing_empty_and_foreign_directories_are_not_found(tmp_path):
  like = initial_state(optax.sgd(0.1))
  with pytest.raises(training.CheckpointNotFoundError, match="nothing there"):
    training.restore_checkpoint(tmp_path / "absent", like=like)
  (tmp_path / "empty").mkdir()
  with pytest.raises(training.CheckpointNotFoundError, match="an empty directory"):
    training.restore_checkpoint(tmp_path / "empty", like=like)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("not a checkpoint")
  with pytest.raises(FileNotFoundError, match="without a checkpoint's files"):
    training.restore_checkpoint(tmp_path / "other", like=like)


def test_another_structure_or_dtype_is_a_mismatch_and_cast_is_opt_in(saved):
  state, path = saved
  like = initial_state(optax.sgd(0.1))
  counted = like._replace(
    batch_stats={"bn": {**like.batch_stats["bn"], "count": jnp.zeros((), jnp.int32)}}
  )
  with pytest.raises(
    training.CheckpointMismatchError, match=r"batch_stats/bn/count is missing from the checkpoint"
  ):
    training.restore_checkpoint(path, like=counted)
  half = like._replace(batch_stats=jax.tree.map(lambda v: v.astype(jnp.bfloat16), like.batch_stats))
  with pytest.raises(
    training.CheckpointMismatchError,
    match=r"batch_stats/bn/mean is float32, `like` bfloat16 \(cast=True casts\)",
  ):
    training.restore_checkpoint(path, like=half)
  cast = training.restore_checkpoint(path, like=half, cast=True)
  assert cast.batch_stats["bn"]["mean"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    cast.batch_stats["bn"]["mean"], state.batch_stats["bn"]["mean"].astype(jnp.bfloat16)
  )


def test_a_checkpoint_without_a_manifest_loads_with_a_warning(saved):
  state, path = saved
  (path / "bnjax_manifest.json").unlink()
  with pytest.warns(UserWarning, match="has no bnjax_manifest.json"):
    restored = training.restore_checkpoint(path, like=initial_state(optax.sgd(0.1)))
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_overwrite_is_explicit_and_atomic(saved):
  state, path = saved
  with pytest.raises(FileExistsError, match="overwrite=True"):
    training.save_checkpoint(path, state)
  newer = state._replace(step=state.step + 7)
  training.save_checkpoint(path, newer, overwrite=True)
  restored = training.restore_checkpoint(path, like=initial_state(optax.sgd(0.1)))
  assert int(restored.step) == int(state.step) + 7
  assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging left behind


@pytest.mark.parametrize("moment", ["writing", "publishing"])
@pytest.mark.slow
def test_a_crash_mid_save_leaves_the_previous_checkpoint(saved, moment):
  """A subprocess overwrites the checkpoint and is killed while orbax writes the staged copy,
  or just before the rename; the previous checkpoint restores exactly."""
  state, path = saved
  hook = (
    "orbax.checkpoint.StandardCheckpointer.save"
    if moment == "writing"
    else "bnjax._checkpoint._publish"
  )
  script = textwrap.dedent(f"""
      import sys, time
      sys.path.insert(0, {str(ROOT / "tests")!r})
      import jax.numpy as jnp, optax
      import orbax.checkpoint, bnjax._checkpoint
      from bnjax import training
      from test_reliability import initial_state
      module, name = {hook!r}.rsplit('.', 1)
      owner = eval(module)
      real = getattr(owner, name)
      def stall(*args, **kwargs):
        if {moment!r} == 'writing':
          real(*args, **kwargs)  # the staged copy is on disk, the manifest not yet
        print('stalled', flush=True)
        time.sleep(120)
      setattr(owner, name, stall)
      state = initial_state(optax.sgd(0.1))
      training.save_checkpoint({str(path)!r}, state._replace(step=state.step + 99), overwrite=True)
  """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  process = subprocess.Popen(
    [sys.executable, "-c", script],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
  )
  try:
    line = process.stdout.readline()
    assert line.strip() == "stalled", process.stderr.read()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
  finally:
    if process.poll() is None:
      process.kill()
    process.communicate(timeout=30)  # closes the pipes
  restored = training.restore_checkpoint(path, like=initial_state(optax.sgd(0.1)))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  leftovers = [p.name for p in path.parent.iterdir() if p.name != path.name]
  assert all(name.startswith(f".{path.name}.tmp") for name in leftovers), leftovers
  training.save_checkpoint(path, state, overwrite=True)  # the next save clears them
  assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_no_warnings_on_a_clean_round_trip(saved):
  _, path = saved
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    training.restore_checkpoint(path, like=initial_state(optax.sgd(0.1)))
