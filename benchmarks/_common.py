"""What the benchmark scripts share: timing one call, medians with spreads, the environment.

The scripts put this folder on ``sys.path`` first, so they run as ``python benchmarks/X.py`` and
load by file path in the smoke tests alike.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

import bnjax

# glibc's allocator told to reuse freed buffers: without it every fresh output of tens of MB is
# mapped and unmapped per call, and its page faults hide the algorithm being timed.
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
}


def malloc_env_active() -> bool:
  return all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())


def malloc_env_row() -> str:
  """The environment table's 'malloc env' entry: whether the tuned settings are in force."""
  malloc = " ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in MALLOC_ENV)
  return f"{'tuned' if malloc_env_active() else 'NOT the tuned setting'}: {malloc}"


def rerun_with_malloc_env(script: str, argv) -> int | None:
  """Runs ``script`` again in a fresh process with ``MALLOC_ENV`` unless it is in force.

  glibc reads these at start-up only. Returns the child's exit status, or None when the
  settings are already in force and the caller should go on.
  """
  if malloc_env_active():
    return None
  argv = sys.argv[1:] if argv is None else list(argv)
  return subprocess.call([sys.executable, script, *argv], env={**os.environ, **MALLOC_ENV})


def time_call(fn: Callable, args: tuple) -> float:
  """Seconds for one call, waiting for the result."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def format_ms(samples: np.ndarray) -> str:
  """'median [25th, 75th percentile]' of samples in seconds, as milliseconds."""
  q25, q50, q75 = np.percentile(samples, [25, 50, 75]) * 1e3
  return f"{q50:.3g} [{q25:.3g}, {q75:.3g}]"


def format_ratio(num: np.ndarray, den: np.ndarray) -> str:
  """Percentiles over rounds of the per-round ratio of medians; inputs are (rounds, reps)."""
  per_round = np.median(num, axis=1) / np.median(den, axis=1)
  q25, q50, q75 = np.percentile(per_round, [25, 50, 75])
  return f"{q50:.2f} [{q25:.2f}, {q75:.2f}]"


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or "unknown processor"


def environment(config, **extra: str) -> dict[str, str]:
  """Device, CPUs, versions and settings, plus the script's own ``extra`` entries."""
  device = jax.devices()[0]
  return {
      "device": f"{device.device_kind} ({device.platform}), {jax.device_count()} device(s)",
      "CPUs": f"{os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})",
      "processor": f"{_cpu_model()}, {platform.machine()}",
      **extra,
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", "(unset)") or "(empty)",
      "versions": (
          f"python {platform.python_version()}, jax {jax.__version__},"
          f" jaxlib {importlib.metadata.version('jaxlib')}, numpy {np.__version__},"
          f" bnjax {bnjax.__version__}"
      ),
      "settings": (
          f"rounds={config.rounds}, reps={config.reps}, warmup={config.warmup},"
          f" quick={config.quick}"
      ),
      "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
  }


def environment_section(env: dict[str, str]) -> list[str]:
  """The report's closing '## Environment' table, as markdown lines."""
  return ["## Environment", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in env.items()), ""]
