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


def inverse_stddev(var, epsilon, n=None):
  """1 / sqrt(var + epsilon), defined as 0 where var + epsilon is 0 or the channel is empty.

  Both cases have no spread to normalize by: a constant channel with epsilon = 0 (every centred
  value is 0), or a masked channel with no valid element. xhat is 0 there, so y is the bias.
  """
  total = np.asarray(var, np.float64) + epsilon
  defined = total > 0 if n is None else (total > 0) & (n > 0)
  return np.where(defined, 1 / np.sqrt(np.where(defined, total, 1)), 0.0)


def batch_norm(
  x,
  params,
  stats,
  *,
  training,
  axis=-1,
  momentum=0.99,
  epsilon=1e-5,
  update_stats=True,
  running_variance="biased",
  mask=None,
  variance=None,
  renorm=False,
  renorm_clipping=None,
  renorm_momentum=0.99,
  virtual_batch_size=None,
  adjustment=None,
  zero_debias=None,
):
  """Returns (y, new_stats) in float64, from the textbook definitions.

  ``variance`` names bnjax's algorithm; every algorithm estimates the same exact value, so the
  oracle ignores it. TensorFlow's training features follow the batch-renorm paper and tf_keras's
  documented behaviour: ``y = ((xhat * r + d) * a + b) * scale + bias``; virtual batch ``j``
  holds examples ``i`` with ``i % (N // size) == j``, and the running statistics move once
  toward the groups' average; zero-debiased averages are EMAs from 0 divided by ``1 - m^t``.
  """
  x = np.asarray(x, np.float64)
  reduced, features = _axes(x.ndim, axis)
  feature_shape = tuple(x.shape[a] for a in features)
  scale = _features(params.get("scale", np.ones(feature_shape)), x.shape, features)
  bias = _features(params.get("bias", np.zeros(feature_shape)), x.shape, features)
  new_stats = {k: np.asarray(v) for k, v in stats.items()}
  if not training:
    mean = _features(stats["mean"], x.shape, features)
    var = _features(stats["var"], x.shape, features)
    return (x - mean) * inverse_stddev(var, epsilon) * scale + bias, new_stats

  xs, ms, group_axis = x, mask, None
  if virtual_batch_size:  # example i -> row i // groups, column (group) i % groups
    groups = x.shape[0] // virtual_batch_size
    xs = x.reshape((virtual_batch_size, groups, *x.shape[1:]))
    if mask is not None:
      ms = np.broadcast_to(mask, x.shape).reshape(xs.shape)
    reduced, group_axis = (0, *tuple(a + 1 for a in reduced if a != 0)), 1
    scale, bias = scale[None], bias[None]
  mean, var, n = moments(xs, reduced, ms)
  xhat = (xs - mean) * inverse_stddev(var, epsilon, n)

  def per_feature(v):  # group averages, as (*F,)
    v = np.broadcast_to(v, mean.shape)
    return (v if group_axis is None else v.mean(group_axis, keepdims=True)).reshape(feature_shape)

  batch_mean, batch_var = per_feature(mean), per_feature(var)
  if running_variance == "unbiased":
    var = var * n / np.maximum(n - 1, 1)
  running_var = per_feature(var)
  seen = per_feature(n) > 0
  a, b = (
    (1.0, 0.0) if adjustment is None else (np.asarray(v, np.float64) for v in adjustment(xs.shape))
  )
  r, d = 1.0, 0.0
  if renorm:
    sigma = np.maximum(np.asarray(stats["renorm_stddev"], np.float64), np.sqrt(epsilon))
    r = np.sqrt(batch_var + epsilon) / sigma
    d = (batch_mean - stats["renorm_mean"]) / sigma
    clip = renorm_clipping or {}
    r = np.clip(r, clip.get("rmin", -np.inf), clip.get("rmax", np.inf))
    d = np.clip(d, -clip.get("dmax", np.inf), clip.get("dmax", np.inf))
    shape = [1] * xs.ndim
    for f, size in zip(
      features if group_axis is None else [f + 1 for f in features], feature_shape
    ):
      shape[f] = size
    r, d = r.reshape(shape), d.reshape(shape)
  y = (((xhat * r + d) * a + b) * scale + bias).reshape(x.shape)
  if not update_stats:
    return y, new_stats

  t = int(stats["count"]) if "count" in stats else None
  if t is not None:
    new_stats["count"] = np.asarray(stats["count"]) + 1

  def weight(debiased):
    if momentum is None:
      return 1.0 - 1.0 / (t + 1)
    return momentum * (1 - momentum**t) / (1 - momentum ** (t + 1)) if debiased else momentum

  def move(key, target, w):
    old = np.asarray(stats[key], np.float64)
    return np.where(seen, w * old + (1 - w) * target, old)

  new_stats["mean"] = move("mean", batch_mean, weight(zero_debias in ("mean", "mean_and_var")))
  if not renorm:
    new_stats["var"] = move("var", running_var, weight(zero_debias == "mean_and_var"))
    return y, new_stats
  new_stats["stddev"] = move("stddev", np.sqrt(running_var + epsilon), momentum)
  new_stats["var"] = np.maximum(new_stats["stddev"] ** 2 - epsilon, 0)
  new_stats["renorm_mean"] = move("renorm_mean", batch_mean, renorm_momentum)
  new_stats["renorm_stddev"] = move("renorm_stddev", np.sqrt(batch_var + epsilon), renorm_momentum)
  return y, new_stats


def training_grads(x, dy, *, scale=None, axis=-1, epsilon=1e-5, mask=None):
  """Closed-form (dx, dscale, dbias) of y = (x - mean_B) / sqrt(var_B + eps) * scale + bias.

  With g = scale * inv, inv = inverse_stddev(var, eps, n), xhat = (x - mean) * inv, m the mask and
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
  inv = inverse_stddev(var, epsilon, n)
  xhat = (x - mean) * inv
  sum_dy = dy.sum(reduced, keepdims=True)
  sum_dy_xhat = (dy * xhat).sum(reduced, keepdims=True)
  g = scale * inv
  dx = g * dy - m * g / np.maximum(n, 1) * (sum_dy + xhat * sum_dy_xhat)
  return dx, sum_dy_xhat.reshape(feature_shape), sum_dy.reshape(feature_shape)
