"""Train a small CNN with ``bnjax.linen.BatchNorm`` and dropout on scikit-learn's 8x8 digits.

    python examples/train_digits.py      # ~99% eval accuracy; plot in examples/out/train_digits.png
    python examples/train_digits.py --epochs 3 --no-progress --plot /tmp/digits.png

``bnjax.training`` builds the steps: the train step normalizes with batch statistics and keeps
the new running statistics (``batch_stats``); the eval step normalizes with the running
statistics and changes nothing. At the end of each epoch ``bnjax.diagnostics.check_epoch``
looks for the classic mistakes (running statistics never updated, evaluation with batch
statistics, momentum too high for the steps taken) and prints what it finds. Train loss and
accuracy are means over the epoch's steps (batch statistics, dropout on); eval loss and accuracy
are on the held-out quarter of the data. The plot shows the curves and the running mean and
variance of the first BatchNorm converging to the statistics of its input over the training set.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from bnjax import diagnostics, training
from bnjax.linen import BatchNorm

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt


@dataclasses.dataclass(frozen=True)
class Config:
  epochs: int = 8
  batch_size: int = 32
  learning_rate: float = 3e-3
  dropout: float = 0.2  # rate before the last dense layer; 0 disables it
  bn_momentum: float = 0.9  # weight on the old running value; ~42 steps per epoch here
  test_fraction: float = 0.25
  seed: int = 0  # data split, shuffling, initialization and dropout
  progress: bool = True
  plot: Path = Path(__file__).resolve().parent / "out" / "train_digits.png"


HEADER = f"{'epoch':>5}  {'train loss':>10}  {'train acc':>9}  {'eval loss':>9}  {'eval acc':>8}"
ROW = (
  "{epoch:>5}  {train_loss:>10.4f}  {train_accuracy:>9.2%}  {eval_loss:>9.4f}"
  "  {eval_accuracy:>8.2%}"
)
TRACKED_LAYER, TRACKED_INPUT, TRACKED_CHANNELS = "bn1", "conv1", 4  # the plot's BN layer


class CNN(nn.Module):
  """conv -> BN -> relu (x2), average pool, dense -> BN -> relu, dropout, dense."""

  bn_momentum: float
  dropout: float

  @nn.compact
  def __call__(self, x, *, train: bool):
    def norm(name):
      return BatchNorm(use_running_average=not train, momentum=self.bn_momentum, name=name)

    # No conv/dense bias before a BN: its own bias replaces it.
    x = nn.relu(norm("bn1")(nn.Conv(16, (3, 3), use_bias=False, name="conv1")(x)))
    x = nn.relu(norm("bn2")(nn.Conv(32, (3, 3), use_bias=False, name="conv2")(x)))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
    x = nn.relu(norm("bn3")(nn.Dense(64, use_bias=False, name="dense1")(x)))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(10, name="head")(x)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits, labels):
  return {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def load_data(config: Config):
  """Digits as (N, 8, 8, 1) float32 in [0, 1] and int32 labels, split with a fixed seed."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  return train_test_split(
    images, labels, test_size=config.test_fraction, random_state=config.seed, stratify=labels
  )


def population_statistics(model: CNN, state: training.TrainState, images) -> tuple[np.ndarray, ...]:
  """Mean and variance of the tracked BN layer's input over ``images``: where its running
  statistics should end up."""

  @jax.jit
  def tracked_input(variables):
    _, captured = model.apply(
      variables,
      images,
      train=False,
      capture_intermediates=lambda module, _: module.name == TRACKED_INPUT,
    )
    return captured["intermediates"][TRACKED_INPUT]["__call__"][0]

  features = np.asarray(
    tracked_input({"params": state.params, "batch_stats": state.batch_stats}), np.float64
  )
  return features.mean((0, 1, 2)), features.var((0, 1, 2))


def plot(path: Path, history: list[dict], step_losses, running, population, steps_per_epoch):
  """Loss and accuracy curves; the tracked layer's running mean and variance over the steps."""
  path.parent.mkdir(parents=True, exist_ok=True)
  epochs = [row["epoch"] for row in history]
  epoch_ends = [e * steps_per_epoch for e in epochs]
  fig, ((loss_ax, acc_ax), (mean_ax, var_ax)) = plt.subplots(2, 2, figsize=(11, 7.5))
  loss_ax.plot(
    np.arange(1, len(step_losses) + 1), step_losses, lw=0.6, alpha=0.5, label="train (per step)"
  )
  loss_ax.plot(epoch_ends, [row["eval_loss"] for row in history], "o-", label="eval")
  loss_ax.set(title="cross-entropy loss", xlabel="step", yscale="log")
  acc_ax.plot(epochs, [row["train_accuracy"] for row in history], "o-", label="train")
  acc_ax.plot(epochs, [row["eval_accuracy"] for row in history], "o-", label="eval")
  acc_ax.set(title="accuracy", xlabel="epoch", ylim=(0, 1.02))
  steps = np.arange(1, len(running["mean"]) + 1)
  for ax, key in ((mean_ax, "mean"), (var_ax, "var")):
    for c in range(TRACKED_CHANNELS):
      (line,) = ax.plot(steps, running[key][:, c], lw=1.2, label=f"channel {c}")
      ax.axhline(population[key][c], color=line.get_color(), ls="--", lw=0.8)
    ax.set(
      title=f"{TRACKED_LAYER} running {key} (dashed: over the training set, final params)",
      xlabel="step",
    )
  for ax in (loss_ax, acc_ax, var_ax):
    ax.legend(fontsize=8, loc="upper right" if ax is var_ax else "best")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def train(config: Config) -> dict[str, Any]:
  """Trains for ``config.epochs``, prints one table row per epoch, returns the final metrics."""
  start = time.perf_counter()  # the time reported includes compilation
  x_train, x_test, y_train, y_test = load_data(config)
  steps_per_epoch = len(x_train) // config.batch_size  # the last partial batch is dropped
  if steps_per_epoch == 0:
    raise ValueError(
      f"batch_size must be at most {len(x_train)} (the training set), got {config.batch_size}."
    )
  model = CNN(bn_momentum=config.bn_momentum, dropout=config.dropout)
  apply_fn = training.linen_apply_fn(model)
  tx = optax.adam(config.learning_rate)
  train_step = training.make_train_step(apply_fn, tx, loss_fn=cross_entropy, metrics_fn=accuracy)
  eval_step = training.make_eval_step(apply_fn, loss_fn=cross_entropy, metrics_fn=accuracy)
  predict = training.make_predict(apply_fn)
  # 'rbg' keys draw with XLA's RngBitGenerator: on CPU they compile in a fraction of the time of
  # the default threefry keys, and compilation is most of this demo's run time.
  init_key, dropout_key = jax.random.split(jax.random.key(config.seed, impl="unsafe_rbg"))
  variables = jax.jit(lambda key: model.init(key, x_train[:1], train=False))(init_key)
  state = training.create_train_state(variables["params"], variables["batch_stats"], tx)

  rng = np.random.default_rng(config.seed)
  show_bar = config.progress and sys.stderr.isatty()
  print(HEADER)
  history, problems, step_metrics, running = [], [], [], []
  for epoch in range(1, config.epochs + 1):
    order = rng.permutation(len(x_train))
    epoch_metrics = []
    for step in tqdm(
      range(steps_per_epoch), desc=f"epoch {epoch}", leave=False, disable=not show_bar
    ):
      batch = order[step * config.batch_size : (step + 1) * config.batch_size]
      state, metrics = train_step(state, x_train[batch], y_train[batch], dropout_key)
      epoch_metrics.append(metrics)  # device arrays: no wait for the step to finish
      running.append(state.batch_stats[TRACKED_LAYER])
    epoch_metrics = jax.device_get(epoch_metrics)
    step_metrics += epoch_metrics
    evaluation = jax.device_get(eval_step(state, x_test, y_test))
    row = {
      "epoch": epoch,
      "train_loss": float(np.mean([m["loss"] for m in epoch_metrics])),
      "train_accuracy": float(np.mean([m["accuracy"] for m in epoch_metrics])),
      "eval_loss": float(evaluation["loss"]),
      "eval_accuracy": float(evaluation["accuracy"]),
    }
    history.append(row)
    print(ROW.format(**row))
    found = diagnostics.check_epoch(
      state, momentum=config.bn_momentum, predict=predict, inputs=x_test[: config.batch_size]
    )
    for problem in found:
      print(f"  diagnostics [{problem.check}]: {problem.message}")
    problems += found

  running = {k: np.stack([np.asarray(r[k]) for r in running]) for k in ("mean", "var")}
  mean, var = population_statistics(model, state, x_train)
  plot(
    config.plot,
    history,
    [float(m["loss"]) for m in step_metrics],
    running,
    {"mean": mean, "var": var},
    steps_per_epoch,
  )
  return {
    **history[-1],
    "seconds": time.perf_counter() - start,
    "history": history,
    "problems": problems,
    "plot": config.plot,
    "running": {k: v[-1] for k, v in running.items()},
    "population": {"mean": mean, "var": var},
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  defaults = Config()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--epochs",
    type=int,
    default=defaults.epochs,
    help="passes over the training set (default: %(default)s)",
  )
  parser.add_argument(
    "--batch-size",
    type=int,
    default=defaults.batch_size,
    help="examples per training step; BatchNorm's batch statistics are taken"
    " over them (default: %(default)s)",
  )
  parser.add_argument(
    "--learning-rate",
    type=float,
    default=defaults.learning_rate,
    help="Adam's step size (default: %(default)s)",
  )
  parser.add_argument(
    "--dropout",
    type=float,
    default=defaults.dropout,
    help="dropout rate before the last dense layer; 0 disables it (default: %(default)s)",
  )
  parser.add_argument(
    "--bn-momentum",
    type=float,
    default=defaults.bn_momentum,
    help="BatchNorm momentum, the weight on the old running value; values"
    " close to 1 need ~3/(1 - momentum) steps to warm up and the diagnostics"
    " say so (default: %(default)s)",
  )
  parser.add_argument(
    "--seed",
    type=int,
    default=defaults.seed,
    help="seed for the train/test split, shuffling, initialization and dropout"
    " (default: %(default)s)",
  )
  parser.add_argument(
    "--plot",
    type=Path,
    default=defaults.plot,
    help="where to write the PNG of the loss/accuracy curves and the running"
    " statistics (default: examples/out/train_digits.png)",
  )
  parser.add_argument(
    "--no-progress",
    dest="progress",
    action="store_false",
    help="hide the progress bar (it is also hidden when stderr is not a terminal)",
  )
  args = parser.parse_args(argv)
  if args.epochs < 1 or args.batch_size < 1:
    parser.error(f"expected --epochs, --batch-size >= 1, got {args.epochs}, {args.batch_size}")
  config = dataclasses.replace(defaults, **vars(args))
  metrics = train(config)
  print(f"final eval accuracy {metrics['eval_accuracy']:.2%} ({metrics['seconds']:.1f} s)")
  print(f"plot written to {_shown(metrics['plot'])}")
  return metrics


def _shown(path: Path) -> str:
  """``path`` relative to the working directory when it lies below it."""
  try:
    return str(path.resolve().relative_to(Path.cwd()))
  except ValueError:
    return str(path)


if __name__ == "__main__":
  main()
