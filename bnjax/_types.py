"""The types of bnjax's public API: string options as ``Literal``, state as ``TypedDict``.

The option tuples that ``_checks.choice`` validates against are derived from these ``Literal``\\ s
(``typing.get_args``), so a type checker and the trace-time error agree on what is allowed.
"""

from __future__ import annotations

from typing import Literal, TypedDict

import jax

Variance = Literal["auto", "two_pass", "shifted", "fast"]
"""How batch variances are computed (see ``bnjax.moments``)."""

RunningVariance = Literal["biased", "unbiased"]
"""Which variance the running average tracks: the batch's biased one, or Bessel-corrected."""

Backward = Literal["closed_form", "autodiff"]
"""How training mode is differentiated."""

ZeroDebias = Literal["mean", "mean_and_var"]
"""Which running statistics are zero-debiased (tf.contrib's ``zero_debias_moving_mean``)."""

OnNonfinite = Literal["keep", "propagate", "raise"]
"""What a channel whose batch statistics are not finite does to its running statistics."""


class Params(TypedDict, total=False):
  """Learned parameters, Flax's names and layout: each entry has the feature shape ``(*F,)``.

  Either entry may be absent (``use_scale=False``, ``use_bias=False``): scale 1, bias 0.
  """

  scale: jax.Array
  bias: jax.Array


class _RequiredStats(TypedDict):
  mean: jax.Array
  var: jax.Array


class Stats(_RequiredStats, total=False):
  """Running statistics, Flax's ``batch_stats`` layout. ``mean`` and ``var`` are required.

  ``mean``, ``var`` (and the renorm statistics) have the feature shape ``(*F,)``, in float32 or
  wider; ``count`` is an int32 scalar, the number of updates (``init(track_count=True)``).
  """

  count: jax.Array
  renorm_mean: jax.Array
  renorm_stddev: jax.Array
  stddev: jax.Array
