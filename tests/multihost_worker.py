"""One process of a multi-process run of ``examples/data_parallel.py``, for ``test_multihost.py``.

    python tests/multihost_worker.py --result OUT.npz [--die-after-step N] -- EXAMPLE_FLAGS...

Runs the example's ``main(EXAMPLE_FLAGS)``. Process 0 then writes the final state (every leaf of
``params``, ``batch_stats`` and ``step``, keyed by its path) and the metrics to ``OUT.npz``.
With ``--die-after-step N`` this process kills itself with SIGKILL right after step N: a peer
that dies mid-run, with no clean-up and no goodbye to the others.

The caller sets the environment (``JAX_PLATFORMS=cpu`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=4``) before jax is imported here.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import importlib.util
import json
import os
import pickle
import signal
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def load_example():
  """examples/data_parallel.py as a module (examples/ is not a package)."""
  path = ROOT / "examples" / "data_parallel.py"
  spec = importlib.util.spec_from_file_location("data_parallel", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["data_parallel"] = module  # dataclasses look their module up while it executes
  spec.loader.exec_module(module)
  return module


# The run every comparison uses: 12 steps of 64 examples (8 per device on 8 devices), a
# checkpoint every 4 steps in the multi-process runs.
STEPS = 12
EXAMPLE_FLAGS = ("--steps", str(STEPS), "--log-every", "100", "--no-progress")


_RUNS: dict = {}


def one_process_run(shared_dir: Path | None = None):
  """``(metrics, states)`` of the example in this process (which must have 8 devices):
  ``states[k]`` is the host state after k steps.

  Run once per test session: memoized here, and with ``shared_dir`` (a directory all
  pytest-xdist workers of the session share) also through a pickle that the first worker
  writes under a file lock and the others read.
  """
  if "run" in _RUNS:
    return _RUNS["run"]
  if shared_dir is None:
    _RUNS["run"] = _run_in_process()
    return _RUNS["run"]
  path = shared_dir / "data_parallel_one_process.pickle"
  with open(shared_dir / "data_parallel_one_process.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not path.exists():
      run = _run_in_process()
      path.with_suffix(".tmp").write_bytes(pickle.dumps(run))
      path.with_suffix(".tmp").rename(path)
    _RUNS["run"] = pickle.loads(path.read_bytes())
  return _RUNS["run"]


def xdist_shared_dir(tmp_path_factory) -> Path | None:
  """The directory all pytest-xdist workers of this session share; None without xdist."""
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    return None
  return tmp_path_factory.getbasetemp().parent


def _run_in_process():
  import jax

  states = {}

  def on_step(step, state):
    states[step] = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state)

  with jax.numpy_dtype_promotion("standard"):  # Flax and optax rely on standard promotion
    result = load_example().main(list(EXAMPLE_FLAGS), on_step=on_step)
  return result.metrics, states


def flat_state(state) -> dict[str, np.ndarray]:
  """``{path: value}`` of a replicated state, readable on every process."""
  import jax

  tree = {"params": state.params, "batch_stats": state.batch_stats, "step": state.step}
  return {
    jax.tree_util.keystr(path): np.asarray(
      leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
    )
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--result",
    type=Path,
    required=True,
    help="where process 0 writes the final state and metrics (.npz)",
  )
  parser.add_argument(
    "--die-after-step", type=int, default=None, help="SIGKILL this process after this step"
  )
  parser.add_argument(
    "example_flags", nargs=argparse.REMAINDER, help="flags for examples/data_parallel.py, after --"
  )
  args = parser.parse_args()
  flags = args.example_flags[1:] if args.example_flags[:1] == ["--"] else args.example_flags

  def on_step(step, state):
    if step == args.die_after_step:
      sys.stdout.flush()
      os.kill(os.getpid(), signal.SIGKILL)

  example = load_example()
  result = example.main(flags, on_step=on_step)
  import jax

  if jax.process_index() == 0:
    metrics = {k: v for k, v in result.metrics.items() if k != "history"}
    np.savez(args.result, metrics=json.dumps(metrics), **flat_state(result.state))


if __name__ == "__main__":
  main()
