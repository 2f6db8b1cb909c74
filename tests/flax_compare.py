"""Helpers for comparing bnjax's Flax adapters with Flax's own BatchNorm modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tolerances import SAME_FORMULA

MAX_DIFF: dict[str, tuple[float, float]] = {}  # dtype -> (max abs, max rel) seen in the run


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
