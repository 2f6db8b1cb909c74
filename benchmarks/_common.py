"""What the benchmark scripts share: timing one call, medians with spreads, the environment.

The scripts put this folder on ``sys.path`` first, so they run as ``python benchmarks/X.py`` and
load by file path in the smoke tests alike.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import _timing
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


def timing_parser(doc: str, defaults, *, malloc_env: bool) -> argparse.ArgumentParser:
  """The options every timing script shares: --rounds, --reps, --quick, --output, --no-progress.

  ``defaults`` is the script's config (rounds, reps, output); ``malloc_env`` adds
  --no-malloc-env for scripts that re-run themselves with ``MALLOC_ENV``. ``timing_args``
  completes what this parses.
  """
  parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  parser.add_argument(
    "--rounds",
    type=int,
    default=None,
    help="rounds over all cases; ratios are medians over rounds"
    f" (default: {defaults.rounds}; 2 with --quick)",
  )
  parser.add_argument(
    "--reps",
    type=int,
    default=None,
    help="timed calls per case in each round, back to back after one untimed call"
    f" (default: {defaults.reps}; 2 with --quick)",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="tiny shapes and few rounds: a smoke test of the script, not a measurement",
  )
  parser.add_argument(
    "--output",
    type=Path,
    default=defaults.output,
    help="where to write the markdown report"
    f" (default: benchmarks/{defaults.output.name} next to this script)",
  )
  if malloc_env:
    parser.add_argument(
      "--no-malloc-env",
      dest="malloc_env",
      action="store_false",
      help="run in this process with the current environment instead of"
      " re-running with " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()),
    )
  parser.add_argument(
    "--no-progress",
    dest="progress",
    action="store_false",
    help="hide the progress bar (also hidden when stderr is not a terminal)",
  )
  return parser


def timing_args(parser: argparse.ArgumentParser, argv, defaults) -> argparse.Namespace:
  """``parser``'s arguments, with --rounds and --reps filled in (2 with --quick) and checked."""
  args = parser.parse_args(argv)
  for name in ("rounds", "reps"):
    if getattr(args, name) is None:
      setattr(args, name, 2 if args.quick else getattr(defaults, name))
  if args.rounds < 1 or args.reps < 1:
    parser.error(f"--rounds and --reps must be >= 1, got {args.rounds} and {args.reps}")
  return args


def time_cases(
  cases: Mapping[_timing.Case, tuple[Callable, tuple]], config
) -> dict[_timing.Case, np.ndarray]:
  """``{key: (rounds, reps) seconds}`` of each ``fn(*args)``, waited for (``_timing.interleaved``).

  ``config`` gives ``rounds``, ``reps``, ``warmup`` and ``progress`` (a bar over the rounds, shown
  when stderr is a terminal).
  """
  from tqdm.auto import tqdm

  def call(fn, args):
    jax.block_until_ready(fn(*args))

  with tqdm(
    total=config.rounds, desc="rounds", disable=not (config.progress and sys.stderr.isatty())
  ) as bar:
    return _timing.interleaved(
      {key: functools.partial(call, fn, args) for key, (fn, args) in cases.items()},
      rounds=config.rounds,
      reps=config.reps,
      warmup=config.warmup,
      on_round=bar.update,
    )


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
      f"rounds={config.rounds}, reps={config.reps}, warmup={config.warmup}, quick={config.quick}"
    ),
    "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
  }


def environment_section(env: dict[str, str]) -> list[str]:
  """The report's closing '## Environment' table, as markdown lines."""
  return [
    "## Environment",
    "",
    "| | |",
    "|---|---|",
    *(f"| {k} | {v} |" for k, v in env.items()),
    "",
  ]
