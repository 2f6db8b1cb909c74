"""Batch statistics: per-device moments, masks, and the count-weighted cross-device combine.

All statistics are computed in ``promote_types(x.dtype, float32)``: float16 and bfloat16 inputs get
float32 statistics, float64 inputs keep float64.

Each device first reduces its own elements to three numbers per channel (Chan, Golub and LeVeque,
"Algorithms for computing the sample variance", 1983):

    n    = number of (unmasked) elements
    mean = sum(x) / n
    M2   = sum((x - mean)^2)

then, with ``axis_name``, the devices exchange these triples in ONE ``all_gather`` and combine
them exactly, weighting by count:

    N    = sum_d n_d
    mean = sum_d n_d * mean_d / N
    M2   = sum_d M2_d + sum_d n_d * (mean_d - mean)^2
    var  = M2 / N

This is exact for devices holding different numbers of valid elements (a mean of per-device means
is not), and stable: no sum of squares of large values is ever formed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import _checks


class Moments(NamedTuple):
  """Statistics over the reduced axes, shaped to broadcast against ``x`` (size 1 on reduced axes)."""

  mean: jax.Array  # stat dtype, x.shape with 1 on reduced axes
  var: jax.Array  # stat dtype, same shape; biased: M2 / N, never negative
  count: jax.Array  # stat dtype, scalar, or same shape as mean when masked: N


SHIFT_FRACTION = 64  # 'shifted' takes K from the leading 1/64 of the first reduced axis


def resolve_variance(variance: str) -> str:
  """``'auto'``: ``'two_pass'`` on CPU, ``'shifted'`` on accelerators (GPU, TPU).

  Both are accurate for any data. XLA:GPU computes the shifted sums in one read of x (one
  multi-output reduction), 3|x| of traffic in training forward against two-pass's 4|x|;
  XLA:CPU reduces each sum in its own pass, where two-pass is as fast and exact
  (``benchmarks/NOTES.md``). The backend is JAX's default backend at trace time.
  """
  if variance != "auto":
    return variance
  return "two_pass" if jax.default_backend() == "cpu" else "shifted"


def stat_dtype(x_dtype) -> jnp.dtype:
  """The dtype statistics are computed and returned in: at least float32."""
  x_dtype = jnp.dtype(x_dtype)
  return x_dtype if x_dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def _local(x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None, variance: str):
  """Per-device ``(n, mean, M2)`` over ``axes``, keeping reduced axes as size 1.

  The three ``variance`` algorithms differ only in the shift ``K`` the sums are taken about,

      d = x - K,  mean = K + sum(d) / n,  M2 = sum(d^2) - sum(d)^2 / n  (clamped at 0),

  - ``'two_pass'``: K = mean(x), computed in a first pass; the correction term is then ~0 and
    is dropped (M2 = sum((x - mean)^2)). Accurate for any data.
  - ``'shifted'``: K = the mean of the leading 1/64 of the first reduced axis (at least one
    entry along it; ``batch_norm`` passes float32 NHWC as (N*H*W, C), so 1/64 of the rows), a
    small extra read; then both sums come from one read of x. Accurate for any data: a part
    holding a fraction f >= 1/64 of the elements has a mean within sqrt((1 - f) / f) standard
    deviations of the whole's, so (K - mean)^2 / var <= 63 and the cancellation costs at most
    ~64 float32 ulps (7.6e-6 relative). With a mask the leading part may be padding, so the
    mean is used instead (two passes).
  - ``'fast'``: K = 0, the textbook E[x^2] - E[x]^2 (Flax's default). It loses about
    log10(mean^2 / var) of float32's ~7 digits: at mean 1e4 and variance 1 nothing is left,
    and without the clamp the variance would come out negative.
  """
  dtype = stat_dtype(x.dtype)
  x = x.astype(dtype)
  if mask is None:
    count = jnp.asarray(math.prod(x.shape[a] for a in axes), dtype)

    def total(v):
      return jnp.sum(v, axes, keepdims=True)
  else:
    mask = jnp.broadcast_to(mask, x.shape)
    count = jnp.sum(mask, axes, keepdims=True, dtype=dtype)

    def total(v):
      return jnp.sum(jnp.where(mask, v, 0), axes, keepdims=True)

  safe_count = jnp.maximum(count, 1)  # an empty channel gets mean 0, var 0
  if variance == "two_pass" or (variance == "shifted" and mask is not None):
    mean = total(x) / safe_count
    return count, mean, total(jnp.square(x - mean))
  if variance == "shifted":
    lead = axes[0]
    part = lax.slice_in_dim(x, 0, -(-x.shape[lead] // SHIFT_FRACTION), axis=lead)
    shift = lax.stop_gradient(jnp.mean(part, axes, keepdims=True))
  else:
    shift = jnp.zeros((), dtype)
  centered = x - shift
  sum1, sum2 = total(centered), total(jnp.square(centered))
  mean = shift + sum1 / safe_count
  return count, mean, jnp.maximum(sum2 - jnp.square(sum1) / safe_count, 0)


def _gather_type(local, axis_name, axis_index_groups) -> str:
  """'invarying' where ``shard_map`` tracks that ``local`` varies over ``axis_name``.

  The combined statistics are then typed as replicated, so ``out_specs=P()`` works for the new
  running statistics. ``pmap`` and ``vmap`` do not track this (and the invariant gather's
  transpose is only right where they do), nor can a gather within groups be replicated.
  """
  names = set(axis_name) if isinstance(axis_name, (tuple, list)) else {axis_name}
  varying = getattr(getattr(jax.typeof(local), "mat", None), "varying", frozenset())
  return "invarying" if axis_index_groups is None and names <= varying else "varying"


def _combine_devices(count, mean, m2, axis_name, axis_index_groups):
  """Count-weighted combination of per-device ``(n, mean, M2)`` in one all_gather."""
  pieces = [count.reshape(-1), mean.reshape(-1), m2.reshape(-1)]
  sizes = [p.size for p in pieces]
  local = jnp.concatenate(pieces)
  gathered = lax.all_gather(
      local, axis_name, axis_index_groups=axis_index_groups,
      to=_gather_type(local, axis_name, axis_index_groups),
  )
  counts, means, m2s = jnp.split(gathered, [sizes[0], sizes[0] + sizes[1]], axis=1)
  total = jnp.sum(counts, 0)
  combined_mean = jnp.sum(counts * means, 0) / jnp.maximum(total, 1)
  combined_m2 = jnp.sum(m2s, 0) + jnp.sum(counts * jnp.square(means - combined_mean), 0)
  total = total.reshape(count.shape)
  return total, combined_mean.reshape(mean.shape), combined_m2.reshape(m2.shape)


def batch_moments(
    x: jax.Array,
    axes: tuple[int, ...],
    *,
    mask: jax.Array | None,
    axis_name,
    axis_index_groups,
    variance: str,
) -> Moments:
  """Mean, biased variance and count over ``axes`` (and over devices of ``axis_name``).

  Inputs are assumed checked; see ``moments`` for the public, checked version.
  """
  count, mean, m2 = _local(x, axes, mask, variance)
  if axis_name is not None:
    count, mean, m2 = _combine_devices(count, mean, m2, axis_name, axis_index_groups)
  return Moments(mean=mean, var=m2 / jnp.maximum(count, 1), count=count)


def moments(
    x: jax.Array,
    axes,
    *,
    mask: jax.Array | None = None,
    axis_name=None,
    axis_index_groups=None,
    variance: str = "auto",
) -> tuple[jax.Array, jax.Array]:
  """Batch mean and (biased) variance of ``x`` over ``axes``, like ``tf.nn.moments``.

  Args:
    x: floating array.
    axes: the axes to reduce (an int or a tuple; negative allowed). The remaining axes are
      the features; the results have their shape.
    mask: optional boolean array broadcastable to ``x``; only True elements count. A feature
      with no True element gets mean 0 and variance 0.
    axis_name: a mapped axis (shard_map, pmap, vmap) whose devices share statistics,
      count-weighted, in one ``all_gather``.
    axis_index_groups: optional groups of indices of ``axis_name`` that share statistics.
    variance: ``'auto'`` (default: ``'two_pass'`` on CPU, ``'shifted'`` on GPU/TPU; see
      ``resolve_variance``), ``'two_pass'`` (accurate for any data), ``'shifted'`` (sums about
      the mean of a leading 1/64 of x, one read of x, accurate for any data) or ``'fast'``
      (E[x^2] - E[x]^2, clamped at 0; inaccurate when |mean| >> std).

  Returns:
    ``(mean, var)``, each of the features' shape, in ``promote_types(x.dtype, float32)``.
  """
  fn = "moments"
  x = _checks.floating_input(fn, x)
  axes = _checks.canonical_axes(fn, "axes", axes, x.ndim)
  mask = _checks.mask(fn, mask, x.shape)
  variance = resolve_variance(_checks.choice(fn, "variance", variance, _checks.VARIANCE_ALGORITHMS))
  _checks.axis_name(fn, axis_name, axis_index_groups)
  m = batch_moments(
      x, axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups,
      variance=variance,
  )
  return jnp.squeeze(m.mean, axes), jnp.squeeze(m.var, axes)
