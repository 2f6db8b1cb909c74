"""Trace-time validation for the public functions, with messages that say what to do.

Every check looks at static information only (shapes, dtypes, Python values), so errors are
raised while tracing, before anything runs. Messages follow one pattern:
``bnjax.<function>: `<argument>` <what was expected>, got <what was passed>. <hint>``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar, cast, get_args

import jax
import jax.core as jax_core
import jax.numpy as jnp
import numpy as np

from bnjax import _types

PARAM_KEYS = ("scale", "bias")
REQUIRED_STAT_KEYS = ("mean", "var")
RENORM_STAT_KEYS = ("renorm_mean", "renorm_stddev", "stddev")
CLIPPING_KEYS = ("rmin", "rmax", "dmax")
VARIANCE_ALGORITHMS: tuple[_types.Variance, ...] = get_args(_types.Variance)
RUNNING_VARIANCES: tuple[_types.RunningVariance, ...] = get_args(_types.RunningVariance)
BACKWARDS: tuple[_types.Backward, ...] = get_args(_types.Backward)
ZERO_DEBIAS: tuple[_types.ZeroDebias, ...] = get_args(_types.ZeroDebias)
ON_NONFINITE: tuple[_types.OnNonfinite, ...] = get_args(_types.OnNonfinite)

_Choice = TypeVar("_Choice", bound=str)


def fail(fn: str, message: str, error: type[Exception] = ValueError) -> NoReturn:
  raise error(f"bnjax.{fn}: {message}")


def array_like(fn: str, name: str, value: Any) -> jax.Array:
  if value is None:
    hint = (
      " Hint: leave the key out to disable it (scale 1, bias 0)."
      if name.startswith("params[")
      else ""
    )
    fail(fn, f"`{name}` must be an array, got None.{hint}", TypeError)
  if not hasattr(value, "shape") or not hasattr(value, "dtype"):
    try:
      value = jnp.asarray(value)
    except (TypeError, ValueError):
      fail(fn, f"`{name}` must be an array, got {type(value).__name__}.", TypeError)
  return value


def floating_input(fn: str, x: Any) -> jax.Array:
  """``x`` as an array of rank >= 1 with a floating or complex dtype, or raises."""
  x = array_like(fn, "x", x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    fail(
      fn,
      f"`x` must have a floating or complex dtype (float16, bfloat16, float32, float64,"
      f" complex64, complex128), got {x.dtype}. Hint: convert it first, e.g."
      " `x.astype(jnp.float32)`.",
      TypeError,
    )
  if x.ndim == 0:
    fail(fn, "`x` must have at least one axis (the features), got a scalar.")
  return x


def canonical_axes(fn: str, name: str, axes: Any, ndim: int) -> tuple[int, ...]:
  """Returns `axes` as a sorted tuple of non-negative ints, or raises."""
  as_tuple = tuple(axes) if isinstance(axes, Sequence) and not isinstance(axes, str) else (axes,)
  for a in as_tuple:
    if isinstance(a, bool) or not isinstance(a, numbers.Integral):
      fail(
        fn,
        f"`{name}` must be an int or a tuple of ints, got {axes!r}.",
        TypeError,
      )
  bad = [int(a) for a in as_tuple if not -ndim <= int(a) < ndim]
  if bad:
    fail(
      fn,
      f"`{name}`={axes!r} is out of range for an input of rank {ndim}; expected values in"
      f" [{-ndim}, {ndim - 1}]. Hint: channels-last (NHWC) is axis=-1, channels-first (NCHW)"
      " is axis=1.",
    )
  positive = [int(a) % ndim for a in as_tuple]
  if len(set(positive)) != len(positive):
    fail(fn, f"`{name}`={axes!r} names the same axis twice (as {positive}).")
  return tuple(sorted(positive))


def feature_axes(fn: str, axis: Any, ndim: int) -> tuple[int, ...]:
  """``axis`` canonicalized. All axes may be features (rank-1 input): each element is then its
  own channel, normalized to ``bias`` in training, as Flax does."""
  return canonical_axes(fn, "axis", axis, ndim)


def _feature_array(
  fn: str, what: str, value: Any, feature_shape: tuple[int, ...], *, complex_ok: bool = False
) -> jax.Array:
  value = array_like(fn, what, value)
  kind = jnp.inexact if complex_ok else jnp.floating
  if not jnp.issubdtype(value.dtype, kind):
    fail(
      fn,
      f"`{what}` must have a {'floating or complex' if complex_ok else 'floating'} dtype, got"
      f" {value.dtype}. Hint: build params and stats with `bnjax.init(...)`.",
      TypeError,
    )
  if tuple(value.shape) != feature_shape:
    fail(
      fn,
      f"`{what}` must have the shape of the feature axes {feature_shape}, got {tuple(value.shape)}."
      " Hint: check `axis` (channels-first inputs need axis=1) and the `num_features` given"
      " to `bnjax.init`.",
    )
  return value


def params(fn: str, params: Any, feature_shape: tuple[int, ...]) -> _types.Params:
  if not isinstance(params, Mapping):
    fail(
      fn,
      f"`params` must be a dict with optional keys {PARAM_KEYS}, got {type(params).__name__}.",
      TypeError,
    )
  unknown = sorted(set(params) - set(PARAM_KEYS))
  if unknown:
    fail(
      fn,
      f"`params` has unknown keys {unknown}; expected only {PARAM_KEYS} (Flax's names)."
      " Hint: Keras' gamma/beta are scale/bias; leave a key out to disable it.",
    )
  checked = {k: _feature_array(fn, f"params['{k}']", v, feature_shape) for k, v in params.items()}
  return cast(_types.Params, checked)


def stats(
  fn: str, stats: Any, feature_shape: tuple[int, ...], *, need_count: bool, need_renorm: bool
) -> _types.Stats:
  if not isinstance(stats, Mapping):
    fail(
      fn,
      f"`stats` must be a dict with keys {REQUIRED_STAT_KEYS}, got {type(stats).__name__}.",
      TypeError,
    )
  missing = [k for k in REQUIRED_STAT_KEYS if k not in stats]
  if missing:
    fail(
      fn,
      f"`stats` is missing {missing}; got keys {sorted(stats)}."
      " Hint: Flax's names are 'mean' and 'var' (Keras: moving_mean, moving_variance);"
      " `bnjax.init(num_features)` builds them.",
    )
  missing_renorm = [k for k in RENORM_STAT_KEYS if k not in stats]
  if need_renorm and missing_renorm:
    fail(
      fn,
      f"`renorm=True` needs the running statistics {missing_renorm} in `stats`, got keys"
      f" {sorted(stats)}. Hint: `bnjax.init(num_features, renorm=True)`.",
    )
  checked = dict(stats)
  for k in REQUIRED_STAT_KEYS + (RENORM_STAT_KEYS if need_renorm else ()):
    # The running mean of complex input is complex (Flax's); every other statistic is real.
    checked[k] = _feature_array(
      fn, f"stats['{k}']", stats[k], feature_shape, complex_ok=k == "mean"
    )
  if "count" in stats:
    count = array_like(fn, "stats['count']", stats["count"])
    if count.shape != () or not jnp.issubdtype(count.dtype, jnp.integer):
      fail(
        fn,
        f"`stats['count']` must be an integer scalar, got {count.dtype}{list(count.shape)}.",
        TypeError,
      )
    checked["count"] = count
  elif need_count:
    fail(
      fn,
      "`momentum=None` (the cumulative average) and `zero_debias` need the number of"
      f" updates so far in `stats['count']`, got stats with keys {sorted(stats)}."
      " Hint: `bnjax.init(num_features, track_count=True)`.",
    )
  return cast(_types.Stats, checked)


def momentum(fn: str, momentum: Any, *, name: str = "momentum") -> float | None:
  if momentum is None and name == "momentum":
    return None
  if isinstance(momentum, jax_core.Tracer):
    fail(
      fn,
      f"`{name}` must be a Python float, got a traced value ({momentum!r}). It is a"
      " static option, fixed when the function is traced. Hint: close over it, or mark it"
      " static: `jax.jit(step, static_argnames='momentum')`.",
      TypeError,
    )
  if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
    allowed = " or None" if name == "momentum" else ""
    fail(fn, f"`{name}` must be a float in [0, 1){allowed}, got {momentum!r}.", TypeError)
  momentum = float(momentum)
  if not 0.0 <= momentum < 1.0:
    hint = (
      f" Hint: bnjax weighs the old value (Keras/Flax); PyTorch's momentum={momentum} is"
      f" momentum={1 - momentum:g} here."
      if 0.0 < momentum <= 1.0
      else ""
    )
    fail(fn, f"`{name}` must be in [0, 1), got {momentum}.{hint}")
  return momentum


def float_momentum(fn: str, value: Any, *, name: str) -> float:
  """Like ``momentum``, where None (the cumulative average) has no meaning."""
  checked = momentum(fn, value, name=name)
  if checked is None:
    fail(fn, f"`{name}` must be a float in [0, 1), got None.", TypeError)
  return checked


def epsilon(fn: str, epsilon: Any) -> float:
  if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
    fail(fn, f"`epsilon` must be a non-negative float, got {epsilon!r}.", TypeError)
  epsilon = float(epsilon)
  if not epsilon >= 0.0:
    fail(fn, f"`epsilon` must be >= 0, got {epsilon}.")
  if not np.isfinite(epsilon):
    fail(
      fn,
      f"`epsilon` must be finite, got {epsilon}: an infinite epsilon normalizes every"
      " output to `bias`. Hint: batch norm's epsilon is small, 1e-5 (Flax, PyTorch) or 1e-3"
      " (Keras).",
    )
  return epsilon


def choice(fn: str, name: str, value: Any, choices: tuple[_Choice, ...]) -> _Choice:
  """``value`` if it is one of ``choices`` (a ``Literal``'s arguments), or raises."""
  if value not in choices:
    fail(fn, f"`{name}` must be one of {choices}, got {value!r}.")
  return value


def flag(fn: str, name: str, value: Any) -> bool:
  """A Python bool (numpy bools accepted), nothing else."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  fail(fn, f"`{name}` must be a Python bool, got {value!r}.", TypeError)


def training(fn: str, training: Any) -> bool | jax.Array:
  """A Python bool, or a boolean scalar array (possibly traced)."""
  if isinstance(training, (bool, np.bool_)):
    return bool(training)
  if (
    hasattr(training, "dtype")
    and hasattr(training, "shape")
    and training.dtype == jnp.bool_
    and training.shape == ()
  ):
    # Only a traced flag needs lax.cond; a concrete one picks its branch now.
    return training if isinstance(training, jax_core.Tracer) else bool(training)
  got = f"{training.dtype}{list(training.shape)}" if hasattr(training, "dtype") else repr(training)
  fail(
    fn,
    f"`training` must be a Python bool or a boolean scalar array, got {got}."
    " Hint: True normalizes with batch statistics and updates the running ones; False"
    " uses the running statistics.",
    TypeError,
  )


def _broadcasts(shape: tuple[int, ...], to: tuple[int, ...]) -> bool:
  try:
    return jnp.broadcast_shapes(shape, to) == tuple(to)
  except ValueError:
    return False


def mask(fn: str, mask: Any, shape: tuple[int, ...]) -> jax.Array | None:
  """``mask`` broadcastable to ``shape``. A Keras-shaped mask, one axis short and aligned from
  the leading axis ((N, T) for x of shape (N, T, C)), gets its missing trailing axis where
  NumPy's trailing alignment would not broadcast; where both alignments would, it raises."""
  if mask is None:
    return None
  mask = array_like(fn, "mask", mask)
  if mask.dtype != jnp.bool_:
    fail(
      fn,
      f"`mask` must be boolean, got {mask.dtype}. Hint: `mask.astype(bool)` if 0/1 values were"
      " meant; weighted statistics are not supported.",
      TypeError,
    )
  shape = tuple(shape)
  trailing = _broadcasts(mask.shape, shape)
  leading = mask.ndim == len(shape) - 1 and _broadcasts((*mask.shape, 1), shape)
  if trailing and leading and mask.ndim > 0 and (*mask.shape, 1) != (1, *mask.shape):
    fail(
      fn,
      f"`mask` of shape {tuple(mask.shape)} is ambiguous for x of shape {shape}: it broadcasts"
      " aligned from the last axis (NumPy's rule) and, one axis short, from the first"
      " (Keras' rule), with different meanings. Hint: pass `mask[..., None]` for a mask per"
      " position of the leading axes (Keras), or `mask[None]` for one shared across the"
      " first axis.",
    )
  if leading and not trailing:
    return mask[..., None]
  if not trailing:
    fail(
      fn,
      f"`mask` of shape {tuple(mask.shape)} does not broadcast to x's shape {shape}."
      " Hint: keep size-1 axes where the mask is shared, e.g. (N, 1, 1, 1) per example.",
    )
  return mask


def axis_name(
  fn: str, axis_name: Any, axis_index_groups: Any, *, communicates: bool = True
) -> None:
  """``communicates=False`` (evaluation) skips the binding check: nothing crosses devices then,
  so a module built with an axis name also runs under plain ``jit``, as Flax's does."""
  if axis_name is None:
    if axis_index_groups is not None:
      fail(fn, "`axis_index_groups` needs `axis_name`, got axis_name=None.")
    return
  if not communicates:
    return
  try:
    jax.lax.axis_size(axis_name)
  except NameError:
    fail(
      fn,
      f"`axis_name`={axis_name!r} is not bound here. It names a mapped axis, so call bnjax"
      f" inside `jax.shard_map(..., mesh=...)` with a mesh axis {axis_name!r}, inside"
      f" `jax.pmap(..., axis_name={axis_name!r})` or `jax.vmap(..., axis_name={axis_name!r})`."
      " Under plain `jax.jit` over a sharded batch leave axis_name=None: XLA adds the"
      " cross-device reduction itself.",
      NameError,
    )


def num_features(fn: str, num_features: Any) -> tuple[int, ...]:
  shape = tuple(num_features) if isinstance(num_features, Sequence) else (num_features,)
  if not shape or not all(
    isinstance(n, numbers.Integral) and not isinstance(n, bool) and int(n) > 0 for n in shape
  ):
    fail(fn, f"`num_features` must be a positive int or a tuple of them, got {num_features!r}.")
  return tuple(int(n) for n in shape)


def floating_dtype(fn: str, name: str, dtype: Any) -> jnp.dtype:
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    fail(
      fn, f"`{name}` must be a floating dtype, got {dtype!r}. Hint: e.g. jnp.float32.", TypeError
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    fail(fn, f"`{name}` must be a floating dtype, got {dtype}. Hint: e.g. jnp.float32.", TypeError)
  return dtype


def output_dtype(fn: str, dtype: Any, x_dtype: Any) -> Any:
  if dtype is None:
    return x_dtype
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    fail(fn, f"`dtype` must be a floating or complex dtype, got {dtype!r}.", TypeError)
  if not jnp.issubdtype(dtype, jnp.inexact):
    fail(fn, f"`dtype` must be a floating or complex dtype, got {dtype}.", TypeError)
  if jnp.issubdtype(x_dtype, jnp.complexfloating) and not jnp.issubdtype(
    dtype, jnp.complexfloating
  ):
    fail(
      fn,
      f"`dtype`={dtype} is real but `x` is {x_dtype}: the imaginary part would be dropped."
      " Hint: pass a complex dtype (or None), or normalize `x.real` instead.",
      TypeError,
    )
  return dtype


def raise_if_nonfinite(finite_channels) -> None:
  """Run time (a ``jax.debug.callback``): raises where a channel's batch statistics are not
  finite, for ``on_nonfinite='raise'``."""
  bad = [int(i) for i in np.flatnonzero(~np.asarray(finite_channels))]
  if bad:
    raise FloatingPointError(
      f"bnjax.batch_norm: the training batch has a NaN or inf mean or variance in channels"
      f" {bad[:10]}{' ...' if len(bad) > 10 else ''} (on_nonfinite='raise'); the running"
      " statistics were kept. Hint: find the non-finite input (jax.debug_nans), or pass"
      " on_nonfinite='keep' to skip such batches silently."
    )


def complex_options(fn: str, *, renorm: Any, virtual_batch_size: Any, adjustment: Any) -> None:
  """TensorFlow's training-only features are defined for real input only."""
  given = [
    name
    for name, value in (
      ("renorm", renorm),
      ("virtual_batch_size", virtual_batch_size),
      ("adjustment", adjustment),
    )
    if value not in (None, False)
  ]
  if given:
    fail(
      fn,
      f"complex `x` does not combine with {given}: TensorFlow defines them for real input"
      " only. Hint: normalize complex input without them (Flax's complex batch norm), or"
      " normalize `x.real` and `x.imag` as separate real channels.",
    )


def adjustment_values(fn: str, values: Any, shape: tuple[int, ...]) -> tuple[Any, Any]:
  """What ``adjustment(shape)`` returned: a pair broadcastable to ``shape``."""
  if not (isinstance(values, (tuple, list)) and len(values) == 2):
    fail(
      fn, f"`adjustment` must return a pair (scale, bias), got {type(values).__name__}.", TypeError
    )
  for name, value in zip(("scale", "bias"), values):
    value_shape = tuple(jnp.shape(value))
    if not _broadcasts(value_shape, tuple(shape)):
      fail(
        fn,
        f"`adjustment` returned a {name} of shape {value_shape}, which does not"
        f" broadcast to x's shape {tuple(shape)}. Hint: return per-channel values shaped"
        " to broadcast, e.g. (1, 1, 1, C) for NHWC.",
      )
  return tuple(values)


def stats_precision(fn: str, stats: Mapping[str, Any]) -> None:
  """Running statistics updated in float16 or bfloat16 drift: each update rounds to 8 or 11
  bits, so an average over ~1000 steps is off by percents."""
  low = sorted(
    k
    for k, v in stats.items()
    if hasattr(v, "dtype")
    and jnp.issubdtype(v.dtype, jnp.floating)
    and jnp.dtype(v.dtype).itemsize < 4
  )
  if low:
    fail(
      fn,
      f"`stats` {low} are {stats[low[0]].dtype}; running statistics updated in half"
      " precision drift (every update rounds to a few bits). Hint: keep them in float32,"
      " as `bnjax.init` makes them: `jax.tree.map(lambda v: v.astype(jnp.float32), stats)`"
      " (evaluation alone may use half-precision statistics).",
      TypeError,
    )


def renorm_clipping(fn: str, clipping: Any, renorm: bool) -> dict[str, float]:
  if clipping is None:
    return {}
  if not renorm:
    fail(fn, "`renorm_clipping` needs `renorm=True`, got renorm=False.")
  if not isinstance(clipping, Mapping):
    fail(fn, f"`renorm_clipping` must be a dict, got {type(clipping).__name__}.", TypeError)
  unknown = sorted(set(clipping) - set(CLIPPING_KEYS))
  if unknown:
    fail(fn, f"`renorm_clipping` has unknown keys {unknown}; expected some of {CLIPPING_KEYS}.")
  bounds = {}
  for key, value in clipping.items():
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      fail(fn, f"`renorm_clipping['{key}']` must be a number, got {value!r}.", TypeError)
    value = float(value)
    if np.isnan(value):
      fail(
        fn,
        f"`renorm_clipping['{key}']` must be a number, got nan. Hint: leave the key out"
        " (or pass inf) for no bound.",
      )
    bounds[key] = value
  rmin, rmax, dmax = (bounds.get(k) for k in CLIPPING_KEYS)
  if (rmin is not None and rmin <= 0) or (rmax is not None and rmax <= 0):
    fail(fn, f"`renorm_clipping` needs rmin, rmax > 0, got {clipping}.")
  if rmin is not None and rmax is not None and rmin > rmax:
    fail(fn, f"`renorm_clipping` needs rmin <= rmax, got {clipping}.")
  if dmax is not None and dmax < 0:
    fail(fn, f"`renorm_clipping` needs dmax >= 0, got {clipping}.")
  return bounds


def zero_debias(
  fn: str, value: Any, *, momentum: float | None, renorm: bool
) -> _types.ZeroDebias | None:
  if value is None:
    return None
  value = choice(fn, "zero_debias", value, ZERO_DEBIAS)
  if momentum is None:
    fail(
      fn,
      "`zero_debias` needs a float `momentum`: the cumulative average (momentum=None)"
      " has no bias to remove.",
    )
  if renorm:
    fail(
      fn,
      "`zero_debias` and `renorm=True` cannot be combined: tf_keras's renorm tracks a"
      " standard deviation that this debiasing does not cover.",
    )
  if momentum == 0.0:
    fail(
      fn,
      f"`zero_debias={value!r}` needs `momentum` > 0, got momentum=0: the running value"
      " is then the last batch's, with no start to remove. Hint: leave zero_debias out.",
    )
  return value


def virtual_batch_size(
  fn: str, size: Any, shape: tuple[int, ...], reduced_axes: tuple[int, ...], axis_name: Any
) -> int | None:
  if size is None:
    return None
  if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
    fail(fn, f"`virtual_batch_size` must be a positive int or None, got {size!r}.", TypeError)
  if 0 not in reduced_axes:
    fail(fn, "`virtual_batch_size` splits axis 0, the batch, but `axis` makes it a feature axis.")
  if shape[0] % size:
    fail(
      fn,
      f"`virtual_batch_size`={size} must divide the batch size, got x.shape[0]={shape[0]}."
      " Hint: tf_keras raises the same way; pad or drop the last partial batch.",
    )
  if axis_name is not None:
    fail(
      fn,
      "`virtual_batch_size` with `axis_name` is not supported: ghost batches are"
      " per-device by design. Hint: drop axis_name to normalize each device's groups.",
    )
  return int(size)


Adjustment = Callable[[tuple[int, ...]], tuple[Any, Any]]


def adjustment(fn: str, adjustment: Any, *, virtual_batch_size: int | None) -> Adjustment | None:
  if adjustment is not None and virtual_batch_size is not None:
    fail(fn, "`adjustment` with `virtual_batch_size` is not supported (tf_keras rejects it too).")
  if adjustment is not None and not callable(adjustment):
    fail(
      fn,
      f"`adjustment` must be a callable shape -> (scale, bias), got {type(adjustment).__name__}.",
      TypeError,
    )
  return cast("Adjustment | None", adjustment)
