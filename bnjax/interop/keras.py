"""Keras 3 and tf_keras (Keras 2) ``BatchNormalization`` layers to and from bnjax.

    converted = from_keras(layer)          # a built layer -> Converted(params, stats, convention)
    layer = to_keras(*converted, input_shape=(None, 32, 32, 16))          # a new Keras 3 layer
    assign_to_keras(layer, params, stats)  # into an existing built layer

Names: Keras ``gamma, beta, moving_mean, moving_variance`` are bnjax ``scale, bias, mean, var``;
``center=False`` / ``scale=False`` drop ``bias`` / ``scale``. The convention comes from
``bnjax.conventions.keras`` or ``tf_keras`` with the layer's axis, momentum and epsilon; for
tf_keras also ``fused`` as the built layer resolved it (fused stores the unbiased variance).

Not carried by the weights: a frozen layer (``trainable=False``) runs in inference mode, so call
``bnjax.batch_norm(..., training=False)`` for it. Keras variables are float32 (also under mixed
precision policies); values of other dtypes are converted on the way in. TensorFlow/Keras are
imported only by ``to_keras``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from bnjax import _checks, conventions
from bnjax.conventions import Convention
from bnjax.interop import Converted

__all__ = ["from_keras", "to_keras", "assign_to_keras"]

_NAMES = (("gamma", "params", "scale"), ("beta", "params", "bias"),
          ("moving_mean", "stats", "mean"), ("moving_variance", "stats", "var"))
_LIBRARIES = ("keras", "tf_keras")


def _fail(fn: str, message: str, error: type[Exception] = ValueError):
  _checks.fail(f"interop.keras.{fn}", message, error)


def _library(fn: str, layer: Any) -> str:
  """'keras' (Keras 3) or 'tf_keras', from the layer's class, without importing either."""
  for cls in type(layer).__mro__:
    if cls.__name__ == "BatchNormalization":
      root = cls.__module__.split(".")[0]
      if root in _LIBRARIES:
        return root
  _fail(fn, f"`layer` must be a Keras 3 or tf_keras BatchNormalization, got"
        f" {type(layer).__module__}.{type(layer).__name__}.", TypeError)


def _present(layer: Any, weight: str) -> bool:
  return getattr(layer, {"gamma": "scale", "beta": "center"}.get(weight, weight), True) is not False


def _value(variable: Any) -> np.ndarray:
  return np.asarray(variable.numpy())


def from_keras(layer: Any) -> Converted:
  """A built Keras 3 or tf_keras ``BatchNormalization`` as bnjax ``params, stats, convention``.

  Raises for a layer not built (no weights yet: call it once or ``build`` it), and for
  ``renorm``, ``virtual_batch_size`` and ``adjustment`` layers, whose extra weights and shapes
  are not converted yet (``bnjax.conventions.keras/tf_keras`` take those options).
  """
  fn = "from_keras"
  library = _library(fn, layer)
  if not layer.built:
    _fail(fn, "`layer` is not built, so it has no weights yet. Hint: call it on an input once,"
          " or `layer.build(input_shape)`.")
  for option, off in (("renorm", False), ("virtual_batch_size", None), ("adjustment", None)):
    if getattr(layer, option, off) is not off:
      _fail(fn, f"`layer.{option}` is set; from_keras does not convert such layers yet."
            f" Hint: bnjax.conventions.{library}(..., {option}=...) gives the options; copy the"
            " weights by hand.")
  params, stats = {}, {}
  for weight, tree, key in _NAMES:
    if _present(layer, weight):
      (params if tree == "params" else stats)[key] = jnp.asarray(_value(getattr(layer, weight)))
  axis = layer.axis
  if library == "tf_keras":  # a list of non-negative axes once built: the last one is -1 again
    rank = layer.input_spec.ndim
    axis = tuple(int(a) - rank if int(a) == rank - 1 else int(a) for a in axis)
    axis = axis[0] if len(axis) == 1 else axis
  common = dict(axis=axis, momentum=float(layer.momentum), epsilon=float(layer.epsilon),
                synchronized=bool(getattr(layer, "synchronized", False)))
  if library == "keras":
    convention = conventions.keras(**common)
  else:
    convention = conventions.tf_keras(fused=bool(layer.fused), **common)
  return Converted(params, stats, convention)


def _keras_arguments(fn: str, convention: Convention, library: str) -> dict[str, Any]:
  """The BatchNormalization arguments that reproduce ``convention``, or an error saying why not."""
  if not isinstance(convention, Convention):
    _fail(fn, "`convention` must be a bnjax.conventions.Convention, got"
          f" {type(convention).__name__}.", TypeError)
  options = convention.options()
  problems = []
  if options["momentum"] is None:
    problems.append("momentum=None (a cumulative average)")
  if options["variance"] == "shifted":
    problems.append("variance='shifted'")
  if convention.extra:
    problems.append(f"extra options {dict(convention.extra)}")
  unbiased = options["running_variance"] == "unbiased"
  if unbiased and library == "keras":
    problems.append("running_variance='unbiased' (Keras 3 stores the biased variance; tf_keras"
                    " with fused=True stores the unbiased one)")
  synchronized = options["variance"] == "fast"
  if synchronized and unbiased:
    problems.append("variance='fast' (synchronized) with the unbiased running variance")
  if problems:
    _fail(fn, f"{library} BatchNormalization cannot reproduce {', '.join(problems)}.")
  arguments = dict(axis=options["axis"], momentum=options["momentum"],
                   epsilon=options["epsilon"], synchronized=synchronized)
  if library == "tf_keras":
    arguments["fused"] = unbiased
  return arguments


def to_keras(
    params: dict[str, Any],
    stats: dict[str, Any],
    convention: Convention,
    *,
    input_shape: tuple[int | None, ...],
    library: str = "keras",
) -> Any:
  """A new, built ``BatchNormalization`` of ``library`` ('keras' or 'tf_keras') holding
  ``params`` and ``stats`` and reproducing ``convention``.

  ``variance='fast'`` becomes ``synchronized=True`` (the same moments under a
  ``tf.distribute`` strategy); the unbiased running variance needs tf_keras with
  ``fused=True`` (4-D or 5-D inputs, channels first or last). Anything Keras cannot express
  (momentum=None, extra options) raises. ``stats['count']`` has no Keras counterpart and is
  dropped.
  """
  fn = "to_keras"
  _checks.choice(f"interop.keras.{fn}", "library", library, _LIBRARIES)
  arguments = _keras_arguments(fn, convention, library)
  if library == "keras":
    import keras

    layers = keras.layers
  else:
    import tf_keras

    layers = tf_keras.layers
  layer = layers.BatchNormalization(center="bias" in params, scale="scale" in params, **arguments)
  layer.build(tuple(input_shape))
  assign_to_keras(layer, params, stats)
  return layer


def assign_to_keras(layer: Any, params: dict[str, Any], stats: dict[str, Any]) -> None:
  """Writes ``params`` and ``stats`` into a built Keras BatchNormalization, exactly.

  The layer must have exactly the weights ``params`` has (``center``/``scale``) and the same
  number of features; ``stats['count']`` is ignored.
  """
  fn = "assign_to_keras"
  _library(fn, layer)
  if not layer.built:
    _fail(fn, "`layer` is not built. Hint: `layer.build(input_shape)` first.")
  for weight, tree, key in _NAMES:
    source = params if tree == "params" else stats
    has_weight, has_value = _present(layer, weight), key in source
    if has_weight != has_value:
      _fail(fn, f"`{tree}` {'lacks' if has_weight else 'has'} '{key}' but the layer"
            f" {'has' if has_weight else 'has no'} `{weight}`."
            " Hint: Keras' center=False drops beta (bias), scale=False drops gamma (scale).")
    if not has_weight:
      continue
    variable = getattr(layer, weight)
    value = np.asarray(source[key])
    if tuple(value.shape) != tuple(variable.shape):
      _fail(fn, f"`{tree}['{key}']` has shape {tuple(value.shape)}, the layer's `{weight}` has"
            f" {tuple(variable.shape)}.")
    dtype = getattr(variable.dtype, "name", variable.dtype)  # tf.DType (tf_keras) or str (Keras 3)
    variable.assign(value.astype(np.dtype(dtype)))
