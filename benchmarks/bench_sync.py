"""What does synchronizing batch statistics across devices cost, next to local batch norm?

Both cases run ``bnjax.batch_norm(training=True)`` per device inside one ``jax.shard_map`` over
fake CPU devices, on the same global batch split along axis 0:

  local    axis_name=None: each device normalizes with the statistics of its own shard
  synced   axis_name='d': the devices combine their (count, mean, M2) in one all_gather and
           all normalize with the statistics of the global batch

for the training forward pass (``train``: y and the new running statistics) and forward plus
backward (``train+grad``: the gradients with respect to x, scale and bias of sum(y * dy)), at
issue 6's float32 benchmark shapes (``bench_batch_norm.SHAPES``, features last) and one small
batch, where the fixed cost of a rendezvous shows.

Each device count runs in its own process (XLA fixes the count at start-up), with the
allocator settings of ``_common.MALLOC_ENV``:

  8 devices  issue 6's setting: 8 threads take turns on the host's cores, so a rendezvous
             also waits for the threads that were not running
  2 devices  one device per core (on a 2-core host): the rendezvous without that queueing

Cases run interleaved (``_timing.interleaved``), ``--rounds`` rounds of ``--reps`` calls
each; a time is the median over all calls with the interquartile range, a
ratio the median over rounds of the per-round ratio of medians. The compiled HLO of each case
is checked for its collectives: one all-gather per synced forward (its transpose, an
all-reduce of the 2C per-channel sums, in the backward pass), none when local.
Writes a markdown report (``--output``) and prints it.

    python benchmarks/bench_sync.py            # ~1 min on 2 CPU cores
    python benchmarks/bench_sync.py --quick    # tiny shapes, a smoke test (~15 s, compiling)

Fake devices are threads of one process sharing the host's cores, so the collective is an
in-memory rendezvous: this measures the synchronization and the extra arithmetic, not a
network. docs/multi_device.md works out the bytes a real interconnect carries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import bench_batch_norm
from _common import environment_section, format_ms, format_ratio

DEVICE_COUNTS = (8, 2)  # issue 6's setting, and one device per core of a 2-core host
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "SYNC.md"
_WORKER = "_BNJAX_BENCH_SYNC_DEVICES"  # set in the processes that measure


@dataclasses.dataclass(frozen=True)
class Config:
  rounds: int = 7
  reps: int = 10  # timed calls per case per round, back to back after an untimed one
  warmup: int = 2  # untimed calls per case after compiling
  quick: bool = False
  output: Path = DEFAULT_OUTPUT
  progress: bool = True


class Shape(NamedTuple):
  name: str
  shape: tuple[int, ...]  # the global batch; split along axis 0; features last


SHAPES = (
  *(
    Shape(s.name, s.shape) for s in bench_batch_norm.SHAPES if s.axis == -1 and s.dtype == "float32"
  ),
  Shape("NHWC, small", (64, 16, 16, 64)),
)
QUICK_SHAPES = (Shape("NHWC", (16, 4, 4, 8)),)
PASSES = ("train", "train+grad")
MODES = ("local", "synced")


def make_case(shape: Shape, mesh, mode: str, pass_: str):
  """A compiled shard_map program and its arguments."""
  channels = shape.shape[-1]
  rng = np.random.default_rng(0)
  x = rng.normal(1.0, 2.0, shape.shape).astype(np.float32)
  dy = rng.standard_normal(shape.shape, np.float32)
  params, stats = bnjax.init(channels)
  axis_name = "d" if mode == "synced" else None

  def forward(x, params):
    return bnjax.batch_norm(x, params, stats, training=True, axis_name=axis_name)

  if pass_ == "train":

    def body(x, dy, params):
      y, new_stats = forward(x, params)
      return y, jax.tree.map(lambda s: s[None], new_stats)
  else:

    def body(x, dy, params):
      def loss(x, params):
        return jnp.vdot(forward(x, params)[0], dy)

      dx, dparams = jax.grad(loss, argnums=(0, 1))(x, params)
      return dx, jax.tree.map(lambda g: g[None], dparams)

  # Same program shape for both modes: per-device outputs (P('d')), no replication check.
  fn = jax.jit(
    jax.shard_map(
      body, mesh=mesh, in_specs=(P("d"), P("d"), P()), out_specs=P("d"), check_vma=False
    )
  )
  split = NamedSharding(mesh, P("d"))
  args = (
    jax.device_put(x, split),
    jax.device_put(dy, split),
    jax.device_put(params, NamedSharding(mesh, P())),
  )
  return fn.lower(*args).compile(), args


_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(compiled) -> dict[str, int]:
  hlo = compiled.as_text()
  return {op: len(re.findall(rf" {op}(?:-start)?\(", hlo)) for op in _COLLECTIVES}


def _describe(counts: dict[str, int]) -> str:
  """'all-gather x1, reduce-scatter x1', or 'none'."""
  return ", ".join(f"{op} x{n}" for op, n in counts.items() if n) or "none"


def measure(shapes, config: Config):
  """times[shape][pass][mode] = (rounds, reps) seconds; hlo[shape][pass][mode] = collectives."""
  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  cases = {
    s.name: {p: {m: make_case(s, mesh, m, p) for m in MODES} for p in PASSES} for s in shapes
  }
  hlo = {
    s: {
      p: {m: collectives(compiled) for m, (compiled, _) in by_mode.items()}
      for p, by_mode in by_pass.items()
    }
    for s, by_pass in cases.items()
  }
  samples = _common.time_cases(
    {
      (s, p, m): call
      for s, by_pass in cases.items()
      for p, by_mode in by_pass.items()
      for m, call in by_mode.items()
    },
    config,
  )
  times = {s.name: {p: {m: samples[s.name, p, m] for m in MODES} for p in PASSES} for s in shapes}
  return times, hlo


def _load() -> str:
  try:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1, 5, 15 min)"
  except OSError:
    return "unknown"


def worker(shapes, config: Config, path: Path) -> None:
  """Measures with this process's devices and writes the raw results to ``path`` as JSON."""
  times, hlo = measure(shapes, config)
  env = _common.environment(
    config, **{"malloc env": _common.malloc_env_row(), "load average at the end": _load()}
  )
  path.write_text(
    json.dumps(
      {
        "devices": jax.device_count(),
        "times": {
          s: {p: {m: t.tolist() for m, t in by_mode.items()} for p, by_mode in by_pass.items()}
          for s, by_pass in times.items()
        },
        "hlo": hlo,
        "environment": env,
      }
    )
  )


def run_worker(devices: int, argv: list[str], path: Path) -> dict:
  """Runs this script in a fresh process with ``devices`` fake CPU devices; its JSON results."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
  env = {
    **os.environ,
    **_common.MALLOC_ENV,
    _WORKER: str(devices),
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
  }
  subprocess.run([sys.executable, __file__, *argv, "--json", str(path)], env=env, check=True)
  return json.loads(path.read_text())


def _ms(samples) -> float:
  return float(np.median(samples)) * 1e3


def report(shapes, results: list[dict], config: Config) -> str:
  rows = []
  for result in results:
    devices = result["devices"]
    for s in shapes:
      per_device = (s.shape[0] // devices, *s.shape[1:])
      channels = s.shape[-1]
      sent = (3 * channels + 1) * 4  # bytes one device contributes: count, C shifts, deltas, M2s
      for p in PASSES:
        t = {m: np.asarray(v) for m, v in result["times"][s.name][p].items()}
        h = result["hlo"][s.name][p]
        rows.append(
          f"| {devices} | {s.name} {'x'.join(map(str, s.shape))} |"
          f" {'x'.join(map(str, per_device))} | {sent} B / {devices * sent} B | {p} |"
          f" {format_ms(t['local'])} | {format_ms(t['synced'])} |"
          f" {_ms(t['synced']) - _ms(t['local']):+.2f} |"
          f" {format_ratio(t['synced'], t['local'])} |"
          f" {_describe(h['synced'])} | {_describe(h['local'])} |"
        )
  env = dict(results[0]["environment"])
  env["device"] = f"{env['device'].split(',')[0]}, " + " and ".join(
    f"{r['devices']} fake devices" for r in results
  )
  env["XLA_FLAGS"] = "; ".join(r["environment"]["XLA_FLAGS"] for r in results)
  env["load average at the end"] = results[-1]["environment"]["load average at the end"]
  counts = " and ".join(str(r["devices"]) for r in results)
  lines = [
    f"# Synchronized vs local batch norm on {counts} devices",
    "",
    "Written by `benchmarks/bench_sync.py`; do not edit by hand, re-run the script.",
    "",
    (
      "`bnjax.batch_norm(training=True)` per device inside `jax.shard_map` over fake CPU devices"
      " (threads of one process sharing the host's cores: the collective is an in-memory"
      " rendezvous, not a network). local: `axis_name=None`, each device uses its own shard's"
      " statistics; synced: `axis_name='d'`, one all-gather of (count, shift, delta, M2)."
      " train: forward (y and new running statistics); train+grad: forward and backward"
      " (d/dx, d/dscale, d/dbias of sum(y * dy)). float32, `jax.jit`, `block_until_ready`;"
      f" cases interleaved, {config.rounds} rounds x {config.reps} calls each (shuffled order;"
      " each visit: one untimed call, then the timed ones back to back)."
      " Each device count runs in its own process."
    ),
    "",
    (
      "With more devices than cores, the threads take turns: the synced program's rendezvous"
      " waits until every device thread has had its turn, where local ones run through. With"
      " one device per core that queueing is gone and the rest is the synchronization itself."
    ),
    "",
    (
      "Times in ms: median [25th, 75th percentile] over all calls; the difference is of the"
      " medians. Ratio: median [25th, 75th] over rounds of the per-round ratio of medians."
      " Bytes: what one device contributes to the all-gather, (3C+1) float32, and what every"
      " device receives. Collectives: counted in the compiled HLO (structure, not timing)."
    ),
    "",
    (
      "| devices | global shape | per device | all-gather bytes (sent / received) | pass |"
      " local | synced | synced - local (ms) | synced / local | collectives (synced) |"
      " collectives (local) |"
    ),
    "|---:|---|---|---:|---|---:|---:|---:|---:|---|---|",
    *rows,
    "",
    *environment_section(env),
  ]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
  defaults = Config()
  parser = _common.timing_parser(__doc__, defaults, malloc_env=False)
  parser.add_argument(
    "--devices",
    type=int,
    nargs="+",
    default=list(DEVICE_COUNTS),
    help="fake CPU device counts, each measured in its own process"
    f" (default: {' '.join(map(str, DEVICE_COUNTS))})",
  )
  parser.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)  # worker output
  args = _common.timing_args(parser, argv, defaults)
  if any(n < 1 for n in args.devices):
    parser.error(f"--devices must be >= 1, got {args.devices}")
  shapes = QUICK_SHAPES if args.quick else SHAPES
  if any(s.shape[0] % n for s in shapes for n in args.devices):
    parser.error(
      f"--devices {args.devices}: each must divide every batch,"
      f" {sorted({s.shape[0] for s in shapes})}"
    )
  devices, json_path = args.devices, args.json
  del args.devices, args.json
  config = dataclasses.replace(defaults, **vars(args))

  if os.environ.get(_WORKER):
    expected = int(os.environ[_WORKER])
    if jax.device_count() != expected:
      raise RuntimeError(f"bench_sync: expected {expected} CPU devices, got {jax.device_count()}")
    worker(shapes, config, json_path)
    return json_path

  start = time.perf_counter()
  passthrough = sys.argv[1:] if argv is None else list(argv)
  with tempfile.TemporaryDirectory() as tmp:
    results = [run_worker(n, passthrough, Path(tmp) / f"{n}.json") for n in devices]
  text = report(shapes, results, config)
  config.output.parent.mkdir(parents=True, exist_ok=True)
  config.output.write_text(text)
  print(text)
  print(f"wrote {config.output} in {time.perf_counter() - start:.0f} s")
  return config.output


if __name__ == "__main__":
  main()
