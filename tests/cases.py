"""Named input cases shared by the tests (and, later, the benchmarks)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Layout(NamedTuple):
  shape: tuple[int, ...]
  axis: int | tuple[int, ...]

  def features(self) -> tuple[int, ...]:
    axes = (self.axis,) if isinstance(self.axis, int) else self.axis
    return tuple(self.shape[a] for a in sorted(a % len(self.shape) for a in axes))

  def reduction_size(self) -> int:
    return math.prod(self.shape) // math.prod(self.features())


LAYOUTS = {
  "dense": Layout((32, 5), -1),
  "seq": Layout((4, 9, 3), -1),
  "nhwc": Layout((4, 5, 6, 3), -1),
  "nchw": Layout((4, 3, 5, 6), 1),
  "ndhwc": Layout((2, 3, 4, 5, 6), -1),
  "ncdhw": Layout((2, 6, 3, 4, 5), 1),
  "two-feature-axes": Layout((4, 3, 5, 2), (1, 3)),
}


def random_inputs(layout: Layout, *, seed: int = 0, dtype=jnp.float32, offset: float = 0.0):
  """x with per-channel means and scales that differ, plus non-trivial params and stats."""
  rng = np.random.default_rng(seed)
  f = layout.features()
  x = rng.normal(size=layout.shape) * 2.0 + 0.5 + offset
  params = {"scale": rng.uniform(0.5, 1.5, f), "bias": rng.normal(size=f)}
  stats = {"mean": rng.normal(size=f), "var": rng.uniform(0.5, 2.0, f)}
  as_jax = lambda tree, dt: jax.tree.map(lambda v: jnp.asarray(v, dt), tree)
  return jnp.asarray(x, dtype), as_jax(params, jnp.float32), as_jax(stats, jnp.float32)
