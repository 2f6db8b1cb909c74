"""The one table of tolerances for comparing bnjax with references, and why each is what it is.

bnjax computes statistics in float32 (float64 for float64 input) and rounds only the output to
the input's dtype. Against the float64 oracle fed the SAME (already rounded) input:

- float32 / float64: each reduction of n terms accumulates rounding that grows like
  sqrt(n) * eps for the tree-shaped sums XLA emits (tokamax scales the same way); a normalized
  output of order 1 then carries that relative error. rtol = atol = 8 * eps * sqrt(n); 8 covers
  the few roundings per element (subtract, multiply, rsqrt, add). The absolute part scales with
  the largest |expected| of the array: an output near zero is often xhat * scale + bias with
  the two terms cancelling, and its error is that of the terms, not of the small result
  (hypothesis found y = 0.137 = 1.9 - 1.8 off by 3e-6 at n = 2).
- float16 / bfloat16: the statistics' float32 error is negligible next to rounding the output
  once to the input dtype, a relative error of at most eps / 2. rtol = atol = eps; the atol
  covers outputs near zero, where float32 rounding of (x - mean) * inv is absolute, not relative.

Comparisons between two implementations that both run (bnjax vs Flax, eager vs jit) use the
same table: both sides sit within it of the exact value.
"""

from __future__ import annotations

import math

import numpy as np

EPS = {
    "float64": float(np.finfo(np.float64).eps),
    "float32": float(np.finfo(np.float32).eps),
    "float16": float(np.finfo(np.float16).eps),
    "bfloat16": 2.0**-7,
}

# The accuracy target for the default variance at a large offset (the core issue's numerics
# section): relative error of the batch variance for x = 1e4 + N(0, 1) in float32.
LARGE_OFFSET_VARIANCE_RTOL = 1e-5


def tolerance(dtype, reduction_size: int = 1) -> dict[str, float]:
  """``dict(rtol=..., atol=...)`` for outputs and statistics of ``dtype`` over n elements."""
  name = np.dtype(dtype).name
  eps = EPS[name]
  if name in ("float16", "bfloat16"):
    return {"rtol": eps, "atol": eps}
  bound = 8 * eps * math.sqrt(max(reduction_size, 1))
  return {"rtol": bound, "atol": bound}


def assert_close(actual, expected, dtype, reduction_size: int = 1, what: str = ""):
  """``assert_allclose`` with ``tolerance``, the atol scaled by the array's magnitude."""
  expected = np.asarray(expected, np.float64)
  tol = tolerance(dtype, reduction_size)
  magnitude = max(1.0, float(np.abs(expected).max(initial=0.0)))
  np.testing.assert_allclose(
      np.asarray(actual, np.float64), expected,
      err_msg=what, rtol=tol["rtol"], atol=tol["atol"] * magnitude,
  )


def offset_atol(dtype, reduction_size: int, *, max_abs_output: float, offset_over_std: float) -> float:
  """Absolute tolerance on outputs for data at ``offset`` with standard deviation ``std``.

  Two errors add up. Statistics in float32 (or float64): x - mean is formed next to |offset|,
  so its error, relative to the std that normalizes it, is 8 * eps * sqrt(n) * (1 + offset/std).
  Then the output is rounded once to ``dtype``: eps / 2 of its magnitude, bounded by eps.
  """
  stat_eps = EPS["float64" if np.dtype(dtype).name == "float64" else "float32"]
  statistics = 8 * stat_eps * math.sqrt(max(reduction_size, 1)) * (1 + offset_over_std)
  return statistics * max(max_abs_output, 1.0) + EPS[np.dtype(dtype).name] * max_abs_output


# bnjax against another implementation of the SAME formula in the same dtype (Flax's two-pass
# BatchNorm): the order of operations matches, only XLA's reduction order and Flax's
# (1 - momentum) rounded from float64 differ, a few float32 ulps; the largest seen was 2.3e-5
# at |y| ~ 90 (3 ulps) in evaluation outputs. bfloat16 outputs: one ulp (seen: identical).
SAME_FORMULA = {
    "float32": {"rtol": 1e-6, "atol": 1e-6},
    "bfloat16": {"rtol": 8e-3, "atol": 8e-3},
}
