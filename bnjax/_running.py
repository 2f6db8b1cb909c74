"""Running-statistics updates: exponential, cumulative or zero-debiased moving averages.

With batch statistics ``mean_B``, ``var_B`` over ``n`` elements per channel:

    var_R  = var_B * n / max(n - 1, 1)   if running_variance == 'unbiased'   (Bessel)
           = var_B                       if running_variance == 'biased'
    w      = momentum                              (EMA; weight on the OLD value, Keras/Flax)
           = 1 - 1 / (t + 1)                       (momentum=None: cumulative average)
           = m * (1 - m^t) / (1 - m^(t + 1))       (zero_debias: as if started at this batch)
    mean  <- w * mean + (1 - w) * mean_B     computed as  mean + (1 - w) * (mean_B - mean)
    var   <- w * var  + (1 - w) * var_R      likewise

where ``t = stats['count']`` is the number of earlier updates. With virtual batches, mean_B and
var_R are averages over the virtual batches (one update per step, as tf_keras does). With
renorm, ``stddev`` moves toward sqrt(var_R + epsilon) and ``var = max(stddev^2 - epsilon, 0)``;
see ``_renorm``.

Conventions differ between frameworks:
- Keras, Flax and bnjax pass ``momentum`` as the weight on the OLD value (0.99 by default);
  PyTorch passes the weight on the NEW value (0.1 by default, i.e. 0.9 here).
- PyTorch and TensorFlow's fused kernel store the unbiased (Bessel-corrected) variance;
  Keras 3, Flax and ``tf.nn.moments`` store the biased one. Normalization always uses the
  biased batch variance.
- With one element per channel, n / (n - 1) is undefined; TensorFlow's fused kernel uses
  n / max(n - 1, 1) and so does bnjax (PyTorch raises instead).
- The zero-debiased average is tf.contrib's ``zero_debias_moving_mean``: an EMA started at 0
  and divided by 1 - m^t. It removes the cold start: with momentum 0.999 a plain EMA needs
  ~1000 steps to forget its initial value; the debiased one equals the first batch's value
  after one step.

A channel with no valid element (all masked out) keeps its running statistics, and so, with
``keep_nonfinite`` (``batch_norm``'s default ``on_nonfinite='keep'``), does a channel whose
batch mean or variance is NaN or inf: one bad batch would otherwise poison the averages for
good (every framework's behaviour, ``'propagate'``). ``count``, when present, counts the
update calls (PyTorch's ``num_batches_tracked``), skipped channels included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._stats import Moments
from bnjax._types import RunningVariance, Stats, ZeroDebias


class Targets(NamedTuple):
  """Per-feature values the running statistics move toward, shaped like ``stats['mean']``."""

  mean: jax.Array  # mean_B
  var: jax.Array  # var_B, biased (what renorm compares with)
  running_var: jax.Array  # var_R: var_B, Bessel-corrected if asked
  # elements seen per feature (0: keep the old statistics); shadows tuple.count on purpose
  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]


def targets(
  batch: Moments, *, running_variance: RunningVariance, feature_shape, group_axis: int | None
) -> Targets:
  """Reduces batch ``Moments`` to per-feature targets, averaging over virtual batches."""
  mean, var, count = (lax.stop_gradient(v) for v in (batch.mean, batch.var, batch.count))
  count = jnp.broadcast_to(count, mean.shape)
  running_var = var
  if running_variance == "unbiased":
    running_var = var * (count / jnp.maximum(count - 1, 1))
  if group_axis is not None:
    mean, var, running_var = (v.mean(group_axis) for v in (mean, var, running_var))
    count = count.sum(group_axis)
  return Targets(*(v.reshape(feature_shape) for v in (mean, var, running_var, count)))


def _weight_new(momentum: float | None, zero_debias: bool, count, dtype) -> jax.Array:
  """``1 - w``, the weight on the new value, given ``count`` = t earlier updates.

  Computed directly, never as 1 minus a float32 weight: ``1 - float32(0.999)`` is 1.3e-5 off
  ``1 - 0.999``, a relative error that would go straight into the first update.
  """
  if momentum is None:
    return 1 / (count.astype(dtype) + 1)
  if not zero_debias:
    return jnp.asarray(1.0 - momentum, dtype)
  # 1 - w = (1 - m) / (1 - m^(t+1)), with 1 - m^k = -expm1(k * log1p(-(1 - m))): exact to a
  # few ulps even where 1 - m^k is tiny (momentum 0.999, t = 1: 0.002, which the direct form
  # gets to only ~1e-4 in float32).
  log_m = jnp.asarray(math.log1p(-(1.0 - momentum)), dtype)
  return jnp.asarray(1.0 - momentum, dtype) / -jnp.expm1((count.astype(dtype) + 1) * log_m)


def finite(batch: Targets) -> jax.Array:
  """Per channel: the batch mean, variance and stored variance are all finite."""
  return jnp.isfinite(batch.mean) & jnp.isfinite(batch.var) & jnp.isfinite(batch.running_var)


def _move(old, target, weight_new, seen):
  """``old + (1 - w) * (target - old)``: the same average as ``w * old + (1 - w) * target``,
  but an error in the weight scales the small step, not the whole value."""
  dtype = max(old.dtype, target.dtype, key=lambda d: d.itemsize)
  old_value = old.astype(dtype)
  moved = old_value + weight_new.astype(dtype) * (target.astype(dtype) - old_value)
  return jnp.where(seen, moved, old_value).astype(old.dtype)


def update(
  stats: Mapping[str, Any],
  batch: Targets,
  *,
  momentum: float | None,
  zero_debias: ZeroDebias | None,
  renorm: bool,
  renorm_momentum: float,
  epsilon: float,
  keep_nonfinite: bool = True,
) -> Stats:
  """Returns ``stats`` moved toward ``batch``; other keys pass through unchanged.

  No gradient flows through the update: ``stats`` arrive stopped, ``batch`` is stopped.
  ``keep_nonfinite``: channels whose batch statistics are not finite keep their old values.
  """
  dtype = batch.var.dtype  # real, also where the mean is complex
  count = stats.get("count")
  weight_mean = _weight_new(momentum, zero_debias in ("mean", "mean_and_var"), count, dtype)
  weight_var = _weight_new(momentum, zero_debias == "mean_and_var", count, dtype)
  seen = batch.count > 0
  if keep_nonfinite:
    seen = seen & finite(batch)
  new_stats: dict[str, Any] = dict(stats)
  if count is not None:
    # Saturates at the dtype's largest value instead of wrapping negative; Python ints keep a
    # weakly typed count (Equinox's) weak.
    new_stats["count"] = jnp.minimum(count, jnp.iinfo(count.dtype).max - 1) + 1
  new_stats["mean"] = _move(stats["mean"], batch.mean, weight_mean, seen)
  if not renorm:
    new_stats["var"] = _move(stats["var"], batch.running_var, weight_var, seen)
    return cast(Stats, new_stats)

  eps = jnp.asarray(epsilon, dtype)
  stddev = _move(stats["stddev"], jnp.sqrt(batch.running_var + eps), weight_var, seen)
  new_stats["stddev"] = stddev
  new_stats["var"] = jnp.maximum(jnp.square(stddev.astype(dtype)) - eps, 0).astype(
    stats["var"].dtype
  )
  renorm_weight = _weight_new(renorm_momentum, False, count, dtype)
  new_stats["renorm_mean"] = _move(stats["renorm_mean"], batch.mean, renorm_weight, seen)
  new_stats["renorm_stddev"] = _move(
    stats["renorm_stddev"], jnp.sqrt(batch.var + eps), renorm_weight, seen
  )
  return cast(Stats, new_stats)
