"""Data-parallel training of the digits CNN, batch statistics synchronized over devices and hosts.

    # one process, every local device (8 fake CPU devices here):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py
    # two processes, 4 devices each (two hosts; here both on this machine):
    export XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu
    FLAGS="--coordinator 127.0.0.1:29500 --num-processes 2"
    python examples/data_parallel.py $FLAGS --process-id 0 &
    python examples/data_parallel.py $FLAGS --process-id 1
    # on SLURM, Open MPI, Cloud TPU or Kubernetes: let JAX detect the processes
    srun python examples/data_parallel.py --distributed --checkpoint-dir /shared/ckpt

Each training step is one ``jax.shard_map`` over a 1-D mesh of all devices of all processes:
the state is replicated (``P()``), the global batch is split (``P('data')``). The batch-norm
layers carry ``axis_name='data'``, so every layer combines the devices' ``(count, mean, M2)`` in
one ``all_gather`` and normalizes with the statistics of the whole global batch; the gradients
of the global loss are averaged by ``bnjax.training.make_train_step(axis_name='data')``. Every
device therefore ends each step with the same parameters and running statistics as a single
device that trained on the same global batches. Evaluation is a plain ``jax.jit`` over the
sharded test set: batch norm then uses the running statistics and needs no axis name.

Faults: a collective waits for every process, so if a peer dies or never starts the others
would wait (gloo on CPU waits indefinitely; JAX's heartbeat check aborts after
``--heartbeat-timeout`` with a C++ stack trace). A watchdog turns that into a one-paragraph
message and exit code 75 after ``--step-timeout`` (a train step or an evaluation) or
``--init-timeout`` (connecting, compiling, restoring, saving a checkpoint). With
``--checkpoint-dir``, restarting every process with the same flags resumes from the newest
checkpoint, and training continues exactly as if uninterrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import pathlib
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from bnjax import training
from bnjax.linen import BatchNorm

AXIS = "data"  # the mesh axis the batch is split over, and the batch-norm layers' axis_name
EXIT_PEER_LOST = 75  # EX_TEMPFAIL: a temporary failure; restarting all processes resumes
INIT_GRACE_SECONDS = 10  # JAX's own initialization timeout is ours plus this: ours speaks first


@dataclasses.dataclass(frozen=True)
class Config:
  steps: int = 200  # training steps, each on one global batch
  global_batch_size: int = 64  # split evenly over all devices of all processes
  learning_rate: float = 3e-3
  bn_momentum: float = 0.9  # weight on the old running value
  test_fraction: float = 0.25
  seed: int = 0  # data split, batch order and initialization: the same on every process
  log_every: int = 50  # steps between table rows (with eval accuracy); the last step always logs
  checkpoint_dir: str | None = None  # shared by all processes; resumes from its newest checkpoint
  checkpoint_every: int = 50  # steps between checkpoints (and one after the last step)
  coordinator: str | None = None  # host:port of process 0
  num_processes: int | None = None
  process_id: int | None = None
  distributed: bool = False  # jax.distributed.initialize() with JAX's cluster auto-detection
  init_timeout: int = 120  # seconds to connect, compile, restore or save a checkpoint
  heartbeat_timeout: int = 60  # seconds without heartbeats after which JAX declares a process dead
  step_timeout: float = 30.0  # seconds a train step or evaluation may take (multi-process)
  progress: bool = True


class CNN(nn.Module):
  """conv -> BN -> relu (x2), average pool, dense -> BN -> relu, dense (as train_digits.py).

  ``axis_name``: the mapped axis whose devices share batch statistics; None on one device.
  """

  bn_momentum: float = 0.9
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = functools.partial(
      BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      axis_name=self.axis_name,
    )
    x = nn.relu(norm()(nn.Conv(16, (3, 3), use_bias=False)(x)))  # BN's bias replaces the conv's
    x = nn.relu(norm()(nn.Conv(32, (3, 3), use_bias=False)(x)))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
    x = nn.relu(norm()(nn.Dense(64, use_bias=False)(x)))
    return nn.Dense(10)(x)


class Result(NamedTuple):
  metrics: dict[str, Any]  # final train loss/accuracy, eval accuracy, history, timing, topology
  state: training.TrainState  # final step, params, batch_stats, opt_state (replicated arrays)


HEADER = f"{'step':>5}  {'train loss':>10}  {'train acc':>9}  {'eval acc':>8}"
ROW = "{step:>5}  {train_loss:>10.4f}  {train_accuracy:>9.2%}  {eval_accuracy:>8.2%}"


def load_data(config: Config):
  """Digits as (N, 8, 8, 1) float32 in [0, 1] and int32 labels, split with a fixed seed."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  return train_test_split(
    images, labels, test_size=config.test_fraction, random_state=config.seed, stratify=labels
  )


def batch_indices(config: Config, num_train: int, step: int) -> np.ndarray:
  """The examples of global batch ``step`` (0-based): a function of the seed and step only.

  Every process computes the same global batch, and a run resumed at any step sees the
  batches the uninterrupted run would have. Each epoch is a fresh permutation; its last
  partial batch is dropped.
  """
  steps_per_epoch = num_train // config.global_batch_size
  epoch, i = divmod(step, steps_per_epoch)
  order = np.random.default_rng([config.seed, epoch]).permutation(num_train)
  return order[i * config.global_batch_size : (i + 1) * config.global_batch_size]


def loss_fn(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy_fn(logits, labels):
  return {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def make_functions(model: CNN, tx: optax.GradientTransformation, mesh: Mesh):
  """``init_state``, the data-parallel ``train_step`` and the sharded ``eval_accuracy``."""
  replicated = NamedSharding(mesh, P())
  apply_fn = training.linen_apply_fn(model)

  @functools.partial(jax.jit, out_shardings=replicated)
  def init_state(key, sample):
    variables = model.init(key, sample, train=False)  # BN's axis_name is not used in init
    return training.create_train_state(variables["params"], variables["batch_stats"], tx)

  # Per device: its slice of the global batch; the BN layers and the step share axis 'data'.
  per_device_step = training.make_train_step(
    apply_fn, tx, loss_fn=loss_fn, metrics_fn=accuracy_fn, axis_name=AXIS
  )
  train_step = jax.jit(
    jax.shard_map(
      per_device_step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P())
    )
  )

  # Evaluation is a plain jit over a sharded batch: no mapped axis is bound there, so the
  # same model without axis_name (BN uses the running statistics; XLA adds the reduction).
  eval_apply_fn = training.linen_apply_fn(model.clone(axis_name=None))

  @jax.jit
  def eval_accuracy(state, images, labels, weights):
    logits, _ = eval_apply_fn(state.params, state.batch_stats, images, training=False)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(correct * weights) / jnp.sum(weights)

  return init_state, train_step, eval_accuracy


class Watchdog:
  """Ends this process with a message and ``EXIT_PEER_LOST`` if guarded work does not finish.

  A collective (a step's all_gather and pmean, a checkpoint's barrier) waits for every
  process. If a peer died, hung or never started, the others wait: gloo's CPU collectives
  indefinitely, and JAX's heartbeat check then aborts the process with a C++ stack trace after
  ``--heartbeat-timeout``. The watchdog's deadline comes first and says what happened. The
  main thread blocks in XLA with the GIL released, so this thread runs meanwhile.
  """

  def __init__(self, enabled: bool):
    self.enabled = enabled
    self._cond = threading.Condition()
    self._deadline: float | None = None
    self._message: Callable[[], str] = str
    self._closed = False
    self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
    if enabled:
      self._thread.start()

  @contextlib.contextmanager
  def guard(self, seconds: float, message: Callable[[], str]):
    """Within the block, ``message()`` is printed and the process ends after ``seconds``."""
    if not self.enabled:
      yield
      return
    with self._cond:
      self._deadline, self._message = time.monotonic() + seconds, message
      self._cond.notify()
    try:
      yield
    finally:
      with self._cond:
        self._deadline = None
        self._cond.notify()

  def close(self):
    with self._cond:
      self._closed = True
      self._cond.notify()
    if self.enabled:
      self._thread.join()

  def _run(self):
    with self._cond:
      while not self._closed:
        if self._deadline is None:
          self._cond.wait()
          continue
        remaining = self._deadline - time.monotonic()
        if remaining > 0:
          self._cond.wait(remaining)
          continue
        sys.stdout.flush()
        sys.stderr.write(f"\n{self._message()}\n")
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)


def initialize_distributed(config: Config, watchdog: Watchdog) -> None:
  """``jax.distributed.initialize`` when asked for; must run before any JAX computation."""
  if config.coordinator is None and not config.distributed:
    return
  if config.coordinator is not None:
    where = config.coordinator
    advice = (
      f"Start every process with the same --coordinator and --num-processes"
      f" ({config.num_processes}) and its own --process-id in 0..{config.num_processes - 1};"
      " process 0 hosts the coordinator and must be reachable at that address."
    )
  else:
    where = "the address JAX's cluster auto-detection chose"
    advice = "Check that every process of the job started and can reach process 0."

  def message():
    return (
      f"data_parallel.py: not all processes connected to the coordinator at {where} within"
      f" --init-timeout={config.init_timeout} s; stopping (exit code {EXIT_PEER_LOST}). {advice}"
    )

  with watchdog.guard(config.init_timeout, message):
    jax.distributed.initialize(
      coordinator_address=config.coordinator,
      num_processes=config.num_processes,
      process_id=config.process_id,
      initialization_timeout=config.init_timeout + INIT_GRACE_SECONDS,
      heartbeat_timeout_seconds=config.heartbeat_timeout,
      shutdown_timeout_seconds=max(config.heartbeat_timeout, 10),
    )


def _host(x) -> np.ndarray:
  """A replicated array's value, on every process (``np.asarray`` needs all shards local)."""
  return np.asarray(x.addressable_data(0))


def latest_checkpoint(directory: pathlib.Path) -> tuple[int, pathlib.Path] | None:
  """``(step, path)`` of the newest finished checkpoint ``step_NNNNNN`` in ``directory``.

  orbax writes a checkpoint under a temporary name and renames it once every process is done,
  so a crash mid-save leaves no ``step_NNNNNN`` behind; the finalized check is orbax's own.
  """
  import orbax.checkpoint as ocp

  found = [
    (int(m.group(1)), p)
    for p in directory.glob("step_*")
    if (m := re.fullmatch(r"step_(\d+)", p.name)) and ocp.utils.is_checkpoint_finalized(p)
  ]
  return max(found) if found else None


def train(config: Config, *, on_step: Callable[[int, Any], None] | None = None) -> Result:
  """Trains for ``config.steps`` global batches on all devices; see the module docstring.

  ``on_step(step, state)`` (optional) runs on every process with the state after ``step``
  steps: once before training (the initial or restored state), then after every step.
  """
  start = time.perf_counter()  # the time reported includes start-up and compilation
  watchdog = Watchdog(enabled=config.coordinator is not None or config.distributed)
  try:
    initialize_distributed(config, watchdog)
    return _train(config, watchdog, on_step, start)
  finally:
    watchdog.close()


def _train(config: Config, watchdog: Watchdog, on_step, start: float) -> Result:
  process, processes = jax.process_index(), jax.process_count()
  devices = jax.devices()  # all processes' devices, ordered by process
  if config.global_batch_size % len(devices):
    raise ValueError(
      f"--global-batch-size must be a multiple of the {len(devices)} devices"
      f" ({processes} process(es)), got {config.global_batch_size}."
    )
  x_train, x_test, y_train, y_test = load_data(config)
  if len(x_train) < config.global_batch_size:
    raise ValueError(
      f"--global-batch-size must be at most {len(x_train)} (the training set),"
      f" got {config.global_batch_size}."
    )
  mesh = Mesh(np.asarray(devices), (AXIS,))
  split = NamedSharding(mesh, P(AXIS))

  def global_array(host_value: np.ndarray) -> jax.Array:
    """Every process holds the whole global batch; each device takes its own rows."""
    return jax.make_array_from_callback(host_value.shape, split, lambda index: host_value[index])

  model = CNN(bn_momentum=config.bn_momentum, axis_name=AXIS)
  tx = optax.adam(config.learning_rate)
  init_state, train_step, eval_accuracy = make_functions(model, tx, mesh)
  state = init_state(jax.random.key(config.seed), x_train[:1])

  def slow_peer(what: str) -> Callable[[], str]:
    return lambda: (
      f"data_parallel.py: process {process} of {processes}: {what} did not finish within"
      f" --init-timeout={config.init_timeout} s; a peer process has probably died or hung."
      f" Stopping (exit code {EXIT_PEER_LOST})."
    )

  checkpoints = pathlib.Path(config.checkpoint_dir).absolute() if config.checkpoint_dir else None
  last_saved = None
  if checkpoints is not None and (found := latest_checkpoint(checkpoints)) is not None:
    last_saved = found
    with watchdog.guard(config.init_timeout, slow_peer(f"restoring the checkpoint {found[1]}")):
      state = training.restore_checkpoint(found[1], like=state)
  resumed_from = int(_host(state.step))

  def peer_lost(what: str, flag="--step-timeout", seconds=config.step_timeout) -> Callable[[], str]:
    def message():
      if last_saved is not None:
        resume = (
          f" The newest checkpoint is step {last_saved[0]} in {checkpoints}: restart all"
          f" {processes} processes with the same flags to resume from it."
        )
      elif checkpoints is not None:
        resume = f" No checkpoint was written yet to {checkpoints}: a restart begins at step 0."
      else:
        resume = " No --checkpoint-dir was given: a restart begins at step 0."
      return (
        f"data_parallel.py: process {process} of {processes}: {what} did not finish within"
        f" {flag}={seconds:g} s; a peer process has probably died, hung or"
        f" lost its connection (every collective waits for all {processes} processes)."
        f" Stopping (exit code {EXIT_PEER_LOST}).{resume}"
      )

    return message

  # Evaluation: the test set padded to a multiple of the device count, the padding weighted 0.
  pad = -len(x_test) % len(devices)
  padding = np.zeros((pad, *x_test.shape[1:]), np.float32)
  test_images = global_array(np.concatenate([x_test, padding]))
  test_labels = global_array(np.concatenate([y_test, np.zeros(pad, np.int32)]))
  weights = np.concatenate([np.ones(len(x_test)), np.zeros(pad)]).astype(np.float32)
  test_weights = global_array(weights)

  # Compile before the watchdog starts timing steps (compilation is local and can be slow).
  batch = batch_indices(config, len(x_train), resumed_from)
  sample = (global_array(x_train[batch]), global_array(y_train[batch]))
  train_step = train_step.lower(state, *sample).compile()
  eval_accuracy = eval_accuracy.lower(state, test_images, test_labels, test_weights).compile()
  if processes > 1:  # the slowest compiler sets the pace: wait for it without the step timeout
    with watchdog.guard(config.init_timeout, slow_peer("waiting for every process to compile")):
      multihost_utils.sync_global_devices("data_parallel.py: compiled")

  def save(step):
    nonlocal last_saved
    with watchdog.guard(
      config.init_timeout,
      peer_lost(f"saving the checkpoint of step {step}", "--init-timeout", config.init_timeout),
    ):
      last_saved = (step, training.save_checkpoint(checkpoints / f"step_{step:06d}", state))

  if on_step is not None:
    on_step(resumed_from, state)
  if process == 0:
    if resumed_from:
      print(f"resumed from the checkpoint of step {resumed_from} in {checkpoints}")
    print(
      f"{processes} process(es), {len(devices)} devices, global batch"
      f" {config.global_batch_size} ({config.global_batch_size // len(devices)} per device)"
    )
    print(HEADER)
  history, losses, accuracies = [], [], []
  show_bar = config.progress and process == 0 and sys.stderr.isatty()
  for step in tqdm(range(resumed_from, config.steps), disable=not show_bar, desc="train"):
    batch = batch_indices(config, len(x_train), step)
    images, labels = global_array(x_train[batch]), global_array(y_train[batch])
    with watchdog.guard(config.step_timeout, peer_lost(f"train step {step + 1}")):
      state, metrics = train_step(state, images, labels)
      jax.block_until_ready((state, metrics))
    losses.append(metrics["loss"])
    accuracies.append(metrics["accuracy"])
    done = step + 1
    if on_step is not None:
      on_step(done, state)
    if checkpoints is not None and (done % config.checkpoint_every == 0 or done == config.steps):
      save(done)
    if done % config.log_every == 0 or done == config.steps:
      with watchdog.guard(config.step_timeout, peer_lost(f"evaluation after step {done}")):
        eval_acc = float(_host(eval_accuracy(state, test_images, test_labels, test_weights)))
      row = {
        "step": done,
        "train_loss": float(np.mean([_host(v) for v in losses])),
        "train_accuracy": float(np.mean([_host(v) for v in accuracies])),
        "eval_accuracy": eval_acc,
      }
      history.append(row)
      losses, accuracies = [], []
      if process == 0 and show_bar:
        tqdm.write(ROW.format(**row))
      elif process == 0:
        print(ROW.format(**row), flush=True)
  if not history:  # resumed at the last step: nothing left to train
    with watchdog.guard(config.step_timeout, peer_lost("evaluation")):
      eval_acc = float(_host(eval_accuracy(state, test_images, test_labels, test_weights)))
    history.append(
      {
        "step": resumed_from,
        "train_loss": float("nan"),
        "train_accuracy": float("nan"),
        "eval_accuracy": eval_acc,
      }
    )
  metrics = {
    **history[-1],
    "history": history,
    "resumed_from": resumed_from,
    "processes": processes,
    "devices": len(devices),
    "seconds": time.perf_counter() - start,
  }
  return Result(metrics, state)


def main(argv: list[str] | None = None, *, on_step=None) -> Result:
  """Parses the flags in ``argv`` (default: ``sys.argv``), trains, prints the final line.

  Returns ``Result(metrics, state)``: the last table row plus the history, timing and topology,
  and the final train state. ``on_step`` is passed to ``train``.
  """
  defaults = Config()
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__.split("\n\n", 1)[1],
  )
  add = parser.add_argument
  add(
    "--steps",
    type=int,
    default=defaults.steps,
    help="training steps, one global batch each (default: %(default)s)",
  )
  add(
    "--global-batch-size",
    type=int,
    default=defaults.global_batch_size,
    help="examples per step over all devices of all processes; a multiple of the device"
    " count. BatchNorm's statistics are taken over all of them (default: %(default)s)",
  )
  add(
    "--learning-rate",
    type=float,
    default=defaults.learning_rate,
    help="Adam's step size (default: %(default)s)",
  )
  add(
    "--bn-momentum",
    type=float,
    default=defaults.bn_momentum,
    help="BatchNorm's weight on the old running value (default: %(default)s)",
  )
  add(
    "--seed",
    type=int,
    default=defaults.seed,
    help="seed of the data split, batch order and initialization; every process must use the"
    " same (default: %(default)s)",
  )
  add(
    "--log-every",
    type=int,
    default=defaults.log_every,
    help="steps between table rows with eval accuracy; the last step always logs"
    " (default: %(default)s)",
  )
  add(
    "--checkpoint-dir",
    default=None,
    help="directory, shared by all processes, for orbax checkpoints step_NNNNNN; a run"
    " resumes from the newest one there (default: no checkpoints)",
  )
  add(
    "--checkpoint-every",
    type=int,
    default=defaults.checkpoint_every,
    help="steps between checkpoints; one is also written after the last step"
    " (default: %(default)s)",
  )
  add(
    "--coordinator",
    default=None,
    help="host:port of process 0, which hosts jax.distributed's coordinator (multi-process)",
  )
  add(
    "--num-processes",
    type=int,
    default=None,
    help="number of processes in the run (with --coordinator)",
  )
  add(
    "--process-id",
    type=int,
    default=None,
    help="this process's index in 0..num_processes-1 (with --coordinator)",
  )
  add(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() and let JAX detect the cluster (SLURM, Open MPI,"
    " Cloud TPU, Kubernetes, or JAX_COORDINATOR_ADDRESS); not needed with --coordinator",
  )
  add(
    "--init-timeout",
    type=int,
    default=defaults.init_timeout,
    help="seconds for the slow collective phases of a multi-process run: all processes"
    " connecting, waiting for each other to compile, restoring and saving a checkpoint;"
    f" past it this process stops with exit code {EXIT_PEER_LOST} (default: %(default)s)",
  )
  add(
    "--heartbeat-timeout",
    type=int,
    default=defaults.heartbeat_timeout,
    help="seconds without heartbeats after which JAX declares a process dead and aborts the"
    " others; a backstop behind --step-timeout (default: %(default)s)",
  )
  add(
    "--step-timeout",
    type=float,
    default=defaults.step_timeout,
    help="seconds a train step or evaluation may take in a multi-process run before"
    " this process concludes a peer is lost and stops with exit code"
    f" {EXIT_PEER_LOST} (default: %(default)s)",
  )
  add(
    "--no-progress",
    dest="progress",
    action="store_false",
    help="hide the progress bar (it is also hidden when stderr is not a terminal)",
  )
  args = parser.parse_args(argv)
  for name in (
    "steps",
    "global_batch_size",
    "log_every",
    "checkpoint_every",
    "init_timeout",
    "heartbeat_timeout",
  ):
    if getattr(args, name) < 1:
      parser.error(f"expected --{name.replace('_', '-')} >= 1, got {getattr(args, name)}")
  if args.step_timeout <= 0:
    parser.error(f"expected --step-timeout > 0, got {args.step_timeout}")
  explicit = [args.coordinator, args.num_processes, args.process_id]
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    parser.error(
      "expected --coordinator, --num-processes and --process-id together (or --distributed"
      f" for JAX's cluster auto-detection), got {args.coordinator!r}, {args.num_processes!r},"
      f" {args.process_id!r}"
    )
  config = dataclasses.replace(defaults, **vars(args))
  result = train(config, on_step=on_step)
  if jax.process_index() == 0:
    m = result.metrics
    print(
      f"final eval accuracy {m['eval_accuracy']:.2%} after {m['step']} steps on"
      f" {m['devices']} devices in {m['processes']} process(es) ({m['seconds']:.1f} s)"
    )
  return result


if __name__ == "__main__":
  main()
