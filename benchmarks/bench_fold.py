"""What does folding the batch norms into the convolutions save at inference?

``bnjax.fold`` turns ``conv -> batch norm (running statistics) -> relu`` into
``conv' -> + bias' -> relu``. This script times, under ``jax.jit`` with ``block_until_ready``,
a small ResNet-like stage (float32 NHWC, several blocks of 64 -> 64 channels, variables passed
as arguments as in a served model):

  unfolded   conv (no bias) -> bnjax.batch_norm(training=False) -> relu, per block
  folded     conv with the folded kernel -> + folded bias -> relu (``bnjax.fold.fold_affine``)
  conv only  conv -> relu, no batch norm and no bias: the floor folding can at best reach

for 3x3 and 1x1 convolutions. Cases run interleaved (``_timing.interleaved``), ``--rounds``
rounds of ``--reps`` calls each; a time is the median over all calls with the
interquartile range, a ratio the median over rounds of the per-round ratio of medians. It also
checks that the folded net computes what the unfolded one does, and counts the compiled
programs' top-level operations (fusions and convolutions), which shows where a batch norm
after a convolution runs. Writes a markdown report (``--output``) and prints it.

    python benchmarks/bench_fold.py            # ~1.5 min on 2 CPU cores (7 rounds x 8 calls)
    python benchmarks/bench_fold.py --quick    # tiny shapes, a few seconds

glibc's allocator distorts timings of large short-lived buffers (arenas, mmap/munmap of every
output, trimming), so by default the script re-runs itself with ``_common.MALLOC_ENV`` set.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import bnjax
from bnjax import fold

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402, RUF100
from _common import environment_section, format_ms, format_ratio  # noqa: E402, RUF100

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "FOLD.md"


@dataclasses.dataclass(frozen=True)
class Config:
  rounds: int = 7
  reps: int = 8  # timed calls per case per round, back to back after an untimed one
  warmup: int = 2  # untimed calls per case after compiling
  quick: bool = False
  output: Path = DEFAULT_OUTPUT
  malloc_env: bool = True
  progress: bool = True


class Net(NamedTuple):
  name: str
  input_shape: tuple[int, ...]  # NHWC
  window: int  # the convolutions' kernel size
  blocks: int


NETS = (
  Net("3x3", (32, 56, 56, 64), 3, 3),
  Net("1x1", (32, 56, 56, 64), 1, 3),
)
QUICK_NETS = (
  Net("3x3", (2, 8, 8, 16), 3, 1),
  Net("1x1", (2, 8, 8, 16), 1, 1),
)
CASES = ("unfolded", "folded", "conv_only")
CASE_TITLES = {
  "unfolded": "unfolded (conv, BN, relu)",
  "folded": "folded (conv, bias, relu)",
  "conv_only": "conv only (conv, relu)",
}
EPSILON = 1e-5


def conv(x, kernel):
  return lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def unfolded_net(x, kernels, bn_params, bn_stats):
  for kernel, params, stats in zip(kernels, bn_params, bn_stats):
    x, _ = bnjax.batch_norm(conv(x, kernel), params, stats, training=False, epsilon=EPSILON)
    x = jax.nn.relu(x)
  return x


def folded_net(x, kernels, biases):
  for kernel, bias in zip(kernels, biases):
    x = jax.nn.relu(conv(x, kernel) + bias)
  return x


def conv_only_net(x, kernels):
  for kernel in kernels:
    x = jax.nn.relu(conv(x, kernel))
  return x


def make_variables(net: Net):
  """He-initialized kernels, running statistics of real activations, random scale and bias."""
  rng = np.random.default_rng(0)
  c = net.input_shape[-1]
  x = jnp.asarray(rng.normal(size=net.input_shape), jnp.float32)
  fan_in = net.window * net.window * c
  kernels, bn_params, bn_stats = [], [], []
  h = x
  for _ in range(net.blocks):
    kernel = jnp.asarray(
      rng.normal(0.0, math.sqrt(2 / fan_in), (net.window, net.window, c, c)), jnp.float32
    )
    params = {
      "scale": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
      "bias": jnp.asarray(rng.normal(0.0, 0.5, c), jnp.float32),
    }
    mean, var = bnjax.moments(conv(h, kernel), (0, 1, 2))
    stats = {"mean": mean, "var": var}
    h = unfolded_net(h, [kernel], [params], [stats])
    kernels.append(kernel)
    bn_params.append(params)
    bn_stats.append(stats)
  return x, kernels, bn_params, bn_stats


def make_cases(net: Net):
  """Each case as a compiled ``jax.jit`` function and its arguments; and the accuracy check."""
  x, kernels, bn_params, bn_stats = make_variables(net)
  folded = [
    fold.fold_affine(k, None, p, s, epsilon=EPSILON)
    for k, p, s in zip(kernels, bn_params, bn_stats)
  ]
  cases = {
    "unfolded": (unfolded_net, (x, kernels, bn_params, bn_stats)),
    "folded": (folded_net, (x, [k for k, _ in folded], [b for _, b in folded])),
    "conv_only": (conv_only_net, (x, kernels)),
  }
  compiled = {
    name: (jax.jit(fn).lower(*args).compile(), args) for name, (fn, args) in cases.items()
  }
  unfolded = np.asarray(compiled["unfolded"][0](*compiled["unfolded"][1]), np.float64)
  refolded = np.asarray(compiled["folded"][0](*compiled["folded"][1]), np.float64)
  # A sanity bound, not a test: per block, both sides' sums of K products within 8 eps sqrt(K)
  # of the exact value relative to the output's scale (tests/tolerances.py, `tolerance`), twice
  # that apart; the blocks' errors add up.
  fan_in = net.window * net.window * net.input_shape[-1]
  bound = (
    2
    * 8
    * np.finfo(np.float32).eps
    * math.sqrt(fan_in)
    * net.blocks
    * max(1.0, float(np.abs(unfolded).max()))
  )
  check = {
    "max_diff": float(np.abs(refolded - unfolded).max()),
    "bound": bound,
    "max_abs": float(np.abs(unfolded).max()),
  }
  return compiled, check


_ENTRY = re.compile(r"^ENTRY .*?\{\n(.*?)\n\}", re.DOTALL | re.MULTILINE)
_OP = re.compile(r"=\s*\w+\[([\d,]*)\]\S*\s+(fusion|convolution|custom-call|dot)\(")
_KIND = re.compile(r"\bkind=(\w+)")


def top_level_ops(compiled, activation_size: int) -> str:
  """The entry computation's operations, as '<convolutions> / <passes> / <per-channel>'.

  A convolution is a ``convolution``, a ``dot`` (a small 1x1 convolution), a ``custom-call``
  or a ``kCustom`` fusion (XLA's CPU backend hands convolutions to a library that way); any
  other fusion is a pass over the
  activations when its output is activation-sized, else per-channel work on (C,) vectors.
  """
  entry = _ENTRY.search(compiled.as_text())
  convolutions = passes = per_channel = 0
  for line in entry.group(1).splitlines() if entry else ():
    op = _OP.search(line)
    if not op:
      continue
    kind = _KIND.search(line)
    if op.group(2) != "fusion" or (kind and kind.group(1) == "kCustom"):
      convolutions += 1
    elif math.prod(int(d) for d in op.group(1).split(",") if d) >= activation_size:
      passes += 1
    else:
      per_channel += 1
  return f"{convolutions} / {passes} / {per_channel}"


def measure(nets, config: Config):
  """times[net][case] = array (rounds, reps) of seconds; checks[net]; ops[net][case]."""
  all_cases, checks = {}, {}
  for net in nets:
    all_cases[net.name], checks[net.name] = make_cases(net)
  ops = {
    net.name: {
      c: top_level_ops(fn, math.prod(net.input_shape)) for c, (fn, _) in all_cases[net.name].items()
    }
    for net in nets
  }
  samples = _common.time_cases(
    {(net, case): call for net, cases in all_cases.items() for case, call in cases.items()},
    config,
  )
  times = {n.name: {c: samples[n.name, c] for c in CASES} for n in nets}
  return times, checks, ops


def environment(config: Config, load: tuple[float, float]) -> dict[str, str]:
  return _common.environment(
    config,
    **{
      "malloc env": _common.malloc_env_row(),
      # Other processes share the CPUs; a load above the CPU count slows every case alike
      # (they are interleaved), which blurs times more than ratios.
      "load average": f"{load[0]:.2f} at the start, {load[1]:.2f} at the end (1 minute)",
    },
  )


def _label(net: Net) -> str:
  shape = "x".join(map(str, net.input_shape))
  return f"{net.name}: {net.blocks} x conv{net.window}x{net.window}, {shape}"


def report(nets, times, checks, ops, config: Config, load: tuple[float, float]) -> str:
  time_rows, ratio_rows, check_rows, op_rows = [], [], [], []
  for net in nets:
    t, c = times[net.name], checks[net.name]
    label = _label(net)
    time_rows.append(f"| {label} | " + " | ".join(format_ms(t[case]) for case in CASES) + " |")
    ratio_rows.append(
      f"| {label} | {format_ratio(t['folded'], t['unfolded'])} |"
      f" {format_ratio(t['unfolded'], t['conv_only'])} |"
      f" {format_ratio(t['folded'], t['conv_only'])} |"
    )
    check_rows.append(
      f"| {label} | {c['max_diff']:.2g} | {c['bound']:.2g} | {c['max_abs']:.3g} |"
      f" {'yes' if c['max_diff'] <= c['bound'] else 'NO'} |"
    )
    op_rows.append(f"| {label} | " + " | ".join(ops[net.name][case] for case in CASES) + " |")
  env = environment(config, load)
  lines = [
    "# Inference with the batch norms folded into the convolutions",
    "",
    "Written by `benchmarks/bench_fold.py`; do not edit by hand, re-run the script.",
    "",
    "`bnjax.fold` turns each `conv -> batch norm -> relu` into `conv' -> + bias' -> relu`.",
    "float32 NHWC, `jax.jit`, `block_until_ready`, the variables passed as arguments; cases",
    f"interleaved, {config.rounds} rounds x {config.reps} calls each (shuffled order; each",
    "visit: one untimed call, then the timed ones back to back).",
    "",
    "## Times (ms): median [25th, 75th percentile] over all calls",
    "",
    "| net | " + " | ".join(CASE_TITLES[c] for c in CASES) + " |",
    "|---|" + "---:|" * len(CASES),
    *time_rows,
    "",
    "## Ratios: median [25th, 75th percentile] over rounds of the per-round ratio of medians",
    "",
    "| net | folded / unfolded | unfolded / conv only | folded / conv only |",
    "|---|---:|---:|---:|",
    *ratio_rows,
    "",
    "## The folded net computes the same (float32)",
    "",
    "| net | max \\|folded - unfolded\\| | bound | max \\|unfolded\\| | within |",
    "|---|---:|---:|---:|---|",
    *check_rows,
    "",
    "## Compiled programs: convolutions / passes over the activations / per-channel operations",
    "",
    "Top-level operations of each compiled program (structure, not timing).",
    "",
    "| net | " + " | ".join(CASE_TITLES[c] for c in CASES) + " |",
    "|---|" + "---|" * len(CASES),
    *op_rows,
    "",
    "A pass reads a convolution's output and writes the next block's input (relu fused in);",
    "per-channel operations work on (C,) vectors (the batch norm's `rsqrt(var + eps) * scale`).",
    "Where the batch norm rides in the pass that applies the relu anyway, folding saves its",
    "arithmetic and per-channel operations, not a pass over memory. A backend that fuses the",
    "bias and relu into the convolution itself (cuDNN on GPU) saves the pass as well.",
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

  nets = QUICK_NETS if config.quick else NETS
  start, load_start = time.perf_counter(), os.getloadavg()[0]
  times, checks, ops = measure(nets, config)
  text = report(nets, times, checks, ops, config, (load_start, os.getloadavg()[0]))
  config.output.parent.mkdir(parents=True, exist_ok=True)
  config.output.write_text(text)
  print(text)
  print(f"wrote {config.output} in {time.perf_counter() - start:.0f} s")
  return config.output


if __name__ == "__main__":
  main()
