"""Batch renormalization (Ioffe, 2017), as tf_keras computes it.

With batch statistics ``mean_B``, ``var_B`` and the renorm moving averages ``renorm_mean``,
``renorm_stddev`` from before this step:

    stddev_B = sqrt(var_B + epsilon)
    sigma    = max(renorm_stddev, sqrt(epsilon))      (no division by ~0 early in training)
    r = clip(stddev_B / sigma, rmin, rmax)             (no gradient)
    d = clip((mean_B - renorm_mean) / sigma, -dmax, dmax)   (no gradient)
    y = (xhat * r + d) * scale + bias,  xhat = (x - mean_B) / stddev_B

so the layer trains on statistics that agree with the ones used in inference. The renorm
averages move with ``renorm_momentum`` toward ``mean_B`` and ``stddev_B``; the inference
statistics track ``stddev`` = EMA of ``stddev_B`` (with ``momentum``) and set
``var = max(stddev^2 - epsilon, 0)``, as tf_keras does. Clipping keys are tf_keras's:
``rmin``, ``rmax``, ``dmax``; a missing key means no clip on that side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._types import Stats


def add_init_stats(stats: Stats) -> Stats:
  """``stats`` with the running statistics renorm needs, initialized as tf_keras does (var = 1).

  They take the shape and dtype of ``stats['var']``.
  """
  like = stats["var"]
  return {
    **stats,
    "renorm_mean": jnp.zeros_like(like),
    "renorm_stddev": jnp.ones_like(like),
    "stddev": jnp.ones_like(like),
  }


def correction(mean, var, stats, *, epsilon, clipping) -> tuple[jax.Array, jax.Array]:
  """``(r, d)`` for feature-shaped batch statistics, from the pre-update renorm averages."""
  dtype = mean.dtype
  eps = jnp.asarray(epsilon, dtype)
  sigma = jnp.maximum(stats["renorm_stddev"].astype(dtype), jnp.sqrt(eps))
  r = jnp.sqrt(var + eps) / sigma
  d = (mean - stats["renorm_mean"].astype(dtype)) / sigma
  if clipping.get("rmin") is not None:
    r = jnp.maximum(r, jnp.asarray(clipping["rmin"], dtype))
  if clipping.get("rmax") is not None:
    r = jnp.minimum(r, jnp.asarray(clipping["rmax"], dtype))
  if clipping.get("dmax") is not None:
    dmax = jnp.asarray(clipping["dmax"], dtype)
    d = jnp.clip(d, -dmax, dmax)
  return lax.stop_gradient(r), lax.stop_gradient(d)
