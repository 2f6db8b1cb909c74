"""What the Linen and NNX adapters share: Flax's argument spellings turned into bnjax's.

Only imported by ``bnjax.linen`` and ``bnjax.nnx``; no arithmetic here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes

from bnjax import _checks
from bnjax._types import Variance


def training_from_flag(fn: str, use_running_average: Any) -> bool | jax.Array:
  """``not use_running_average`` for a Python bool, ``logical_not`` for a boolean scalar array."""
  if isinstance(use_running_average, (bool, np.bool_)):
    return not use_running_average
  if (
    hasattr(use_running_average, "dtype")
    and hasattr(use_running_average, "shape")
    and use_running_average.dtype == jnp.bool_
    and use_running_average.shape == ()
  ):
    return jnp.logical_not(use_running_average)
  got = (
    f"{use_running_average.dtype}{list(use_running_average.shape)}"
    if hasattr(use_running_average, "dtype")
    else repr(use_running_average)
  )
  _checks.fail(
    fn,
    f"`use_running_average` must be a Python bool or a boolean scalar array, got {got}.",
    TypeError,
  )


def variance_algorithm(fn: str, use_fast_variance: Any, variance: Variance) -> Variance:
  """``use_fast_variance=True`` is Flax's spelling of ``variance='fast'``."""
  if not use_fast_variance:
    return variance
  if variance not in ("auto", "two_pass", "fast"):
    _checks.fail(
      fn,
      f"`use_fast_variance=True` means variance='fast', got variance={variance!r} as well."
      " Hint: pass only one of them.",
    )
  return "fast"


def output_dtype(*args: Any, dtype: Any) -> Any:
  """Flax's output dtype: ``dtype``, else the promotion of the non-None ``args``.

  Flax decides it with ``jnp.result_type`` under the standard promotion rules (bfloat16 input
  with float32 params gives float32); the same decision is taken here even when the caller
  runs with ``jax.numpy_dtype_promotion('strict')``. Only a dtype is computed, no array op.
  """
  with jax.numpy_dtype_promotion("standard"):
    return dtypes.canonicalize_dtype(*args, dtype=dtype)


def module_dtypes(fn: str, *, dtype: Any, param_dtype: Any) -> None:
  """``dtype`` (None, or floating or complex) and ``param_dtype`` (floating), or raises."""
  if dtype is not None:
    _checks.output_dtype(fn, dtype, jnp.float32)
  _checks.floating_dtype(fn, "param_dtype", param_dtype)
