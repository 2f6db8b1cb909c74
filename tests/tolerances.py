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


# Issue 11's goals for training mode on float32 input at ANY offset, against float64 arithmetic
# on the same inputs. bnjax centres x as (x - K) - delta with K a shift from the data: x - K is
# exact at a large offset (Sterbenz), delta is small, so the offset drops out of every error:
# - y: a handful of roundings of values of size |xhat| (two subtractions, the multiply, the
#   bias add) plus delta's and inv's own relative errors, ~4 eps each: 2e-6 is 17 eps of
#   max|y|. Measured: 1.3e-7 at offsets 1e2..1e6 (docs/ACCURACY.md).
# - variance: relative 1e-6 for iid data (measured ~1.5e-7); 'shifted' on an adversarial
#   layout (the lead part sorted to one end) loses at most (K - mean)^2 / var <= 63 more ulps:
#   1e-5 (bnjax/_stats.py).
# - mean: one float32 ulp of |mean| (the final K + delta rounding) plus 1e-6 std (delta's).
# - the first running update: the weight and the product each round once: 2 ulps.
# - one exception, XLA's and not bnjax's: on reduced axes that are not adjacent (a tuple of
#   feature axes, (16, 3, 8, 2) over (0, 2)) XLA:CPU sums sequentially, and the float32 sum
#   of n positive terms alone, a random walk of n roundings, is off by up to ~eps * sqrt(n) at
#   any offset: 1.1e-6 at n = 128 even for exactly centred values rounded once (bound: 1.35e-6,
#   ``sequential_sum_rtol``).
FLOOR = {
  "y": 2e-6,
  "var": 1e-6,
  "var_adversarial": 1e-5,
  "mean_std": 1e-6,
  "running": 2 * float(np.finfo(np.float32).eps),
}


def sequential_sum_rtol(n: int) -> float:
  """Relative error bound of a sequential float32 sum of n positive terms (see FLOOR)."""
  return max(FLOOR["var"], EPS["float32"] * math.sqrt(n))


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
    np.asarray(actual, np.float64),
    expected,
    err_msg=what,
    rtol=tol["rtol"],
    atol=tol["atol"] * magnitude,
  )


def offset_atol(
  dtype, reduction_size: int, *, max_abs_output: float, offset_over_std: float
) -> float:
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


def debiased_atol(steps: int, momentum: float, magnitude: float, reduction_size: int) -> float:
  """Absolute tolerance of ``bnjax.diagnostics.debias`` against the float64 weighted average.

  Three float32 errors, for values of size at most ``magnitude`` (batch statistics, running
  values, initial values):
  - the batch statistics themselves: 8 * eps * sqrt(n), as in ``tolerance``;
  - the running value: each update rounds it twice (multiply-add, store), and momentum m
    damps older errors, so it is off by at most 2 * eps * min(t, 1 / (1 - m)), doubled for the
    float32 rounding of m itself;
  - debiasing subtracts m^t * init and divides by 1 - m^t, which magnifies the running value's
    error by 1 / (1 - m^t): 1000x for m = 0.999 after one step.
  """
  eps = EPS["float32"]
  running = 4 * eps * min(steps, 1 / (1 - momentum)) / (1 - momentum**steps)
  return magnitude * (8 * eps * math.sqrt(reduction_size) + running)


# bnjax against ANOTHER framework's batch norm (TensorFlow, Keras, PyTorch, Flax), fed the same
# (already rounded) inputs, both computing in float32. Each side lies within `tolerance(float32,
# n)` of the exact value, so they differ by at most twice that: rtol = atol = 16 * eps * sqrt(n).
# The absolute part is relative to the magnitude of the TERMS each result is computed from, not
# of the (possibly cancelled) result, because the frameworks arrange the terms differently and
# rounding is relative to what is added, not to the sum:
# - y: the largest |x * a|, |mean * a|, |bias|, with a = scale / sqrt(var + eps).
#   tf.nn.batch_normalization (Keras, tf_keras unfused) and PyTorch's CPU kernel compute
#   x * a + (bias - mean * a), whose terms are |mean| / std times the result; bnjax computes
#   (x - mean) * a + bias (bnjax/conventions.py, "order of the final multiply-add").
# - dx = a * (dy - mean(dy) - xhat * mean(dy * xhat)): the largest |a * dy|. With 2 elements per
#   channel the bracket cancels to a few percent of its terms (PyTorch's dx at N = 2: 7e-6 off at
#   |dx| = 0.19 where |a * dy| ~ 20, three float32 ulps of the terms).
# - dscale = sum(dy * xhat), dbias = sum(dy): the sums of the terms' absolute values.
# - running statistics: max(1, |value|) (a few roundings per step; momentum is also rounded
#   differently, float32(1 - 0.9) != float32(0.1): one ulp per step).
# 16-bit outputs and dx: both sides round float32 values that differ in their last bits, so they
# may land one 16-bit ulp apart: eps of the value, or of the terms' magnitude near zero.
def cross_framework(dtype, reduction_size: int = 1) -> dict[str, float]:
  """``dict(rtol=..., atol=...)`` for bnjax vs a reference framework in ``dtype``; ``atol`` is
  relative to the terms' magnitude (see above)."""
  name = np.dtype(dtype).name
  if name in ("float16", "bfloat16"):
    return {"rtol": EPS[name], "atol": EPS[name]}
  bound = 2 * 8 * EPS[name] * math.sqrt(max(reduction_size, 1))
  return {"rtol": bound, "atol": bound}


def tf_zero_debias_rtol(momentum: float, steps: int) -> float:
  """Relative tolerance against TensorFlow's zero-debiased moving average after ``steps``.

  TF divides its float32 accumulator by ``1 - m^t`` computed directly, which cancels: at
  momentum 0.999 and t = 2 it is 0.002 with a relative error of eps / 0.002 = 6e-5 (bnjax uses
  expm1/log1p and stays within a few eps of the float64 value). 8 covers the accumulator's
  own roundings.
  """
  return 8 * EPS["float32"] / (1 - momentum**steps)


# Data-parallel training (examples/data_parallel.py: 8 devices, one or two processes) against
# one device on the same global batches: parameters and running statistics after <= 12 Adam
# steps (lr 3e-3) in float32. Only the order of float32 additions differs (8 partial moments
# combined, the gradient pmean, gloo's all-reduce across processes); Adam divides each gradient
# by its running RMS, so a relative gradient error r moves that step's update by about lr * r.
# Seen on 1 process x 8 devices: 7.7e-7 absolute after 12 steps (1.8e-7 after one). The bound
# is 13x that and ~300x below one Adam step (lr); per-device batch norm with averaged running
# statistics misses it by up to 2e-3 after one step (tests/test_multidevice.py).
DATA_PARALLEL = {"rtol": 1e-5, "atol": 1e-5}


# bnjax.fold: a layer with the batch norm folded in (kernel * inv, (bias - mean) * inv + beta)
# against the layer followed by the batch norm in evaluation, same inputs, same dtypes. Per
# output element both sides form the same sum of K products (K: the kernel's fan-in, e.g.
# 3 * 3 * C_in), arranged differently, so their difference is bounded relative to the TERMS,
# not to the (possibly cancelled) result: T = |inv| * sum_i |x_i * k_i| + |(bias - mean) * inv|
# + |beta|. Near |mean| >> std the result is a small difference of large terms on both sides.
# - The sums: each side within 8 * eps * sqrt(K) * T of the exact value (the `tolerance` rule, in
#   the accumulation dtype: float64 for float64 kernels, else float32), so twice that apart.
# - A 16-bit folded kernel and bias are rounded once to their dtype: eps / 2 of each term, at most
#   eps / 2 * T in all; the unfolded side keeps the unrounded product in float32.
# Seen (tests/test_fold.py, 5 seeds): float32 layers <= 0.04 of the bound; bfloat16 <= 0.6, the
# kernel's rounding, worst for a Dense with fan-in 8 whose terms do not cancel.
def folded_atol(kernel_dtype, fan_in: int) -> float:
  """Absolute tolerance of folded vs unfolded outputs, in units of the element's terms T."""
  name = np.dtype(kernel_dtype).name
  sums = 2 * 8 * EPS["float64" if name == "float64" else "float32"] * math.sqrt(max(fan_in, 1))
  return sums + (EPS[name] / 2 if name in ("float16", "bfloat16") else 0.0)


# A whole model computed two ways in float32: ported between PyTorch and Flax
# (examples/port_torch_resnet.py: a stem, four basic blocks, a linear head), or bnjax's batch
# norm against Flax's in the same ResNet-18/50 or MLP (benchmarks/bench_models.py). Both sides
# compute every convolution as sums of K products (K <= 9 * 512 for ResNet-18) and every batch
# norm from sums over the batch, in different orders: each layer's sums within
# 8 * eps * sqrt(K) ~ 6e-5 of the exact value relative to their terms (the `tolerance` rule, at
# K = 4608), and batch norm renormalizes the next layer's input, so the errors of the layers add
# rather than multiply: 1e-4 relative to the largest logit, loss or running statistic, and to
# the largest parameter after one SGD step. Seen: 3e-7 (port, evaluation), 2e-6 (port, training
# mode), up to 1e-5 (bench_models --quick).
WHOLE_MODEL_RTOL = 1e-4

# One SGD step of those models in float32 against the same step in float64
# (bench_models.update_errors, on the models' smooth twins), per leaf relative to the leaf's
# update: a small update is the difference of gradient terms that nearly cancel, so the float32
# error of every convolution's gradient shows at up to ~1e-4 of it, for bnjax and Flax's two-pass
# batch norm alike (seen: 3.2e-5 and 3.2e-5 on ResNet-18, 9.4e-5 and 1.1e-4 on ResNet-50, 6.4e-5
# on the MLP). Both share every layer but the batch norms, so bnjax's error must stay within
# twice Flax's: room for another processor's summation order, while a batch norm that lost one
# digit (10x) fails.
UPDATE_VS_FLOAT64_FACTOR = 2.0
