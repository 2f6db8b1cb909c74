"""Interleaved timing, shared by every benchmark script: each case timed in its own warm state.

It imports neither jax nor a peer, so the TensorFlow subprocess of ``bench_batch_norm.py`` uses
it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

import numpy as np

Case = TypeVar("Case", bound=Hashable)


def interleaved(
  cases: Mapping[Case, Callable[[], object]],
  *,
  rounds: int,
  reps: int,
  warmup: int,
  seed: int = 0,
  on_round: Callable[[], object] | None = None,
) -> dict[Case, np.ndarray]:
  """``{case: (rounds, reps) seconds}`` of calls ``cases[case]()``, each waiting for its result.

  First every case is called ``warmup`` times. Then each round visits every case once, in an
  order shuffled afresh for the round (from ``seed``, so a run is reproducible); a visit makes
  one untimed call, then ``reps`` timed calls back to back. ``on_round`` is called after each
  round (a progress bar).

  Why not call by call in a fixed rotation (A B C, B C A, ...): there each case follows the
  same case nearly every time, and a program's first call after another program's runs with
  the caches and the allocator as that one left them. On 2 CPU cores, ``bench_models.py``'s
  MLP train step took 4.7 ms (15%) longer right after PyTorch's step than after a JAX one,
  and bnjax's step was the case that always followed PyTorch's, so MODELS.md read 1.21x
  Flax's (1.07x with this loop; ``NOTES.md``, N). The untimed call puts every timed
  call after one of its own case, as in a training loop; the shuffle keeps what is left
  from falling on the same case in every round.
  """
  if rounds < 1 or reps < 1 or warmup < 0:
    raise ValueError(
      "_timing.interleaved: rounds and reps must be >= 1 and warmup >= 0,"
      f" got rounds={rounds}, reps={reps}, warmup={warmup}"
    )
  names = list(cases)
  for name in names:
    for _ in range(warmup):
      cases[name]()
  order = np.random.default_rng(seed)
  times = {name: np.zeros((rounds, reps)) for name in names}
  for r in range(rounds):
    for i in order.permutation(len(names)):
      call = cases[names[i]]
      call()  # not timed: leaves the caches and the allocator as this case needs them
      for k in range(reps):
        start = time.perf_counter()
        call()
        times[names[i]][r, k] = time.perf_counter() - start
    if on_round is not None:
      on_round()
  return times
