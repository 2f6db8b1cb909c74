"""Framework conventions as named presets for ``bnjax.batch_norm``, and momentum converters.

A ``Convention`` is an immutable set of keyword options. Passed to ``bnjax.batch_norm`` it
reproduces one framework's batch norm::

    import bnjax
    from bnjax import conventions

    params, stats = conventions.PYTORCH.init(16)     # stats carry 'count' (num_batches_tracked)
    y, stats = bnjax.batch_norm(x, params, stats, training=True, **conventions.PYTORCH.options())

    bn = conventions.pytorch(momentum=0.01, eps=1e-3)   # a configured layer, in torch's spelling
    y, stats = bnjax.batch_norm(x, params, stats, training=True, **bn.options())

Every framework computes, per channel, with ``B`` the batch statistics over ``n`` elements::

    y     = (x - mean_B) / sqrt(var_B + eps) * scale + bias          (training)
    y     = (x - mean_R) / sqrt(var_R + eps) * scale + bias          (inference)
    mean_R <- w * mean_R + (1 - w) * mean_B
    var_R  <- w * var_R  + (1 - w) * var_B * (n / (n - 1) if the running variance is unbiased)

and they differ in the five places a ``Convention`` pins down (below), plus the order of the
final multiply-add, which bnjax does not copy (last bullet):

==================  =========  =======  ========  ===========  =================================
preset              axis       w        eps       running var  batch variance
==================  =========  =======  ========  ===========  =================================
TF_NN               -1         decay    yours     biased       two-pass (``tf.nn.moments``)
TF_FUSED_NHWC/NCHW  -1 / 1     1 - f    1e-3      unbiased     fused kernel, two-pass
KERAS               -1         0.99     1e-3      biased       two-pass; ``synchronized``: fast
TF_KERAS_FUSED      -1         0.99     1e-3      UNBIASED     fused kernel
TF_KERAS_UNFUSED    -1         0.99     1e-3      biased       two-pass; ``synchronized``: fast
TF_V1_LAYERS_*      as tf_keras (same code, TF1 graph mode)
PYTORCH             1          0.9      1e-5      unbiased     two-pass; ``momentum=None``: 1-1/t
FLAX_LINEN/NNX      -1         0.99     1e-5      biased       fast (``use_fast_variance=True``)
MXNET_GLUON         1          0.9      1e-5      biased       two-pass (CPU kernel)
==================  =========  =======  ========  ===========  =================================

- **Momentum.** bnjax's ``momentum`` is ``w``, the weight on the OLD value, as in Keras, Flax,
  MXNet and ``tf.train.ExponentialMovingAverage`` (``decay``). PyTorch's ``momentum`` and TF's
  fused ``exponential_avg_factor`` are the weight on the NEW value, ``1 - w``: use
  ``from_torch_momentum`` / ``to_torch_momentum`` and ``from_exponential_avg_factor`` /
  ``to_exponential_avg_factor``. PyTorch's ``momentum=None`` is the cumulative average
  ``w = 1 - 1/t`` over ``t = num_batches_tracked`` batches: ``momentum=None`` here, with
  ``stats['count']``.
- **Bessel's correction.** Normalization always uses the biased batch variance. What is STORED
  differs: PyTorch, TF's fused kernel and, through it, tf_keras with ``fused=True`` (the
  default for 4-D and 5-D inputs with channels first or last) store ``var_B * n / (n - 1)``;
  tf_keras with ``fused=False`` (2-D and 3-D inputs), Keras 3, Flax, MXNet and ``tf.nn.moments``
  store ``var_B``. So the same tf_keras model accumulates a different moving variance depending
  on the rank of the input. With one element per channel the fused kernel uses
  ``n / max(n - 1, 1)``, as bnjax does; PyTorch raises instead.
- **Epsilon.** Defaults differ by two orders of magnitude: 1e-3 for TensorFlow and Keras,
  1e-5 for PyTorch, Flax and MXNet. TensorFlow's Python wrapper of the fused kernel used to
  raise epsilon to at least 1.001e-5 (a cuDNN < 7.5 limit; tensorflow/tensorflow#37768); TF
  2.21 passes it through unchanged (measured: epsilon 0 stays 0 on CPU). ``min_epsilon``
  reproduces the old clamp: ``tf_fused(..., min_epsilon=LEGACY_FUSED_MIN_EPSILON)``.
- **Batch variance algorithm.** Flax's default and every *synchronized* TensorFlow batch norm
  (Keras 3 and tf_keras under a ``tf.distribute`` strategy) compute ``E[x^2] - E[x]^2`` clamped
  at 0 (``variance='fast'``); the others subtract the mean first (``'two_pass'``).
- **Order of the final multiply-add.** bnjax, TF's fused kernel, Flax and MXNet compute
  ``(x - mean) * (scale * rsqrt(var + eps)) + bias`` (MXNet: ``((x - mean) * rsqrt) * scale +
  bias``). ``tf.nn.batch_normalization`` (used by Keras 3, tf_keras unfused and the TF_NN
  recipe) and PyTorch's CPU kernel compute ``x * a + (bias - mean * a)`` with
  ``a = scale * rsqrt(var + eps)``, which cancels when ``|mean| >> std``: their float32 error
  grows like ``eps * |mean| / std``. bnjax keeps its own, more accurate order, so against
  these references outputs agree to that rounding, not bit for bit (``cross_framework`` in
  tests/tolerances.py; measured errors in docs/EQUIVALENCE.md).

Also different: ``trainable=False``. Keras 3 and tf_keras then run in inference mode (call
with ``training=False``); TF1 ``tf.compat.v1.layers`` stays in training mode but freezes the
moving statistics (``tf_v1_layers(trainable=False)`` sets ``update_stats=False``). PyTorch's
``track_running_stats=False`` always normalizes with batch statistics (``training=True,
update_stats=False``). MXNet's CPU kernel (1.x) updates the moving statistics in the backward
pass, so a training forward without backward leaves them unchanged.
"""

from __future__ import annotations

import dataclasses
import decimal
import inspect
import numbers
import types
from collections.abc import Mapping
from typing import Any

from bnjax import _checks
from bnjax._core import batch_norm, init
from bnjax._types import RunningVariance, Variance

__all__ = [
  "FLAX_LINEN",
  "FLAX_NNX",
  "KERAS",
  "KERAS_SYNCHRONIZED",
  "LEGACY_FUSED_MIN_EPSILON",
  "MXNET_GLUON",
  "PRESETS",
  "PYTORCH",
  "PYTORCH_CUMULATIVE",
  "TF_FUSED_NCHW",
  "TF_FUSED_NHWC",
  "TF_KERAS_FUSED",
  "TF_KERAS_UNFUSED",
  "TF_NN",
  "TF_V1_LAYERS_FUSED",
  "TF_V1_LAYERS_UNFUSED",
  "Convention",
  "flax_linen",
  "flax_nnx",
  "from_exponential_avg_factor",
  "from_torch_momentum",
  "keras",
  "mxnet_gluon",
  "pytorch",
  "tf_fused",
  "tf_keras",
  "tf_nn",
  "tf_v1_layers",
  "to_exponential_avg_factor",
  "to_torch_momentum",
]

# The floor TensorFlow's `fused_batch_norm` wrapper put on epsilon before TF dropped it
# (tensorflow/tensorflow#37768): cuDNN < 7.5 rejected epsilon below 1e-5.
LEGACY_FUSED_MIN_EPSILON = 1.001e-5

# Keyword options of bnjax.batch_norm a Convention may set. Read from the signature, so options
# added to batch_norm later (renorm, virtual_batch_size, ...) are accepted without a change here.
_BATCH_NORM_OPTIONS = frozenset(
  name
  for name, p in inspect.signature(batch_norm).parameters.items()
  if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "training"
)
_CORE_FIELDS = ("axis", "momentum", "epsilon", "running_variance", "variance")


def _fail(fn: str, message: str, error: type[Exception] = ValueError):
  _checks.fail(f"conventions.{fn}", message, error)


def _complement(fn: str, name: str, value: Any, *, low_open: bool) -> float:
  """``1 - value``, in decimal on ``value``'s shortest repr: 0.1 <-> 0.9 exactly as typed."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    _fail(fn, f"`{name}` must be a float, got {value!r}.", TypeError)
  value = float(value)
  ok = 0.0 < value <= 1.0 if low_open else 0.0 <= value < 1.0
  if not ok:
    interval = "(0, 1]" if low_open else "[0, 1)"
    _fail(fn, f"`{name}` must be in {interval}, got {value}.")
  return float(1 - decimal.Decimal(repr(value)))


def from_torch_momentum(momentum: float | None) -> float | None:
  """bnjax's ``momentum`` (weight on the old value) for PyTorch's (weight on the new value).

  ``w = 1 - m``: PyTorch's default 0.1 is 0.9 here. ``None`` (PyTorch's cumulative average) stays
  ``None``. PyTorch's ``momentum=0`` never updates and has no bnjax momentum; use
  ``update_stats=False``. Computed in decimal, so ``from_torch_momentum(0.1) == 0.9`` exactly
  and ``to_torch_momentum`` inverts it.

  Args:
    momentum: PyTorch's ``momentum``, in (0, 1], or None.

  Returns:
    ``1 - momentum``, or None.

  Example:
    >>> from bnjax import conventions
    >>> conventions.from_torch_momentum(0.1)
    0.9
  """
  if momentum is None:
    return None
  if not isinstance(momentum, bool) and isinstance(momentum, numbers.Real) and momentum == 0:
    _fail(
      "from_torch_momentum",
      "PyTorch's `momentum=0` never updates the running statistics, and has no bnjax"
      " momentum (the weight on the old value would be 1). Hint: pass update_stats=False to"
      " bnjax.batch_norm: training normalizes with batch statistics and keeps the running"
      " ones, as torch does with momentum=0.",
    )
  return _complement("from_torch_momentum", "momentum", momentum, low_open=True)


def to_torch_momentum(momentum: float | None) -> float | None:
  """PyTorch's ``momentum`` for bnjax's: ``1 - w``; ``None`` stays ``None``.

  Args:
    momentum: bnjax's ``momentum``, in [0, 1), or None.

  Returns:
    ``1 - momentum``, or None.

  Example:
    >>> from bnjax import conventions
    >>> conventions.to_torch_momentum(0.99)
    0.01
  """
  if momentum is None:
    return None
  return _complement("to_torch_momentum", "momentum", momentum, low_open=False)


def from_exponential_avg_factor(factor: float) -> float:
  """bnjax's ``momentum`` for TF's fused ``exponential_avg_factor`` f: ``w = 1 - f``.

  f = 1 (TF's default) makes the running statistics the batch's: ``momentum=0``.

  Args:
    factor: TF's ``exponential_avg_factor``, in (0, 1].

  Returns:
    ``1 - factor``.

  Example:
    >>> from bnjax import conventions
    >>> conventions.from_exponential_avg_factor(0.01)
    0.99
  """
  return _complement("from_exponential_avg_factor", "exponential_avg_factor", factor, low_open=True)


def to_exponential_avg_factor(momentum: float) -> float:
  """TF's fused ``exponential_avg_factor`` for bnjax's ``momentum``: ``f = 1 - w``.

  Args:
    momentum: bnjax's ``momentum``, in [0, 1).

  Returns:
    ``1 - momentum``.

  Example:
    >>> from bnjax import conventions
    >>> conventions.to_exponential_avg_factor(0.9)
    0.1
  """
  return _complement("to_exponential_avg_factor", "momentum", momentum, low_open=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Convention:
  """One framework's batch-norm convention, as keyword options of ``bnjax.batch_norm``.

  ``options()`` returns them as a dict; ``init()`` builds matching ``params, stats``. The
  fields are validated on construction; ``replace`` returns a modified copy. Immutable, and
  hashable (a static argument of ``jax.jit``) unless ``extra`` holds a dict such as
  ``renorm_clipping``.

  Attributes:
    name: what it reproduces, e.g. ``'torch.nn.BatchNorm2d'``.
    axis: the feature axis (or axes) of the framework's layout: -1 channels-last, 1
      channels-first.
    momentum: weight on the OLD running value, or None for the cumulative average.
    epsilon: added to the variance before the square root.
    running_variance: ``'biased'`` or ``'unbiased'`` (Bessel's n/(n-1), stored only).
    variance: the batch-variance algorithm, ``'two_pass'``, ``'shifted'`` or ``'fast'``.
    min_epsilon: ``options()`` passes ``max(epsilon, min_epsilon)`` (TF's old fused clamp).
    track_count: the framework counts batches (PyTorch's ``num_batches_tracked``); ``init``
      then adds ``stats['count']``. Required by ``momentum=None``.
    extra: further keyword options of ``bnjax.batch_norm``, as ``(name, value)`` pairs (a dict
      is accepted and stored sorted): the place for options batch_norm gains later.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> from bnjax import conventions
    >>> mine = conventions.Convention(name="mine", axis=-1, momentum=0.9, epsilon=1e-3)
    >>> params, stats = mine.init(2)
    >>> x = jnp.array([[0.0, 10.0], [2.0, 30.0]])
    >>> y, stats = bnjax.batch_norm(x, params, stats, training=True, **mine.options())
    >>> stats["mean"]
    Array([0.1, 2. ], dtype=float32)
  """

  name: str
  axis: int | tuple[int, ...]
  momentum: float | None
  epsilon: float
  running_variance: RunningVariance = "biased"
  variance: Variance = "two_pass"
  min_epsilon: float = 0.0
  track_count: bool = False
  extra: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    fn = "Convention"
    if not isinstance(self.name, str):
      _fail(fn, f"`name` must be a str, got {self.name!r}.", TypeError)
    axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
    if not axes or any(isinstance(a, bool) or not isinstance(a, numbers.Integral) for a in axes):
      _fail(fn, f"`axis` must be an int or a tuple of ints, got {self.axis!r}.", TypeError)
    _checks.momentum(f"conventions.{fn}", self.momentum)
    _checks.epsilon(f"conventions.{fn}", self.epsilon)
    _checks.epsilon(f"conventions.{fn}", self.min_epsilon)
    _checks.choice(
      f"conventions.{fn}", "running_variance", self.running_variance, _checks.RUNNING_VARIANCES
    )
    _checks.choice(f"conventions.{fn}", "variance", self.variance, _checks.VARIANCE_ALGORITHMS)
    _checks.flag(f"conventions.{fn}", "track_count", self.track_count)
    extra = dict(self.extra) if isinstance(self.extra, Mapping) else dict(tuple(self.extra))
    _known_options(fn, "extra", extra)
    clash = sorted(set(extra) & set(_CORE_FIELDS))
    if clash:
      _fail(fn, f"`extra` repeats the fields {clash}; set them as fields instead.")
    if self.momentum is None and not self.track_count:
      _fail(fn, "`momentum=None` (cumulative average) needs `track_count=True`.")
    if extra.get("zero_debias") is not None and not self.track_count:
      _fail(
        fn,
        f"`zero_debias={extra['zero_debias']!r}` counts the batches seen: it needs"
        " `track_count=True`.",
      )
    object.__setattr__(self, "extra", tuple(sorted(extra.items())))

  def options(self, **overrides: Any) -> dict[str, Any]:
    """Keyword options for ``bnjax.batch_norm``: this convention, then ``overrides``.

    ``epsilon`` (overridden or not) is raised to ``min_epsilon``. Override names must be
    keyword options of ``bnjax.batch_norm`` (``training`` excluded: it is per call).

    Args:
      **overrides: keyword options of ``bnjax.batch_norm`` that replace this convention's.

    Returns:
      A dict of keyword options for ``bnjax.batch_norm``.

    Example:
      >>> from bnjax import conventions
      >>> opts = conventions.PYTORCH.options(momentum=0.5)
      >>> opts["axis"], opts["momentum"], opts["running_variance"]
      (1, 0.5, 'unbiased')
    """
    _known_options("Convention.options", "overrides", overrides)
    options = {k: getattr(self, k) for k in _CORE_FIELDS}
    options.update(self.extra)
    options.update(overrides)
    options["epsilon"] = max(options["epsilon"], self.min_epsilon)
    return options

  def init(self, num_features: int | tuple[int, ...], **kwargs: Any):
    """``bnjax.init`` with this convention's counter (``track_count``) and, when ``extra``
    asks for ``renorm``, the renorm statistics; ``kwargs`` go to ``bnjax.init`` too.

    Args:
      num_features: the size of the feature axis, or a tuple of sizes.
      **kwargs: further keyword arguments of ``bnjax.init`` (``use_scale``, ``dtype``, ...).

    Returns:
      ``(params, stats)`` as ``bnjax.init`` returns them.

    Example:
      >>> from bnjax import conventions
      >>> params, stats = conventions.PYTORCH.init(4)
      >>> sorted(stats)
      ['count', 'mean', 'var']
    """
    if dict(self.extra).get("renorm"):
      kwargs.setdefault("renorm", True)
    return init(num_features, track_count=self.track_count, **kwargs)

  def replace(self, **changes: Any) -> Convention:
    """A copy with ``changes`` applied (and validated), e.g. ``KERAS.replace(axis=1)``.

    Args:
      **changes: fields and their new values.

    Returns:
      A new ``Convention``.

    Example:
      >>> from bnjax import conventions
      >>> conventions.KERAS.replace(axis=1).axis
      1
    """
    return dataclasses.replace(self, **changes)


def _known_options(fn: str, what: str, options: Mapping[str, Any]) -> None:
  unknown = sorted(set(options) - _BATCH_NORM_OPTIONS)
  if unknown:
    _fail(
      fn,
      f"`{what}` has {unknown}, which are not keyword options of bnjax.batch_norm; expected"
      f" some of {sorted(_BATCH_NORM_OPTIONS)}.",
      TypeError,
    )


def _axis_for_data_format(fn: str, data_format: str) -> int:
  formats = {"NHWC": -1, "NDHWC": -1, "NCHW": 1, "NCDHW": 1}
  if data_format not in formats:
    _fail(fn, f"`data_format` must be one of {tuple(formats)}, got {data_format!r}.")
  return formats[data_format]


def tf_nn(*, decay: float, variance_epsilon: float, axis: int | tuple[int, ...] = -1) -> Convention:
  """``tf.nn.moments`` + ``tf.nn.batch_normalization`` with a moving average you own.

  The recipe::

      mean_B, var_B = tf.nn.moments(x, axes)                 # biased, two-pass
      y = tf.nn.batch_normalization(x, mean_B, var_B, bias, scale, variance_epsilon)
      moving.assign_sub((moving - value) * (1 - decay))       # for mean and var

  (``tf.compat.v1.train.assign_moving_average(..., zero_debias=False)`` is that last line.)
  ``decay`` is bnjax's ``momentum``. ``tf.nn.batch_normalization`` computes ``x * a + (bias -
  mean * a)``; for float16 input it does so in float16, where bnjax computes in float32.

  Args:
    decay: the moving average's decay (bnjax's ``momentum``).
    variance_epsilon: ``tf.nn.batch_normalization``'s epsilon.
    axis: the feature axis or axes (those ``tf.nn.moments`` does not reduce).

  Returns:
    The ``Convention``.

  Example:
    >>> from bnjax import conventions
    >>> conventions.tf_nn(decay=0.9, variance_epsilon=1e-3).options()["momentum"]
    0.9
  """
  return Convention(
    name="tf.nn.moments+tf.nn.batch_normalization",
    axis=axis,
    momentum=decay,
    epsilon=variance_epsilon,
    running_variance="biased",
  )


def tf_fused(
  *,
  epsilon: float = 1e-3,
  exponential_avg_factor: float = 1.0,
  data_format: str = "NHWC",
  min_epsilon: float = 0.0,
) -> Convention:
  """``tf.compat.v1.nn.fused_batch_norm`` (the ``FusedBatchNormV3`` kernel), TF's defaults.

  Running statistics: ``(1 - f) * old + f * batch`` with ``f = exponential_avg_factor``, i.e.
  ``momentum = 1 - f``; the default f = 1 replaces them by the batch's. The stored variance is
  unbiased, ``var_B * n / max(n - 1, 1)``. ``data_format`` NHWC/NDHWC is ``axis=-1``,
  NCHW/NCDHW ``axis=1``. float16/bfloat16 inputs get float32 statistics, as here. TF 2.21
  does not clamp epsilon; ``min_epsilon=LEGACY_FUSED_MIN_EPSILON`` reproduces older TF.

  Args:
    epsilon: the kernel's epsilon.
    exponential_avg_factor: the kernel's ``f``, the weight on the new batch statistics.
    data_format: ``'NHWC'``, ``'NDHWC'``, ``'NCHW'`` or ``'NCDHW'``.
    min_epsilon: a floor on epsilon (older TF's clamp), 0 for none.

  Returns:
    The ``Convention``.

  Example:
    >>> from bnjax import conventions
    >>> bn = conventions.tf_fused(exponential_avg_factor=0.1, data_format="NCHW")
    >>> bn.axis, bn.momentum, bn.running_variance
    (1, 0.9, 'unbiased')
  """
  return Convention(
    name=f"tf.compat.v1.nn.fused_batch_norm[{data_format}]",
    axis=_axis_for_data_format("tf_fused", data_format),
    momentum=from_exponential_avg_factor(exponential_avg_factor),
    epsilon=epsilon,
    running_variance="unbiased",
    min_epsilon=min_epsilon,
  )


def _tf_features(**options: Any) -> tuple[tuple[str, Any], ...]:
  """Keras's TF-only options that differ from their defaults, for ``Convention.extra``."""
  defaults = {
    "renorm": False,
    "renorm_clipping": None,
    "renorm_momentum": 0.99,
    "virtual_batch_size": None,
    "adjustment": None,
  }
  return tuple((k, v) for k, v in options.items() if v != defaults[k])


def keras(
  *,
  axis: int = -1,
  momentum: float = 0.99,
  epsilon: float = 1e-3,
  synchronized: bool = False,
  renorm: bool = False,
  renorm_clipping: dict[str, float] | None = None,
  renorm_momentum: float = 0.99,
) -> Convention:
  """Keras 3 ``keras.layers.BatchNormalization`` (``tf.keras`` in TF 2.21), its defaults.

  ``moving = moving * momentum + batch * (1 - momentum)``, biased variance, statistics in
  float32 for 16-bit inputs (``mixed_float16``/``mixed_bfloat16`` policies), normalization by
  ``tf.nn.batch_normalization`` on the TensorFlow backend. ``synchronized=True`` under a
  ``tf.distribute`` strategy computes ``E[x^2] - E[x]^2`` over all replicas: ``variance='fast'``
  with ``axis_name``. ``layer.trainable = False`` means inference: call with ``training=False``.
  ``renorm``, ``renorm_clipping`` and ``renorm_momentum`` go to ``extra`` under the same names
  (``bnjax.batch_norm``'s batch renormalization), when not at their defaults.

  Args:
    axis: the layer's ``axis``.
    momentum: the layer's ``momentum`` (the weight on the old value, as bnjax's).
    epsilon: the layer's ``epsilon``.
    synchronized: the layer's ``synchronized`` (statistics over all replicas).
    renorm: the layer's ``renorm`` (tf_keras and Keras 3 on TensorFlow).
    renorm_clipping: the layer's ``renorm_clipping``.
    renorm_momentum: the layer's ``renorm_momentum``.

  Returns:
    The ``Convention``.

  Example:
    >>> from bnjax import conventions
    >>> conventions.keras(synchronized=True).variance
    'fast'
  """
  _checks.flag("conventions.keras", "synchronized", synchronized)
  return Convention(
    name="keras.layers.BatchNormalization" + ("[synchronized]" * synchronized),
    axis=axis,
    momentum=momentum,
    epsilon=epsilon,
    running_variance="biased",
    variance="fast" if synchronized else "two_pass",
    extra=_tf_features(
      renorm=renorm, renorm_clipping=renorm_clipping, renorm_momentum=renorm_momentum
    ),
  )


def tf_keras(
  *,
  fused: bool,
  axis: int = -1,
  momentum: float = 0.99,
  epsilon: float = 1e-3,
  synchronized: bool = False,
  renorm: bool = False,
  renorm_clipping: dict[str, float] | None = None,
  renorm_momentum: float = 0.99,
  virtual_batch_size: int | None = None,
  adjustment: Any = None,
) -> Convention:
  """tf_keras (Keras 2) ``BatchNormalization``; ``fused`` as the layer resolved it.

  tf_keras resolves ``fused=None`` to True for 4-D and 5-D inputs with channels first or last
  (read ``layer.fused`` after the first call). Fused, it calls ``fused_batch_norm`` with
  ``exponential_avg_factor = 1 - momentum`` and stores the kernel's UNBIASED variance (its
  Bessel-removal code is switched off by ``_bessels_correction_test_only = True``). Unfused,
  it uses ``tf.nn.moments`` (``tf.nn.weighted_moments`` with a mask), stores the biased
  variance, and updates in decay form ``moving -= (moving - batch) * (1 - momentum)``.
  ``synchronized=True`` (unfused only) is ``variance='fast'`` with ``axis_name``.
  ``trainable=False`` means inference, as in Keras 3. ``renorm*``, ``virtual_batch_size`` and
  ``adjustment`` go to ``extra`` under the same names, when not at their defaults; tf_keras
  never fuses with them.

  Args:
    fused: whether the layer runs fused (``layer.fused`` after its first call).
    axis: the layer's ``axis``.
    momentum: the layer's ``momentum``.
    epsilon: the layer's ``epsilon``.
    synchronized: the layer's ``synchronized`` (unfused only).
    renorm: the layer's ``renorm``.
    renorm_clipping: the layer's ``renorm_clipping``.
    renorm_momentum: the layer's ``renorm_momentum``.
    virtual_batch_size: the layer's ``virtual_batch_size`` (ghost batches).
    adjustment: the layer's ``adjustment`` callable.

  Returns:
    The ``Convention``.

  Example:
    >>> from bnjax import conventions
    >>> conventions.tf_keras(fused=True).running_variance
    'unbiased'
    >>> conventions.tf_keras(fused=False).running_variance
    'biased'
  """
  fn = "tf_keras"
  _checks.flag(f"conventions.{fn}", "fused", fused)
  _checks.flag(f"conventions.{fn}", "synchronized", synchronized)
  if fused and synchronized:
    _fail(fn, "`fused=True` and `synchronized=True` exclude each other (tf_keras raises too).")
  features = _tf_features(
    renorm=renorm,
    renorm_clipping=renorm_clipping,
    renorm_momentum=renorm_momentum,
    virtual_batch_size=virtual_batch_size,
    adjustment=adjustment,
  )
  if fused and features:
    _fail(fn, f"`fused=True` excludes {sorted(dict(features))}: tf_keras only fuses without them.")
  return Convention(
    name="tf_keras.layers.BatchNormalization" + ("[fused]" if fused else "[unfused]"),
    axis=axis,
    momentum=momentum,
    epsilon=epsilon,
    running_variance="unbiased" if fused else "biased",
    variance="fast" if synchronized else "two_pass",
    extra=features,
  )


def tf_v1_layers(
  *,
  fused: bool,
  axis: int = -1,
  momentum: float = 0.99,
  epsilon: float = 1e-3,
  trainable: bool = True,
) -> Convention:
  """TF1 ``tf.compat.v1.layers.batch_normalization`` (needs ``TF_USE_LEGACY_KERAS=1``).

  The same tf_keras code in graph mode, with the same ``fused`` resolution and so the same
  unbiased (fused) / biased (unfused) stored variance; the moving averages are updated by the
  ops in ``tf.GraphKeys.UPDATE_OPS``, which the caller must run. Unlike Keras,
  ``trainable=False`` does not switch to inference: ``training=True`` still normalizes with
  batch statistics but leaves the moving ones alone (measured), which is
  ``update_stats=False`` here.

  Args:
    fused: whether the layer runs fused, as for ``tf_keras``.
    axis: the layer's ``axis``.
    momentum: the layer's ``momentum``.
    epsilon: the layer's ``epsilon``.
    trainable: the layer's ``trainable``; False freezes the moving statistics.

  Returns:
    The ``Convention``.

  Example:
    >>> from bnjax import conventions
    >>> conventions.tf_v1_layers(fused=False, trainable=False).options()["update_stats"]
    False
  """
  _checks.flag("conventions.tf_v1_layers", "trainable", trainable)
  base = tf_keras(fused=fused, axis=axis, momentum=momentum, epsilon=epsilon)
  return base.replace(
    name="tf.compat.v1.layers.batch_normalization"
    + ("[fused]" if fused else "[unfused]")
    + ("" if trainable else "[trainable=False]"),
    extra={} if trainable else {"update_stats": False},
  )


def pytorch(*, momentum: float | None = 0.1, eps: float = 1e-5) -> Convention:
  """PyTorch ``torch.nn.BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``), in torch's spelling.

  Channels on axis 1 for every rank (``channels_last`` memory format keeps the logical NCHW
  shape). ``momentum`` is torch's (weight on the new value): 0.1 is bnjax's 0.9; ``None`` is
  the cumulative average over ``num_batches_tracked`` (``stats['count']``, counted always).
  Stores the unbiased variance. Training with one element per channel raises in PyTorch.

  Args:
    momentum: torch's ``momentum`` (the weight on the new value), or None.
    eps: torch's ``eps``.

  Returns:
    The ``Convention``.

  Example:
    >>> from bnjax import conventions
    >>> bn = conventions.pytorch(momentum=0.01)
    >>> bn.axis, bn.momentum, bn.track_count
    (1, 0.99, True)
  """
  return Convention(
    name="torch.nn.BatchNorm",
    axis=1,
    momentum=from_torch_momentum(momentum),
    epsilon=eps,
    running_variance="unbiased",
    track_count=True,
  )


def flax_linen(
  *,
  axis: int | tuple[int, ...] = -1,
  momentum: float = 0.99,
  epsilon: float = 1e-5,
  use_fast_variance: bool = True,
) -> Convention:
  """``flax.linen.BatchNorm`` defaults: biased, and ``use_fast_variance=True`` (E[x^2]-E[x]^2).

  The fast variance loses float32 precision when ``|mean| / std`` is large (all of it near
  3e3); ``use_fast_variance=False`` is bnjax's two-pass default.

  Args:
    axis: the module's ``axis``.
    momentum: the module's ``momentum``.
    epsilon: the module's ``epsilon``.
    use_fast_variance: the module's ``use_fast_variance``.

  Returns:
    The ``Convention``.

  Example:
    >>> from bnjax import conventions
    >>> conventions.flax_linen(use_fast_variance=False).variance
    'two_pass'
  """
  _checks.flag("conventions.flax_linen", "use_fast_variance", use_fast_variance)
  return Convention(
    name="flax.linen.BatchNorm",
    axis=axis,
    momentum=momentum,
    epsilon=epsilon,
    variance="fast" if use_fast_variance else "two_pass",
  )


def flax_nnx(
  *,
  axis: int | tuple[int, ...] = -1,
  momentum: float = 0.99,
  epsilon: float = 1e-5,
  use_fast_variance: bool = True,
) -> Convention:
  """``flax.nnx.BatchNorm`` defaults: the same arithmetic as ``flax.linen.BatchNorm``.

  Args:
    axis: the module's ``axis``.
    momentum: the module's ``momentum``.
    epsilon: the module's ``epsilon``.
    use_fast_variance: the module's ``use_fast_variance``.

  Returns:
    The ``Convention``.

  Example:
    >>> from bnjax import conventions
    >>> conventions.flax_nnx().name
    'flax.nnx.BatchNorm'
  """
  return flax_linen(
    axis=axis, momentum=momentum, epsilon=epsilon, use_fast_variance=use_fast_variance
  ).replace(name="flax.nnx.BatchNorm")


def mxnet_gluon(*, axis: int = 1, momentum: float = 0.9, epsilon: float = 1e-5) -> Convention:
  """MXNet Gluon ``mxnet.gluon.nn.BatchNorm`` defaults, from MXNet's CPU kernel.

  Source: ``python/mxnet/gluon/nn/basic_layers.py`` (``axis=1, momentum=0.9, epsilon=1e-5``,
  ``fix_gamma = not scale``) and ``src/operator/nn/batch_norm.cc``: two-pass batch moments, the
  biased variance stored as ``moving * momentum + var * (1 - momentum)``, output
  ``((x - mean) * rsqrt(var + eps)) * gamma + beta``. ``momentum`` means what it means here.
  Not tested live (MXNet is retired and not installable here); GPU (cuDNN) kernels may differ.

  Args:
    axis: the layer's ``axis``.
    momentum: the layer's ``momentum`` (the weight on the old value, as bnjax's).
    epsilon: the layer's ``epsilon``.

  Returns:
    The ``Convention``.

  Example:
    >>> from bnjax import conventions
    >>> conventions.mxnet_gluon().options()["momentum"]
    0.9
  """
  return Convention(
    name="mxnet.gluon.nn.BatchNorm",
    axis=axis,
    momentum=momentum,
    epsilon=epsilon,
    running_variance="biased",
  )


TF_NN = tf_nn(decay=0.99, variance_epsilon=1e-3)  # tf.nn has no defaults: Keras's values
TF_FUSED_NHWC = tf_fused(data_format="NHWC")
TF_FUSED_NCHW = tf_fused(data_format="NCHW")
KERAS = keras()
KERAS_SYNCHRONIZED = keras(synchronized=True)
TF_KERAS_FUSED = tf_keras(fused=True)
TF_KERAS_UNFUSED = tf_keras(fused=False)
TF_V1_LAYERS_FUSED = tf_v1_layers(fused=True)
TF_V1_LAYERS_UNFUSED = tf_v1_layers(fused=False)
PYTORCH = pytorch()
PYTORCH_CUMULATIVE = pytorch(momentum=None)
FLAX_LINEN = flax_linen()
FLAX_NNX = flax_nnx()
MXNET_GLUON = mxnet_gluon()


class _Presets(Mapping):
  """The presets by name, read-only; an unknown name's KeyError lists the known ones."""

  def __init__(self, presets: Mapping[str, Convention]):
    self._presets = types.MappingProxyType(dict(presets))

  def __getitem__(self, name: str) -> Convention:
    try:
      return self._presets[name]
    except KeyError:
      hint = (
        f" Hint: the names are upper case, e.g. {name.upper()!r}."
        if isinstance(name, str) and name.upper() in self._presets
        else ""
      )
      raise KeyError(
        f"bnjax.conventions.PRESETS has no preset {name!r}; the presets are"
        f" {sorted(self._presets)}.{hint}"
      ) from None

  def __iter__(self):
    return iter(self._presets)

  def __len__(self) -> int:
    return len(self._presets)

  def __repr__(self) -> str:
    return f"PRESETS({sorted(self._presets)})"


PRESETS: Mapping[str, Convention] = _Presets(
  {
    "TF_NN": TF_NN,
    "TF_FUSED_NHWC": TF_FUSED_NHWC,
    "TF_FUSED_NCHW": TF_FUSED_NCHW,
    "KERAS": KERAS,
    "KERAS_SYNCHRONIZED": KERAS_SYNCHRONIZED,
    "TF_KERAS_FUSED": TF_KERAS_FUSED,
    "TF_KERAS_UNFUSED": TF_KERAS_UNFUSED,
    "TF_V1_LAYERS_FUSED": TF_V1_LAYERS_FUSED,
    "TF_V1_LAYERS_UNFUSED": TF_V1_LAYERS_UNFUSED,
    "PYTORCH": PYTORCH,
    "PYTORCH_CUMULATIVE": PYTORCH_CUMULATIVE,
    "FLAX_LINEN": FLAX_LINEN,
    "FLAX_NNX": FLAX_NNX,
    "MXNET_GLUON": MXNET_GLUON,
  }
)
