"""Training with bnjax: a train state, jitted train and eval steps that thread ``batch_stats``,
Keras-style frozen layers from optax masking, and orbax checkpoints.

Imported on demand (``import bnjax.training``); it needs optax, and orbax-checkpoint for the
checkpoint helpers (the ``train`` extra). ``import bnjax`` alone imports neither. The loop::

    state = create_train_state(params, batch_stats, tx)
    train_step = make_train_step(apply_fn, tx, loss_fn=loss_fn)
    eval_step = make_eval_step(apply_fn, loss_fn=loss_fn)
    for inputs, targets in batches:
      state, metrics = train_step(state, inputs, targets)  # batch statistics, new batch_stats kept
    metrics = eval_step(state, test_inputs, test_targets)  # running statistics, nothing changes

A model is one function, ``apply_fn(params, batch_stats, inputs, *, training) -> (outputs,
new_batch_stats)``: with ``training=True`` it normalizes with batch statistics and returns the
updated running statistics; with ``training=False`` it uses the running statistics (and may
return them unchanged). Steps given a ``key`` call it with ``key=`` as well, for dropout. A plain
function built on ``bnjax.batch_norm`` has this form already; ``linen_apply_fn(model)`` wraps a
``flax.linen`` model.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

try:
  import optax
except ImportError as error:
  raise ImportError("bnjax.training needs optax: pip install 'bnjax[train]'") from error
from jax import lax

from bnjax import _checkpoint, _checks
from bnjax._checkpoint import (
  CheckpointDamagedError,
  CheckpointError,
  CheckpointMismatchError,
  CheckpointNotFoundError,
)
from bnjax.diagnostics import covered_by

__all__ = [
  "CheckpointDamagedError",
  "CheckpointError",
  "CheckpointMismatchError",
  "CheckpointNotFoundError",
  "TrainState",
  "create_train_state",
  "freeze",
  "linen_apply_fn",
  "make_eval_step",
  "make_predict",
  "make_train_step",
  "restore_checkpoint",
  "save_checkpoint",
]

ApplyFn = Callable[..., tuple[Any, Any]]  # (params, batch_stats, inputs, *, training[, key])
LossFn = Callable[[Any, Any], jax.Array]  # (outputs, targets) -> float scalar
MetricsFn = Callable[[Any, Any], Mapping[str, jax.Array]]  # (outputs, targets) -> {name: scalar}


class TrainState(NamedTuple):
  """Everything a run carries from step to step (a pytree of arrays: jit and orbax take it)."""

  step: jax.Array  # int32[]: train steps taken
  params: Any  # trained by the optimizer
  batch_stats: Any  # running statistics of every batch-norm layer; replaced by each train step
  opt_state: Any  # the optax state of `tx`


def create_train_state(
  params: Any, batch_stats: Any, tx: optax.GradientTransformation
) -> TrainState:
  """The state at step 0: ``TrainState(0, params, batch_stats, tx.init(params))``.

  Args:
    params: the model's parameters (a pytree), e.g. ``variables['params']``.
    batch_stats: its running statistics, e.g. ``variables['batch_stats']`` (``{}`` if none).
    tx: the optimizer; its state is initialized from ``params``.

  Returns:
    The ``TrainState`` at step 0.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from bnjax import training
    >>> state = training.create_train_state({"w": jnp.ones(2)}, {}, optax.sgd(0.1))
    >>> int(state.step)
    0
  """
  _gradient_transformation("create_train_state", tx)
  return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params))


def linen_apply_fn(
  model: Any, *, train_arg: str = "train", rng_collection: str = "dropout"
) -> ApplyFn:
  """``apply_fn`` for a ``flax.linen`` model whose ``__call__`` takes ``train: bool``.

  Training applies the model with ``mutable=['batch_stats']`` and returns the updated
  collection; evaluation applies it read-only and returns ``batch_stats`` unchanged::

      outputs, updates = model.apply({'params': p, 'batch_stats': s}, inputs, train=True,
                                     mutable=['batch_stats'], rngs={'dropout': key})
      return outputs, updates['batch_stats']

  Args:
    model: a module instance, e.g. ``CNN()``.
    train_arg: the name of the model's keyword that switches training on.
    rng_collection: the PRNG stream that receives the step's ``key`` (Flax's Dropout: 'dropout').

  Returns:
    ``apply_fn(params, batch_stats, inputs, *, training, key=None) -> (outputs, batch_stats)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import bnjax.linen
    >>> from bnjax import training
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, *, train):
    ...     return bnjax.linen.BatchNorm(use_running_average=not train)(x)
    >>> variables = Net().init(jax.random.key(0), jnp.ones((4, 3)), train=False)
    >>> apply_fn = training.linen_apply_fn(Net())
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> y, stats = apply_fn(variables["params"], variables["batch_stats"], x, training=True)
    >>> stats["BatchNorm_0"]["mean"]
    Array([0.045, 0.055, 0.065], dtype=float32)
  """
  if isinstance(model, type) or not callable(getattr(model, "apply", None)):
    _checks.fail(
      "training.linen_apply_fn",
      f"`model` must be a flax.linen module instance, got {model!r}."
      " Hint: pass an instance, e.g. `linen_apply_fn(CNN())`, not the class.",
      TypeError,
    )

  def apply_fn(params, batch_stats, inputs, *, training, key=None):
    variables = {"params": params, "batch_stats": batch_stats}
    rngs = None if key is None else {rng_collection: key}
    if not training:
      return model.apply(variables, inputs, rngs=rngs, **{train_arg: False}), batch_stats
    outputs, updates = model.apply(
      variables, inputs, rngs=rngs, mutable=["batch_stats"], **{train_arg: True}
    )
    return outputs, updates["batch_stats"]

  return apply_fn


def make_train_step(
  apply_fn: ApplyFn,
  tx: optax.GradientTransformation,
  *,
  loss_fn: LossFn,
  metrics_fn: MetricsFn | None = None,
  axis_name: Any = None,
  skip_nonfinite: bool = True,
  donate_argnums: int | tuple[int, ...] = (),
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted ``train_step(state, inputs, targets, key=None) -> (new_state, metrics)``::

      outputs, new_batch_stats = apply_fn(params, batch_stats, inputs, training=True)
      loss    = loss_fn(outputs, targets)                 (pmean over axis_name)
      grads   = d loss / d params                         (pmean over axis_name)
      updates, opt_state = tx.update(grads, opt_state, params)
      params  = optax.apply_updates(params, updates)
      new_state = TrainState(step + 1, params, new_batch_stats, opt_state)
      metrics = {'loss': loss, **metrics_fn(outputs, targets),   (pmean over axis_name)
                 'skipped': 1.0 if the step was skipped else 0.0}

  A step whose loss or gradients are NaN or inf is skipped (``skip_nonfinite=True``): the
  params, the optimizer state and the running statistics stay as they were (only ``step``
  advances), so one bad batch cannot poison ``batch_stats`` while the parameters are spared, as
  it does with ``optax.apply_if_finite`` alone. Where ``tx`` contains ``apply_if_finite``, its
  own state (the count of non-finite steps) is taken from ``tx`` as it updated it.
  ``bnjax.diagnostics.check_skipped`` counts the skipped steps in the metrics.

  ``key`` (optional) feeds the model's randomness: ``apply_fn`` gets
  ``key=fold_in(key, state.step)`` (and the device index with ``axis_name``), so one key passed
  at every step gives fresh dropout masks each step, and a run restored from a checkpoint
  draws the same masks as the uninterrupted one.

  Data parallel: with ``axis_name``, call the step inside ``jax.shard_map`` (state replicated,
  ``P()``; inputs and targets split, ``P(axis_name)``) or ``jax.pmap``, and give the batch-norm
  layers the same ``axis_name``. The layers then already compute the batch statistics over
  the global batch, so every device returns the same ``new_batch_stats``: the step does not
  average them again. The loss differentiated is the global one, ``pmean`` of the per-device
  means (exact for equal shards), and the gradients are ``pmean``-ed as well: under ``pmap``
  (or ``shard_map(check_vma=False)``) each device holds its share and ``pmean`` averages
  them; under ``shard_map`` with its default replication checking, autodiff has already
  summed the shares into the replicated gradient and ``pmean`` leaves it unchanged. Either
  way every device applies the gradient of the global loss.

  Args:
    apply_fn: the model, ``(params, batch_stats, inputs, *, training[, key]) ->
      (outputs, new_batch_stats)``; see the module docstring.
    tx: the optimizer (``freeze(tx, frozen=...)`` for Keras-style frozen layers).
    loss_fn: ``(outputs, targets) -> scalar``, the mean loss over the (local) batch.
    metrics_fn: ``(outputs, targets) -> {name: scalar}`` reported besides the loss.
    axis_name: the mapped axis of data-parallel training; None on one device or under plain
      ``jax.jit`` over a sharded batch.
    skip_nonfinite: skip the whole update of a step with a non-finite loss or gradient
      (default). False applies it, as a bare optax loop does.
    donate_argnums: the step's arguments whose buffers XLA may reuse for its outputs, as in
      ``jax.jit``: ``(0,)`` donates ``state``, so a step holds one copy of the params, the
      optimizer state and the running statistics instead of two. Caveat: a donated argument
      is deleted by the call; using it afterwards (``state`` after
      ``state, m = train_step(state, ...)`` rebinds it, which is fine) raises
      ``RuntimeError: Array has been deleted``. Keep no other reference to a donated state:
      save checkpoints from the returned one.

  Returns:
    The jitted ``train_step``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from bnjax import training
    >>> def apply_fn(params, batch_stats, inputs, *, training):
    ...   return inputs @ params["w"], batch_stats
    >>> tx = optax.sgd(0.1)
    >>> state = training.create_train_state({"w": jnp.ones((3, 1))}, {}, tx)
    >>> step = training.make_train_step(
    ...     apply_fn, tx, loss_fn=lambda y, t: jnp.mean((y - t) ** 2), donate_argnums=(0,))
    >>> state, metrics = step(state, jnp.ones((4, 3)), jnp.zeros((4, 1)))
    >>> int(state.step), float(metrics["loss"])
    (1, 9.0)
  """
  skip_nonfinite = _checks.flag("training.make_train_step", "skip_nonfinite", skip_nonfinite)
  donate_argnums = _donate_argnums("training.make_train_step", donate_argnums)
  _callables(
    "training.make_train_step",
    apply_fn=apply_fn,
    loss_fn=loss_fn,
    metrics_fn=metrics_fn,
    optional={"metrics_fn"},
  )
  _gradient_transformation("training.make_train_step", tx)
  fn = "training.train_step"

  def train_step(state: TrainState, inputs: Any, targets: Any, key: jax.Array | None = None):
    _train_state(fn, "state", state)
    model_kwargs = {}
    if key is not None:
      key = jax.random.fold_in(key, state.step)
      if axis_name is not None:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
      model_kwargs["key"] = key

    def objective(params):
      outputs, batch_stats = _apply(
        fn, apply_fn, params, state.batch_stats, inputs, training=True, **model_kwargs
      )
      loss = _scalar_loss(fn, loss_fn(outputs, targets))
      if axis_name is not None:
        loss = lax.pmean(loss, axis_name)
      return loss, (outputs, batch_stats)

    (loss, (outputs, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
      state.params
    )
    if axis_name is not None:
      grads = lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    if skip_nonfinite:
      params, batch_stats = _where(finite, (params, batch_stats), (state.params, state.batch_stats))
      if not _has_apply_if_finite(opt_state):  # apply_if_finite guards and counts by itself
        opt_state = _where(finite, opt_state, state.opt_state)
    new_state = TrainState(state.step + 1, params, batch_stats, opt_state)
    metrics = _metrics(fn, loss, metrics_fn, outputs, targets, axis_name)
    return new_state, {**metrics, "skipped": jnp.where(finite, 0.0, 1.0).astype(jnp.float32)}

  return jax.jit(train_step, donate_argnums=donate_argnums)


_STEP_ARGUMENTS = ("state", "inputs", "targets", "key")


def _donate_argnums(fn: str, donate_argnums: Any) -> tuple[int, ...]:
  """``donate_argnums`` as a tuple of positions of ``train_step``'s arguments, or raises."""
  as_tuple = donate_argnums if isinstance(donate_argnums, tuple) else (donate_argnums,)
  if not all(isinstance(i, int) and not isinstance(i, bool) for i in as_tuple):
    _checks.fail(
      fn,
      f"`donate_argnums` must be an int or a tuple of ints, got {donate_argnums!r}.",
      TypeError,
    )
  bad = [i for i in as_tuple if not 0 <= i < len(_STEP_ARGUMENTS)]
  if bad:
    _checks.fail(
      fn,
      f"`donate_argnums` must name arguments of train_step{_STEP_ARGUMENTS} by position"
      f" (0 to {len(_STEP_ARGUMENTS) - 1}), got {donate_argnums!r}. Hint: (0,) donates the state.",
    )
  return tuple(sorted(set(as_tuple)))


def make_eval_step(
  apply_fn: ApplyFn,
  *,
  loss_fn: LossFn,
  metrics_fn: MetricsFn | None = None,
  axis_name: Any = None,
) -> Callable[[TrainState, Any, Any], dict[str, jax.Array]]:
  """A jitted ``eval_step(state, inputs, targets) -> metrics`` with the running statistics::

      outputs, _ = apply_fn(params, batch_stats, inputs, training=False)
      metrics    = {'loss': loss_fn(outputs, targets), **metrics_fn(outputs, targets)}
                   (pmean over axis_name)

  Nothing in ``state`` changes and no state is returned. Arguments as for ``make_train_step``.

  Args:
    apply_fn: the model, as for ``make_train_step``.
    loss_fn: ``(outputs, targets) -> scalar``.
    metrics_fn: ``(outputs, targets) -> {name: scalar}`` reported besides the loss.
    axis_name: the mapped axis of data-parallel evaluation, or None.

  Returns:
    The jitted ``eval_step``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from bnjax import training
    >>> def apply_fn(params, batch_stats, inputs, *, training):
    ...   return inputs * params["w"], batch_stats
    >>> state = training.create_train_state({"w": jnp.float32(2.0)}, {}, optax.sgd(0.1))
    >>> eval_step = training.make_eval_step(apply_fn, loss_fn=lambda y, t: jnp.mean((y - t) ** 2))
    >>> float(eval_step(state, jnp.ones(3), jnp.zeros(3))["loss"])
    4.0
  """
  _callables(
    "training.make_eval_step",
    apply_fn=apply_fn,
    loss_fn=loss_fn,
    metrics_fn=metrics_fn,
    optional={"metrics_fn"},
  )
  fn = "training.eval_step"

  def eval_step(state: TrainState, inputs: Any, targets: Any):
    _train_state(fn, "state", state)
    outputs, _ = _apply(fn, apply_fn, state.params, state.batch_stats, inputs, training=False)
    loss = _scalar_loss(fn, loss_fn(outputs, targets))
    return _metrics(fn, loss, metrics_fn, outputs, targets, axis_name)

  return jax.jit(eval_step)


def make_predict(apply_fn: ApplyFn) -> Callable[[TrainState, Any], Any]:
  """A jitted ``predict(state, inputs) -> outputs`` with the running statistics (evaluation).

  ``lambda x: predict(state, x)`` is what ``bnjax.diagnostics.check_eval_mode`` probes.

  Args:
    apply_fn: the model, as for ``make_train_step``.

  Returns:
    The jitted ``predict``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from bnjax import training
    >>> def apply_fn(params, batch_stats, inputs, *, training):
    ...   return inputs * params["w"], batch_stats
    >>> state = training.create_train_state({"w": jnp.float32(2.0)}, {}, optax.sgd(0.1))
    >>> training.make_predict(apply_fn)(state, jnp.ones(2))
    Array([2., 2.], dtype=float32)
  """
  _callables("training.make_predict", apply_fn=apply_fn)
  fn = "training.predict"

  def predict(state: TrainState, inputs: Any):
    _train_state(fn, "state", state)
    outputs, _ = _apply(fn, apply_fn, state.params, state.batch_stats, inputs, training=False)
    return outputs

  return jax.jit(predict)


def freeze(
  tx: optax.GradientTransformation, *, frozen: Collection[str]
) -> optax.GradientTransformation:
  """Keras 3's ``layer.trainable = False`` for the layers in ``frozen``, from optax masking.

  Keras 3 (and tf.keras since TF 2.0) runs a frozen BatchNormalization in inference mode:
  running statistics for the normalization, no statistics update, no parameter update. Before
  TF 2.0 a frozen Keras layer still normalized with batch statistics (keras-team/keras#9965),
  and TF1's ``tf.layers`` with ``trainable=False`` kept updating the statistics as well: only
  the parameters stayed. The two halves live in two places:

  - Parameters, here: ``optax.multi_transform`` sends every parameter of a frozen layer to
    ``optax.set_to_zero()`` (no update, no optimizer state) and every other one to ``tx``::

        label(path) = 'frozen' if covered_by(path, frozen) else 'trainable'
        tx' = optax.multi_transform({'trainable': tx, 'frozen': optax.set_to_zero()}, label)

  - Inference mode, in the model, which reads the same set::

        class Net(nn.Module):
          frozen: frozenset[str] = frozenset()

          @nn.compact
          def __call__(self, x, *, train):
            x = BatchNorm(use_running_average=not train or 'bn1' in self.frozen, name='bn1')(x)
            ...

        frozen = frozenset({'bn1'})
        model, tx = Net(frozen=frozen), freeze(optax.adam(1e-3), frozen=frozen)

    With ``use_running_average=True`` the layer normalizes with, and keeps, its running
    statistics. ``bnjax.diagnostics.check_frozen`` catches a model that does not read the set:
    its frozen layers' statistics move.

  Args:
    tx: the optimizer of the trainable parameters.
    frozen: layer paths, module names joined by '/' as in the params tree (``'bn1'``,
      ``'block/bn1'``). A path freezes everything under it (``'block'`` freezes
      ``'block/bn1/scale'``), as Keras' ``trainable = False`` on a model freezes its layers;
      ``bnjax.diagnostics.covered_by`` is the rule. Each path must cover a parameter.

  Returns:
    The optimizer: ``tx`` for the trainable parameters, no update for the frozen ones.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from bnjax import training
    >>> params = {"bn1": {"scale": jnp.ones(2)}, "dense": {"kernel": jnp.ones(2)}}
    >>> tx = training.freeze(optax.sgd(1.0), frozen={"bn1"})
    >>> grads = {"bn1": {"scale": jnp.ones(2)}, "dense": {"kernel": jnp.ones(2)}}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates["bn1"]["scale"], updates["dense"]["kernel"]
    (Array([0., 0.], dtype=float32), Array([-1., -1.], dtype=float32))
  """
  fn = "training.freeze"
  _gradient_transformation(fn, tx)
  if isinstance(frozen, str) or not isinstance(frozen, Collection):
    _checks.fail(
      fn,
      f"`frozen` must be a collection of layer paths, got {frozen!r}."
      " Hint: frozen={'bn1'} for one layer.",
      TypeError,
    )
  frozen = frozenset(frozen)

  def labels(params):
    paths = [
      jax.tree_util.keystr(path, simple=True, separator="/")
      for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]
    unknown = sorted(f for f in frozen if not any(covered_by(p, {f}) for p in paths))
    if unknown:
      _checks.fail(
        fn,
        f"`frozen` names layers without parameters: {unknown}; the parameters are {paths}."
        " Hint: paths join module names with '/', as in the params tree.",
      )
    return jax.tree.unflatten(
      jax.tree.structure(params),
      ["frozen" if covered_by(p, frozen) else "trainable" for p in paths],
    )

  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def save_checkpoint(
  path: str | pathlib.Path, state: TrainState, *, overwrite: bool = False
) -> pathlib.Path:
  """Writes all of ``state`` (step, params, batch_stats, opt_state) to the directory ``path``.

  The running statistics and the optimizer state are saved with the parameters: without them
  a restored run would normalize with initial statistics and restart Adam's moments. The
  write is atomic: orbax's ``StandardCheckpointer`` writes a hidden sibling directory, a
  manifest with every array's SHA-256 joins it, and a rename puts it in place, so a crash
  leaves the previous checkpoint intact (``bnjax._checkpoint``).

  Args:
    path: the checkpoint directory to create.
    state: the ``TrainState`` to save.
    overwrite: replace a checkpoint already at ``path`` (atomically); False raises
      ``FileExistsError`` there.

  Returns:
    The absolute path, once the checkpoint is on disk.

  Example:
    >>> import pathlib, tempfile, jax.numpy as jnp, optax
    >>> from bnjax import training
    >>> state = training.create_train_state({"w": jnp.ones(2)}, {}, optax.sgd(0.1))
    >>> path = training.save_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "step_0", state)
    >>> path.name, (path / "bnjax_manifest.json").exists()
    ('step_0', True)
  """
  fn = "training.save_checkpoint"
  _train_state(fn, "state", state)
  return _checkpoint.save(fn, path, state, overwrite=_checks.flag(fn, "overwrite", overwrite))


def restore_checkpoint(
  path: str | pathlib.Path, *, like: TrainState, cast: bool = False
) -> TrainState:
  """The ``TrainState`` saved at ``path`` by ``save_checkpoint``, verified against its manifest.

  Args:
    path: the checkpoint directory.
    like: a state of the same model and optimizer, e.g. fresh from ``create_train_state``; it
      gives the tree structure, shapes, dtypes and shardings to restore into. Training resumed
      from the result continues bit for bit as the uninterrupted run.
    cast: accept arrays saved in another dtype than ``like``'s and cast them (a bfloat16
      ``like`` for a float32 checkpoint); False raises ``CheckpointMismatchError``.

  Returns:
    The restored state, every array's checksum verified.

  Raises:
    CheckpointNotFoundError: nothing, or no checkpoint, at ``path``.
    CheckpointDamagedError: unreadable files or an array whose checksum differs (named).
    CheckpointMismatchError: another tree, shape or dtype than ``like``.

  Example:
    >>> import pathlib, tempfile, jax.numpy as jnp, optax
    >>> from bnjax import training
    >>> state = training.create_train_state({"w": jnp.ones(2)}, {}, optax.sgd(0.1))
    >>> path = training.save_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "step_0", state)
    >>> training.restore_checkpoint(path, like=state).params["w"]
    Array([1., 1.], dtype=float32)
  """
  fn = "training.restore_checkpoint"
  _train_state(fn, "like", like)
  return _checkpoint.restore(fn, path, like, cast=_checks.flag(fn, "cast", cast))


def _apply(fn, apply_fn, params, batch_stats, inputs, **kwargs):
  """Calls ``apply_fn`` and checks that the running statistics come back in their own form."""
  result = apply_fn(params, batch_stats, inputs, **kwargs)
  if not (isinstance(result, tuple) and len(result) == 2):
    _checks.fail(
      fn,
      f"`apply_fn` must return (outputs, new_batch_stats), got {_describe(result)}."
      " Hint: return the running statistics that bnjax.batch_norm (or the Flax update of"
      " 'batch_stats') gives back; dropping them is how they end up never updating.",
      TypeError,
    )
  outputs, new_batch_stats = result
  before, after = (
    jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), tree)
    for tree in (batch_stats, new_batch_stats)
  )
  if before != after:
    _checks.fail(
      fn,
      "`apply_fn` must return new_batch_stats with the structure, shapes and dtypes of"
      f" batch_stats, expected {before}, got {after}.",
    )
  return outputs, new_batch_stats


def _all_finite(tree) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(leaf))
    for leaf in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _where(condition, new, old):
  """``new`` where ``condition`` (a scalar) holds, else ``old``, leaf by leaf."""
  return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


def _has_apply_if_finite(opt_state) -> bool:
  def is_guard(node):
    return isinstance(node, optax.ApplyIfFiniteState)

  return any(is_guard(node) for node in jax.tree.leaves(opt_state, is_leaf=is_guard))


def _scalar_loss(fn, loss):
  if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
    _checks.fail(
      fn,
      "`loss_fn` must return a float scalar, got"
      f" {jnp.result_type(loss)}{list(jnp.shape(loss))}. Hint: average over the batch, e.g."
      " `optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()`.",
    )
  return loss


def _metrics(fn, loss, metrics_fn, outputs, targets, axis_name):
  extra = {} if metrics_fn is None else metrics_fn(outputs, targets)
  if not isinstance(extra, Mapping) or "loss" in extra:
    got = f"keys {sorted(extra)}" if isinstance(extra, Mapping) else _describe(extra)
    _checks.fail(
      fn,
      f"`metrics_fn` must return a dict without a 'loss' key (the step adds it), got {got}.",
      TypeError,
    )
  metrics = {"loss": loss, **extra}
  return metrics if axis_name is None else lax.pmean(metrics, axis_name)


def _callables(fn, *, optional=(), **functions):
  for name, function in functions.items():
    if not (callable(function) or (function is None and name in optional)):
      _checks.fail(fn, f"`{name}` must be callable, got {function!r}.", TypeError)


def _gradient_transformation(fn, tx):
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    _checks.fail(
      fn,
      f"`tx` must be an optax.GradientTransformation, got {tx!r}. Hint: e.g. `optax.adam(1e-3)`.",
      TypeError,
    )


def _train_state(fn, name, state):
  if not isinstance(state, TrainState):
    _checks.fail(
      fn,
      f"`{name}` must be a bnjax.training.TrainState, got {type(state).__name__}."
      " Hint: build it with create_train_state(params, batch_stats, tx).",
      TypeError,
    )


def _describe(value):
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    return f"an array {value.dtype}{list(value.shape)}"
  if isinstance(value, tuple):
    return f"a tuple of {len(value)}"
  return type(value).__name__
