"""bnjax: exact, fast batch normalization for JAX, as a pure function.

    params, stats = bnjax.init(num_features)
    y, new_stats = bnjax.batch_norm(x, params, stats, training=True)

Flax adapters live in ``bnjax.linen`` and ``bnjax.nnx`` (imported on demand: ``import bnjax``
never imports Flax).
"""

from bnjax._core import batch_norm, init
from bnjax._stats import moments

__version__ = "0.1.0"

__all__ = ["batch_norm", "init", "moments", "__version__"]
