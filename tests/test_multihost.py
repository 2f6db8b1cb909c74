"""examples/data_parallel.py as 2 processes x 4 CPU devices on 127.0.0.1, against 1 process x 8.

Real processes (tests/multihost_worker.py) joined by ``jax.distributed.initialize`` and gloo's
CPU collectives, with timeouts on every wait so that a hang fails a test instead of the job:

- a fault run: process 1 kills itself (SIGKILL) after step 6 of 12, after the checkpoint of
  step 4; process 0 must stop with the example's message and exit code 75 within its
  --step-timeout. The checkpoint of step 4, written by the two processes before the fault,
  must equal one process's state after 4 steps (2 x 4 devices trained as 1 x 8);
- a restart of both processes with the same flags: it must resume from step 4 and end where
  one process with 8 devices ends;
- processes whose peer or coordinator never starts must stop within their --init-timeout.

A run without a fault is not launched separately: the first two checks already compare 2
processes with 1, and every launch costs ~15 s of compiling on 2 cores.

The subprocesses compile with XLA's backend optimization level 0: compiling is most of their
run time, and the float32 results stay within the same DATA_PARALLEL tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from devices import device_mesh, multidevice
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from multihost_worker import (
  EXAMPLE_FLAGS,
  STEPS,
  flat_state,
  one_process_run,
  xdist_shared_dir,
)
from tolerances import DATA_PARALLEL

for _package in ("flax", "optax", "orbax.checkpoint", "sklearn", "tqdm"):
  pytest.importorskip(_package)

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "multihost_worker.py"
LAUNCH_TIMEOUT = 240  # seconds for one launch of both processes, start-up and compiling included
EXIT_PEER_LOST = 75  # examples/data_parallel.py's exit code when a peer is lost
DIE_AFTER, CHECKPOINT_EVERY, STEP_TIMEOUT, INIT_TIMEOUT = 6, 4, 6, 3


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_env(cache_dir: Path) -> dict[str, str]:
  return {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
    "PYTHONUNBUFFERED": "1",
    # Process 0 of a restart reads what process 0 of the first launch compiled.
    "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }


class Launch:
  """Worker processes of one run, each logging to its own file."""

  def __init__(
    self,
    directory: Path,
    name: str,
    process_ids,
    flags,
    *,
    die_after=None,
    num_processes=2,
    port=None,
  ):
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    self.logs = [directory / f"{name}-process{i}.log" for i in process_ids]
    self.result = directory / f"{name}-result.npz"
    self.procs = []
    for i, log in zip(process_ids, self.logs):
      die = ["--die-after-step", str(die_after[i])] if die_after and i in die_after else []
      command = [
        sys.executable,
        str(WORKER),
        "--result",
        str(self.result),
        *die,
        "--",
        *EXAMPLE_FLAGS,
        *flags,
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(num_processes),
        "--process-id",
        str(i),
      ]
      with open(log, "wb") as out:
        self.procs.append(
          subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=worker_env(directory.parent / "compilation-cache"),
          )
        )
    self.started = time.monotonic()

  def wait(self, timeout=LAUNCH_TIMEOUT) -> list[float]:
    """Each process's exit time (time.monotonic); kills them all and fails on timeout."""
    ended = [None] * len(self.procs)
    while None in ended:
      for i, proc in enumerate(self.procs):
        if ended[i] is None and proc.poll() is not None:
          ended[i] = time.monotonic()
      if time.monotonic() - self.started > timeout:
        for proc in self.procs:
          if proc.poll() is None:
            proc.kill()
            proc.wait()
        pytest.fail(f"processes still running after {timeout} s (killed):\n{self.tails()}")
      time.sleep(0.05)
    return ended

  @property
  def returncodes(self):
    return [proc.returncode for proc in self.procs]

  def log(self, i: int) -> str:
    return self.logs[i].read_text(errors="replace")

  def tails(self) -> str:
    return "\n".join(
      f"--- {log.name} (exit {proc.returncode}):\n"
      + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
      for log, proc in zip(self.logs, self.procs)
    )


def assert_states_match(actual: dict, expected: dict, what: str):
  assert sorted(actual) == sorted(expected), what
  for key, value in expected.items():
    np.testing.assert_allclose(actual[key], value, err_msg=f"{what}: {key}", **DATA_PARALLEL)
  largest = max(float(np.max(np.abs(actual[k] - v), initial=0.0)) for k, v in expected.items())
  print(f"\n{what}: largest difference from 1 process x 8 devices {largest:.2g}")


def checkpoint_flags(directory: Path) -> list[str]:
  return [
    "--checkpoint-dir",
    str(directory),
    "--checkpoint-every",
    str(CHECKPOINT_EVERY),
    "--step-timeout",
    str(STEP_TIMEOUT),
    "--init-timeout",
    "120",
    # JAX's heartbeat check is the backstop; the example's watchdog must speak first.
    "--heartbeat-timeout",
    "60",
  ]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """``(metrics, states)``: the example on this process's 8 devices, once per session."""
  return one_process_run(xdist_shared_dir(tmp_path_factory))


@pytest.mark.slow
@multidevice
def test_peer_death_stops_the_survivor_and_a_restart_ends_as_one_process(tmp_path, one_process):
  # One test, in stages, so that pytest-xdist never runs the launches twice on two workers.
  from bnjax import training

  metrics, states = one_process
  checkpoints = tmp_path / "checkpoints"

  # 1. Both processes, a checkpoint every 4 steps; process 1 is killed after step 6.
  fault = Launch(tmp_path, "fault", [0, 1], checkpoint_flags(checkpoints), die_after={1: DIE_AFTER})
  ended = fault.wait()
  assert fault.returncodes == [EXIT_PEER_LOST, -signal.SIGKILL], fault.tails()
  log = fault.log(0)
  expected = (
    f"process 0 of 2: train step {DIE_AFTER + 1} did not finish within"
    f" --step-timeout={STEP_TIMEOUT} s; a peer process has probably died"
  )
  assert expected in log, fault.tails()
  assert (
    f"The newest checkpoint is step {CHECKPOINT_EVERY} in {checkpoints}: restart all 2"
    " processes with the same flags to resume from it."
  ) in log, fault.tails()
  assert "Check failure stack trace" not in log  # the watchdog spoke before JAX's abort
  seconds = ended[0] - ended[1]
  print(f"\nsurvivor stopped {seconds:.1f} s after its peer died (--step-timeout={STEP_TIMEOUT})")
  assert seconds < STEP_TIMEOUT + 30, seconds  # bounded: the timeout plus scheduling slack

  # 2. The checkpoint of step 4, written by 2 processes x 4 devices before the fault and
  # restored here on 1 process x 8 devices, holds one process's state after 4 steps.
  like = jax.device_put(states[0], NamedSharding(device_mesh(), P()))
  restored = training.restore_checkpoint(checkpoints / f"step_{CHECKPOINT_EVERY:06d}", like=like)
  assert_states_match(
    flat_state(restored),
    flat_state(states[CHECKPOINT_EVERY]),
    f"checkpoint after {CHECKPOINT_EVERY} steps",
  )
  for got, want in zip(
    jax.tree.leaves(restored.opt_state), jax.tree.leaves(states[CHECKPOINT_EVERY].opt_state)
  ):
    np.testing.assert_allclose(np.asarray(got), want, **DATA_PARALLEL)

  # 3. Both processes restarted with the same flags resume from step 4 and end, after 12
  # steps, where one process with 8 devices ends.
  restart = Launch(tmp_path, "restart", [0, 1], checkpoint_flags(checkpoints))
  restart.wait()
  assert restart.returncodes == [0, 0], restart.tails()
  assert f"resumed from the checkpoint of step {CHECKPOINT_EVERY}" in restart.log(0)
  with np.load(restart.result) as saved:
    resumed = json.loads(str(saved["metrics"]))
    final = {key: saved[key] for key in saved.files if key != "metrics"}
  assert resumed["resumed_from"] == CHECKPOINT_EVERY, resumed
  assert (resumed["processes"], resumed["devices"], resumed["step"]) == (2, 8, STEPS), resumed
  assert_states_match(final, flat_state(states[STEPS]), f"after {STEPS} steps")
  assert abs(resumed["eval_accuracy"] - metrics["eval_accuracy"]) <= 1 / 450, resumed


@pytest.mark.slow
def test_missing_peer_or_coordinator_stops_within_the_init_timeout(tmp_path):
  # Process 0 alone (its peer never starts) and process 1 alone (no coordinator to reach),
  # as two separate runs at the same time.
  flags = ["--init-timeout", str(INIT_TIMEOUT)]
  ports = free_port(), free_port()
  alone = [Launch(tmp_path, f"alone{i}", [i], flags, port=port) for i, port in zip((0, 1), ports)]
  for launch, port in zip(alone, ports):
    launch.wait(timeout=120)
    assert launch.returncodes == [EXIT_PEER_LOST], launch.tails()
    assert (
      f"not all processes connected to the coordinator at 127.0.0.1:{port} within"
      f" --init-timeout={INIT_TIMEOUT} s"
    ) in launch.log(0), launch.tails()
    assert "Check failure stack trace" not in launch.log(0)
