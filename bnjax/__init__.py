"""bnjax: exact, fast batch normalization for JAX, as a pure function.

    params, stats = bnjax.init(num_features)
    y, new_stats = bnjax.batch_norm(x, params, stats, training=True)

``bnjax.fold`` folds inference batch norms into the Dense or Conv layers before them (arrays,
Linen variables, NNX models).

Imported on demand (``import bnjax`` alone needs only jax and numpy): the drop-ins
``bnjax.linen`` and ``bnjax.nnx`` (Flax) and ``bnjax.equinox`` (Equinox), the optax training
loop ``bnjax.training`` and the checks in ``bnjax.diagnostics``.
"""

from bnjax import conventions, fold
from bnjax._core import batch_norm, init
from bnjax._stats import moments
from bnjax._types import Backward, OnNonfinite, Params, RunningVariance, Stats, Variance, ZeroDebias

__version__ = "0.1.0"

__all__ = [
  "Backward",
  "OnNonfinite",
  "Params",
  "RunningVariance",
  "Stats",
  "Variance",
  "ZeroDebias",
  "__version__",
  "batch_norm",
  "conventions",
  "fold",
  "init",
  "moments",
]
