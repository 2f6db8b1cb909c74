"""Keras 3 and tf_keras (Keras 2) ``BatchNormalization`` layers to and from bnjax.

    converted = from_keras(layer)          # a built layer -> Converted(params, stats, convention)
    layer = to_keras(*converted, input_shape=(None, 32, 32, 16))          # a new Keras 3 layer
    assign_to_keras(layer, params, stats)  # into an existing built layer

Names: Keras ``gamma, beta, moving_mean, moving_variance`` are bnjax ``scale, bias, mean, var``;
``center=False`` / ``scale=False`` drop ``bias`` / ``scale``. The convention comes from
``bnjax.conventions.keras`` or ``tf_keras`` with the layer's axis, momentum and epsilon; for
tf_keras also ``fused`` as the built layer resolved it (fused stores the unbiased variance).

TensorFlow's training-only features carry over:

- ``renorm=True`` (Keras 3 and tf_keras): the extra weights ``moving_stddev, renorm_mean,
  renorm_stddev`` are bnjax's ``stats['stddev'], ['renorm_mean'], ['renorm_stddev']`` (what
  ``bnjax.init(C, renorm=True)`` makes), and ``renorm``, ``renorm_clipping`` and
  ``renorm_momentum`` go into the convention.
- ``virtual_batch_size`` (tf_keras): the layer stores every weight with the input's rank plus
  one, ``(1, 1, ..., C)``; bnjax's are ``(C,)``, reshaped exactly both ways. tf_keras also
  shifts ``layer.axis`` by one; the convention has the input's axis.
- ``adjustment`` (tf_keras) is a TensorFlow function, not a weight, so it cannot be copied:
  ``from_keras(layer, adjustment=fn)`` takes a JAX function that computes the same
  ``(scale, bias)`` from the input's shape, and the convention passes it to
  ``bnjax.batch_norm`` as ``adjustment=fn``; ``to_keras(..., adjustment=tf_fn)`` takes the
  TensorFlow one back. It applies in training only.

Not carried by the weights: a frozen layer (``trainable=False``) runs in inference mode, so call
``bnjax.batch_norm(..., training=False)`` for it. Keras variables are float32 (also under mixed
precision policies); values of other dtypes are converted on the way in. TensorFlow/Keras are
imported only by ``to_keras``.
"""

from __future__ import annotations

from typing import Any, NoReturn

import jax.numpy as jnp
import numpy as np

from bnjax import _checks, conventions
from bnjax.conventions import Convention
from bnjax.interop import Converted
from bnjax.interop._models import NameMapping, PortedModel, flax_paths, get, put, require

__all__ = ["assign_to_keras", "assign_to_keras_model", "from_keras", "from_keras_model", "to_keras"]

_NAMES = (
  ("gamma", "params", "scale"),
  ("beta", "params", "bias"),
  ("moving_mean", "stats", "mean"),
  ("moving_variance", "stats", "var"),
  ("moving_stddev", "stats", "stddev"),
  ("renorm_mean", "stats", "renorm_mean"),
  ("renorm_stddev", "stats", "renorm_stddev"),
)
_RENORM_WEIGHTS = ("moving_stddev", "renorm_mean", "renorm_stddev")
_LIBRARIES = ("keras", "tf_keras")
# Convention.extra options a Keras layer has arguments for (the rest raise in to_keras)
_FEATURES = ("renorm", "renorm_clipping", "renorm_momentum", "virtual_batch_size", "adjustment")
_TF_KERAS_ONLY = ("virtual_batch_size", "adjustment")


def _fail(fn: str, message: str, error: type[Exception] = ValueError) -> NoReturn:
  _checks.fail(f"interop.keras.{fn}", message, error)


def _library(fn: str, layer: Any) -> str:
  """'keras' (Keras 3) or 'tf_keras', from the layer's class, without importing either."""
  for cls in type(layer).__mro__:
    if cls.__name__ == "BatchNormalization":
      root = cls.__module__.split(".")[0]
      if root in _LIBRARIES:
        return root
  _fail(
    fn,
    f"`layer` must be a Keras 3 or tf_keras BatchNormalization, got"
    f" {type(layer).__module__}.{type(layer).__name__}.",
    TypeError,
  )


def _present(layer: Any, weight: str) -> bool:
  if weight in _RENORM_WEIGHTS:
    return bool(getattr(layer, "renorm", False))
  return getattr(layer, {"gamma": "scale", "beta": "center"}.get(weight, weight), True) is not False


def _value(variable: Any) -> np.ndarray:
  return np.asarray(variable.numpy())


def _feature_shape(layer: Any, variable: Any) -> tuple[int, ...]:
  """bnjax's shape for a weight: the sizes of the feature axes.

  Keras 3 and single-axis tf_keras store ``(C,)``. tf_keras with several axes or with
  ``virtual_batch_size`` stores the input's rank (plus one for the virtual-batch axis) with 1
  elsewhere, and its built ``layer.axis`` indexes that shape.
  """
  shape = tuple(int(d) for d in variable.shape)
  if len(shape) == 1:
    return shape
  return tuple(shape[int(a)] for a in layer.axis)


def _clipping(clipping: Any) -> dict[str, float] | None:
  """Keras's ``renorm_clipping`` ({} or None entries when unset) as bnjax's: bounds or None."""
  bounds = {k: float(v) for k, v in dict(clipping or {}).items() if v is not None}
  return bounds or None


def from_keras(layer: Any, *, adjustment: Any = None) -> Converted:
  """A built Keras 3 or tf_keras ``BatchNormalization`` as bnjax ``params, stats, convention``.

  Renorm layers give ``stats`` with ``stddev``, ``renorm_mean`` and ``renorm_stddev`` too, and a
  convention with their ``renorm*`` options; virtual-batch layers give ``(C,)`` values and
  ``virtual_batch_size``. A tf_keras ``adjustment`` is a TensorFlow function, so a layer with
  one needs ``adjustment``: a JAX function ``shape -> (scale, bias)`` that computes the same,
  which the convention passes on to ``bnjax.batch_norm``.

  Raises for a layer not built (no weights yet: call it once or ``build`` it), and for a layer
  with an ``adjustment`` and no ``adjustment`` given (or the other way round).

  Args:
    layer: a built Keras 3 or tf_keras ``BatchNormalization``.
    adjustment: for a tf_keras layer with an ``adjustment``, the JAX function that computes
      the same ``(scale, bias)``; None otherwise.

  Returns:
    ``Converted(params, stats, convention)``.

  Example:
    >>> import keras
    >>> from bnjax.interop import from_keras
    >>> layer = keras.layers.BatchNormalization(momentum=0.9)
    >>> layer.build((None, 3))
    >>> params, stats, convention = from_keras(layer)
    >>> sorted(params), convention.momentum, convention.epsilon
    (['bias', 'scale'], 0.9, 0.001)
  """
  fn = "from_keras"
  library = _library(fn, layer)
  if not layer.built:
    _fail(
      fn,
      "`layer` is not built, so it has no weights yet. Hint: call it on an input once,"
      " or `layer.build(input_shape)`.",
    )
  has_adjustment = getattr(layer, "adjustment", None) is not None
  if has_adjustment and adjustment is None:
    _fail(
      fn,
      "`layer.adjustment` is a TensorFlow function, not a weight, so it cannot be"
      " converted. Hint: pass a JAX function that computes the same (scale, bias) from the"
      " input's shape, `from_keras(layer, adjustment=fn)`; the convention gives it to"
      " bnjax.batch_norm as `adjustment=fn` (training only).",
    )
  if adjustment is not None and not has_adjustment:
    _fail(
      fn,
      f"`adjustment` is given, but the {library} layer has none (layer.adjustment is"
      " None). Hint: leave it out.",
    )
  if adjustment is not None and not callable(adjustment):
    _fail(
      fn,
      f"`adjustment` must be a callable shape -> (scale, bias), got {type(adjustment).__name__}.",
      TypeError,
    )
  params, stats = {}, {}
  for weight, tree, key in _NAMES:
    if _present(layer, weight):
      variable = getattr(layer, weight)
      value = _value(variable).reshape(_feature_shape(layer, variable))
      (params if tree == "params" else stats)[key] = jnp.asarray(value)
  virtual_batch_size = getattr(layer, "virtual_batch_size", None)
  axis = layer.axis
  if library == "tf_keras":  # a list of non-negative axes once built: the last one is -1 again
    rank = layer.input_spec.ndim
    shift = 0 if virtual_batch_size is None else 1  # tf_keras counts its virtual-batch axis
    axis = tuple(int(a) - shift for a in axis)
    axis = tuple(a - rank if a == rank - 1 else a for a in axis)
    axis = axis[0] if len(axis) == 1 else axis
  common = {
    "axis": axis,
    "momentum": float(layer.momentum),
    "epsilon": float(layer.epsilon),
    "synchronized": bool(getattr(layer, "synchronized", False)),
  }
  if getattr(layer, "renorm", False):
    common.update(
      renorm=True,
      renorm_clipping=_clipping(layer.renorm_clipping),
      renorm_momentum=float(layer.renorm_momentum),
    )
  if library == "keras":
    convention = conventions.keras(**common)
  else:
    convention = conventions.tf_keras(
      fused=bool(layer.fused),
      adjustment=adjustment,
      virtual_batch_size=None if virtual_batch_size is None else int(virtual_batch_size),
      **common,
    )
  return Converted(params, stats, convention)


def _keras_arguments(
  fn: str, convention: Convention, library: str, adjustment: Any
) -> dict[str, Any]:
  """The BatchNormalization arguments that reproduce ``convention``, or an error saying why not."""
  if not isinstance(convention, Convention):
    _fail(
      fn,
      f"`convention` must be a bnjax.conventions.Convention, got {type(convention).__name__}.",
      TypeError,
    )
  options = convention.options()
  extra = dict(convention.extra)
  problems = []
  if options["momentum"] is None:
    problems.append("momentum=None (a cumulative average)")
  if options["variance"] == "shifted":
    problems.append("variance='shifted'")
  others = {k: v for k, v in extra.items() if k not in _FEATURES}
  if others:
    problems.append(f"extra options {others}")
  if not extra.get("renorm") and ({"renorm_clipping", "renorm_momentum"} & set(extra)):
    problems.append("renorm_clipping or renorm_momentum without renorm=True")
  if library == "keras":
    problems += [
      f"{k} (Keras 3 has no such argument; tf_keras has)" for k in _TF_KERAS_ONLY if k in extra
    ]
  axis = options["axis"]
  if isinstance(axis, tuple) and len(axis) == 1:
    axis = axis[0]
  if isinstance(axis, tuple) and library == "keras":
    problems.append(f"axis={axis} (Keras 3 takes one feature axis; tf_keras takes several)")
  unbiased = options["running_variance"] == "unbiased"
  if unbiased and library == "keras":
    problems.append(
      "running_variance='unbiased' (Keras 3 stores the biased variance; tf_keras"
      " with fused=True stores the unbiased one)"
    )
  synchronized = options["variance"] == "fast"
  if synchronized and unbiased:
    problems.append("variance='fast' (synchronized) with the unbiased running variance")
  features = sorted(set(extra) & set(_FEATURES))
  if unbiased and features and library == "tf_keras":
    problems.append(
      f"running_variance='unbiased' with {features} (tf_keras stores the unbiased"
      " variance only when fused, and it never fuses with them)"
    )
  if library == "tf_keras" and "adjustment" in extra and adjustment is None:
    problems.append(
      "adjustment without its TensorFlow version (the convention's is a JAX"
      " function; pass the TensorFlow one as `to_keras(..., adjustment=tf_fn)`)"
    )
  if problems:
    _fail(fn, f"{library} BatchNormalization cannot reproduce {', '.join(problems)}.")
  if adjustment is not None and "adjustment" not in extra:
    _fail(
      fn,
      "`adjustment` is given, but the convention has none. Hint: leave it out, or give"
      " the convention its JAX version (`convention.replace(extra={..., 'adjustment': fn})`).",
    )
  arguments = {
    "axis": list(axis) if isinstance(axis, tuple) else axis,
    "momentum": options["momentum"],
    "epsilon": options["epsilon"],
    "synchronized": synchronized,
  }
  if extra.get("renorm"):
    arguments.update(
      renorm=True,
      renorm_clipping=extra.get("renorm_clipping"),
      renorm_momentum=extra.get("renorm_momentum", 0.99),
    )
  if library == "tf_keras":
    arguments.update(
      fused=unbiased, virtual_batch_size=extra.get("virtual_batch_size"), adjustment=adjustment
    )
  return arguments


def to_keras(
  params: dict[str, Any],
  stats: dict[str, Any],
  convention: Convention,
  *,
  input_shape: tuple[int | None, ...],
  library: str = "keras",
  adjustment: Any = None,
) -> Any:
  """A new, built ``BatchNormalization`` of ``library`` ('keras' or 'tf_keras') holding
  ``params`` and ``stats`` and reproducing ``convention``.

  ``variance='fast'`` becomes ``synchronized=True`` (the same moments under a
  ``tf.distribute`` strategy); the unbiased running variance needs tf_keras with
  ``fused=True`` (4-D or 5-D inputs, channels first or last). The convention's ``renorm*``
  options go to the layer's arguments of the same names (with the renorm statistics in
  ``stats``); ``virtual_batch_size`` and ``adjustment`` need tf_keras, and ``adjustment`` the
  TensorFlow function that computes what the convention's JAX one does. Anything Keras cannot
  express (momentum=None, other extra options) raises. ``stats['count']`` has no Keras
  counterpart and is dropped.

  Args:
    params: ``{'scale': (C,), 'bias': (C,)}``, either optional (``scale=``/``center=False``).
    stats: ``{'mean': (C,), 'var': (C,)}`` (+ the renorm statistics for ``renorm``).
    convention: what the layer must compute, e.g. ``bnjax.conventions.keras(...)``.
    input_shape: the layer's input shape, for ``build`` (``None`` for the batch).
    library: ``'keras'`` (Keras 3) or ``'tf_keras'``.
    adjustment: tf_keras's TensorFlow ``adjustment`` function, for a convention with one.

  Returns:
    The built layer.

  Example:
    >>> from bnjax import conventions
    >>> from bnjax.interop import to_keras
    >>> params, stats = conventions.KERAS.init(3)
    >>> layer = to_keras(params, stats, conventions.keras(momentum=0.5), input_shape=(None, 3))
    >>> type(layer).__name__, layer.momentum
    ('BatchNormalization', 0.5)
  """
  fn = "to_keras"
  _checks.choice(f"interop.keras.{fn}", "library", library, _LIBRARIES)
  arguments = _keras_arguments(fn, convention, library, adjustment)
  extra = "keras" if library == "keras" else "tf"
  layers = require(library, fn=f"interop.keras.{fn}", extra=extra).layers
  layer = layers.BatchNormalization(center="bias" in params, scale="scale" in params, **arguments)
  layer.build(tuple(input_shape))
  assign_to_keras(layer, params, stats)
  return layer


def assign_to_keras(layer: Any, params: dict[str, Any], stats: dict[str, Any]) -> None:
  """Writes ``params`` and ``stats`` into a built Keras BatchNormalization, exactly.

  The layer must have exactly the weights ``params`` and ``stats`` have (``center``/``scale``;
  the renorm statistics iff ``renorm=True``) and the same features; ``(C,)`` values fill
  tf_keras's ``(1, ..., C)`` weights. ``stats['count']`` is ignored.

  Args:
    layer: a built Keras 3 or tf_keras ``BatchNormalization``.
    params: ``{'scale': (C,), 'bias': (C,)}``, as the layer's ``scale``/``center`` require.
    stats: ``{'mean': (C,), 'var': (C,)}`` (+ the renorm statistics).

  Returns:
    None: the layer's weights are assigned in place.

  Example:
    >>> import keras, numpy as np
    >>> import bnjax
    >>> from bnjax.interop import assign_to_keras
    >>> layer = keras.layers.BatchNormalization()
    >>> layer.build((None, 2))
    >>> params, stats = bnjax.init(2)
    >>> assign_to_keras(layer, params, {**stats, "mean": np.array([1.0, 2.0], np.float32)})
    >>> layer.moving_mean.numpy()
    array([1., 2.], dtype=float32)
  """
  fn = "assign_to_keras"
  _library(fn, layer)
  if not layer.built:
    _fail(fn, "`layer` is not built. Hint: `layer.build(input_shape)` first.")
  for weight, tree, key in _NAMES:
    source = params if tree == "params" else stats
    has_weight, has_value = _present(layer, weight), key in source
    if has_weight != has_value:
      hint = (
        " Hint: renorm=True layers hold moving_stddev, renorm_mean and renorm_stddev, which"
        " are the stats 'stddev', 'renorm_mean' and 'renorm_stddev' of"
        " `bnjax.init(C, renorm=True)`."
        if weight in _RENORM_WEIGHTS
        else " Hint: Keras' center=False drops beta (bias), scale=False drops gamma (scale)."
      )
      _fail(
        fn,
        f"`{tree}` {'lacks' if has_weight else 'has'} '{key}' but the layer"
        f" {'has' if has_weight else 'has no'} `{weight}`." + hint,
      )
    if not has_weight:
      continue
    variable = getattr(layer, weight)
    value = np.asarray(source[key])
    shape, stored = _feature_shape(layer, variable), tuple(int(d) for d in variable.shape)
    if tuple(value.shape) != shape:
      _fail(
        fn,
        f"`{tree}['{key}']` has shape {tuple(value.shape)}, the layer's `{weight}` has"
        f" {shape}" + ("" if stored == shape else f" (stored as {stored})") + ".",
      )
    dtype = getattr(variable.dtype, "name", variable.dtype)  # tf.DType (tf_keras) or str (Keras 3)
    variable.assign(value.reshape(stored).astype(np.dtype(dtype)))


# --- whole models ---------------------------------------------------------------------------


def _is_batch_norm(layer: Any) -> bool:
  return any(
    cls.__name__ == "BatchNormalization" and cls.__module__.split(".")[0] in _LIBRARIES
    for cls in type(layer).__mro__
  )


def _batch_norms(fn: str, model: Any) -> dict[str, Any]:
  """``{path: layer}`` for the BatchNormalization layers in ``model``, nested models included.

  A path is the layer names from the model down, joined by ``/`` (``'block1/bn'``).
  """
  if not hasattr(model, "_flatten_layers"):
    _checks.fail(
      fn,
      f"`model` must be a Keras 3 or tf_keras model or layer, got {type(model).__name__}.",
      TypeError,
    )
  found: dict[str, Any] = {}

  def walk(layer: Any, prefix: str) -> None:
    for child in layer._flatten_layers(include_self=False, recursive=False):
      path = f"{prefix}{child.name}"
      if _is_batch_norm(child):
        found[path] = child
      else:
        walk(child, f"{path}/")

  walk(model, "")
  if not found:
    _checks.fail(fn, f"`model` ({type(model).__name__}) has no BatchNormalization layers.")
  return found


def _same_path(path: str) -> str:
  return path


def from_keras_model(model: Any, *, names: NameMapping = None) -> PortedModel:
  """Every BatchNormalization of a built Keras model, as a Flax model's
  ``{'params', 'batch_stats'}``.

  Each Keras 3 or tf_keras ``BatchNormalization`` in ``model`` (in nested models and layers
  too) goes through ``from_keras`` and lands at its Flax path, with its own convention: Keras
  3's, or tf_keras's fused or unfused one as each layer resolved it, renorm included. Layers
  with an ``adjustment`` need ``from_keras`` one by one (the JAX function is the caller's).

  Args:
    model: a built Keras 3 or tf_keras model (or layer holding others).
    names: the Flax path of each batch norm: None keeps the Keras path (layer names joined by
      ``/``, e.g. ``'block1/batch_normalization'``), a callable ``keras_path -> flax_path``,
      or a dict that maps every batch norm's Keras path.

  Returns:
    ``PortedModel(variables, conventions)``, as ``interop.torch.from_torch_model``.

  Example:
    >>> import keras
    >>> from bnjax.interop import from_keras_model
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="bn")])
    >>> ported = from_keras_model(model, names={"bn": "BatchNorm_0"})
    >>> sorted(ported.variables["params"]["BatchNorm_0"])
    ['bias', 'scale']
    >>> ported.conventions["BatchNorm_0"].epsilon
    0.001
  """
  fn = "interop.keras.from_keras_model"
  found = _batch_norms(fn, model)
  paths = flax_paths(fn, list(found), names, _same_path)
  variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
  layer_conventions = {}
  for keras_path, layer in found.items():
    converted = from_keras(layer)
    flax_path = paths[keras_path]
    if converted.params:
      put(variables["params"], flax_path, converted.params)
    put(variables["batch_stats"], flax_path, converted.stats)
    layer_conventions[flax_path] = converted.convention
  return PortedModel(variables, layer_conventions)


def assign_to_keras_model(model: Any, variables: Any, *, names: NameMapping = None) -> None:
  """Writes a Flax model's batch-norm variables into every BatchNormalization of a Keras model.

  The inverse of ``from_keras_model``: each layer gets the ``params`` and ``batch_stats`` at its
  Flax path through ``assign_to_keras`` (exact, shapes checked; ``count`` has no Keras
  weight and is dropped). The other layers' weights are the caller's.

  Args:
    model: the built Keras 3 or tf_keras model that receives the values.
    variables: ``{'params': ..., 'batch_stats': ...}`` as a Flax model holds them.
    names: as for ``from_keras_model``; give the same.

  Returns:
    None: the model's weights are assigned in place.

  Example:
    >>> import keras, numpy as np
    >>> from bnjax.interop import assign_to_keras_model, from_keras_model
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization(name="bn")])
    >>> ported = from_keras_model(model)
    >>> ported.variables["batch_stats"]["bn"]["mean"] = np.array([3.0, 4.0], np.float32)
    >>> assign_to_keras_model(model, ported.variables)
    >>> model.get_layer("bn").moving_mean.numpy()
    array([3., 4.], dtype=float32)
  """
  fn = "interop.keras.assign_to_keras_model"
  found = _batch_norms(fn, model)
  paths = flax_paths(fn, list(found), names, _same_path)
  for keras_path, layer in found.items():
    flax_path = paths[keras_path]
    has_params = layer.center or layer.scale
    params = get(fn, variables, "params", flax_path, required=has_params) or {}
    stats = get(fn, variables, "batch_stats", flax_path, required=True)
    stats = {key: value for key, value in stats.items() if key != "count"}
    assign_to_keras(layer, dict(params), stats)
