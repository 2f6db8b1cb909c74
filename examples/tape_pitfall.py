"""The GradientTape pitfall in bnjax: running statistics that stay at 0 and 1.

    python examples/tape_pitfall.py
    python examples/tape_pitfall.py --steps 60 --momentum 0.9

The classic question: "I train a model with BatchNormalization in a custom loop (tf.GradientTape)
and its moving mean and variance stay at 0 and 1". In Keras the cause is calling the model
without ``training=True`` inside the tape; in TF1 it was the forgotten ``UPDATE_OPS``. In JAX
the running statistics are explicit: ``bnjax.batch_norm`` returns them, and the same bug is
dropping what it returns.

The model is one batch-norm layer. It is trained on inputs drawn uniformly from the integers
100..109 toward the target 150, twice: once threading the new statistics through
(``bnjax.training`` does), once dropping them. Threaded, the running mean ends near 104.5 and the
variance near 8.25 (those of 100..109; the stored variance is the biased batch variance, 8.25 *
(n - 1) / n in expectation), and evaluation outputs are near 150. Dropped, the statistics stay
at 0 and 1, evaluation normalizes x ~ 104.5 with them, the outputs land near 254.5, and
``bnjax.diagnostics.check_epoch`` says why.

The layer has no learned scale (Keras' ``scale=False``): fitting a constant target would shrink
it toward 0 and hide which statistics evaluation used.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

import bnjax
from bnjax import diagnostics, training


@dataclasses.dataclass(frozen=True)
class Config:
  steps: int = 1000
  batch_size: int = 256
  momentum: float = 0.99  # Keras' default; 0.99**1000 = 4e-5 of the initial values remain
  learning_rate: float = 0.1
  target: float = 150.0
  seed: int = 0


def bn_model(params, batch_stats, x, *, training, momentum):
  """The layer, threading its statistics: ``(y, new_batch_stats)``."""
  y, stats = bnjax.batch_norm(
    x, params["bn"], batch_stats["bn"], training=training, momentum=momentum
  )
  return y, {"bn": stats}


def bn_model_dropping_stats(params, batch_stats, x, *, training, momentum):
  """The bug: the new statistics are computed and thrown away (Keras: no training=True)."""
  y, _ = bnjax.batch_norm(x, params["bn"], batch_stats["bn"], training=training, momentum=momentum)
  return y, batch_stats


def run(model, config: Config, inputs: np.ndarray, eval_inputs: np.ndarray) -> dict[str, Any]:
  """Trains ``model`` for ``config.steps`` steps, then evaluates it and runs the diagnostics."""

  def apply_fn(params, batch_stats, x, *, training):
    return model(params, batch_stats, x, training=training, momentum=config.momentum)

  def squared_error(y, target):
    return jnp.mean((y - target) ** 2)

  bn_params, bn_stats = bnjax.init(1, use_scale=False)
  tx = optax.sgd(config.learning_rate)
  state = training.create_train_state({"bn": bn_params}, {"bn": bn_stats}, tx)
  train_step = training.make_train_step(apply_fn, tx, loss_fn=squared_error)
  predict = training.make_predict(apply_fn)
  target = jnp.full((config.batch_size, 1), config.target, jnp.float32)
  for x in inputs:
    state, _ = train_step(state, x, target)
  outputs = np.asarray(predict(state, eval_inputs))
  return {
    "mean": float(state.batch_stats["bn"]["mean"][0]),
    "var": float(state.batch_stats["bn"]["var"][0]),
    "eval_mean": float(outputs.mean()),
    "eval_std": float(outputs.std()),
    "problems": diagnostics.check_epoch(
      state, momentum=config.momentum, predict=predict, inputs=eval_inputs
    ),
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  defaults = Config()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--steps", type=int, default=defaults.steps, help="training steps (default: %(default)s)"
  )
  parser.add_argument(
    "--batch-size",
    type=int,
    default=defaults.batch_size,
    help="inputs per step, each drawn uniformly from 100..109 (default: %(default)s)",
  )
  parser.add_argument(
    "--momentum",
    type=float,
    default=defaults.momentum,
    help="weight on the old running value; needs ~3/(1 - momentum) steps to"
    " forget the initial 0 and 1 (default: %(default)s)",
  )
  parser.add_argument(
    "--learning-rate",
    type=float,
    default=defaults.learning_rate,
    help="SGD step size for the layer's bias (default: %(default)s)",
  )
  parser.add_argument(
    "--seed", type=int, default=defaults.seed, help="seed of the input draws (default: %(default)s)"
  )
  args = parser.parse_args(argv)
  if args.steps < 1 or args.batch_size < 2:
    parser.error(
      f"expected --steps >= 1 and --batch-size >= 2, got {args.steps}, {args.batch_size}"
    )
  config = dataclasses.replace(defaults, **vars(args))

  rng = np.random.default_rng(config.seed)
  draws = rng.integers(100, 110, size=(config.steps + 1, config.batch_size, 1))
  inputs, eval_inputs = draws[:-1].astype(np.float32), draws[-1].astype(np.float32)
  results = {
    "threaded": run(bn_model, config, inputs, eval_inputs),
    "dropped": run(bn_model_dropping_stats, config, inputs, eval_inputs),
  }

  print(
    f"after {config.steps} steps, momentum {config.momentum}, inputs from 100..109"
    f" (mean 104.5, variance 8.25), target {config.target:g}:"
  )
  print(f"{'':<28}{'threaded':>16}{'dropped':>16}")
  for label, key in (("running mean", "mean"), ("running variance", "var")):
    print(f"{label:<28}" + "".join(f"{results[r][key]:>16.3f}" for r in results))
  outputs = (f"{r['eval_mean']:>9.2f} +- {r['eval_std']:<4.2f}" for r in results.values())
  print(f"{'eval output (mean +- std)':<28}" + "".join(outputs))
  for name, result in results.items():
    found = [f"[{p.check}] {p.message}" for p in result["problems"]] or ["no problem found"]
    print(f"diagnostics, {name}:", *found, sep="\n  ")
  return results


if __name__ == "__main__":
  main()
