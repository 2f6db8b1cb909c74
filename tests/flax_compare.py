"""Helpers for comparing bnjax's Flax adapters with Flax's own BatchNorm modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tolerances import SAME_FORMULA, offset_atol

MAX_DIFF: dict[str, tuple[float, float]] = {}  # dtype -> (max abs, max rel) seen in the run


DATA_OFFSET = 100.0
DATA_STD = 1.5  # the smallest of `data`'s standard deviations (seed 0)


def data(shape, dtype=np.float32, seed=0, offset=DATA_OFFSET):
  """NumPy-made data (no compiles), std 1.5 + seed, mean `offset`.

  At the default offset (|mean| / std up to ~70) Flax's default one-pass variance is off by
  more than 1e-4, so matching Flax's two-pass running variance to 1e-6 pins bnjax's default
  algorithm.
  """
  x = np.random.default_rng(seed).standard_normal(shape, np.float32) * (DATA_STD + seed) + offset
  return x.astype(dtype)


def flax_promotion():
  """Flax's modules rely on implicit bfloat16/float32 promotion; bnjax's run under strict."""
  return jax.numpy_dtype_promotion("standard")


def assert_close(actual, expected, what=""):
  """Same dtype, same shape, equal within ``SAME_FORMULA``; records the largest difference."""
  actual, expected = jnp.asarray(actual), jnp.asarray(expected)
  assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  name = jnp.dtype(actual.dtype).name
  if not jnp.issubdtype(actual.dtype, jnp.floating):  # counts: exact
    np.testing.assert_array_equal(actual, expected, err_msg=what)
    return
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  diff = np.abs(a - e)
  seen = MAX_DIFF.get(name, (0.0, 0.0))
  MAX_DIFF[name] = (
    max(seen[0], float(diff.max(initial=0.0))),
    max(seen[1], float((diff / np.maximum(np.abs(e), 1e-30)).max(initial=0.0))),
  )
  np.testing.assert_allclose(a, e, err_msg=what, **SAME_FORMULA[name])


def flat(tree):
  """{path: array} of an nnx State or any pytree, on the host."""
  if isinstance(tree, nnx.State):
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(tree)}
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def assert_trees_close(actual, expected, what=""):
  actual, expected = flat(actual), flat(expected)
  assert actual.keys() == expected.keys(), (what, actual.keys(), expected.keys())
  for k in actual:
    assert_close(actual[k], expected[k], f"{what}{k}")


def assert_centred_close(
  actual, expected, reduction_size, what="", *, offset_over_std=DATA_OFFSET / DATA_STD
):
  """Training outputs and gradients of bnjax vs Flax: values computed from ``x - mean_B``.

  Flax forms ``x - mean_B`` with a float32 mean that carries ~1 ulp of |mean| and its sum's
  rounding; bnjax centres about a shift from the data and does not (tests/test_numerics.py
  holds it to the float32 floor). The two differ by Flax's error, which ``offset_atol`` bounds
  (seen at mean 100, std 1.5: 1.6e-5 in y). Recorded in ``MAX_DIFF`` like ``assert_close``.
  """
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert np.shape(actual) == np.shape(expected), (what, np.shape(actual), np.shape(expected))
  name = jnp.dtype(jnp.asarray(actual).dtype).name
  diff = np.abs(a - e)
  seen = MAX_DIFF.get(f"{name} centred", (0.0, 0.0))
  MAX_DIFF[f"{name} centred"] = (
    max(seen[0], float(diff.max(initial=0.0))),
    max(seen[1], float((diff / np.maximum(np.abs(e), 1e-30)).max(initial=0.0))),
  )
  atol = offset_atol(
    actual.dtype,
    reduction_size,
    max_abs_output=float(np.abs(e).max()),
    offset_over_std=offset_over_std,
  )
  np.testing.assert_allclose(
    a,
    e,
    err_msg=what,
    rtol=0,
    atol=max(atol, SAME_FORMULA.get(name, SAME_FORMULA["float32"])["atol"]),
  )
