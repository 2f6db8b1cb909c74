"""Does evaluation with a traced ``training`` flag pay for batch moments?

``bnjax.batch_norm(..., training=flag)`` with a traced boolean picks the branch at run time
with ``lax.cond``. This script times, under ``jax.jit`` with ``block_until_ready``:

  static eval    training=False (Python bool): running statistics only
  traced eval    training=flag, flag=False at run time (one compiled function for both modes)
  static train   training=True: batch moments + running-statistics update (what evaluation
                 would cost if it computed the moments)
  copy           x * c with c a run-time scalar: one read and one write of x, the floor

Cases run interleaved (``_timing.interleaved``), ``--rounds`` rounds of ``--reps`` calls
each; a time is the median over all calls with the interquartile range, a ratio the
median over rounds of the per-round ratio of medians. It also checks, in the compiled HLO, that
the traced flag became a ``conditional`` whose False branch has no ``reduce`` (no moments).
Writes a markdown report (``--output``) and prints it.

    python benchmarks/bench_traced_flag.py            # ~30 s on 2 CPU cores
    python benchmarks/bench_traced_flag.py --quick    # tiny shapes, ~10 s (mostly compilation)

glibc's allocator distorts timings of large short-lived buffers (arenas, mmap/munmap of every
output, trimming), so by default the script re-runs itself with ``_common.MALLOC_ENV`` set.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import bnjax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
from _common import environment_section, format_ms, format_ratio

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "TRACED_FLAG.md"


@dataclasses.dataclass(frozen=True)
class Config:
  rounds: int = 7
  reps: int = 20  # timed calls per case per round, back to back after an untimed one
  warmup: int = 2  # untimed calls per case after compiling
  quick: bool = False
  output: Path = DEFAULT_OUTPUT
  malloc_env: bool = True
  progress: bool = True


class Shape(NamedTuple):
  name: str
  shape: tuple[int, ...]
  axis: int  # the feature axis


SHAPES = (
  Shape("NHWC", (32, 56, 56, 128), -1),
  Shape("dense", (4096, 1024), -1),
  Shape("NCHW", (32, 128, 56, 56), 1),
)
QUICK_SHAPES = (
  Shape("NHWC", (4, 8, 8, 16), -1),
  Shape("dense", (64, 32), -1),
  Shape("NCHW", (4, 16, 8, 8), 1),
)
CASES = ("static_eval", "traced_eval", "static_train", "copy")
CASE_TITLES = {
  "static_eval": "static eval",
  "traced_eval": "traced eval (False)",
  "static_train": "static train",
  "copy": "copy `x * c`",
}


def make_cases(shape: Shape) -> dict[str, tuple[Callable, tuple]]:
  """Each case as a compiled ``jax.jit`` function and its arguments."""
  x = jax.random.normal(jax.random.key(0), shape.shape, jnp.float32)
  params, stats = bnjax.init(shape.shape[shape.axis])

  def bn(training):
    return jax.jit(lambda x, p, s: bnjax.batch_norm(x, p, s, training=training, axis=shape.axis))

  traced = jax.jit(lambda x, p, s, t: bnjax.batch_norm(x, p, s, training=t, axis=shape.axis))
  cases = {
    "static_eval": (bn(False), (x, params, stats)),
    "traced_eval": (traced, (x, params, stats, jnp.asarray(False))),
    "static_train": (bn(True), (x, params, stats)),
    "copy": (jax.jit(lambda x, c: x * c), (x, jnp.ones((), jnp.float32))),
  }
  return {name: (fn.lower(*args).compile(), args) for name, (fn, args) in cases.items()}


_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_CALLS = re.compile(
  r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)"
)
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_REDUCE = re.compile(r"\sreduce\(")


def _computations(hlo: str) -> dict[str, str]:
  """HLO text split into ``{computation name: body}``; the entry computation is also ``'ENTRY'``."""
  bodies, name, lines = {}, None, []
  for line in hlo.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      name, lines = match.group(1), []
      if line.startswith("ENTRY"):
        bodies["ENTRY"] = name
    elif line == "}" and name is not None:
      bodies[name], name = "\n".join(lines), None
    elif name is not None:
      lines.append(line)
  bodies["ENTRY"] = bodies[bodies["ENTRY"]]
  return bodies


def _has_reduce(bodies: dict[str, str], root: str) -> bool:
  """Whether ``root`` or any computation it calls (fusions, branches, loops) has a reduce."""
  seen, todo = set(), [root]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    body = bodies[name]
    if _REDUCE.search(body):
      return True
    todo += _CALLS.findall(body)
    for group in _BRANCHES.findall(body):
      todo += [b.strip().lstrip("%") for b in group.split(",")]
  return False


def hlo_facts(cases: dict[str, tuple[Callable, tuple]]) -> dict[str, bool | None]:
  """What the compiled HLO shows, without timing anything.

  The traced flag must become an HLO ``conditional`` whose False branch (branch 0: ``lax.cond``
  turns the flag into the index ``int(flag)``) has no ``reduce``, i.e. computes no moments.
  """
  bodies = {name: _computations(compiled.as_text()) for name, (compiled, _) in cases.items()}
  traced = bodies["traced_eval"]
  branches = _BRANCHES.findall(traced["ENTRY"])
  eval_branch = branches[0].split(",")[0].strip().lstrip("%") if branches else None
  return {
    "traced_has_conditional": bool(branches),
    "traced_false_branch_has_reduce": eval_branch and _has_reduce(traced, eval_branch),
    "static_eval_has_reduce": _has_reduce(bodies["static_eval"], "ENTRY"),
    "static_train_has_reduce": _has_reduce(bodies["static_train"], "ENTRY"),
  }


def measure(shapes, config: Config):
  """times[shape][case] = array (rounds, reps) of seconds; facts[shape] = hlo_facts."""
  all_cases = {s.name: make_cases(s) for s in shapes}
  facts = {name: hlo_facts(cases) for name, cases in all_cases.items()}
  samples = _common.time_cases(
    {(shape, case): call for shape, cases in all_cases.items() for case, call in cases.items()},
    config,
  )
  times = {s.name: {c: samples[s.name, c] for c in CASES} for s in shapes}
  return times, facts


def environment(config: Config) -> dict[str, str]:
  return _common.environment(config, **{"malloc env": _common.malloc_env_row()})


def report(shapes, times, facts, config: Config) -> str:
  time_rows, ratio_rows, hlo_rows = [], [], []
  for s in shapes:
    t = times[s.name]
    label = f"{s.name} {'x'.join(map(str, s.shape))} axis={s.axis}"
    gbs = 2 * np.prod(s.shape) * 4 / np.median(t["copy"]) / 1e9
    time_rows.append(
      f"| {label} | " + " | ".join(format_ms(t[c]) for c in CASES) + f" | {gbs:.1f} |"
    )
    ratio_rows.append(
      f"| {label} | {format_ratio(t['traced_eval'], t['static_eval'])} |"
      f" {format_ratio(t['static_eval'], t['copy'])} |"
      f" {format_ratio(t['traced_eval'], t['copy'])} |"
      f" {format_ratio(t['static_train'], t['static_eval'])} |"
    )
    yes = {True: "yes", False: "no", None: "n/a"}
    hlo_rows.append(f"| {label} | " + " | ".join(yes[v] for v in facts[s.name].values()) + " |")
  env = environment(config)
  lines = [
    "# Evaluation with a traced `training` flag",
    "",
    "Written by `benchmarks/bench_traced_flag.py`; do not edit by hand, re-run the script.",
    "",
    "Does `bnjax.batch_norm(x, params, stats, training=flag)` with a traced `flag=False` pay for",
    (
      "batch moments? float32, `jax.jit`, `block_until_ready`; cases interleaved,"
      f" {config.rounds} rounds x {config.reps} calls each (shuffled order; each visit: one"
      " untimed call, then the timed ones back to back)."
    ),
    "",
    "## Times (ms): median [25th, 75th percentile] over all calls",
    "",
    "| shape | " + " | ".join(CASE_TITLES[c] for c in CASES) + " | copy GB/s (read+write) |",
    "|---|" + "---:|" * (len(CASES) + 1),
    *time_rows,
    "",
    "## Ratios: median [25th, 75th percentile] over rounds of the per-round ratio of medians",
    "",
    (
      "| shape | traced eval / static eval | static eval / copy | traced eval / copy |"
      " static train / static eval |"
    ),
    "|---|---:|---:|---:|---:|",
    *ratio_rows,
    "",
    "## Compiled HLO (structure, not timing)",
    "",
    (
      "| shape | traced flag: a `conditional` | its False branch: a `reduce` |"
      " static eval: a `reduce` | static train: a `reduce` |"
    ),
    "|---|---|---|---|---|",
    *hlo_rows,
    "",
    *environment_section(env),
  ]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
  defaults = Config()
  parser = _common.timing_parser(__doc__, defaults, malloc_env=True)
  config = dataclasses.replace(defaults, **vars(_common.timing_args(parser, argv, defaults)))

  if config.malloc_env and _common.rerun_with_malloc_env(__file__, argv) is not None:
    return config.output

  shapes = QUICK_SHAPES if config.quick else SHAPES
  start = time.perf_counter()
  times, facts = measure(shapes, config)
  text = report(shapes, times, facts, config)
  config.output.parent.mkdir(parents=True, exist_ok=True)
  config.output.write_text(text)
  print(text)
  for s in shapes:
    f = facts[s.name]
    print(
      f"{s.name}: compiled traced-flag function contains an HLO conditional (lax.cond):"
      f" {f['traced_has_conditional']}; its False branch computes a reduction:"
      f" {f['traced_false_branch_has_reduce']}"
    )
  print(f"wrote {config.output} in {time.perf_counter() - start:.0f} s")
  return config.output


if __name__ == "__main__":
  main()
