"""Running-statistics updates: exponential moving average or cumulative average.

With batch statistics ``mean_B``, ``var_B`` over ``n`` elements per channel:

    var_R  = var_B * n / max(n - 1, 1)   if running_variance == 'unbiased'   (Bessel)
           = var_B                       if running_variance == 'biased'
    w      = momentum                    (EMA; the weight on the old value, Keras/Flax style)
           = 1 - 1 / count               (momentum=None: cumulative average, count += 1 first)
    mean  <- w * mean + (1 - w) * mean_B
    var   <- w * var  + (1 - w) * var_R

Conventions differ between frameworks:
- Keras, Flax and bnjax pass ``momentum`` as the weight on the OLD value (0.99 by default);
  PyTorch passes the weight on the NEW value (0.1 by default, i.e. 0.9 here).
- PyTorch and TensorFlow's fused kernel store the unbiased (Bessel-corrected) variance;
  Keras 3, Flax and ``tf.nn.moments`` store the biased one. Normalization always uses the
  biased batch variance.
- With one element per channel, n / (n - 1) is undefined; TensorFlow's fused kernel uses
  n / max(n - 1, 1) and so does bnjax (PyTorch raises instead).

A channel with no valid element (all masked out) keeps its running statistics. ``count``, when
present, counts the updates (PyTorch's ``num_batches_tracked``).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from bnjax._stats import Moments


def update(
    stats: dict[str, Any],
    batch: Moments,
    *,
    momentum: float | None,
    running_variance: str,
    feature_shape: tuple[int, ...],
) -> dict[str, Any]:
  """Returns ``stats`` with ``mean``, ``var`` (and ``count``) moved toward the batch.

  No gradient flows through the update: ``stats`` arrive stopped, ``batch`` is stopped here.
  """
  batch_mean, batch_var, count = (lax.stop_gradient(v) for v in batch)
  if running_variance == "unbiased":
    batch_var = batch_var * (count / jnp.maximum(count - 1, 1))

  new_stats = dict(stats)
  if "count" in stats:
    new_stats["count"] = stats["count"] + jnp.ones((), stats["count"].dtype)
  if momentum is None:
    weight_old = 1 - 1 / new_stats["count"].astype(batch_mean.dtype)
  else:
    weight_old = jnp.asarray(momentum, batch_mean.dtype)

  seen = jnp.reshape(count > 0, count.shape if count.shape == () else feature_shape)
  for key, batch_value in (("mean", batch_mean), ("var", batch_var)):
    old = stats[key]
    dtype = max(old.dtype, batch_value.dtype, key=lambda d: d.itemsize)
    w = weight_old.astype(dtype)
    moved = w * old.astype(dtype) + (1 - w) * batch_value.reshape(feature_shape).astype(dtype)
    new_stats[key] = jnp.where(seen, moved, old.astype(dtype)).astype(old.dtype)
  return new_stats
