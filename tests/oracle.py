"""A float64 NumPy oracle for batch normalization: the independent reference for the math.

Written from the textbook formulas, sharing no code with bnjax: a plain mean and centered
variance over the reduced axes, the normalization, the running-statistics update, and the
closed-form backward of the training-mode normalization.
"""

from __future__ import annotations

import numpy as np


def _axes(ndim, axis):
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  features = sorted(a % ndim for a in axis)
  return tuple(a for a in range(ndim) if a not in features), features


def _features(value, x_shape, features):
  """A (*F,) array shaped to broadcast against x."""
  shape = [x_shape[a] if a in features else 1 for a in range(len(x_shape))]
  return np.asarray(value, np.float64).reshape(shape)


def moments(x, reduced, mask=None):
  """Mean, biased variance and count per channel (keepdims), over the masked elements."""
  x = np.asarray(x, np.float64)
  m = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask, np.float64), x.shape)
  n = m.sum(reduced, keepdims=True)
  mean = (x * m).sum(reduced, keepdims=True) / np.maximum(n, 1)
  var = ((x - mean) ** 2 * m).sum(reduced, keepdims=True) / np.maximum(n, 1)
  return mean, var, n


def batch_norm(x, params, stats, *, training, axis=-1, momentum=0.99, epsilon=1e-5,
               update_stats=True, running_variance="biased", mask=None, variance=None):
  """Returns (y, new_stats) in float64.

  ``variance`` names bnjax's algorithm; every algorithm estimates the same exact value, so the
  oracle ignores it.
  """
  x = np.asarray(x, np.float64)
  reduced, features = _axes(x.ndim, axis)
  feature_shape = tuple(x.shape[a] for a in features)
  scale = _features(params.get("scale", np.ones(feature_shape)), x.shape, features)
  bias = _features(params.get("bias", np.zeros(feature_shape)), x.shape, features)
  new_stats = {k: np.asarray(v) for k, v in stats.items()}
  if training:
    mean, var, n = moments(x, reduced, mask)
    if update_stats:
      stored_var = var * n / np.maximum(n - 1, 1) if running_variance == "unbiased" else var
      if "count" in stats:
        new_stats["count"] = np.asarray(stats["count"]) + 1
      w = momentum if momentum is not None else 1.0 - 1.0 / float(new_stats["count"])
      seen = n.reshape(feature_shape) > 0
      for key, batch in (("mean", mean), ("var", stored_var)):
        old = np.asarray(stats[key], np.float64)
        new_stats[key] = np.where(seen, w * old + (1 - w) * batch.reshape(feature_shape), old)
  else:
    mean = _features(stats["mean"], x.shape, features)
    var = _features(stats["var"], x.shape, features)
  y = (x - mean) / np.sqrt(var + epsilon) * scale + bias
  return y, new_stats


def training_grads(x, dy, *, scale=None, axis=-1, epsilon=1e-5, mask=None):
  """Closed-form (dx, dscale, dbias) of y = (x - mean_B) / sqrt(var_B + eps) * scale + bias.

  With g = scale / sqrt(var + eps), xhat = (x - mean) * (1 / sqrt(var + eps)), m the mask and
  n its count, and sums over all elements of the channel (every element is normalized):
      dbias  = sum(dy)
      dscale = sum(dy * xhat)
      dx     = g * dy - m * g / n * (sum(dy) + xhat * sum(dy * xhat))
  """
  x = np.asarray(x, np.float64)
  dy = np.asarray(dy, np.float64)
  reduced, features = _axes(x.ndim, axis)
  feature_shape = tuple(x.shape[a] for a in features)
  scale = _features(np.ones(feature_shape) if scale is None else scale, x.shape, features)
  mean, var, n = moments(x, reduced, mask)
  m = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask, np.float64), x.shape)
  inv = 1 / np.sqrt(var + epsilon)
  xhat = (x - mean) * inv
  sum_dy = dy.sum(reduced, keepdims=True)
  sum_dy_xhat = (dy * xhat).sum(reduced, keepdims=True)
  g = scale * inv
  dx = g * dy - m * g / np.maximum(n, 1) * (sum_dy + xhat * sum_dy_xhat)
  return dx, sum_dy_xhat.reshape(feature_shape), sum_dy.reshape(feature_shape)
