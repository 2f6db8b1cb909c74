"""Batch-norm weights and settings in and out of Keras and PyTorch.

    from bnjax.interop import from_torch, to_torch, from_keras, to_keras
    params, stats, convention = from_torch(module)   # a BatchNorm2d
    y, stats = bnjax.batch_norm(x, params, stats, training=True, **convention.options())

- ``bnjax.interop.keras``: Keras 3 and tf_keras ``BatchNormalization`` layers
  (``from_keras``, ``to_keras``, ``assign_to_keras``), renorm and virtual batches included.
- ``bnjax.interop.torch``: ``torch.nn.BatchNorm1d/2d/3d`` modules and their state dicts
  (``from_torch``, ``to_torch``, ``to_state_dict``).
- Whole models: every batch norm of a torch model or a Keras model into a Flax model's
  ``{'params', 'batch_stats'}`` by a name mapping, with each layer's convention
  (``from_torch_model``, ``from_keras_model``), and back (``to_torch_state_dict``,
  ``assign_to_keras_model``). ``examples/port_torch_resnet.py`` ports a ResNet both ways.

Values are copied exactly (float32 stays float32, 16-bit values are widened exactly where the
target stores float32), so a round trip loses nothing, and the ``Convention`` carries the
layer's momentum, epsilon, axis and variance conventions. Importing this package imports
neither TensorFlow nor PyTorch: each function imports what it needs when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from bnjax.conventions import Convention
from bnjax.interop._models import PortedModel

if TYPE_CHECKING:  # at run time they come from __getattr__, on first use
  from bnjax.interop.keras import (
    assign_to_keras,
    assign_to_keras_model,
    from_keras,
    from_keras_model,
    to_keras,
  )
  from bnjax.interop.torch import (
    from_torch,
    from_torch_model,
    to_state_dict,
    to_torch,
    to_torch_state_dict,
  )

__all__ = [
  "Converted",
  "PortedModel",
  "assign_to_keras",
  "assign_to_keras_model",
  "from_keras",
  "from_keras_model",
  "from_torch",
  "from_torch_model",
  "to_keras",
  "to_state_dict",
  "to_torch",
  "to_torch_state_dict",
]

# The converters, from their submodules on first use (neither imports its framework until called).
_SUBMODULE = {
  "from_torch": "torch",
  "to_torch": "torch",
  "to_state_dict": "torch",
  "from_keras": "keras",
  "to_keras": "keras",
  "assign_to_keras": "keras",
  "from_torch_model": "torch",
  "to_torch_state_dict": "torch",
  "from_keras_model": "keras",
  "assign_to_keras_model": "keras",
}


class Converted(NamedTuple):
  """What a framework's batch norm becomes in bnjax."""

  params: dict[str, Any]  # {'scale': (C,), 'bias': (C,)}, without what the layer lacks
  stats: dict[str, Any]  # {'mean': (C,), 'var': (C,)} (+ 'count': int32[] for PyTorch,
  #                        + 'stddev', 'renorm_mean', 'renorm_stddev' for Keras renorm layers)
  convention: Convention  # keyword options for bnjax.batch_norm: convention.options()


def __getattr__(name: str) -> Any:
  if name in _SUBMODULE:
    import importlib

    return getattr(importlib.import_module(f"bnjax.interop.{_SUBMODULE[name]}"), name)
  raise AttributeError(f"module 'bnjax.interop' has no attribute {name!r}")
