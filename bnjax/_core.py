"""``batch_norm`` and ``init``: the one place where the normalization arithmetic lives.

Batch statistics come from ``_stats``, running-statistics updates from ``_running``, the renorm
correction from ``_renorm``; this module validates, picks the branch and normalizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from bnjax import _checks, _normalize, _renorm, _running, _stats
from bnjax._types import Backward, OnNonfinite, Params, RunningVariance, Stats, Variance, ZeroDebias


def init(
  num_features: int | tuple[int, ...],
  *,
  use_scale: bool = True,
  use_bias: bool = True,
  dtype: DTypeLike = jnp.float32,
  track_count: bool = False,
  renorm: bool = False,
) -> tuple[Params, Stats]:
  """Initial ``(params, stats)`` for ``batch_norm``, with Flax's names and layout.

  Args:
    num_features: the size of the feature axis, or a tuple of sizes for several feature axes.
    use_scale: include the learned scale (gamma), initialized to 1.
    use_bias: include the learned bias (beta), initialized to 0.
    dtype: dtype of ``params``. Running statistics are kept in at least float32.
    track_count: add ``stats['count']`` (int32 scalar, the number of updates, PyTorch's
      ``num_batches_tracked``); needed by ``momentum=None`` and ``zero_debias``.
    renorm: add the running statistics batch renormalization needs: ``renorm_mean`` (0),
      ``renorm_stddev`` (1) and ``stddev`` (1), tf_keras's ``renorm_mean``, ``renorm_stddev``
      and ``moving_stddev``.

  Returns:
    ``params = {'scale': ones, 'bias': zeros}`` without the disabled entries, and
    ``stats = {'mean': zeros, 'var': ones}`` (+ ``'count': 0``, + the renorm statistics).

  Example:
    >>> import bnjax
    >>> params, stats = bnjax.init(3, track_count=True)
    >>> sorted(params), sorted(stats)
    (['bias', 'scale'], ['count', 'mean', 'var'])
    >>> stats["var"]
    Array([1., 1., 1.], dtype=float32)
  """
  shape = _checks.num_features("init", num_features)
  _checks.floating_dtype("init", "dtype", dtype)
  params: Params = {}
  if use_scale:
    params["scale"] = jnp.ones(shape, dtype)
  if use_bias:
    params["bias"] = jnp.zeros(shape, dtype)
  stat_dtype = _stats.stat_dtype(dtype)
  stats: Stats = {"mean": jnp.zeros(shape, stat_dtype), "var": jnp.ones(shape, stat_dtype)}
  if track_count:
    stats["count"] = jnp.zeros((), jnp.int32)
  if renorm:
    stats = _renorm.add_init_stats(stats)
  return params, stats


def _then(inner_scale, inner_offset, scale, offset):
  """(scale, offset) of v -> (v * inner_scale + inner_offset) * scale + offset (None: 1, 0)."""
  if scale is not None:
    inner_scale, inner_offset = inner_scale * scale, inner_offset * scale
  return inner_scale, inner_offset if offset is None else inner_offset + offset


@jax.named_scope("bnjax.batch_norm")  # names its ops in HLO dumps and profiles
def batch_norm(
  x: ArrayLike,
  params: Params,
  stats: Stats,
  *,
  training: bool | jax.Array,
  axis: int | tuple[int, ...] = -1,
  momentum: float | None = 0.99,
  epsilon: float = 1e-5,
  update_stats: bool = True,
  running_variance: RunningVariance = "biased",
  variance: Variance = "auto",
  mask: ArrayLike | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
  dtype: DTypeLike | None = None,
  renorm: bool = False,
  renorm_clipping: dict[str, float] | None = None,
  renorm_momentum: float = 0.99,
  virtual_batch_size: int | None = None,
  adjustment: Callable[[tuple[int, ...]], tuple[jax.Array, jax.Array]] | None = None,
  zero_debias: ZeroDebias | None = None,
  backward: Backward = "closed_form",
  on_nonfinite: OnNonfinite = "keep",
) -> tuple[jax.Array, Stats]:
  """Batch normalization as a pure function: ``y, new_stats = batch_norm(x, params, stats, ...)``.

  In training, with ``B`` the axes not in ``axis`` (and the devices of ``axis_name``)::

      mean_B, var_B = mean and biased variance of x over B     (float32 or wider)
      y = (x - mean_B) * (scale * rsqrt(var_B + epsilon)) + bias
      new_stats = running-statistics update from (mean_B, var_B)   (see below)

  In evaluation the running ``stats['mean']`` and ``stats['var']`` replace the batch
  statistics and ``new_stats`` is ``stats``. Equivalent to this JAX code, without its traps::

      mean, var = x.mean(B), x.var(B)
      y = (x - mean) / jnp.sqrt(var + epsilon) * scale + bias
      new_mean = momentum * stats['mean'] + (1 - momentum) * mean    # likewise for var

  Running statistics, with ``n`` elements per channel and ``w`` the weight on the old value::

      var_R = var_B * n / max(n - 1, 1)  if running_variance == 'unbiased' else var_B
      w     = momentum; 1 - 1/(t+1) with momentum=None; m(1 - m^t)/(1 - m^(t+1)) debiased
      mean <- w * mean + (1 - w) * mean_B;   var <- w * var + (1 - w) * var_R

  TensorFlow's training-only features compose as tf_keras composes them: with ``xhat`` the
  normalized input, ``(r, d)`` the renorm correction and ``(a, b) = adjustment(shape)``,
  ``y = ((xhat * r + d) * a + b) * scale + bias``.

  Args:
    x: input, float16, bfloat16, float32 or float64, any rank >= 1 (rank 1, or ``axis``
      naming every axis: each element is its own channel and training outputs ``bias``).
      complex64/complex128 as in Flax: a complex mean, the real variance
      ``mean(|x - mean|^2)`` (each part's moments accurate, ``bnjax._normalize``), real
      params, and a running mean that becomes complex; differentiated by JAX (``backward``
      does not apply), without renorm, virtual batches or adjustment.
    params: ``{'scale': (*F,), 'bias': (*F,)}``; a missing entry means scale 1 / bias 0.
    stats: ``{'mean': (*F,), 'var': (*F,)}`` running statistics (+ ``'count'``, + the renorm
      statistics): build them with ``bnjax.init``.
    training: required. True: normalize with batch statistics and update the running ones.
      False: normalize with the running statistics; ``stats`` come back unchanged. A traced
      boolean scalar picks the branch at run time with ``lax.cond``, so one compiled
      function serves both and evaluation never computes batch moments (under ``vmap`` with
      a batched flag both branches run, as for any ``lax.cond``).
    axis: the feature axis or axes (negative allowed); all others are reduced. NHWC: -1,
      NCHW: 1.
    momentum: weight on the old running value (Keras/Flax convention; PyTorch's
      ``momentum=0.1`` is 0.9 here). ``None``: cumulative average over all batches seen,
      like PyTorch's ``momentum=None``; needs ``stats['count']`` (``init(..., track_count=True)``).
    epsilon: added to the variance before the square root.
    update_stats: with ``training=True``, False normalizes with batch statistics but leaves
      ``stats`` alone (the TF1 ``tf.layers`` ``trainable=False`` case).
    running_variance: ``'biased'`` (Keras 3, Flax, tf.nn.moments) or ``'unbiased'``
      (PyTorch, TensorFlow's fused kernel: Bessel's n/(n-1)). Only the stored variance differs;
      normalization always uses the biased batch variance.
    variance: how the batch variance is computed: ``'auto'`` (default: ``'two_pass'`` on CPU,
      ``'shifted'`` on GPU and TPU, where it is faster), ``'two_pass'`` (the mean about a shift
      K from the data, then squares about the mean), ``'shifted'`` (both sums about K in one
      read of x) or ``'fast'`` (E[x^2] - E[x]^2 clamped at 0, Flax's default; loses all
      float32 precision when |mean| / std reaches ~3e3, and y with it). All but ``'fast'``
      keep the mean as K plus a small correction and are accurate at any offset: y within
      2e-6 of float64 arithmetic, the variance within 1e-6 (``docs/ACCURACY.md``). See
      ``bnjax.moments``.
    mask: boolean, broadcastable to ``x``: statistics over the True elements only. A
      Keras-shaped mask, one axis short and aligned from the first ((N, T) for (N, T, C)),
      is accepted where NumPy's alignment would not broadcast it; where both would, it is
      refused as ambiguous. All
      elements are normalized. A channel with no True element outputs ``bias`` and keeps its
      running statistics. Masked-out NaN or inf (padding) changes no statistic, and under a
      masked loss leaves the closed-form gradients of the valid elements finite.
    axis_name: a mapped axis (``shard_map``, ``pmap``, ``vmap``) whose devices share batch
      statistics: count-weighted, exact, one ``all_gather`` of 3C+1 floats per device (4C
      with a mask): count, shift, correction and M2 (``bnjax._stats``). A tuple of names JAX
      cannot gather over (nested ``vmap``s) is combined exactly with two ``psum``s. Not
      needed under ``jax.jit`` over a sharded batch, where XLA inserts the reduction itself.
    axis_index_groups: groups of indices of ``axis_name`` that share statistics.
    dtype: dtype of ``y``; default ``x.dtype``.
    renorm: batch renormalization (tf_keras ``renorm=True``): needs ``init(..., renorm=True)``.
      See ``bnjax._renorm`` for the formulas.
    renorm_clipping: ``{'rmin', 'rmax', 'dmax'}`` bounds for ``r`` and ``d``; missing: no clip.
    renorm_momentum: weight on the old value of the renorm averages.
    virtual_batch_size: ghost batches: statistics over groups of this many examples of axis 0,
      grouped as tf_keras groups them: example ``i`` belongs to group ``i % (N // size)``. The
      running statistics move once per step toward the groups' average mean and variance.
    adjustment: tf_keras's ``adjustment``: called in training with ``x.shape``, returns
      ``(a, b)`` broadcastable to ``x``; ``y = (xhat * a + b) * scale + bias``. Not with
      ``virtual_batch_size`` (tf_keras rejects that pair too).
    zero_debias: ``'mean'`` (tf.contrib's ``zero_debias_moving_mean``) or ``'mean_and_var'``:
      running averages debiased as if started at the first batch; needs ``stats['count']``.
    backward: how training mode is differentiated: ``'closed_form'`` (default; two reductions
      and one elementwise pass, see ``bnjax._normalize``) or ``'autodiff'`` (JAX differentiates
      the forward computation; slower, but allows forward mode: ``jax.jvp``, ``jax.jacfwd``).
      Same values either way; evaluation mode is always plain autodiff.
    on_nonfinite: what a training batch whose mean or variance is NaN or inf in some channel
      (one NaN or inf element there) does to the running statistics. ``'keep'`` (default):
      that channel keeps its old running statistics; the batch's own output still shows the
      NaN, so nothing is hidden, and the next clean batch updates as usual. ``'propagate'``:
      they become NaN, as in PyTorch, TensorFlow and Flax. ``'raise'``: as ``'keep'``, and
      the call raises at run time (``jax.debug.callback``; under ``jit`` a ``JaxRuntimeError``
      carrying the message). Masked-out elements never count. The float32 limit: a channel
      whose sum of squared deviations passes ~3.4e38 (a spread beyond ~1.8e19 / sqrt(n))
      has an infinite variance; its output is then NaN, not a silent ``bias``, and it counts
      as non-finite here (``docs/RELIABILITY.md``).

  Returns:
    ``(y, new_stats)``: ``y`` of ``x``'s shape in ``dtype``; ``new_stats`` with ``stats``'s
    structure and dtypes. No gradient flows into or out of the running statistics.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> params, stats = bnjax.init(2)
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, stats = bnjax.batch_norm(x, params, stats, training=True, momentum=0.5, epsilon=0.0)
    >>> y
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> stats["mean"], stats["var"]    # 0.5 * initial (0, 1) + 0.5 * batch (2, 20; 1, 100)
    (Array([ 1., 10.], dtype=float32), Array([ 1. , 50.5], dtype=float32))
  """
  fn = "batch_norm"
  x = _checks.floating_input(fn, x)
  training = _checks.training(fn, training)
  feature_axes = _checks.feature_axes(fn, axis, x.ndim)
  reduced_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  broadcast_shape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
  momentum = _checks.momentum(fn, momentum)
  renorm = _checks.flag(fn, "renorm", renorm)
  renorm_clipping = _checks.renorm_clipping(fn, renorm_clipping, renorm)
  renorm_momentum = _checks.float_momentum(fn, renorm_momentum, name="renorm_momentum")
  zero_debias = _checks.zero_debias(fn, zero_debias, momentum=momentum, renorm=renorm)
  update_stats = _checks.flag(fn, "update_stats", update_stats)
  params = _checks.params(fn, params, feature_shape)
  stats = _checks.stats(
    fn,
    stats,
    feature_shape,
    need_count=update_stats and (momentum is None or zero_debias is not None),
    need_renorm=renorm,
  )
  if update_stats and training is not False:
    _checks.stats_precision(fn, stats)
  stats = jax.tree.map(lax.stop_gradient, stats)  # running statistics are state, not parameters
  epsilon = _checks.epsilon(fn, epsilon)
  running_variance = _checks.choice(
    fn, "running_variance", running_variance, _checks.RUNNING_VARIANCES
  )
  variance = _stats.resolve_variance(
    _checks.choice(fn, "variance", variance, _checks.VARIANCE_ALGORITHMS)
  )
  backward = _checks.choice(fn, "backward", backward, _checks.BACKWARDS)
  on_nonfinite = _checks.choice(fn, "on_nonfinite", on_nonfinite, _checks.ON_NONFINITE)
  mask = _checks.mask(fn, mask, x.shape)
  _checks.axis_name(fn, axis_name, axis_index_groups, communicates=training is not False)
  virtual_batch_size = _checks.virtual_batch_size(
    fn, virtual_batch_size, x.shape, reduced_axes, axis_name
  )
  adjustment = _checks.adjustment(fn, adjustment, virtual_batch_size=virtual_batch_size)
  out_dtype = _checks.output_dtype(fn, dtype, x.dtype)
  stat_dtype = _stats.stat_dtype(x.dtype)  # real: the statistics of complex x are of its parts
  is_complex = jnp.issubdtype(x.dtype, jnp.complexfloating)
  if is_complex:
    _checks.complex_options(
      fn, renorm=renorm, virtual_batch_size=virtual_batch_size, adjustment=adjustment
    )
    # Its running mean is complex from the first update on; both lax.cond branches agree.
    stats = {**stats, "mean": stats["mean"].astype(_stats.complex_dtype(stat_dtype))}
  scale, offset = (
    None if v is None else v.astype(stat_dtype).reshape(broadcast_shape)
    for v in (params.get("scale"), params.get("bias"))
  )

  def normalize_with_batch_statistics():
    # Virtual batches: (N, ...) -> (size, N // size, ...), statistics per column (axis 1).
    if virtual_batch_size is None:
      xv, mask_v, axes_v, group_axis, features_v = x, mask, reduced_axes, None, broadcast_shape
    else:
      grouped = (virtual_batch_size, x.shape[0] // virtual_batch_size, *x.shape[1:])
      xv = x.reshape(grouped)
      mask_v = None if mask is None else jnp.broadcast_to(mask, x.shape).reshape(grouped)
      axes_v, group_axis = (0, *tuple(a + 1 for a in reduced_axes if a != 0)), 1
      features_v = (1, *broadcast_shape)  # x's axis 0 is reduced, so broadcast_shape[0] == 1
    scale_v, offset_v = (None if v is None else v.reshape(features_v) for v in (scale, offset))

    def _targets(batch):
      return _running.targets(
        batch,
        running_variance=running_variance,
        feature_shape=feature_shape,
        group_axis=group_axis,
      )

    if adjustment is not None:
      a, b = (
        jnp.asarray(v).astype(stat_dtype)
        for v in _checks.adjustment_values(fn, adjustment(xv.shape), xv.shape)
      )
      scale_v, offset_v = _then(a, b, scale_v, offset_v)
    reduction = _normalize.Reduction(
      axes=axes_v,
      axis_name=axis_name,
      variance=variance,
      epsilon=epsilon,
      out_dtype=out_dtype,
      axis_index_groups=None
      if axis_index_groups is None
      else tuple(tuple(group) for group in axis_index_groups),
    )
    if is_complex:  # the real and imaginary parts as pairs, differentiated by JAX
      y, batch = _normalize.complex_with_batch_moments(
        xv, mask_v, scale_v, offset_v, reduction=reduction
      )
      target = _targets(batch)
    elif renorm:  # r and d come from the batch moments, so these come first
      batch = _stats.batch_moments(
        xv,
        axes_v,
        mask=mask_v,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        variance=variance,
      )
      target = _targets(batch)
      r, d = _renorm.correction(
        target.mean, target.var, stats, epsilon=epsilon, clipping=renorm_clipping
      )
      scale_v, offset_v = _then(r.reshape(features_v), d.reshape(features_v), scale_v, offset_v)
      y = _normalize.with_moments(xv, batch, scale_v, offset_v, reduction=reduction)
    else:
      y, batch = _normalize.with_batch_moments(
        xv, mask_v, scale_v, offset_v, reduction=reduction, backward=backward
      )
      target = _targets(batch)
    y = y.reshape(x.shape)
    if not update_stats:
      return y, stats
    if on_nonfinite == "raise":
      checked = _running.finite(target) | (target.count == 0)
      jax.debug.callback(_checks.raise_if_nonfinite, checked)
    return y, _running.update(
      stats,
      target,
      momentum=momentum,
      zero_debias=zero_debias,
      renorm=renorm,
      renorm_momentum=renorm_momentum,
      epsilon=epsilon,
      keep_nonfinite=on_nonfinite != "propagate",
    )

  def normalize_with_running_statistics():
    mean_dtype = _stats.complex_dtype(stat_dtype) if jnp.iscomplexobj(stats["mean"]) else stat_dtype
    mean = stats["mean"].astype(mean_dtype).reshape(broadcast_shape)
    var = stats["var"].astype(stat_dtype).reshape(broadcast_shape)
    m = _normalize.multiplier(var, scale, epsilon=epsilon)
    return _normalize.affine(x, mean, m, offset, out_dtype=out_dtype), stats

  if training is True:
    return normalize_with_batch_statistics()
  if training is False:
    return normalize_with_running_statistics()
  return lax.cond(training, normalize_with_batch_statistics, normalize_with_running_statistics)
