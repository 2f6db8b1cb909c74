"""``bnjax.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm`` backed by ``bnjax.batch_norm``.

Imported on demand (``from bnjax import nnx``); ``import bnjax`` alone never imports Flax.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, cast

import jax
import jax.numpy as jnp

try:
  from flax import nnx
except ImportError as error:
  raise ImportError("bnjax.nnx needs flax: pip install 'bnjax[flax]'") from error
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes, initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn
from jax import lax

from bnjax import _checks, _flax_common, _module_options
from bnjax._core import batch_norm, init
from bnjax._types import Backward, OnNonfinite, Params, RunningVariance, Stats, Variance, ZeroDebias
from bnjax.conventions import Convention

__all__ = ["BatchNorm"]

_FN = "nnx.BatchNorm"


class BatchNorm(nnx.Module):
  """Batch normalization for Flax NNX, a drop-in for ``flax.nnx.BatchNorm``.

  Same constructor, same state (``nnx.BatchStat`` ``mean``/``var`` in float32, ``nnx.Param``
  ``scale``/``bias``), ``model.train()`` / ``model.eval()`` / ``nnx.view`` work as for Flax's
  module. All arithmetic is ``bnjax.batch_norm``::

      mean_B, var_B = mean and biased variance of x over the non-feature axes
      y    = (x - mean_B) * (scale * rsqrt(var_B + epsilon)) + bias          (training)
      y    = (x - mean)   * (scale * rsqrt(var   + epsilon)) + bias          (evaluation)
      mean <- momentum * mean + (1 - momentum) * mean_B,  likewise var       (training)

  Differences from ``flax.nnx.BatchNorm`` (Flax's own tests that use it pass with this module
  swapped in, warnings as errors; ``tests/test_flax_scenarios.py`` holds bnjax's tests of their
  scenarios):

  - The batch variance is accurate for any data by default (two-pass about a shift from the
    data on CPU, shifted sums on GPU/TPU). Flax's default ``use_fast_variance=True`` is
    ``E[x^2] - E[x]^2``, which loses all float32 precision once ``|mean| / std`` reaches
    ~3e3. ``use_fast_variance=True`` here is an alias for ``variance='fast'`` and reproduces
    Flax's default.
  - With ``axis_name`` the devices' statistics are combined weighted by their counts (exact
    for uneven shards and masks); Flax averages per-device means. A tuple of names over
    nested ``vmap``s is combined exactly with ``psum``s.
  - Outputs agree with Flax's to a few float32 ulps (to Flax's own rounding error at an
    offset), not bit for bit. With ``promote_dtype`` the identity, this module and
    ``bnjax.linen.BatchNorm`` agree bit for bit, as Flax's two do.
  - A channel with no valid element under ``mask`` outputs ``bias`` and keeps its running
    statistics; Flax's mean over no element is NaN.
  - Complex input works, and makes the running mean complex (as in Flax Linen); Flax NNX's
    float32 ``BatchStat`` cannot take it.
  - Statistics are computed in at least float32 from the input as ``promote_dtype`` gives it
    (Flax's default hook casts x, the running statistics and the params to ``dtype`` first;
    evaluation then normalizes with the cast statistics, as Flax does).

  Beyond Flax: ``num_features`` may be a tuple (one size per axis of a tuple ``axis``);
  ``convention=`` (a ``bnjax.conventions`` preset's arithmetic; the layout stays ``axis``, and
  an input for which the preset's axis differs is refused); ``momentum=None`` (cumulative
  average) and ``track_count=True`` (an int32 ``nnx.BatchStat`` ``count``, PyTorch's
  ``num_batches_tracked``); ``running_variance='unbiased'`` (PyTorch); Keras-shaped masks; a
  traced ``use_running_average`` (``lax.cond`` picks the branch); TensorFlow's training
  features and ``backward=``.

  Example::

      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from bnjax import nnx as bnnnx
      >>> bn = bnnnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 3.0 + 1e4
      >>> y = bn(x)              # training (the default): batch statistics, stats updated
      >>> bn.eval()
      >>> y_eval = bn(x)         # running statistics
      >>> sorted(nnx.state(bn, nnx.BatchStat))
      ['mean', 'var']

  Args:
    num_features: the size of the feature axis, or a tuple of sizes for a tuple ``axis``.
    use_running_average: True: normalize with the stored running statistics; False (default):
      with the batch statistics, updating the running ones. A call-time value wins.
    axis: the feature axis or axes (int or tuple; negative allowed). NHWC: -1, NCHW: 1.
    momentum: weight on the old running value (Keras/Flax convention; PyTorch's 0.1 is 0.9
      here), or None for the cumulative average.
    epsilon: added to the variance before the square root.
    dtype: dtype of the result; default: promotion of the input, the statistics and the
      params (Flax NNX's rule).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: add the learned ``bias`` (beta).
    use_scale: multiply by the learned ``scale`` (gamma).
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: a mapped axis (``shard_map``, ``pmap``) whose devices share batch statistics.
    axis_index_groups: groups of indices of ``axis_name`` that share statistics.
    use_fast_variance: Flax's flag; True means ``variance='fast'``. Default False (Flax: True).
    variance: ``'auto'`` (default: ``'two_pass'`` on CPU, ``'shifted'`` on GPU/TPU),
      ``'two_pass'``, ``'shifted'`` or ``'fast'``; see ``bnjax.batch_norm``.
    running_variance: ``'biased'`` (Flax, Keras) or ``'unbiased'`` (PyTorch).
    backward: ``'closed_form'`` (default, fast) or ``'autodiff'`` (allows ``jax.jvp``); see
      ``bnjax.batch_norm``.
    update_stats: False normalizes training batches with their own statistics but leaves the
      running ones alone (TF1 ``tf.layers`` with ``trainable=False``; presets pass it).
    renorm: batch renormalization (tf_keras), as in ``bnjax.batch_norm``; adds the
      ``renorm_mean``, ``renorm_stddev`` and ``stddev`` BatchStats.
    renorm_clipping: renorm's bounds on r and d, as in ``bnjax.batch_norm``.
    renorm_momentum: the momentum of renorm's averages, as in ``bnjax.batch_norm``.
    virtual_batch_size: tf_keras's ghost batches, as in ``bnjax.batch_norm``.
    adjustment: tf_keras's adjustment callable, as in ``bnjax.batch_norm``.
    zero_debias: tf.contrib's zero-debiased averages, as in ``bnjax.batch_norm``; adds a
      ``count`` BatchStat.
    track_count: keep an int32 ``count`` BatchStat, the number of updates.
    on_nonfinite: ``'keep'`` (default: a channel whose batch statistics are NaN or inf keeps
      its running statistics), ``'propagate'`` (Flax's behaviour) or ``'raise'``; see
      ``bnjax.batch_norm``.
    convention: a ``bnjax.conventions.Convention`` whose arithmetic replaces ``momentum``,
      ``epsilon``, ``variance``, ``running_variance``, ``track_count`` and its extra options.
    promote_dtype: Flax's hook: called as ``promote_dtype((x, mean, var, scale, bias),
      dtype=dtype)``, returns them in the dtype to compute with (default: Flax's
      ``promote_dtype``; ``lambda a, **_: a`` computes as Linen does).
    rngs: the ``nnx.Rngs`` whose ``params`` stream feeds the initializers.
    bias_metadata: metadata of the ``bias`` ``nnx.Param``.
    scale_metadata: metadata of the ``scale`` ``nnx.Param``.
  """

  def __init__(
    self,
    num_features: int | tuple[int, ...],
    *,
    use_running_average: bool | None = False,
    axis: int | tuple[int, ...] = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = initializers.zeros_init(),
    scale_init: Initializer = initializers.ones_init(),
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = False,
    variance: Variance = "auto",
    running_variance: RunningVariance = "biased",
    backward: Backward = "closed_form",
    update_stats: bool = True,
    renorm: bool = False,
    renorm_clipping: dict[str, float] | None = None,
    renorm_momentum: float = 0.99,
    virtual_batch_size: int | None = None,
    adjustment: Callable[[tuple[int, ...]], tuple[jax.Array, jax.Array]] | None = None,
    zero_debias: ZeroDebias | None = None,
    track_count: bool = False,
    convention: Convention | None = None,
    on_nonfinite: OnNonfinite = "keep",
    promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    scale_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    options = {
      name: value for name, value in locals().items() if name in _module_options.BATCH_NORM_OPTIONS
    }
    options["variance"] = _flax_common.variance_algorithm(_FN, use_fast_variance, variance)
    options["track_count"] = track_count
    options = _module_options.with_convention(_FN, convention, options, _DEFAULTS)
    _checks.choice(_FN, "variance", options["variance"], _checks.VARIANCE_ALGORITHMS)
    _checks.choice(_FN, "running_variance", options["running_variance"], _checks.RUNNING_VARIANCES)
    _checks.choice(_FN, "backward", options["backward"], _checks.BACKWARDS)
    _checks.choice(_FN, "on_nonfinite", options["on_nonfinite"], _checks.ON_NONFINITE)
    _checks.momentum(_FN, options["momentum"])
    _checks.flag(_FN, "update_stats", options["update_stats"])
    _flax_common.module_dtypes(_FN, dtype=dtype, param_dtype=param_dtype)
    if not callable(promote_dtype):
      _checks.fail(_FN, f"`promote_dtype` must be a callable, got {promote_dtype!r}.", TypeError)
    feature_shape = _checks.num_features(_FN, num_features)

    # The running statistics bnjax.init lays out for these options, one BatchStat each.
    _, initial = init(
      feature_shape,
      track_count=(
        options["track_count"] or options["momentum"] is None or options["zero_debias"] is not None
      ),
      renorm=options["renorm"],
    )
    self.mean: nnx.BatchStat[jax.Array]
    self.var: nnx.BatchStat[jax.Array]
    for key, value in initial.items():  # mean, var, and count or renorm's where asked
      setattr(self, key, nnx.BatchStat(value))
    self.stat_keys = tuple(initial)

    self.scale: nnx.Param[jax.Array] | None
    if use_scale:
      self.scale = nnx.Param(
        scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata
      )
    else:
      self.scale = nnx.data(None)
    self.bias: nnx.Param[jax.Array] | None
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata)
    else:
      self.bias = nnx.data(None)

    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = options["variance"] == "fast"
    self.convention = convention
    self.promote_dtype = promote_dtype
    for name, value in options.items():  # momentum, epsilon, ..., as the convention set them
      setattr(self, name, value)

  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x``; in training also updates the ``nnx.BatchStat`` variables.

    Args:
      x: input, floating or complex, rank >= 1.
      use_running_average: overrides the attribute (set by ``train()`` / ``eval()``) when
        given. A Python bool, or a boolean scalar array (possibly traced).
      mask: boolean, broadcastable to ``x`` (or Keras-shaped, one axis short): statistics
        over the True elements only.

    Returns:
      The normalized input, of ``x``'s shape.
    """
    use_running_average = first_from(
      use_running_average,
      self.use_running_average,
      error_msg=(
        "No `use_running_average` argument was provided to bnjax.nnx.BatchNorm. Pass it to"
        " the constructor or the call, or use `model.train()` / `model.eval()`."
      ),
    )
    training = _flax_common.training_from_flag(_FN, use_running_average)
    x = _checks.floating_input(_FN, x)
    _module_options.check_layout(_FN, self.convention, self.axis, x.ndim)
    stats = cast(Stats, {key: getattr(self, key)[...] for key in self.stat_keys})
    # Flax's hook: x, the running mean and variance, and the params in one dtype (by default
    # `dtype`, else their promotion). The promoted running statistics normalize in evaluation;
    # training updates the stored ones. The params of complex input stay real. The hook runs
    # under JAX's standard promotion rules, as Flax's does, also where the caller is strict.
    with jax.numpy_dtype_promotion("standard"):
      x, mean, var, scale, bias = self.promote_dtype(
        (x, stats["mean"], stats["var"], _value(self.scale), _value(self.bias)), dtype=self.dtype
      )
    params = cast(
      Params,
      {
        key: _real_like(value, stored)
        for key, value, stored in (("scale", scale, self.scale), ("bias", bias, self.bias))
        if value is not None
      },
    )
    if jnp.iscomplexobj(x):  # the running mean becomes complex, as in Flax
      stats["mean"] = stats["mean"].astype(x.dtype)
    eval_stats = cast(Stats, {**stats, "mean": mean, "var": _real_like(var, self.var)})
    options = {name: getattr(self, name) for name in _module_options.BATCH_NORM_OPTIONS}

    def normalize(train: bool, stats):
      return batch_norm(
        x,
        params,
        stats,
        training=train,
        axis=self.axis,
        mask=mask,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        dtype=_flax_common.output_dtype(x, scale, bias, dtype=self.dtype),
        **options,
      )

    if training is True:
      y, new_stats = normalize(True, stats)
    elif training is False:
      return normalize(False, eval_stats)[0]
    else:
      y, new_stats = lax.cond(
        training, lambda: normalize(True, stats), lambda: (normalize(False, eval_stats)[0], stats)
      )
    for key in self.stat_keys:  # set_value: complex input makes the mean complex
      getattr(self, key).set_value(new_stats[key])
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Sets the mode, as ``nnx.view`` and ``nnx.view_info`` expect of a module.

    Args:
      use_running_average: True: normalize with the stored running statistics; False: with
        the batch statistics, updating the running ones. None leaves it as it is.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


def _value(variable: nnx.Param | None) -> jax.Array | None:
  return None if variable is None else variable[...]


def _real_like(value: jax.Array | None, stored: nnx.Variable | None) -> jax.Array | None:
  """``value``'s real part where promotion made a real stored variable complex."""
  if (
    value is None or stored is None or not jnp.iscomplexobj(value) or jnp.iscomplexobj(stored[...])
  ):
    return value
  return jnp.real(value)


_DEFAULTS = {
  name: p.default for name, p in inspect.signature(BatchNorm.__init__).parameters.items()
}
