"""Checks for the classic batch-norm failures of a training loop, and debiased running statistics.

Each check returns a list of ``Problem`` (empty when nothing is wrong) instead of warning or
raising, so the loop decides what to do: print them, log them, or stop. ``check_epoch`` runs
every check its arguments allow; at the end of an epoch it costs one copy of the running
statistics to the host and two evaluation calls on one batch.

- ``check_stats_updated``: running statistics still at their initial values (mean 0, var 1)
  after training steps: the train step dropped the new ``batch_stats`` (Keras' "moving
  averages stay at 0 and 1 with GradientTape", TF1's forgotten ``UPDATE_OPS``).
- ``check_eval_mode``: an evaluation function that normalizes with batch statistics.
- ``check_warmup``: a momentum too high for the steps taken (``debias`` is one remedy).
- ``check_frozen``: frozen layers whose running statistics moved (run with batch statistics).
- ``check_skipped``: train steps skipped for a non-finite loss or gradient
  (``bnjax.training``'s ``metrics['skipped']``).
- ``check_batch``: a training batch with one element per channel (variance 0, output = bias).
  ``bnjax.batch_norm`` and its modules stay silent there, as Flax and Equinox do.

Layers are found by their running statistics: every dict with ``'mean'`` and ``'var'`` in a
``batch_stats`` tree, named by the '/'-joined keys leading to it (Flax's module paths, e.g.
``'BatchNorm_0'``, ``'block/bn1'``; ``''`` when the tree is one layer's statistics). Frozen
layers are named the same way (``covered_by``; ``bnjax.training.freeze`` uses the same rule).
Imports only jax and numpy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _checks

__all__ = [
  "Problem",
  "check_batch",
  "check_epoch",
  "check_eval_mode",
  "check_frozen",
  "check_skipped",
  "check_stats_updated",
  "check_warmup",
  "covered_by",
  "debias",
  "layers",
]

# check_warmup's limit on momentum**steps, the weight the initial values still carry.
INITIAL_WEIGHT_LIMIT = 0.05
# check_eval_mode's limit on max|output difference| / max(1, max|output|). With running
# statistics the two outputs compared come from one compiled program on one example and agree
# to rounding (bitwise on CPU); with batch statistics they differ by the size of the outputs.
EVAL_MODE_RTOL = 1e-4


class Problem(NamedTuple):
  """One finding of a check."""

  check: str  # 'stats_updated', 'eval_mode', 'warmup', 'frozen', 'batch' or 'skipped'
  layer: str  # the layer's path in batch_stats; '' for the whole model
  message: str  # what is wrong, why it matters and what to do


def layers(batch_stats: Any) -> dict[str, Mapping[str, Any]]:
  """Every layer's running statistics in ``batch_stats``: ``{path: {'mean', 'var', ...}}``.

  Args:
    batch_stats: a ``batch_stats`` tree (a Flax collection, or a ``TrainState``'s).

  Returns:
    ``{path: statistics}`` for each dict holding ``'mean'`` and ``'var'``, paths joined by '/'.

  Example:
    >>> import jax.numpy as jnp
    >>> from bnjax import diagnostics
    >>> stats = {"block": {"bn1": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}}
    >>> list(diagnostics.layers(stats))
    ['block/bn1']
  """
  found = {}

  def visit(node, path):
    if not isinstance(node, Mapping):
      return
    if "mean" in node and "var" in node:
      found["/".join(path)] = node
      return
    for key, child in node.items():
      visit(child, (*path, str(key)))

  visit(batch_stats, ())
  if not found:
    _checks.fail(
      "diagnostics.layers",
      "expected batch_stats holding at least one layer's {'mean', 'var'}, got"
      f" {jax.tree.map(jnp.shape, batch_stats)!r}. Hint: pass state.batch_stats, not the params.",
    )
  return found


def covered_by(path: str, frozen: Collection[str]) -> bool:
  """Whether ``frozen`` names the layer (or parameter) at ``path`` or a module containing it.

  ``covered_by('block/bn1', {'block'})`` is True: as Keras' ``trainable = False`` on a model
  freezes all its layers, a path freezes everything under it; ``''`` covers everything.

  Args:
    path: a layer or parameter path, names joined by '/'.
    frozen: frozen paths.

  Returns:
    True if some path in ``frozen`` is ``path`` or contains it.

  Example:
    >>> from bnjax import diagnostics
    >>> diagnostics.covered_by("block/bn1/scale", {"block"})
    True
    >>> diagnostics.covered_by("block2/bn1", {"block"})
    False
  """
  return any(path == f or not f or path.startswith(f + "/") for f in frozen)


def check_batch(
  shape: Sequence[int],
  *,
  axis: int | tuple[int, ...] = -1,
  devices: int = 1,
  virtual_batch_size: int | None = None,
) -> list[Problem]:
  """A training batch of ``shape`` with one element per channel: the batch variance is 0.

  Normalization then outputs ``bias`` for every element and the running variance moves toward
  0 (the unbiased estimate is undefined there; bnjax uses ``n / max(n - 1, 1)``, as
  TensorFlow's fused kernel does; PyTorch raises). Static: only the shape is looked at.

  Args:
    shape: the shape of ``x`` as one device sees it (``x.shape``).
    axis: the feature axis or axes, as given to ``bnjax.batch_norm``.
    devices: how many devices of ``axis_name`` share the statistics.
    virtual_batch_size: as given to ``bnjax.batch_norm``: each group then has its own moments.

  Returns:
    One ``Problem`` (check ``'batch'``) when each channel's statistics cover one element.

  Example:
    >>> from bnjax import diagnostics
    >>> [p.check for p in diagnostics.check_batch((1, 8), axis=-1)]
    ['batch']
  """
  fn = "diagnostics.check_batch"
  shape = tuple(int(n) for n in shape)
  features = _checks.feature_axes(fn, axis, len(shape))
  per_channel = math.prod(n for a, n in enumerate(shape) if a not in features) * int(devices)
  if virtual_batch_size is not None:
    per_channel = per_channel // shape[0] * int(virtual_batch_size)
  if per_channel != 1:
    return []
  return [
    Problem(
      "batch",
      "",
      f"a batch of shape {shape} with feature axes {features} has one element per channel"
      " (over all devices): its variance is 0, so training outputs the bias for every element"
      " and moves the running variance toward 0. Hint: use a larger batch, or training=False.",
    )
  ]


def check_skipped(metrics: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[Problem]:
  """Counts the train steps skipped for a non-finite loss or gradient.

  ``bnjax.training.make_train_step`` reports ``metrics['skipped']`` (1.0 for a skipped step);
  such a step leaves params, optimizer state and running statistics unchanged.

  Args:
    metrics: the metrics of each step (a list of dicts), or one dict whose ``'skipped'`` holds
      the steps' values stacked.

  Returns:
    One ``Problem`` (check ``'skipped'``) when any step was skipped, saying how many.

  Example:
    >>> from bnjax import diagnostics
    >>> metrics = [{"loss": 1.0, "skipped": 0.0}, {"loss": float("nan"), "skipped": 1.0}]
    >>> [p.check for p in diagnostics.check_skipped(metrics)]
    ['skipped']
  """
  if isinstance(metrics, Mapping):
    values = np.asarray(metrics.get("skipped", []), np.float64).ravel()
  else:
    values = np.asarray([float(m.get("skipped", 0.0)) for m in metrics], np.float64)
  skipped = int(np.sum(values > 0))
  if not skipped:
    return []
  return [
    Problem(
      "skipped",
      "",
      f"{skipped} of {values.size} train steps had a NaN or inf loss or gradient and were"
      " skipped: params, optimizer state and running statistics kept their values. Hint:"
      " find the batch (jax.debug_nans, or the input's finiteness); a lower learning rate or"
      " gradient clipping helps when the loss diverges.",
    )
  ]


def check_stats_updated(
  batch_stats: Any, *, steps: int | jax.Array, frozen: Collection[str] = ()
) -> list[Problem]:
  """Layers whose running statistics are still exactly mean 0, var 1 after ``steps`` > 0 steps.

  Any real batch moves them, so exact initial values mean the updates were never kept: the
  train step computed new statistics and threw them away. Frozen layers are skipped.

  Args:
    batch_stats: the running statistics, as in ``variables['batch_stats']``.
    steps: the number of training steps taken (``state.step``).
    frozen: paths of frozen layers, which keep their statistics on purpose.

  Returns:
    One ``Problem`` per layer still at its initial values.

  Example:
    >>> import jax.numpy as jnp
    >>> from bnjax import diagnostics
    >>> stats = {"bn1": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
    >>> [p.layer for p in diagnostics.check_stats_updated(stats, steps=10)]
    ['bn1']
  """
  found = layers(batch_stats)
  frozen = _frozen("diagnostics.check_stats_updated", frozen)
  steps = int(steps)
  if steps <= 0:
    return []
  problems = []
  for path, stats in found.items():
    if covered_by(path, frozen):
      continue
    if np.all(np.asarray(stats["mean"]) == 0) and np.all(np.asarray(stats["var"]) == 1):
      problems.append(
        Problem(
          "stats_updated",
          path,
          f"{_describe(path)}: running statistics are still at their initial values (mean 0,"
          f" var 1) after {steps} training steps, so evaluation normalizes with the wrong"
          " statistics. The train step computed new ones and dropped them. Hint: keep the"
          " new_stats that bnjax.batch_norm returns (Flax: apply with"
          " mutable=['batch_stats'] and store updates['batch_stats']), e.g. through"
          " bnjax.training.make_train_step.",
        )
      )
  return problems


def check_eval_mode(predict: Callable[[Any], Any], inputs: Any) -> list[Problem]:
  """A problem if ``predict``'s output for one example depends on the rest of the batch.

  Probe: ``predict(inputs)[0]`` against ``predict(copies)[0]``, where ``copies`` repeats
  ``inputs[0]`` over the whole batch. With running statistics every example is normalized on
  its own and the two agree (to ``EVAL_MODE_RTOL``); with batch statistics the second batch
  has zero variance and the outputs differ by their own size. This tests the behaviour rather
  than the compiled program: a search of the HLO or jaxpr for reductions would have to tell a
  batch norm's from legitimate ones (a loss or metric over the batch, pooling, a softmax)
  through reshapes, transposes and layouts.

  Args:
    predict: the evaluation function, ``inputs -> outputs`` with a leading batch axis, e.g.
      ``lambda x: predict(state, x)`` with ``bnjax.training.make_predict``.
    inputs: one batch holding at least two different examples.

  Returns:
    A list with one ``Problem`` if the output depends on the batch, else an empty list.

  Example:
    >>> import jax.numpy as jnp
    >>> from bnjax import diagnostics
    >>> batch_dependent = lambda x: x - x.mean(0)    # normalizes with the batch's mean
    >>> x = jnp.array([[1.0], [3.0]])
    >>> [p.check for p in diagnostics.check_eval_mode(batch_dependent, x)]
    ['eval_mode']
    >>> diagnostics.check_eval_mode(lambda x: 2 * x, x)
    []
  """
  fn = "diagnostics.check_eval_mode"
  inputs = jnp.asarray(inputs)
  copies = jnp.broadcast_to(inputs[:1], inputs.shape) if inputs.ndim else inputs
  if inputs.ndim == 0 or bool(jnp.array_equal(inputs, copies)):
    _checks.fail(
      fn,
      "`inputs` must be a batch holding at least two different examples, got shape"
      f" {inputs.shape} with every example equal to the first.",
    )
  alone = np.asarray(predict(inputs)[0], np.float64)
  among_copies = np.asarray(predict(copies)[0], np.float64)
  difference = float(np.max(np.abs(alone - among_copies), initial=0.0))
  if difference <= EVAL_MODE_RTOL * max(1.0, float(np.max(np.abs(alone), initial=0.0))):
    return []
  return [
    Problem(
      "eval_mode",
      "",
      f"the evaluation output of one example changed by {difference:.3g} when the rest of its"
      " batch changed: evaluation normalizes with batch statistics, not the running ones."
      " Hint: evaluate with training=False (bnjax.batch_norm) or use_running_average=True"
      " (Flax), e.g. through bnjax.training.make_eval_step.",
    )
  ]


def check_warmup(*, momentum: float | None, steps: int | jax.Array) -> list[Problem]:
  """A problem if the initial values still weigh more than 5% in the running statistics.

  After t updates with momentum m the running value is ``m^t * initial + (1 - m^t) * average``
  (see ``debias``); m^t falls under ``INITIAL_WEIGHT_LIMIT`` = 0.05 after
  ``ceil(log(0.05) / log(m))`` ~ 3 / (1 - m) steps: 29 for m = 0.9, 2995 for m = 0.999.
  ``momentum=None`` (the cumulative average) needs no warm-up.

  Args:
    momentum: the batch-norm layers' momentum (the highest, if they differ), or None.
    steps: the number of updates so far.

  Returns:
    A list with one ``Problem`` while the initial values weigh more than 5%, else empty.

  Example:
    >>> from bnjax import diagnostics
    >>> len(diagnostics.check_warmup(momentum=0.999, steps=1000))
    1
    >>> diagnostics.check_warmup(momentum=0.9, steps=100)
    []
  """
  fn = "diagnostics.check_warmup"
  momentum = _checks.momentum(fn, momentum)
  steps = int(steps)
  if momentum is None or steps <= 0:
    return []
  initial_weight = momentum**steps
  if initial_weight <= INITIAL_WEIGHT_LIMIT:
    return []
  needed = math.ceil(math.log(INITIAL_WEIGHT_LIMIT) / math.log(momentum))
  return [
    Problem(
      "warmup",
      "",
      f"momentum={momentum} after {steps} steps: the initial values (mean 0, var 1) still make"
      f" up {initial_weight:.0%} of the running statistics (momentum**steps); they fall under"
      f" {INITIAL_WEIGHT_LIMIT:.0%} after {needed} steps, about 3 / (1 - momentum). Hint: a"
      " lower momentum (0.9 or 0.99), momentum=None (cumulative average, bnjax.init(...,"
      " track_count=True)), or bnjax.diagnostics.debias on the statistics.",
    )
  ]


def check_frozen(batch_stats: Any, reference: Any, *, frozen: Collection[str]) -> list[Problem]:
  """Frozen layers whose running statistics differ from ``reference`` (e.g. the pretrained ones).

  A frozen layer (Keras 3's ``trainable=False``) runs in inference mode and keeps its
  statistics bit for bit; statistics that moved mean the model still ran it in training mode
  (TF1's ``tf.layers`` behaviour, see ``bnjax.training.freeze``). A layer normalized with batch
  statistics but not updated (``update_stats=False``, tf.keras before TF 2.0) keeps its
  statistics too, so this check cannot see it.

  Args:
    batch_stats: the running statistics after training.
    reference: the running statistics the frozen layers started from.
    frozen: paths of frozen layers (as given to ``bnjax.training.freeze``).

  Returns:
    One ``Problem`` per frozen layer whose statistics moved.

  Example:
    >>> import jax.numpy as jnp
    >>> from bnjax import diagnostics
    >>> before = {"bn1": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
    >>> after = {"bn1": {"mean": jnp.full(2, 0.1), "var": jnp.ones(2)}}
    >>> [p.layer for p in diagnostics.check_frozen(after, before, frozen={"bn1"})]
    ['bn1']
  """
  fn = "diagnostics.check_frozen"
  frozen = _frozen(fn, frozen)
  found, expected = layers(batch_stats), layers(reference)
  problems = []
  for path in sorted(p for p in found if covered_by(p, frozen)):
    if path not in expected:
      _checks.fail(
        fn,
        f"expected `reference` to hold the frozen layer {path!r}, got layers"
        f" {sorted(expected)}. Hint: the batch_stats the model was frozen with.",
      )
    moved = {
      key: float(np.max(np.abs(np.asarray(found[path][key]) - np.asarray(expected[path][key]))))
      for key in ("mean", "var")
    }
    if any(moved.values()):
      problems.append(
        Problem(
          "frozen",
          path,
          f"{_describe(path)} is frozen but its running statistics moved (max |change|: mean"
          f" {moved['mean']:.3g}, var {moved['var']:.3g}): the model ran it with batch"
          " statistics. Hint: build it with use_running_average=True while frozen, e.g."
          f" `use_running_average=not train or {path!r} in self.frozen`"
          " (bnjax.training.freeze).",
        )
      )
  return problems


def check_epoch(
  state: Any,
  *,
  momentum: float | None,
  predict: Callable[[Any, Any], Any] | None = None,
  inputs: Any = None,
  frozen: Collection[str] = (),
  reference: Any = None,
) -> list[Problem]:
  """Every check the arguments allow, for the end of an epoch. Returns all problems found.

  Runs ``check_stats_updated`` on ``state.batch_stats`` and ``state.step``;
  ``check_warmup`` on ``state.step`` unless every layer is frozen (it assumes statistics that
  started from their initial values at step 0); ``check_eval_mode`` on
  ``lambda x: predict(state, x)`` with ``predict`` and ``inputs``; ``check_frozen`` against
  ``reference`` with ``frozen``.

  Args:
    state: a ``bnjax.training.TrainState`` (anything with ``step`` and ``batch_stats``).
    momentum: the batch-norm layers' momentum (the highest, if they differ).
    predict: ``predict(state, inputs) -> outputs``, e.g. ``bnjax.training.make_predict``.
    inputs: one evaluation batch for ``predict``, with at least two different examples.
    frozen: paths of frozen layers (as given to ``bnjax.training.freeze``): the batch-norm
      layers they cover are skipped by the initial-values check and compared with
      ``reference``.
    reference: the ``batch_stats`` the frozen layers must still hold.

  Returns:
    Every ``Problem`` found, empty if none.

  Example:
    >>> import jax.numpy as jnp
    >>> from bnjax import diagnostics, training
    >>> stats = {"bn": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
    >>> state = training.TrainState(jnp.int32(100), {}, stats, ())
    >>> [p.check for p in diagnostics.check_epoch(state, momentum=0.9)]
    ['stats_updated']
  """
  fn = "diagnostics.check_epoch"
  frozen = _frozen(fn, frozen)
  if (predict is None) != (inputs is None):
    _checks.fail(fn, "`predict` and `inputs` go together, got only one of them.")
  if frozen and reference is None:
    _checks.fail(
      fn,
      f"`frozen`={sorted(frozen)} needs `reference`, the batch_stats those layers must keep,"
      " got None. Hint: the pretrained state's batch_stats.",
    )
  problems = check_stats_updated(state.batch_stats, steps=state.step, frozen=frozen)
  if not all(covered_by(path, frozen) for path in layers(state.batch_stats)):
    problems += check_warmup(momentum=momentum, steps=state.step)
  if predict is not None:
    problems += check_eval_mode(functools.partial(predict, state), inputs)
  if frozen:
    problems += check_frozen(state.batch_stats, reference, frozen=frozen)
  return problems


def debias(
  stats: Mapping[str, Any],
  *,
  momentum: float,
  count: int | jax.Array | None = None,
  initial_mean: float = 0.0,
  initial_var: float = 1.0,
) -> dict[str, Any]:
  """One layer's running statistics with the weight of their initial values removed.

  After t updates with momentum m (the weight on the old value) from the initial value
  ``init``, each running statistic is an average of the batch statistics b_1..b_t plus the
  initial value::

      EMA_t = m^t * init + (1 - m) * sum_{i=1..t} m^(t-i) * b_i
            = m^t * init + (1 - m^t) * avg_t

  where avg_t weighs b_i by (1 - m) m^(t-i) / (1 - m^t), weights summing to 1. Solving, with
  m rounded to the statistics' dtype as the update rounded it::

      log_m = log(m)                                  (float64, then the statistics' dtype)
      w     = exp(t * log_m)                          (m^t)
      avg_t = (EMA_t - w * init) / -expm1(t * log_m)  (1 - m^t, accurate where it is tiny)

  for t >= 1; t = 0 returns the statistics unchanged. This is Adam's bias correction
  generalized to a non-zero start (for init = 0, TensorFlow's ``assign_moving_average(...,
  zero_debias=True)``). It works after the fact on a plain moving average;
  ``bnjax.batch_norm(..., zero_debias='mean_and_var')`` keeps the debiased average during
  training instead. Use either when a high momentum meets few steps: with m = 0.999 after 100
  steps EMA_t still holds 90% of ``init``, avg_t none.

  Args:
    stats: ``{'mean', 'var'}`` of one layer, with ``'count'`` (the number of updates,
      ``bnjax.init(..., track_count=True)``) unless ``count`` is given.
    momentum: the momentum the statistics were updated with, in [0, 1).
    count: the number of updates t, overriding ``stats['count']``; for layers without a
      count that are updated once per train step, ``state.step``.
    initial_mean: the mean's value before the first update (``bnjax.init``: 0).
    initial_var: the variance's value before the first update (``bnjax.init``: 1).

  Returns:
    ``stats`` with ``'mean'`` and ``'var'`` replaced by avg_t, in their dtypes.

  Example:
    >>> import jax.numpy as jnp
    >>> from bnjax import diagnostics
    >>> stats = {"mean": jnp.array([1.5]), "var": jnp.array([1.0])}   # one update, m = 0.5
    >>> diagnostics.debias(stats, momentum=0.5, count=1)["mean"]    # (1.5 - 0.5 * 0) / 0.5
    Array([3.], dtype=float32)
  """
  fn = "diagnostics.debias"
  if momentum is None:
    _checks.fail(
      fn,
      "`momentum` must be the float the statistics were updated with, got None; the"
      " cumulative average (momentum=None) carries no initial value to remove.",
      TypeError,
    )
  momentum = _checks.float_momentum(fn, momentum, name="momentum")
  if count is None:
    if "count" not in stats:
      _checks.fail(
        fn,
        f"expected the number of updates in stats['count'] or `count=`, got stats with keys"
        f" {sorted(stats)} and count=None. Hint: bnjax.init(..., track_count=True), or"
        " count=state.step for layers updated once per step.",
      )
    count = stats["count"]
  debiased = dict(stats)
  if momentum == 0.0:  # the running value is the last batch's: nothing to remove (and no log)
    return debiased
  count = jnp.asarray(count)
  for key, initial in (("mean", initial_mean), ("var", initial_var)):
    ema = jnp.asarray(stats[key])
    log_m = jnp.asarray(math.log(np.asarray(momentum, ema.dtype)), ema.dtype)
    t = count.astype(ema.dtype)
    w = jnp.exp(t * log_m)
    avg = (ema - w * initial) / jnp.where(count > 0, -jnp.expm1(t * log_m), 1)
    debiased[key] = jnp.where(count > 0, avg, ema)
  return debiased


def _frozen(fn: str, frozen: Collection[str]) -> frozenset[str]:
  if isinstance(frozen, str) or not isinstance(frozen, Collection):
    _checks.fail(
      fn,
      f"`frozen` must be a collection of layer paths, got {frozen!r}. Hint: frozen={{'bn1'}}.",
      TypeError,
    )
  return frozenset(frozen)


def _describe(path: str) -> str:
  return f"layer {path!r}" if path else "the layer"
