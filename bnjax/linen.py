"""``bnjax.linen.BatchNorm``: a drop-in for ``flax.linen.BatchNorm`` backed by ``bnjax.batch_norm``.

Imported on demand (``import bnjax.linen``); ``import bnjax`` alone never imports Flax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp

try:
  from flax.linen import module
except ImportError as error:
  raise ImportError("bnjax.linen needs flax: pip install 'bnjax[flax]'") from error
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from bnjax import _checks, _flax_common, _module_options
from bnjax._core import batch_norm, init
from bnjax._types import Backward, OnNonfinite, Params, RunningVariance, Stats, Variance, ZeroDebias
from bnjax.conventions import Convention

__all__ = ["BatchNorm"]

_FN = "linen.BatchNorm"


class BatchNorm(module.Module):
  """Batch normalization for Flax Linen, a drop-in for ``flax.linen.BatchNorm``.

  Same fields, same variables (``params/scale``, ``params/bias``, ``batch_stats/mean``,
  ``batch_stats/var``, float32 statistics of the feature axes' shape), same call signature,
  so a Flax checkpoint loads unchanged. All arithmetic is ``bnjax.batch_norm``::

      mean_B, var_B = mean and biased variance of x over the non-feature axes
      y    = (x - mean_B) * (scale * rsqrt(var_B + epsilon)) + bias          (training)
      y    = (x - mean)   * (scale * rsqrt(var   + epsilon)) + bias          (evaluation)
      mean <- momentum * mean + (1 - momentum) * mean_B,  likewise var       (training, not init)

  Differences from ``flax.linen.BatchNorm`` (Flax's own BatchNorm tests pass with this module
  swapped in, warnings as errors; ``tests/test_flax_scenarios.py`` holds bnjax's tests of their
  scenarios):

  - The batch variance is accurate for any data by default (two-pass about a shift from the
    data on CPU, shifted sums on GPU/TPU). Flax's default ``use_fast_variance=True`` is
    ``E[x^2] - E[x]^2``, which loses all float32 precision once ``|mean| / std`` reaches
    ~3e3. ``use_fast_variance=True`` here is an alias for ``variance='fast'`` and reproduces
    Flax's default.
  - With ``axis_name`` the devices' statistics are combined weighted by their counts (exact
    for uneven shards and masks); Flax averages per-device means, which agrees only when every
    device holds the same number of valid elements. A tuple of names over nested ``vmap``s
    (where ``all_gather`` cannot batch) is combined exactly with ``psum``s.
  - Outputs agree with Flax's to a few float32 ulps (to Flax's own rounding error at an
    offset), not bit for bit.
  - A channel with no valid element under ``mask`` outputs ``bias`` and keeps its running
    statistics; Flax's mean over no element is NaN.
  - Statistics are always computed in at least float32 (Flax's ``force_float32_reductions``
    is not offered).

  As in Flax: complex input (complex mean, real variance ``mean(|x - mean|^2)``; the running
  mean becomes complex), rank-1 input (each element its own channel), several init calls with
  an unbound ``axis_name``. Beyond Flax:

  - ``convention=``: a ``bnjax.conventions`` preset's arithmetic (momentum, epsilon, variance
    algorithm, stored variance, batch counter). The layout stays ``axis``; where the preset's
    axis differs for the input's rank (PyTorch's 1 on channels-last data), the call is
    refused: pass ``convention=preset.replace(axis=...)`` or ``axis=...``. Setting a field the
    preset also sets, to another value, is refused too.
  - ``momentum=None``: cumulative average of all batches seen (PyTorch's ``momentum=None``).
    ``track_count=True`` (or a preset that counts, or a ``batch_stats['count']`` already in the
    variables, e.g. from ``conventions.PYTORCH.init``) keeps an int32 ``batch_stats/count``
    up to date, PyTorch's ``num_batches_tracked``.
  - ``running_variance='unbiased'`` stores the Bessel-corrected variance (PyTorch,
    TensorFlow's fused kernel); normalization still uses the biased batch variance.
  - ``mask`` may also be Keras-shaped (one axis short, aligned from the first).
  - ``use_running_average`` may be a traced boolean scalar (``jax.jit`` argument): one
    compiled function serves training and evaluation through ``lax.cond``. The running
    statistics are then written back in both branches (unchanged in evaluation), so
    ``'batch_stats'`` must be mutable.
  - TensorFlow's training features (below) and ``backward=``.

  Example::

      >>> import jax, jax.numpy as jnp
      >>> import bnjax.linen
      >>> bn = bnjax.linen.BatchNorm(momentum=0.9)
      >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 3.0 + 1e4
      >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
      >>> jax.tree.map(jnp.shape, variables)
      {'batch_stats': {'mean': (3,), 'var': (3,)}, 'params': {'bias': (3,), 'scale': (3,)}}
      >>> y, updates = bn.apply(
      ...     variables, x, use_running_average=False, mutable=['batch_stats'])
      >>> variables = {**variables, **updates}
      >>> y_eval = bn.apply(variables, x, use_running_average=True)

  Attributes:
    use_running_average: True: normalize with the stored running statistics; False: with
      the batch statistics, updating the running ones. Give it here or at call time.
    axis: the feature axis or axes (int or tuple; negative allowed). NHWC: -1, NCHW: 1.
    momentum: weight on the old running value (Keras/Flax convention; PyTorch's 0.1 is 0.9
      here), or None for the cumulative average.
    epsilon: added to the variance before the square root.
    dtype: dtype of the result; default: promotion of the input and the params (Flax's rule).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: add the learned ``bias`` (beta).
    use_scale: multiply by the learned ``scale`` (gamma).
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: a mapped axis (``shard_map``, ``pmap``) whose devices share batch statistics.
      Not used during ``init``, as in Flax. Not needed under ``jax.jit`` over a sharded batch.
    axis_index_groups: groups of indices of ``axis_name`` that share statistics.
    use_fast_variance: Flax's flag; True means ``variance='fast'``. Default False (Flax: True).
    variance: ``'auto'`` (default: ``'two_pass'`` on CPU, ``'shifted'`` on GPU/TPU),
      ``'two_pass'``, ``'shifted'`` or ``'fast'``; see ``bnjax.batch_norm``.
    running_variance: ``'biased'`` (Flax, Keras) or ``'unbiased'`` (PyTorch).
    backward: ``'closed_form'`` (default, fast) or ``'autodiff'`` (allows ``jax.jvp``); see
      ``bnjax.batch_norm``.
    update_stats: False normalizes training batches with their own statistics but leaves the
      running ones alone (TF1 ``tf.layers`` with ``trainable=False``; presets pass it).
    renorm, renorm_clipping, renorm_momentum, virtual_batch_size, adjustment, zero_debias:
      TensorFlow's training-only features, as in ``bnjax.batch_norm``; renorm adds
      ``renorm_mean``, ``renorm_stddev`` and ``stddev`` to ``batch_stats``, zero_debias a
      ``count``.
    track_count: keep ``batch_stats/count``, the number of updates.
    on_nonfinite: ``'keep'`` (default: a channel whose batch statistics are NaN or inf keeps
      its running statistics), ``'propagate'`` (Flax's behaviour) or ``'raise'``; see
      ``bnjax.batch_norm``.
    convention: a ``bnjax.conventions.Convention`` whose arithmetic replaces ``momentum``,
      ``epsilon``, ``variance``, ``running_variance``, ``track_count`` and its extra options.
  """

  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = False
  variance: Variance = "auto"
  running_variance: RunningVariance = "biased"
  backward: Backward = "closed_form"
  update_stats: bool = True
  renorm: bool = False
  renorm_clipping: dict[str, float] | None = None
  renorm_momentum: float = 0.99
  virtual_batch_size: int | None = None
  adjustment: Callable[[tuple[int, ...]], tuple[jax.Array, jax.Array]] | None = None
  zero_debias: ZeroDebias | None = None
  track_count: bool = False
  convention: Convention | None = None
  on_nonfinite: OnNonfinite = "keep"

  @module.compact
  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x``; in training also updates ``batch_stats`` (unless initializing).

    Args:
      x: input, floating or complex, rank >= 1.
      use_running_average: overrides nothing: give it here or as a field, not both (Flax's
        rule). A Python bool, or a boolean scalar array (possibly traced).
      mask: boolean, broadcastable to ``x`` (or Keras-shaped, one axis short): statistics
        over the True elements only.

    Returns:
      The normalized input, of ``x``'s shape.
    """
    use_running_average = module.merge_param(
      "use_running_average", self.use_running_average, use_running_average
    )
    training = _flax_common.training_from_flag(_FN, use_running_average)
    _flax_common.module_dtypes(_FN, dtype=self.dtype, param_dtype=self.param_dtype)
    options = _options(self)
    track_count = options.pop("track_count")
    x = _checks.floating_input(_FN, x)
    _module_options.check_layout(_FN, self.convention, self.axis, x.ndim)
    feature_axes = _checks.feature_axes(_FN, self.axis, x.ndim)
    feature_shape = tuple(x.shape[a] for a in feature_axes)

    # The running statistics bnjax.init lays out for these options, as batch_stats variables;
    # a count is also kept up to date where the collection already holds one (stats from
    # `conventions.PYTORCH.init`, a ported num_batches_tracked).
    counts = (
      track_count
      or options["momentum"] is None
      or options["zero_debias"] is not None
      or self.has_variable("batch_stats", "count")
    )
    _, initial = init(feature_shape, track_count=counts, renorm=options["renorm"])
    variables = {
      key: self.variable("batch_stats", key, lambda v=value: v) for key, value in initial.items()
    }
    stats = cast(Stats, {key: variable.value for key, variable in variables.items()})

    params: Params = {}
    if self.use_scale:
      params["scale"] = self.param("scale", self.scale_init, feature_shape, self.param_dtype)
    if self.use_bias:
      params["bias"] = self.param("bias", self.bias_init, feature_shape, self.param_dtype)

    initializing = self.is_initializing()
    options["update_stats"] = (
      _checks.flag(_FN, "update_stats", options["update_stats"]) and not initializing
    )
    y, new_stats = batch_norm(
      x,
      params,
      stats,
      training=training,
      axis=self.axis,
      mask=mask,
      axis_name=None if initializing else self.axis_name,
      axis_index_groups=None if initializing else self.axis_index_groups,
      dtype=_flax_common.output_dtype(x, params.get("scale"), params.get("bias"), dtype=self.dtype),
      **options,
    )
    if training is not False and not initializing:
      if not self.is_mutable_collection("batch_stats"):
        _checks.fail(
          _FN,
          "training writes the new running statistics to the 'batch_stats' collection, which"
          " this apply does not let change (with a traced `use_running_average`, both"
          " branches write it). Hint: apply with mutable=['batch_stats'] and keep"
          " updates['batch_stats'].",
        )
      for key, variable in variables.items():
        variable.value = new_stats[key]
    return y


def _options(bn: BatchNorm) -> dict[str, Any]:
  """bnjax.batch_norm's options (and ``track_count``) from the fields and ``convention``.

  A function, not a method: Flax's ``tabulate`` records what every method returns.
  """
  options = {name: getattr(bn, name) for name in _module_options.BATCH_NORM_OPTIONS}
  options["variance"] = _flax_common.variance_algorithm(_FN, bn.use_fast_variance, bn.variance)
  options["track_count"] = bn.track_count
  return _module_options.with_convention(_FN, bn.convention, options, _DEFAULTS)


_DEFAULTS = {field.name: field.default for field in dataclasses.fields(BatchNorm)}
