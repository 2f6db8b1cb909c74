"""Cold start of the running statistics: momentum 0.9 vs 0.999 vs 0.999 debiased.

    python examples/cold_start.py                  # plot in examples/out/cold_start.png
    python examples/cold_start.py --steps 200 --plot /tmp/cold_start.png

One batch-norm layer sees batches from a fixed population, N(5, 2^2), and updates its running
statistics from the initial mean 0 and variance 1. After t steps with momentum m they are
``m^t * initial + (1 - m^t) * average``:

- momentum 0.9 forgets the initial values within ~30 steps but averages only ~20 batches, so
  it stays noisy;
- momentum 0.999 averages ~2000 batches but needs ~3000 steps to forget the initial values:
  evaluation before that normalizes with statistics that are mostly 0 and 1;
- the same 0.999 average debiased (``bnjax.diagnostics.debias``: ``(EMA - m^t * initial) /
  (1 - m^t)``) is right from the first step and as smooth.

The variance stored is the unbiased one (``running_variance='unbiased'``), so that every curve
heads for the population's 4 and not for the biased batch variance's 4 * (n - 1) / n.
``bnjax.diagnostics.check_warmup`` flags the momentum that is too high for the steps taken.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import jax
import matplotlib
import numpy as np
from jax import lax

import bnjax
from bnjax import diagnostics

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt


@dataclasses.dataclass(frozen=True)
class Config:
  steps: int = 2000
  batch_size: int = 32
  population_mean: float = 5.0
  population_std: float = 2.0
  seed: int = 0
  plot: Path = Path(__file__).resolve().parent / "out" / "cold_start.png"


VARIANTS = ("momentum 0.9", "momentum 0.999", "0.999 debiased")
TABLE_STEPS = (1, 10, 100, 1000)  # and the last step


def simulate(batches: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
  """Running mean and variance after every step, ``{variant: {'mean': (T,), 'var': (T,)}}``."""
  params, initial = bnjax.init(1, track_count=True)

  def update(stats, x, momentum):
    _, stats = bnjax.batch_norm(
      x, params, stats, training=True, momentum=momentum, running_variance="unbiased"
    )
    return stats

  def step(carry, x):
    fast, slow = update(carry[0], x, 0.9), update(carry[1], x, 0.999)
    debiased = diagnostics.debias(slow, momentum=0.999)
    return (fast, slow), [{k: s[k][0] for k in ("mean", "var")} for s in (fast, slow, debiased)]

  _, history = jax.jit(lambda xs: lax.scan(step, (initial, initial), xs))(batches)
  return {name: jax.tree.map(np.asarray, h) for name, h in zip(VARIANTS, history, strict=True)}


def plot(path: Path, history, config: Config) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  steps = np.arange(1, config.steps + 1)
  population = {"mean": config.population_mean, "var": config.population_std**2}
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, key in zip(axes, ("mean", "var"), strict=True):
    for name in VARIANTS:
      ax.plot(steps, history[name][key], lw=1.2, label=name)
    ax.axhline(population[key], color="black", ls="--", lw=0.8, label="population")
    ax.set(title=f"running {key}", xlabel="step", xscale="log")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  defaults = Config()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--steps",
    type=int,
    default=defaults.steps,
    help="batches the layer sees (default: %(default)s)",
  )
  parser.add_argument(
    "--batch-size",
    type=int,
    default=defaults.batch_size,
    help="examples per batch (default: %(default)s)",
  )
  parser.add_argument(
    "--seed",
    type=int,
    default=defaults.seed,
    help="seed of the population draws (default: %(default)s)",
  )
  parser.add_argument(
    "--plot",
    type=Path,
    default=defaults.plot,
    help="where to write the PNG of the running statistics against the"
    " population's (default: examples/out/cold_start.png)",
  )
  args = parser.parse_args(argv)
  if args.steps < 1 or args.batch_size < 2:
    parser.error(
      f"expected --steps >= 1 and --batch-size >= 2, got {args.steps}, {args.batch_size}"
    )
  config = dataclasses.replace(defaults, **vars(args))

  rng = np.random.default_rng(config.seed)
  batches = rng.normal(
    config.population_mean, config.population_std, size=(config.steps, config.batch_size, 1)
  ).astype(np.float32)
  history = simulate(batches)

  for key, population in (("mean", config.population_mean), ("var", config.population_std**2)):
    print(f"running {key} (population {population:g})")
    print(f"{'step':>6}" + "".join(f"{name:>17}" for name in VARIANTS))
    for step in sorted({s for s in TABLE_STEPS if s < config.steps} | {config.steps}):
      print(f"{step:>6}" + "".join(f"{history[name][key][step - 1]:>17.3f}" for name in VARIANTS))
  for momentum in (0.9, 0.999):
    for problem in diagnostics.check_warmup(momentum=momentum, steps=config.steps):
      print(f"diagnostics [{problem.check}]: {problem.message}")
  plot(config.plot, history, config)
  print(f"plot written to {config.plot}")
  return {"history": history, "plot": config.plot}


if __name__ == "__main__":
  main()
