"""The normalization formula, and its closed-form derivative when the statistics come from x.

``affine`` is the one formula every branch of ``batch_norm`` uses::

    y = (x - shift) * (scale * inv) + offset,   inv = rsqrt(var + epsilon)

In evaluation ``shift`` is the running mean. In training it is the batch moments' shift K, taken
from the data (``_stats``), and the mean's small correction ``delta`` moves into the offset:
``offset - delta * scale * inv``. Both terms stay small at any offset, where ``x - mean`` with a
float32 mean would carry ~1 ulp of the offset. Where ``var + epsilon`` is 0 (a constant channel
with ``epsilon=0``) or a masked channel holds no valid element, ``inv`` is 0: ``x - mean`` is 0
there, or nothing counts, and ``y = offset`` instead of 0 * inf.

``with_batch_moments`` takes the moments from ``x`` itself and, by default, differentiates in
closed form. With ``s = x - shift`` and ``c = s - delta`` (= x - mean), ``m`` the mask (1
without one), ``N`` the count, sums over the reduced axes (and the devices of ``axis_name``),
and ``g_mean``, ``g_var`` the cotangents of the returned moments::

    d offset = S1 = sum(dy)
    d scale  = S2 * inv,  S2 = sum(dy * c) = sum(dy * s) - delta * S1      (= sum(dy * xhat))
    c1       = (scale * inv * S1 - g_mean) / N
    c2       = (scale * inv^3 * S2 - 2 * g_var) / N
    dx       = scale * inv * dy - m * (c2 * s + (c1 - c2 * delta))          (c1 + c2 * c)

Two reductions and one elementwise pass, about 5|x| of memory traffic, where autodiff of the
forward moves 15-24|x| on XLA:CPU (``benchmarks/NOTES.md``). With a mask, a masked-out
element whose ``dy`` or ``dy * c`` is not finite (NaN or inf padding, under a masked loss)
adds nothing to ``S1`` and ``S2``, so the valid rows' gradients and the parameters' stay finite
and equal to those with finite padding; finite padding counts in full, as every normalized
element does. Autodiff (``backward='autodiff'``) follows JAX's rules there: 0 * NaN = NaN.
The price of the closed form is JAX's rule for ``custom_vjp``: forward-mode differentiation of
``batch_norm`` itself (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) raises, and
``backward='autodiff'`` is there for it. Reverse mode at any order and
forward-over-reverse (``jax.hessian``) work either way. Batch renormalization needs the moments
before it normalizes, and takes ``with_moments``, autodiff.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import _stats
from bnjax._types import Backward, Variance


def affine(x, shift, multiplier, offset, *, out_dtype):
  """y = (x - shift) * multiplier + offset in ``shift``'s dtype (offset None: 0), as ``out_dtype``.

  The subtraction comes first: folding it into the offset (``x * m + (offset - shift * m)``,
  TensorFlow's order) cancels catastrophically when |shift| >> std.
  """
  dtype = shift.dtype  # complex for a complex running mean; its multiplier and offset are real
  y = (x.astype(dtype) - shift) * multiplier.astype(dtype)
  if offset is not None:
    y = y + offset.astype(dtype)
  return y.astype(out_dtype)


def inverse_stddev(var, *, epsilon, count=None):
  """``rsqrt(var + epsilon)`` in ``var``'s dtype; 0 where that is 0, or where ``count`` is 0.

  NaN where the variance overflowed to inf (float32 sums of squares past ~3.4e38, a spread
  beyond ~1.8e19 / sqrt(n)): the output then shows the overflow instead of a silent ``bias``.
  """
  total = var + jnp.asarray(epsilon, var.dtype)
  positive = total > 0
  # The inner where keeps rsqrt's derivative at 0 (inf) out of the gradient.
  inv = jnp.where(positive, lax.rsqrt(jnp.where(positive, total, 1)), 0)
  inv = jnp.where(jnp.isinf(total), jnp.nan, inv)
  return inv if count is None else jnp.where(count > 0, inv, 0)


def multiplier(var, scale, *, epsilon, count=None):
  """The per-channel ``scale * inverse_stddev(var)`` (scale None: 1), in ``var``'s dtype."""
  inv = inverse_stddev(var, epsilon=epsilon, count=count)
  return inv if scale is None else inv * scale


class Reduction(NamedTuple):
  """How the batch moments are taken, and the output's dtype (static, hashable)."""

  axes: tuple[int, ...]
  axis_name: Any
  axis_index_groups: Any  # a tuple of tuples, or None
  variance: Variance
  epsilon: float
  out_dtype: Any


def with_batch_moments(
  x, mask, scale, offset, *, reduction: Reduction, backward: Backward
) -> tuple[jax.Array, _stats.Moments]:
  """``(y, moments)``: ``x`` normalized with its own batch moments (``_stats.batch_moments``).

  ``scale`` and ``offset`` (None: 1 and 0) broadcast against ``x`` in the statistics' dtype.
  ``backward='closed_form'`` differentiates with the formulas of the module docstring,
  ``'autodiff'`` through the forward computation. An ``adjustment`` that varies along the
  reduced axes takes the autodiff path (the closed form assumes per-channel values). Without a
  mask, float32 and float64 ``x`` is computed on its ``_CollapsedView``, the same computation
  in fewer axes (one call on the view, which does not collapse further).
  """
  per_channel = all(_per_channel(v, reduction.axes, x.ndim) for v in (scale, offset))
  view = _CollapsedView.of(x.shape, reduction.axes)
  # Not for float16/bfloat16: XLA:CPU then writes x's float32 conversion out once per
  # reduction instead of once (bfloat16 step 36 -> 48 ms at (32, 56, 56, 128); NOTES.md, J).
  if (
    mask is None and per_channel and view.shape != x.shape and x.dtype == _stats.stat_dtype(x.dtype)
  ):
    y, moments = with_batch_moments(
      x.reshape(view.shape),
      None,
      *(view.per_channel(v) for v in (scale, offset)),
      reduction=reduction._replace(axes=view.axes),
      backward=backward,
    )
    return y.reshape(x.shape), view.restore(moments)
  if backward == "autodiff" or not per_channel:
    return _forward(reduction, x, mask, scale, offset)
  scale, offset = (_varying_like(x, v, reduction.axis_name) for v in (scale, offset))
  try:
    return _closed_form(reduction, x, mask, scale, offset)
  except TypeError as error:  # JAX's refusal of forward mode through a custom_vjp
    if "forward-mode" not in str(error):
      raise
    raise TypeError(
      "bnjax.batch_norm: forward-mode differentiation (jax.jvp, jax.jacfwd, jax.linearize)"
      " of the closed-form backward (backward='closed_form', the default) is not possible."
      " Hint: pass backward='autodiff', which JAX differentiates in both modes."
    ) from error


class _CollapsedView(NamedTuple):
  """``x`` seen with each run of adjacent reduced axes, and of adjacent kept axes, as one axis.

  NHWC reduced over (0, 1, 2) becomes (N*H*W, C) over (0,); NCHW over (0, 2, 3) becomes
  (N, C, H*W) over (0, 2). A row-major reshape, free in XLA; XLA:CPU's reductions and
  elementwise passes run up to 1.3x faster on the collapsed view (``benchmarks/NOTES.md``, J).
  """

  moments_shape: tuple[int, ...]  # x's shape with 1 on the reduced axes
  shape: tuple[int, ...]  # the collapsed shape
  axes: tuple[int, ...]  # its reduced axes

  @classmethod
  def of(cls, shape, axes) -> _CollapsedView:
    runs = []  # [reduced?, size] per run of adjacent axes of one kind
    for a, size in enumerate(shape):
      if runs and runs[-1][0] == (a in axes):
        runs[-1][1] *= size
      else:
        runs.append([a in axes, size])
    return cls(
      moments_shape=tuple(1 if a in axes else size for a, size in enumerate(shape)),
      shape=tuple(size for _, size in runs),
      axes=tuple(i for i, (reduced, _) in enumerate(runs) if reduced),
    )

  def per_channel(self, value):
    """A per-channel ``value`` (None, or broadcastable to ``moments_shape``) on the view."""
    if value is None:
      return None
    collapsed = tuple(1 if a in self.axes else size for a, size in enumerate(self.shape))
    return jnp.broadcast_to(value, self.moments_shape).reshape(collapsed)

  def restore(self, moments: _stats.Moments) -> _stats.Moments:
    """The view's moments shaped like x's again (count is a scalar without a mask)."""
    shaped = (v.reshape(self.moments_shape) for v in (moments.shift, moments.delta, moments.var))
    return moments._replace(**dict(zip(("shift", "delta", "var"), shaped)))


def with_moments(x, moments: _stats.Moments, scale, offset, *, reduction: Reduction):
  """``affine`` with given ``moments``, differentiated by JAX (renorm needs them first)."""
  # The barrier keeps XLA from sharing `x - mean` between the variance and the output: shared,
  # XLA:CPU writes it out in full (one more write and read of x); apart, each pass recomputes
  # it in its own fusion: 17.0 -> 12.7 ms for (32, 56, 56, 128) f32 on 2 CPU cores
  # (benchmarks/NOTES.md).
  moments = lax.optimization_barrier(moments)
  m = multiplier(moments.var, scale, epsilon=reduction.epsilon, count=moments.count)
  return affine(
    x, moments.shift, m, _stats.centering_offset(moments, m, offset), out_dtype=reduction.out_dtype
  )


def complex_with_batch_moments(x, mask, scale, offset, *, reduction: Reduction):
  """``(y, moments)`` for complex ``x``, as Flax normalizes it, differentiated by JAX.

  The real and imaginary parts are normalized as a pair of real channels that share one
  variance, ``|x - mean|^2 = (re - mean_re)^2 + (im - mean_im)^2``, each part with its own
  accurate moments; ``scale`` multiplies both parts and ``offset`` (the real bias) joins the
  real part::

      y = (x - mean) * (scale * rsqrt(var_re + var_im + epsilon)) + offset

  The returned moments have a complex shift and correction and the real variance.
  """
  pairs = _stats.as_pairs(x)
  moments = _stats.batch_moments(
    pairs,
    reduction.axes,
    mask=None if mask is None else jnp.expand_dims(mask, -1),
    axis_name=reduction.axis_name,
    axis_index_groups=reduction.axis_index_groups,
    variance=reduction.variance,
    pairs=True,
  )
  pair_offset = None if offset is None else jnp.stack([offset, jnp.zeros_like(offset)], -1)
  y = with_moments(
    pairs,
    moments,
    None if scale is None else jnp.expand_dims(scale, -1),
    pair_offset,
    reduction=reduction._replace(out_dtype=moments.var.dtype),
  )
  return lax.complex(y[..., 0], y[..., 1]).astype(reduction.out_dtype), _stats.of_pairs(moments)


def _forward(reduction: Reduction, x, mask, scale, offset):
  moments = _stats.batch_moments(
    x,
    reduction.axes,
    mask=mask,
    axis_name=reduction.axis_name,
    axis_index_groups=reduction.axis_index_groups,
    variance=reduction.variance,
  )
  return with_moments(x, moments, scale, offset, reduction=reduction), moments


def _per_channel(value, axes, ndim) -> bool:
  """Whether ``value`` is constant along the reduced ``axes``."""
  if value is None:
    return True
  shape = (1,) * (ndim - value.ndim) + value.shape
  return all(shape[a] == 1 for a in axes)


def _varying_like(x, value, axis_name):
  """``value`` cast to vary over the ``axis_name`` axes that ``shard_map`` says ``x`` varies over.

  A replicated (invariant) parameter needs an invariant cotangent. Autodiff gets one by
  transposing the implicit cast into a ``psum``; the ``custom_vjp`` returns per-device sums,
  so the cast is made explicit here, outside it, where JAX transposes it.
  """
  if value is None or axis_name is None:
    return value
  names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
  x_varying = getattr(getattr(jax.typeof(x), "mat", None), "varying", frozenset())
  value_varying = getattr(getattr(jax.typeof(value), "mat", None), "varying", frozenset())
  missing = tuple(n for n in names if n in x_varying and n not in value_varying)
  return lax.pcast(value, missing, to="varying") if missing else value


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _closed_form(reduction: Reduction, x, mask, scale, offset):
  return _forward(reduction, x, mask, scale, offset)


def _closed_form_fwd(reduction: Reduction, x, mask, scale, offset):
  # Plain JAX: under an outer derivative (second order) the residuals carry x's tangents.
  y, moments = _forward(reduction, x, mask, scale, offset)
  return (y, moments), (x, mask, scale, offset, moments)


def _closed_form_bwd(reduction: Reduction, residuals, cotangents):
  x, mask, scale, offset, moments = residuals
  dy, moments_cotangent = cotangents
  dtype = moments.var.dtype
  dy = dy.astype(dtype)
  inv = inverse_stddev(moments.var, epsilon=reduction.epsilon, count=moments.count)
  # Each full-size pass centres x itself: behind a barrier, XLA cannot share the centred values
  # with the forward's variance pass (which would write them out in full).
  shift, delta = lax.optimization_barrier((moments.shift, moments.delta))
  dy_shifted = dy * (x.astype(dtype) - shift)
  if mask is not None:  # padding may hold NaN or inf: its non-finite terms add nothing
    dy, dy_shifted = (jnp.where(mask | jnp.isfinite(v), v, 0) for v in (dy, dy_shifted))
  s1 = jnp.sum(dy, reduction.axes, keepdims=True)
  s2 = jnp.sum(dy_shifted, reduction.axes, keepdims=True) - delta * s1
  m = inv if scale is None else inv * scale
  # The returned moments' own cotangents (zero when only y is differentiated) join the sums.
  # The shift carries no derivative (it is a constant of the forward), so the mean's cotangent
  # is the delta's.
  t1 = m * s1 - moments_cotangent.delta
  # inv^2 multiplies the sum, not each element: one multiply fewer per element, 2-4% of the
  # step on XLA:CPU (benchmarks/NOTES.md, J).
  t2 = m * s2 * jnp.square(inv) - 2 * moments_cotangent.var
  if reduction.axis_name is not None:
    t1, t2 = lax.psum((t1, t2), reduction.axis_name, axis_index_groups=reduction.axis_index_groups)
  n = jnp.maximum(moments.count, 1)
  shift, delta, m, c1, c2 = lax.optimization_barrier(
    (moments.shift, moments.delta, m, t1 / n, t2 / n)
  )
  correction = c2 * (x.astype(dtype) - shift) + (c1 - c2 * delta)
  if mask is not None:
    correction = jnp.where(mask, correction, 0)
  dx = (m * dy - correction).astype(x.dtype)
  dscale = None if scale is None else _sum_to(s2 * inv, scale)
  doffset = None if offset is None else _sum_to(s1, offset)
  return dx, None, dscale, doffset


def _sum_to(total, like):
  """``total`` (x's rank, reduced axes of size 1) summed to ``like``'s broadcastable shape."""
  extra = total.ndim - like.ndim
  axes = tuple(range(extra)) + tuple(
    extra + i for i, size in enumerate(like.shape) if size == 1 and total.shape[extra + i] != 1
  )
  return jnp.sum(total, axes).reshape(like.shape).astype(like.dtype)


_closed_form.defvjp(_closed_form_fwd, _closed_form_bwd)
