"""What the whole-model converters of ``interop.torch`` and ``interop.keras`` share.

A model's batch norms are found by the framework module (``torch.nn.Module.named_modules``,
Keras' nested ``layers``) under their own paths; each is given a path in the Flax-layout tree
by a name mapping, and its values sit at that path in ``variables['params']`` and
``variables['batch_stats']``::

    {'params':      {'layer1_0': {'bn1': {'scale': (C,), 'bias': (C,)}}, ...},
     'batch_stats': {'layer1_0': {'bn1': {'mean': (C,), 'var': (C,), 'count': ()}}, ...}}

Framework imports stay in the framework modules; nothing here imports TensorFlow or PyTorch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from bnjax import _checks
from bnjax.conventions import Convention

NameMapping = Mapping[str, str] | Callable[[str], str] | None


def require(module: str, *, fn: str, extra: str) -> Any:
  """``import module``, or an ImportError that names the extra bringing it."""
  try:
    return importlib.import_module(module)
  except ImportError as error:
    raise ImportError(f"bnjax.{fn} needs {module}: pip install 'bnjax[{extra}]'") from error


class PortedModel(NamedTuple):
  """Every batch norm of a model, in the layout of a Flax model's variables."""

  variables: dict[str, Any]  # {'params': {...}, 'batch_stats': {...}}, nested by Flax path
  conventions: dict[str, Convention]  # Flax path ('layer1_0/bn1') -> that layer's convention


def flax_paths(
  fn: str, layer_paths: list[str], names: NameMapping, default: Callable[[str], str]
) -> dict[str, str]:
  """``{framework path: Flax path}`` for every batch norm, or raises.

  ``names`` is None (``default`` for every layer), a callable applied to every layer's path,
  or a mapping that names every layer (a partial mapping is refused: a batch norm left behind
  would keep its initial statistics in the ported model without a word).
  """
  if names is None:
    mapped = {path: default(path) for path in layer_paths}
  elif isinstance(names, Mapping):
    missing = [path for path in layer_paths if path not in names]
    unknown = sorted(set(names) - set(layer_paths))
    if unknown:
      _checks.fail(
        fn,
        f"`names` maps {unknown}, which are not batch norms of the model; its batch norms are"
        f" {layer_paths}.",
      )
    if missing:
      _checks.fail(
        fn,
        f"`names` must map every batch norm of the model, got no Flax path for {missing}."
        " Hint: a callable `names` maps paths by rule; names=None uses the default mapping.",
      )
    mapped = {path: names[path] for path in layer_paths}
  elif callable(names):
    mapped = {path: names(path) for path in layer_paths}
  else:
    _checks.fail(
      fn,
      f"`names` must be None, a dict or a callable, got {type(names).__name__}.",
      TypeError,
    )
  for path, flax_path in mapped.items():
    if not isinstance(flax_path, str) or not flax_path or "" in flax_path.split("/"):
      _checks.fail(
        fn,
        f"`names` must give each batch norm a Flax path such as 'block1/bn1', got"
        f" {flax_path!r} for {path!r}.",
      )
  taken: dict[str, str] = {}
  for path, flax_path in mapped.items():
    if flax_path in taken:
      _checks.fail(
        fn,
        f"`names` gives {taken[flax_path]!r} and {path!r} the same Flax path {flax_path!r}.",
      )
    taken[flax_path] = path
  return mapped


def put(tree: dict[str, Any], flax_path: str, value: Any) -> None:
  """``tree[a][b][c] = value`` for ``flax_path = 'a/b/c'``, creating the dicts on the way."""
  *scopes, name = flax_path.split("/")
  for scope in scopes:
    tree = tree.setdefault(scope, {})
  tree[name] = value


def get(fn: str, variables: Any, collection: str, flax_path: str, *, required: bool) -> Any:
  """``variables[collection]`` at ``flax_path``, or None when absent and not ``required``."""
  if not isinstance(variables, Mapping) or not isinstance(variables.get(collection), Mapping):
    _checks.fail(
      fn,
      f"`variables` must be {{'params': ..., 'batch_stats': ...}} as a Flax model's init"
      f" returns them, got {type(variables).__name__} without a '{collection}' collection.",
      TypeError,
    )
  node = variables[collection]
  for key in flax_path.split("/"):
    if not isinstance(node, Mapping) or key not in node:
      if required:
        _checks.fail(
          fn,
          f"`variables['{collection}']` has nothing at {flax_path!r}. Hint: pass the same"
          " `names` as when the model was ported.",
        )
      return None
    node = node[key]
  return node
