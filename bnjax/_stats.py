"""Batch statistics: moments about a shift from the data, masks, and the cross-device combine.

All statistics are computed in ``promote_types(x.dtype, float32)``: float16 and bfloat16 inputs get
float32 statistics, float64 inputs keep float64.

**Shift plus correction.** At a large offset a float32 mean carries about one ulp of the offset,
and every formula that forms ``x - mean`` with it inherits that error: at ``1e6 + N(0, 1)`` it is
6% of a standard deviation. So the mean is kept in two parts, a per-channel shift ``K`` taken from
the data and a small correction ``delta``::

    K      = x0 + mean(lead - x0)      x0: an element of the channel; lead: a leading 1/64 of it
    d      = x - K                     exact where |x - K| <= |x| (Sterbenz), as at any large offset
    delta  = sum(d) / n                small: K is within a few standard deviations of the mean
    mean   = K + delta
    x - mean  is formed as  (x - K) - delta, both terms small; per element only x - K is
              formed, delta joins the per-channel constants (``centering_offset``),

and a channel whose elements are all equal has ``K`` equal to them, ``d = 0`` and everything
exactly 0. Each device reduces its own elements to ``(n, K, delta, M2)`` with ``M2 = sum((x -
mean)^2)`` (Chan, Golub and LeVeque, "Algorithms for computing the sample variance", 1983); with
``axis_name`` the devices exchange these in ONE ``all_gather`` (1 + 3C floats per device, 4C with
a mask) and combine them weighted by count, every mean re-expressed about one device's shift
``K*`` (that of the device with the most elements)::

    e_d    = (K_d - K*) + delta_d      device d's mean about K*, again a small exact difference
    N      = sum_d n_d
    delta  = sum_d n_d * e_d / N
    M2     = sum_d M2_d + sum_d n_d * (e_d - delta)^2
    var    = M2 / N

exact for devices holding different numbers of valid elements (a mean of per-device means is
not), with no sum of squares of large values ever formed. Where JAX cannot gather over the
axis names (a tuple naming nested ``vmap``s), ``_combine_by_sums`` does the same with two
``psum``s about the count-weighted mean of the shifts.

Complex input is normalized as real pairs (``as_pairs``): each part gets these moments, and the
variance is the sum of the two, ``mean(|x - mean|^2)``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from bnjax import _checks
from bnjax._types import Variance


class Moments(NamedTuple):
  """Statistics over the reduced axes, shaped to broadcast against ``x`` (size 1 on reduced axes).

  The mean is ``shift + delta``; normalize ``x - shift``, never ``x - mean``.
  """

  shift: jax.Array  # K: stat dtype, x.shape with 1 on reduced axes; from the data, no gradient
  delta: jax.Array  # mean - K, same shape; small
  var: jax.Array  # biased: M2 / N, same shape; never negative
  # N: stat dtype, scalar, or the shape of shift when masked; shadows tuple.count on purpose
  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]

  @property
  def mean(self) -> jax.Array:
    return self.shift + self.delta


def centering_offset(moments: Moments, multiplier: jax.Array, offset: jax.Array | None):
  """``offset - delta * multiplier``: ``(x - mean) * multiplier + offset`` is then computed as
  ``(x - shift) * multiplier + centering_offset``, both terms of the sum small (K is near the
  mean), one operation per element fewer than centring ``(x - shift) - delta`` first."""
  folded = -moments.delta * multiplier
  return folded if offset is None else offset + folded


SHIFT_FRACTION = 64  # the shift comes from the leading 1/64 of the first reduced axis


def resolve_variance(variance: Variance) -> Variance:
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
  """The real dtype statistics are computed in: at least float32 (complex64 input: float32)."""
  x_dtype = jnp.dtype(x_dtype)
  if jnp.issubdtype(x_dtype, jnp.complexfloating):
    x_dtype = jnp.finfo(x_dtype).dtype
  return x_dtype if x_dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def complex_dtype(real_dtype) -> jnp.dtype:
  """The complex dtype of a real statistics dtype: float32 -> complex64, float64 -> complex128."""
  return jnp.dtype(jnp.complex128 if jnp.dtype(real_dtype).itemsize == 8 else jnp.complex64)


def _shift(x, valid, count, *, axes):
  """``K = x0 + mean(lead - x0)``, per channel, over the valid elements (``valid`` None: all).

  ``x0`` is the channel's first element, or with a mask its largest valid one (the first valid
  one has no cheap gather; an empty channel gets 0). ``lead`` is the leading 1/64 of the first
  reduced axis, at least one entry along it. Where the lead holds no valid element, K = x0.
  With no reduced axis (rank-1 input), every element is its own channel and K = x.
  """
  if not axes:
    return x if valid is None else jnp.where(valid, x, 0)
  lead_size = -(-x.shape[axes[0]] // SHIFT_FRACTION)
  lead = lax.slice_in_dim(x, 0, lead_size, axis=axes[0])
  if valid is None:
    x0 = x[tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim))]
    return x0 + jnp.mean(lead - x0, axes, keepdims=True)
  largest = jnp.max(jnp.where(valid, x, -jnp.inf), axes, keepdims=True)
  x0 = jnp.where(count > 0, largest, 0)
  lead_valid = lax.slice_in_dim(valid, 0, lead_size, axis=axes[0])
  lead_count = jnp.sum(lead_valid, axes, keepdims=True, dtype=x.dtype)
  lead_sum = jnp.sum(jnp.where(lead_valid, lead - x0, 0), axes, keepdims=True)
  return x0 + lead_sum / jnp.maximum(lead_count, 1)


def _sharded_reduced_axes(x, axes):
  """x's explicit sharding with ``axes`` unsharded, or None where none of them is sharded.

  Under ``jit`` over a batch sharded with explicit axes (``jax.make_mesh``'s default), slicing a
  sharded axis to a size its shards do not divide is a type error; ``_shift`` then runs with
  those axes left to XLA (``jax.sharding.auto_axes``), which gathers just the slices.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if sharding is None or spec is None or all(spec[a] is None for a in axes if a < len(spec)):
    return None
  kept = tuple(None if a in axes else (spec[a] if a < len(spec) else None) for a in range(x.ndim))
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*kept))


def _local(
  x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None, variance: Variance
) -> Moments:
  """Per-device moments over ``axes``, with ``M2`` in the ``var`` field (not yet divided by n).

  The ``variance`` algorithms differ in the shift and in how ``M2`` is summed, with ``d = x - K``:

  - ``'two_pass'``: ``delta = sum(d) / n``, then ``M2 = sum((d - delta)^2)``. Two reads of x;
    accurate for any data.
  - ``'shifted'``: ``sum(d)`` and ``sum(d^2)`` in one read of x, then ``M2 = sum(d^2) -
    sum(d)^2 / n`` (clamped at 0). Accurate for any data: a part holding a fraction f >= 1/64
    of the elements has a mean within sqrt((1 - f) / f) standard deviations of the whole's, so
    (K - mean)^2 / var <= 63 and the cancellation costs at most ~64 float32 ulps (7.6e-6
    relative); for iid data K is within a few std / sqrt(n) of the mean and it costs nothing.
    With a mask whose lead holds no valid element of a channel, K there is its largest element.
  - ``'fast'``: sums about 0, the textbook E[x^2] - E[x]^2 (Flax's default), and the float32
    mean as the shift (delta 0), so y is Flax's too: ``(x - mean) * inv``. It loses about
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
  if variance == "fast":  # about 0, as Flax; the mean itself becomes the shift (delta is 0)
    sum_x = total(x)
    mean = sum_x / safe_count
    m2 = jnp.maximum(total(jnp.square(x)) - sum_x * mean, 0)
    shift = lax.stop_gradient(mean)
    return Moments(shift=shift, delta=mean - shift, var=m2, count=count)
  shift_of: Callable[..., jax.Array] = functools.partial(_shift, axes=axes)
  sharding = _sharded_reduced_axes(x, axes)
  if sharding is not None:
    shift_of = cast(
      Callable[..., jax.Array], jax.sharding.auto_axes(shift_of, out_sharding=sharding)
    )
  shift = lax.stop_gradient(shift_of(x, mask, count))
  sum_d = total(x - shift)
  delta = sum_d / safe_count
  # Behind the barrier XLA cannot share `x - shift` between the two reductions: shared, it
  # writes it out in full (one more write and read of x); apart, each fuses into its own pass.
  shift_again = lax.optimization_barrier(shift)
  if variance == "two_pass":
    m2 = total(jnp.square((x - shift_again) - delta))
  else:
    m2 = jnp.maximum(total(jnp.square(x - shift_again)) - sum_d * delta, 0)
  return Moments(shift=shift, delta=delta, var=m2, count=count)


def _gather_type(local, axis_name, axis_index_groups) -> str:
  """'invarying' where ``shard_map`` tracks that ``local`` varies over ``axis_name``.

  The combined statistics are then typed as replicated, so ``out_specs=P()`` works for the new
  running statistics. ``pmap`` and ``vmap`` do not track this (and the invariant gather's
  transpose is only right where they do), nor can a gather within groups be replicated.
  """
  names = set(axis_name) if isinstance(axis_name, (tuple, list)) else {axis_name}
  varying = getattr(getattr(jax.typeof(local), "mat", None), "varying", frozenset())
  return "invarying" if axis_index_groups is None and names <= varying else "varying"


def _combine_devices(local: Moments, axis_name, axis_index_groups) -> Moments:
  """Count-weighted combination of per-device moments (``var`` holding M2) in one all_gather.

  Where JAX cannot gather over ``axis_name`` (a tuple of names, some of them ``jax.vmap``'s:
  its batching rule for ``all_gather`` takes one vmapped name, and refuses such a tuple while
  tracing), ``_combine_by_sums`` combines them with two ``psum``s instead.
  """
  pieces = [v.reshape(-1) for v in local]  # shift, delta, M2: C floats each; count: 1 or C
  local_flat = jnp.concatenate(pieces)
  several_names = isinstance(axis_name, (tuple, list)) and len(axis_name) > 1
  try:
    gathered = lax.all_gather(
      local_flat,
      axis_name,
      axis_index_groups=axis_index_groups,
      to=_gather_type(local_flat, axis_name, axis_index_groups),
    )
  except Exception:
    if not several_names:
      raise
    return _combine_by_sums(local, axis_name, axis_index_groups)
  shifts, deltas, m2s, counts = jnp.split(
    gathered, list(itertools.accumulate(p.size for p in pieces[:-1])), axis=1
  )
  total = jnp.sum(counts, 0)
  counts = jnp.broadcast_to(counts, shifts.shape)
  # Every device's mean about one reference shift: that of the device with the most elements.
  reference = jnp.take_along_axis(shifts, jnp.argmax(counts, 0)[None], 0)[0]
  means_about_reference = (shifts - reference) + deltas
  delta = jnp.sum(counts * means_about_reference, 0) / jnp.maximum(total, 1)
  m2 = jnp.sum(m2s, 0) + jnp.sum(counts * jnp.square(means_about_reference - delta), 0)
  shape = local.shift.shape
  return Moments(
    shift=reference.reshape(shape),
    delta=delta.reshape(shape),
    var=m2.reshape(shape),
    count=total.reshape(local.count.shape),
  )


def _combine_by_sums(local: Moments, axis_name, axis_index_groups) -> Moments:
  """The count-weighted combination with two ``psum``s, for where ``all_gather`` is not allowed.

  The reference shift is the count-weighted mean of the devices' shifts, which lies within the
  data's range, so each device's mean about it is again a small difference::

      N, K*  = psum(n_d), psum(n_d * K_d) / N                       (first psum)
      e_d    = (K_d - K*) + delta_d
      delta  = psum(n_d * e_d) / N
      M2     = psum(M2_d + n_d * e_d^2) - N * delta^2               (second psum)

  ``delta`` is small next to the spread of the ``e_d`` (K* is near the mean), so the last
  subtraction loses at most a few ulps of M2.
  """

  def psum(values):
    return lax.psum(values, axis_name, axis_index_groups=axis_index_groups)

  count = jnp.broadcast_to(local.count, local.shift.shape)
  total, weighted_shifts = psum((count, count * local.shift))
  safe_total = jnp.maximum(total, 1)
  reference = weighted_shifts / safe_total
  about_reference = (local.shift - reference) + local.delta
  weighted_means, m2_about_reference = psum(
    (count * about_reference, local.var + count * jnp.square(about_reference))
  )
  delta = weighted_means / safe_total
  m2 = jnp.maximum(m2_about_reference - total * jnp.square(delta), 0)
  return Moments(
    shift=reference,
    delta=delta,
    var=m2,
    count=total if local.count.shape else jnp.reshape(total.ravel()[0], ()),
  )


def batch_moments(
  x: jax.Array,
  axes: tuple[int, ...],
  *,
  mask: jax.Array | None,
  axis_name,
  axis_index_groups,
  variance: Variance,
  pairs: bool = False,
) -> Moments:
  """Moments over ``axes`` (and over devices of ``axis_name``), with the biased variance.

  ``pairs=True``: ``x`` is ``as_pairs`` of complex input, and each pair's two variances are
  summed (both entries hold the sum). Inputs are assumed checked; see ``moments`` for the
  public, checked version.
  """
  local = _local(x, axes, mask, variance)
  if axis_name is not None:
    local = _combine_devices(local, axis_name, axis_index_groups)
  var = local.var / jnp.maximum(local.count, 1)
  if pairs:
    var = jnp.broadcast_to(jnp.sum(var, -1, keepdims=True), var.shape)
  return local._replace(var=var)


def as_pairs(x: jax.Array) -> jax.Array:
  """Complex ``x`` as real pairs on a new last axis: ``[..., 0]`` real, ``[..., 1]`` imaginary.

  Flax's complex batch norm has a complex mean and the real variance ``mean(|x - mean|^2)``,
  which is the sum of the two parts' variances; each part gets its own accurate moments.
  """
  return jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)


def of_pairs(moments: Moments) -> Moments:
  """The complex moments of ``batch_moments(as_pairs(x), ..., pairs=True)``."""

  def joined(v):
    return lax.complex(v[..., 0], v[..., 1])

  count = moments.count if moments.count.ndim == 0 else moments.count[..., 0]
  return Moments(
    shift=joined(moments.shift), delta=joined(moments.delta), var=moments.var[..., 0], count=count
  )


@jax.named_scope("bnjax.moments")
def moments(
  x: ArrayLike,
  axes: int | Sequence[int],
  *,
  mask: ArrayLike | None = None,
  axis_name: Hashable | Sequence[Hashable] | None = None,
  axis_index_groups: Sequence[Sequence[int]] | None = None,
  variance: Variance = "auto",
) -> tuple[jax.Array, jax.Array]:
  """Batch mean and (biased) variance of ``x`` over ``axes``, like ``tf.nn.moments``.

  Args:
    x: floating or complex array.
    axes: the axes to reduce (an int or a tuple; negative allowed). The remaining axes are
      the features; the results have their shape.
    mask: optional boolean array broadcastable to ``x``; only True elements count (masked-out
      NaN or inf included: they change nothing). A feature with no True element gets mean 0 and
      variance 0.
    axis_name: a mapped axis (shard_map, pmap, vmap) whose devices share statistics,
      count-weighted, in one ``all_gather``.
    axis_index_groups: optional groups of indices of ``axis_name`` that share statistics.
    variance: ``'auto'`` (default: ``'two_pass'`` on CPU, ``'shifted'`` on GPU/TPU; see
      ``resolve_variance``), ``'two_pass'`` or ``'shifted'`` (accurate at any offset; see
      ``_local``) or ``'fast'`` (E[x^2] - E[x]^2, clamped at 0; inaccurate when |mean| >> std).

  Returns:
    ``(mean, var)``, each of the features' shape, in ``promote_types(x.dtype, float32)``; for
    complex ``x`` the mean is complex and the variance is the real ``mean(|x - mean|^2)``.

  Example:
    >>> import jax.numpy as jnp, bnjax
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]]) + 1e6    # a large offset costs no accuracy
    >>> mean, var = bnjax.moments(x, 0)
    >>> var
    Array([  1., 100.], dtype=float32)
  """
  fn = "moments"
  x = _checks.floating_input(fn, x)
  axes = _checks.canonical_axes(fn, "axes", axes, x.ndim)
  mask = _checks.mask(fn, mask, x.shape)
  variance = resolve_variance(_checks.choice(fn, "variance", variance, _checks.VARIANCE_ALGORITHMS))
  _checks.axis_name(fn, axis_name, axis_index_groups)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    m = of_pairs(
      batch_moments(
        as_pairs(x),
        axes,
        mask=None if mask is None else jnp.expand_dims(mask, -1),
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        variance=variance,
        pairs=True,
      )
    )
  else:
    m = batch_moments(
      x,
      axes,
      mask=mask,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      variance=variance,
    )
  return jnp.squeeze(m.mean, axes), jnp.squeeze(m.var, axes)
