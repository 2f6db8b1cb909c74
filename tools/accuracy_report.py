"""Measures training-mode batch norm's float32 error against float64 at growing offsets, for
bnjax and every peer installed, and writes docs/ACCURACY.md and docs/accuracy.png.

    python tools/accuracy_report.py            # all peers: needs the flax, tf and torch extras
    python tools/accuracy_report.py --quick    # three offsets, no files written: prints the table

Each library normalizes the same float32 input x = offset + N(0, 1) (NHWC, 16384 elements per
channel) with batch statistics. The errors are taken against float64 arithmetic on that same
input: for y, max|y - y64| / max|y64|; for the batch variance, max |var - var64| / var64 over the
channels. A peer's batch variance is read from its running variance after one update that
replaces it (momentum 0, or PyTorch's 1, its Bessel factor undone in float64).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import os
import pathlib
import platform
import sys
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import jax.numpy as jnp
import numpy as np

import bnjax

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPE = (64, 16, 16, 8)
EPSILON = 1e-3
RATIOS = (1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6)
QUICK_RATIOS = (1.0, 1e4, 1e6)


@dataclasses.dataclass(frozen=True)
class Peer:
  name: str
  module: str  # the package it needs, or "" for bnjax
  run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # x -> (y, batch variance)


def _bnjax(x):
  params, stats = bnjax.init(x.shape[-1])
  y, _ = bnjax.batch_norm(jnp.asarray(x), params, stats, training=True, epsilon=EPSILON)
  _, var = bnjax.moments(jnp.asarray(x), (0, 1, 2))
  return np.asarray(y), np.asarray(var)


def _flax(fast: bool):
  def run(x):
    import flax.linen as nn

    bn = nn.BatchNorm(
      use_running_average=False, momentum=0.0, epsilon=EPSILON, use_fast_variance=fast
    )
    variables = bn.init(jax.random.key(0), x)
    y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    return np.asarray(y), np.asarray(updates["batch_stats"]["var"])

  return run


def _torch(x):
  import torch

  t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  running_mean, running_var = torch.zeros(x.shape[-1]), torch.ones(x.shape[-1])
  y = torch.nn.functional.batch_norm(
    t, running_mean, running_var, training=True, momentum=1.0, eps=EPSILON
  )
  n = x.size // x.shape[-1]
  var = running_var.numpy().astype(np.float64) * (n - 1) / n
  return y.numpy().transpose(0, 2, 3, 1), var


def _tf_nn(x):
  import tensorflow as tf

  mean, var = tf.nn.moments(tf.constant(x), axes=[0, 1, 2])
  y = tf.nn.batch_normalization(tf.constant(x), mean, var, None, None, EPSILON)
  return y.numpy(), var.numpy()


def _keras(x):
  import keras

  layer = keras.layers.BatchNormalization(momentum=0.0, epsilon=EPSILON)
  y = layer(x, training=True)
  return np.asarray(y), np.asarray(layer.moving_variance)


PEERS = (
  Peer("bnjax (default)", "", _bnjax),
  Peer("flax.linen, use_fast_variance=False", "flax", _flax(False)),
  Peer("flax.linen, default (fast)", "flax", _flax(True)),
  Peer("torch.nn.functional.batch_norm", "torch", _torch),
  Peer("tf.nn.moments + batch_normalization", "tensorflow", _tf_nn),
  Peer("keras.layers.BatchNormalization", "keras", _keras),
)


def errors(run, ratio: float, seed: int = 0) -> tuple[float, float]:
  """(y error, variance error) of ``run`` at offset / std = ``ratio``."""
  x = (np.random.default_rng(seed).standard_normal(SHAPE) + ratio).astype(np.float32)
  y, var = run(x)
  x64 = np.asarray(x, np.float64)
  mean64, var64 = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
  y64 = (x64 - mean64) / np.sqrt(var64 + EPSILON)
  y_error = np.abs(np.asarray(y, np.float64) - y64).max() / np.abs(y64).max()
  var_error = np.max(np.abs(np.asarray(var, np.float64) - var64) / var64)
  return float(y_error), float(var_error)


def available(peers=PEERS):
  return [p for p in peers if not p.module or importlib.util.find_spec(p.module)]


def measure(ratios, peers=None) -> dict[str, list[tuple[float, float]]]:
  return {p.name: [errors(p.run, r) for r in ratios] for p in (peers or available())}


def _e(value: float) -> str:
  return "0" if value == 0 else f"{value:.1e}"


def table(results, ratios, which: int) -> list[str]:
  lines = [
    "| library | " + " | ".join(f"{r:g}" for r in ratios) + " |",
    "|---|" + "---|" * len(ratios),
  ]
  for name, row in results.items():
    lines.append(f"| {name} | " + " | ".join(_e(e[which]) for e in row) + " |")
  return lines


def render(results, ratios) -> str:
  names = ["jax", "numpy", "flax", "torch", "tensorflow", "keras"]
  versions = ", ".join(
    f"{n} {importlib.metadata.version(n)}" for n in names if importlib.util.find_spec(n)
  )
  return "\n".join(
    [
      "# Accuracy at large offsets, measured",
      "",
      "Written by `python tools/accuracy_report.py`; do not edit by hand. Every library",
      "normalizes the same float32 input x = offset + N(0, 1), shape (64, 16, 16, 8) NHWC",
      f"(16384 elements per channel), epsilon {EPSILON:g}, in training mode; errors are against",
      "float64 arithmetic on that same input. Columns: offset / std.",
      "",
      "bnjax keeps the batch mean as a shift from the data plus a small correction",
      "(`bnjax/_stats.py`), so x - mean is never formed next to the offset; the peers form it",
      "with a float32 mean that carries about one ulp of the offset, and their y error grows",
      "with it. `tests/test_accuracy.py` holds bnjax to these bounds on every path.",
      "",
      "![error against offset](accuracy.png)",
      "",
      "## y: max|y - y64| / max|y64|",
      "",
      *table(results, ratios, 0),
      "",
      "## batch variance: max |var - var64| / var64",
      "",
      *table(results, ratios, 1),
      "",
      f"Measured on {platform.machine()} CPU, Python {platform.python_version()}, {versions}.",
      "",
    ]
  )


def plot(results, ratios, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for which, (ax, title) in enumerate(zip(axes, ["y", "batch variance"])):
    for name, row in results.items():
      floor = 1e-9  # an exact 0 drawn at the bottom of the log axis
      ax.loglog(
        ratios,
        [max(e[which], floor) for e in row],
        marker="o",
        label=name,
        linewidth=2.5 if name.startswith("bnjax") else 1.2,
      )
    ax.set_xlabel("offset / std")
    ax.set_ylabel("relative error vs float64")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
  axes[1].legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick",
    action="store_true",
    help="three offsets; print the y table instead of writing the files",
  )
  parser.add_argument(
    "--output",
    type=pathlib.Path,
    default=ROOT / "docs",
    help="folder for ACCURACY.md and accuracy.png (default: docs/)",
  )
  args = parser.parse_args(argv)
  ratios = QUICK_RATIOS if args.quick else RATIOS
  results = measure(ratios)
  if args.quick:
    print("\n".join(table(results, ratios, 0)))
    return 0
  args.output.mkdir(parents=True, exist_ok=True)
  (args.output / "ACCURACY.md").write_text(render(results, ratios))
  plot(results, ratios, args.output / "accuracy.png")
  print(f"wrote {args.output / 'ACCURACY.md'} and accuracy.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
