"""Fine-tune a pretrained model with frozen batch-norm layers, the way Keras 3 freezes them.

    python examples/finetune_frozen.py
    python examples/finetune_frozen.py --pretrain-epochs 1 --finetune-epochs 1

A small MLP with two BatchNorm layers is pretrained on the digits 0-4 of scikit-learn's digits,
then fine-tuned on the digits 5-9 with both BatchNorm layers frozen. Keras 3's
``trainable = False`` on a BatchNormalization layer means inference mode: the layer normalizes
with its running statistics, does not update them, and its scale and bias get no update. With
bnjax the two halves are explicit: ``bnjax.training.freeze`` routes the frozen layers'
parameters to ``optax.set_to_zero()`` (``optax.multi_transform``), and the model reads the same
set to run those layers with ``use_running_average=True``.

Side by side, the same fine-tuning TF1 style (``tf.layers`` with ``trainable=False``): the
parameters are frozen but the model still runs the layers with batch statistics. The table
shows what moved: Keras 3 style, the frozen layers' statistics and parameters stay bit for bit
while the dense layers train; TF1 style, the frozen layers' statistics drift toward the new
data, and ``bnjax.diagnostics.check_epoch`` reports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from bnjax import diagnostics, training
from bnjax.linen import BatchNorm

FROZEN = frozenset({"bn1", "bn2"})


@dataclasses.dataclass(frozen=True)
class Config:
  pretrain_epochs: int = 4
  finetune_epochs: int = 4
  batch_size: int = 32
  learning_rate: float = 3e-3
  bn_momentum: float = 0.9
  seed: int = 0
  progress: bool = True


class MLP(nn.Module):
  """dense -> BN -> relu (x2), dense; BN layers named in ``frozen`` run in inference mode."""

  bn_momentum: float
  frozen: frozenset[str] = frozenset()

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = x.reshape(x.shape[0], -1)
    for i in (1, 2):
      x = nn.Dense(64, use_bias=False, name=f"dense{i}")(x)
      x = BatchNorm(
        use_running_average=not train or f"bn{i}" in self.frozen,  # Keras 3: frozen = inference
        momentum=self.bn_momentum,
        name=f"bn{i}",
      )(x)
      x = nn.relu(x)
    return nn.Dense(10, name="head")(x)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits, labels):
  return {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def load_tasks(config: Config):
  """(train, test) splits of the digits 0-4 (pretraining) and 5-9 (fine-tuning)."""
  digits = load_digits()
  images, labels = (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int32)
  tasks = {}
  for name, classes in (("pretrain", labels < 5), ("finetune", labels >= 5)):
    x_train, x_test, y_train, y_test = train_test_split(
      images[classes],
      labels[classes],
      test_size=0.25,
      random_state=config.seed,
      stratify=labels[classes],
    )
    tasks[name] = ((x_train, y_train), (x_test, y_test))
  return tasks


def fit(
  model,
  tx,
  state,
  data,
  epochs,
  config: Config,
  *,
  eval_step,
  desc,
  frozen=frozenset(),
  reference=None,
):
  """``epochs`` passes over ``data``, with ``bnjax.diagnostics.check_epoch`` after each.

  Returns the state, the eval accuracy and the last epoch's diagnostics.
  """
  train_step = training.make_train_step(training.linen_apply_fn(model), tx, loss_fn=cross_entropy)
  (x_train, y_train), (x_test, y_test) = data
  steps_per_epoch = len(x_train) // config.batch_size
  rng = np.random.default_rng(config.seed)
  show_bar = config.progress and sys.stderr.isatty()
  problems = []
  for _ in tqdm(range(epochs), desc=desc, leave=False, disable=not show_bar):
    order = rng.permutation(len(x_train))
    for step in range(steps_per_epoch):
      batch = order[step * config.batch_size : (step + 1) * config.batch_size]
      state, _ = train_step(state, x_train[batch], y_train[batch])
    problems = diagnostics.check_epoch(
      state, momentum=config.bn_momentum, frozen=frozen, reference=reference
    )
  return state, float(eval_step(state, x_test, y_test)["accuracy"]), problems


def largest_change(after, before) -> dict[str, float]:
  """``{'layer/name': max |after - before|}`` over a params or batch_stats tree."""
  changes = jax.tree.map(
    lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), after, before
  )
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): change
    for path, change in jax.tree_util.tree_leaves_with_path(changes)
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  defaults = Config()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--pretrain-epochs",
    type=int,
    default=defaults.pretrain_epochs,
    help="passes over the digits 0-4 before fine-tuning (default: %(default)s)",
  )
  parser.add_argument(
    "--finetune-epochs",
    type=int,
    default=defaults.finetune_epochs,
    help="passes over the digits 5-9 with the BN layers frozen (default: %(default)s)",
  )
  parser.add_argument(
    "--batch-size",
    type=int,
    default=defaults.batch_size,
    help="examples per training step (default: %(default)s)",
  )
  parser.add_argument(
    "--learning-rate",
    type=float,
    default=defaults.learning_rate,
    help="Adam's step size, in both phases (default: %(default)s)",
  )
  parser.add_argument(
    "--seed",
    type=int,
    default=defaults.seed,
    help="seed for the splits, shuffling and initialization (default: %(default)s)",
  )
  parser.add_argument(
    "--no-progress",
    dest="progress",
    action="store_false",
    help="hide the progress bars (also hidden when stderr is not a terminal)",
  )
  args = parser.parse_args(argv)
  if min(args.pretrain_epochs, args.finetune_epochs, args.batch_size) < 1:
    parser.error("expected --pretrain-epochs, --finetune-epochs and --batch-size >= 1")
  config = dataclasses.replace(defaults, **vars(args))
  tasks = load_tasks(config)

  model = MLP(bn_momentum=config.bn_momentum)
  # Evaluation runs every layer in inference mode, frozen or not: one eval step serves all runs.
  eval_step = training.make_eval_step(
    training.linen_apply_fn(model), loss_fn=cross_entropy, metrics_fn=accuracy
  )
  tx = optax.adam(config.learning_rate)
  # 'rbg' keys (XLA's RngBitGenerator) compile much faster on CPU than the default threefry.
  key = jax.random.key(config.seed, impl="rbg")
  variables = jax.jit(lambda k: model.init(k, tasks["pretrain"][0][0][:1], train=False))(key)
  state = training.create_train_state(variables["params"], variables["batch_stats"], tx)
  pretrained, pretrain_accuracy, _ = fit(
    model,
    tx,
    state,
    tasks["pretrain"],
    config.pretrain_epochs,
    config,
    eval_step=eval_step,
    desc="pretrain",
  )
  print(f"pretrained on digits 0-4: eval accuracy {pretrain_accuracy:.2%}")

  runs = {}
  for style, model_frozen in (("Keras 3", FROZEN), ("TF1", frozenset())):
    tx = training.freeze(optax.adam(config.learning_rate), frozen=FROZEN)
    start = training.create_train_state(pretrained.params, pretrained.batch_stats, tx)
    finetuned, finetune_accuracy, problems = fit(
      MLP(bn_momentum=config.bn_momentum, frozen=model_frozen),
      tx,
      start,
      tasks["finetune"],
      config.finetune_epochs,
      config,
      eval_step=eval_step,
      desc=f"fine-tune, {style} style",
      frozen=FROZEN,
      reference=pretrained.batch_stats,
    )
    changes = {
      **largest_change(finetuned.params, start.params),
      **largest_change(finetuned.batch_stats, start.batch_stats),
    }
    runs[style] = {"accuracy": finetune_accuracy, "changes": changes, "problems": problems}

  print(f"fine-tuned on digits 5-9 with {sorted(FROZEN)} frozen; max |change| of each variable:")
  print(f"{'variable':<16}{'frozen':>8}" + "".join(f"{style + ' style':>16}" for style in runs))
  for name in sorted(runs["Keras 3"]["changes"]):
    is_frozen = "yes" if diagnostics.covered_by(name, FROZEN) else "no"
    changes = "".join(f"{r['changes'][name]:>16.3g}" for r in runs.values())
    print(f"{name:<16}{is_frozen:>8}{changes}")
  print(f"{'eval accuracy':<24}" + "".join(f"{r['accuracy']:>16.2%}" for r in runs.values()))
  for style, run in runs.items():
    found = [f"[{p.check}] {p.message}" for p in run["problems"]] or ["no problem found"]
    print(f"diagnostics after the last epoch, {style} style:", *found, sep="\n  ")
  return {"pretrain_accuracy": pretrain_accuracy, **runs}


if __name__ == "__main__":
  main()
