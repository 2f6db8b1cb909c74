"""PyTorch ``BatchNorm1d/2d/3d`` modules and state dicts to and from bnjax.

    converted = from_torch(module)                      # Converted(params, stats, convention)
    converted = from_torch(model.state_dict(), prefix="layer1.bn1.", momentum=0.1, eps=1e-5)
    module = to_torch(*converted, ndim=4)               # a torch.nn.BatchNorm2d
    state = to_state_dict(params, stats, prefix="layer1.bn1.")

Names: torch ``weight, bias, running_mean, running_var, num_batches_tracked`` are bnjax
``scale, bias, mean, var, count`` (int32 here, int64 there). ``affine=False`` drops ``scale``
and ``bias``. The convention is ``bnjax.conventions.pytorch(momentum, eps)``: torch's momentum
(weight on the new value, or None) converted exactly, channels on axis 1, unbiased running
variance. A state dict carries no momentum or epsilon: pass the module's.

``track_running_stats=False`` has no running statistics: such a module always normalizes with
batch statistics, which is ``bnjax.batch_norm(..., training=True, update_stats=False)``; it is
refused here. PyTorch is imported only inside the functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import jax.numpy as jnp
import numpy as np

from bnjax import _checks, conventions
from bnjax.conventions import Convention
from bnjax.interop import Converted
from bnjax.interop._models import NameMapping, PortedModel, flax_paths, get, put, require

__all__ = [
  "PortedModel",
  "default_flax_path",
  "from_torch",
  "from_torch_model",
  "to_state_dict",
  "to_torch",
  "to_torch_state_dict",
]

_NAMES = (
  ("weight", "params", "scale"),
  ("bias", "params", "bias"),
  ("running_mean", "stats", "mean"),
  ("running_var", "stats", "var"),
)
_MODULES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
_INT32_MAX = np.iinfo(np.int32).max


def _fail(fn: str, message: str, error: type[Exception] = ValueError) -> NoReturn:
  _checks.fail(f"interop.torch.{fn}", message, error)


def _to_jax(tensor: Any) -> Any:
  """A torch tensor as a jax array of the same dtype, exactly (bfloat16 through float32)."""
  import torch

  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return jnp.asarray(tensor.to(torch.float32).numpy()).astype(jnp.bfloat16)
  return jnp.asarray(tensor.numpy())


def _to_torch(value: Any) -> Any:
  """A jax array as a torch tensor of the same dtype, exactly, owning its (writable) memory."""
  import torch

  value = jnp.asarray(value)
  if value.dtype == jnp.bfloat16:
    return torch.from_numpy(np.array(value.astype(jnp.float32))).to(torch.bfloat16)
  return torch.from_numpy(np.array(value))


def _settings(module: Any) -> tuple[float | None, float]:
  """A BatchNorm module's ``(momentum, eps)``."""
  return module.momentum, module.eps


def from_torch(
  module_or_state_dict: Any,
  *,
  prefix: str = "",
  momentum: float | None = 0.1,
  eps: float = 1e-5,
) -> Converted:
  """A torch BatchNorm module, or its entries in a state dict, as bnjax params, stats, convention.

  Args:
    module_or_state_dict: a ``torch.nn.BatchNorm1d/2d/3d`` (or ``SyncBatchNorm``), or a state
      dict holding ``{prefix}running_mean``, ``{prefix}running_var`` and, if affine,
      ``{prefix}weight`` and ``{prefix}bias``, and ``{prefix}num_batches_tracked``.
    prefix: the module's key prefix in a state dict, e.g. ``'layer1.bn1.'``.
    momentum: the module's momentum (torch's: the weight on the new value, or None), for a
      state dict (a module brings its own).
    eps: the module's epsilon, for a state dict.

  Returns:
    ``Converted(params, stats, convention)``: ``stats`` has ``count`` (int32) from
    ``num_batches_tracked``; the convention is ``bnjax.conventions.pytorch(momentum, eps)``.

  Example:
    >>> import torch
    >>> from bnjax.interop import from_torch
    >>> params, stats, convention = from_torch(torch.nn.BatchNorm2d(3, momentum=0.01))
    >>> sorted(params), sorted(stats), convention.momentum
    (['bias', 'scale'], ['count', 'mean', 'var'], 0.99)
  """
  fn = "from_torch"
  torch = require("torch", fn="interop.torch.from_torch", extra="torch")

  if isinstance(module_or_state_dict, torch.nn.Module):
    module = module_or_state_dict
    if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
      _fail(
        fn,
        f"`module_or_state_dict` must be a torch BatchNorm module or a state dict, got"
        f" {type(module).__name__}.",
        TypeError,
      )
    if not module.track_running_stats:
      _fail(
        fn,
        "the module has track_running_stats=False, so no running statistics: it always"
        " normalizes with batch statistics. Hint: bnjax.batch_norm(..., training=True,"
        " update_stats=False) does the same.",
      )
    if prefix:
      _fail(fn, f"`prefix` is for state dicts, got prefix={prefix!r} with a module.")
    momentum, eps = _settings(module)
    state = module.state_dict()
  elif isinstance(module_or_state_dict, Mapping):
    state = {k[len(prefix) :]: v for k, v in module_or_state_dict.items() if k.startswith(prefix)}
    unknown = sorted(set(state) - {n for n, _, _ in _NAMES} - {"num_batches_tracked"})
    if unknown:
      _fail(
        fn,
        f"the state dict has unexpected keys under prefix {prefix!r}:"
        f" {[prefix + k for k in unknown]}. Hint: the prefix should end at the BatchNorm"
        " module, e.g. 'layer1.bn1.'.",
      )
  else:
    _fail(
      fn,
      f"`module_or_state_dict` must be a torch BatchNorm module or a state dict, got"
      f" {type(module_or_state_dict).__name__}.",
      TypeError,
    )

  missing = [prefix + k for k in ("running_mean", "running_var") if k not in state]
  if ("weight" in state) != ("bias" in state):
    missing.append(prefix + ("bias" if "weight" in state else "weight"))
  if missing:
    _fail(fn, f"the state dict lacks {missing} (got {sorted(prefix + k for k in state)}).")
  params, stats = {}, {}
  for name, tree, key in _NAMES:
    if name in state:
      (params if tree == "params" else stats)[key] = _to_jax(state[name])
  count = int(state["num_batches_tracked"]) if "num_batches_tracked" in state else 0
  if not 0 <= count <= _INT32_MAX:
    _fail(fn, f"num_batches_tracked={count} does not fit bnjax's int32 count.")
  stats["count"] = jnp.asarray(count, jnp.int32)
  return Converted(params, stats, conventions.pytorch(momentum=momentum, eps=eps))


def to_state_dict(params: dict[str, Any], stats: dict[str, Any], *, prefix: str = "") -> dict:
  """``params`` and ``stats`` as a torch BatchNorm state dict (``load_state_dict`` ready).

  ``num_batches_tracked`` is ``stats['count']``, or 0 without one. Dtypes are kept.

  Args:
    params: ``{'scale': (C,), 'bias': (C,)}``, both or neither (PyTorch's ``affine``).
    stats: ``{'mean': (C,), 'var': (C,)}`` and optionally ``'count'``.
    prefix: the module's key prefix in the model's state dict, e.g. ``'layer1.bn1.'``.

  Returns:
    ``{prefix + name: tensor}`` for ``weight``, ``bias``, ``running_mean``, ``running_var`` and
    ``num_batches_tracked``.

  Example:
    >>> import bnjax
    >>> from bnjax.interop import to_state_dict
    >>> params, stats = bnjax.init(2, track_count=True)
    >>> sorted(to_state_dict(params, stats, prefix="bn."))
    ['bn.bias', 'bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var', 'bn.weight']
  """
  fn = "to_state_dict"
  torch = require("torch", fn="interop.torch.to_state_dict", extra="torch")

  if ("scale" in params) != ("bias" in params):
    _fail(
      fn,
      f"PyTorch's affine parameters come in pairs: `params` has only"
      f" {sorted(params)}. Hint: add the missing one (scale 1 or bias 0).",
    )
  missing = [k for k in ("mean", "var") if k not in stats]
  if missing:
    _fail(fn, f"`stats` lacks {missing}.")
  state = {}
  for name, tree, key in _NAMES:
    source = params if tree == "params" else stats
    if key in source:
      state[prefix + name] = _to_torch(source[key])
  count = int(stats["count"]) if "count" in stats else 0
  state[prefix + "num_batches_tracked"] = torch.tensor(count, dtype=torch.long)
  return state


def _torch_arguments(fn: str, convention: Convention, ndim: int) -> dict[str, Any]:
  if not isinstance(convention, Convention):
    _fail(
      fn,
      f"`convention` must be a bnjax.conventions.Convention, got {type(convention).__name__}.",
      TypeError,
    )
  if ndim not in _MODULES:
    _fail(fn, f"`ndim` (the input's rank) must be 2, 3, 4 or 5, got {ndim!r}.")
  options = convention.options()
  problems = []
  if options["axis"] not in (1, 1 - ndim) and not (ndim == 2 and options["axis"] == -1):
    problems.append(f"axis={options['axis']!r} (PyTorch's channels are on axis 1)")
  if options["running_variance"] != "unbiased":
    problems.append("running_variance='biased' (PyTorch stores the unbiased variance)")
  if options["variance"] == "fast":
    problems.append("variance='fast'")
  if convention.extra:
    problems.append(f"extra options {dict(convention.extra)}")
  if problems:
    _fail(fn, f"torch.nn.{_MODULES[ndim]} cannot reproduce {', '.join(problems)}.")
  return dict(momentum=conventions.to_torch_momentum(options["momentum"]), eps=options["epsilon"])


def to_torch(
  params: dict[str, Any], stats: dict[str, Any], convention: Convention, *, ndim: int
) -> Any:
  """A new ``torch.nn.BatchNorm1d/2d/3d`` (by the input rank ``ndim``) holding ``params`` and
  ``stats`` (dtypes kept) and reproducing ``convention``; raises for what PyTorch cannot
  express (another axis, the biased running variance, the fast variance, extra options).

  Args:
    params: ``{'scale': (C,), 'bias': (C,)}`` or ``{}`` (``affine=False``).
    stats: ``{'mean': (C,), 'var': (C,)}`` and optionally ``'count'``.
    convention: what the module must compute, e.g. ``bnjax.conventions.pytorch(...)``.
    ndim: the rank of the module's input: 2 or 3 (``BatchNorm1d``), 4 (``2d``) or 5 (``3d``).

  Returns:
    The ``torch.nn.BatchNorm1d/2d/3d`` module.

  Example:
    >>> from bnjax import conventions
    >>> from bnjax.interop import to_torch
    >>> params, stats = conventions.PYTORCH.init(3)
    >>> module = to_torch(params, stats, conventions.pytorch(momentum=0.2), ndim=4)
    >>> type(module).__name__, module.momentum
    ('BatchNorm2d', 0.2)
  """
  fn = "to_torch"
  torch = require("torch", fn="interop.torch.to_torch", extra="torch")

  arguments = _torch_arguments(fn, convention, ndim)
  state = to_state_dict(params, stats)
  features = tuple(state["running_mean"].shape)
  if len(features) != 1:
    _fail(fn, f"PyTorch has one feature axis; `stats['mean']` has shape {features}.")
  module = getattr(torch.nn, _MODULES[ndim])(features[0], affine="scale" in params, **arguments)
  for name, tensor in state.items():  # replaced, not copied into: each keeps its dtype
    if isinstance(getattr(module, name), torch.nn.Parameter):
      tensor = torch.nn.Parameter(tensor)
    setattr(module, name, tensor)
  return module


# --- whole models ---------------------------------------------------------------------------


def default_flax_path(torch_path: str) -> str:
  """The Flax path bnjax gives a torch module path by default: ``'layer1.0.bn1'`` ->
  ``'layer1_0/bn1'``.

  Each dotted name becomes a scope; an index joins the name before it with ``_``, as Flax
  names the modules of a list attribute (``self.layer1 = [Block(...), ...]`` gives
  ``layer1_0``, ``layer1_1``).

  Args:
    torch_path: a module's name in ``model.named_modules()``.

  Returns:
    The path in the Flax-layout tree, scopes joined by ``/``.

  Example:
    >>> from bnjax.interop import torch
    >>> torch.default_flax_path("layer1.0.downsample.1")
    'layer1_0/downsample_1'
  """
  parts: list[str] = []
  for name in torch_path.split("."):
    if name.isdigit() and parts:
      parts[-1] += f"_{name}"
    else:
      parts.append(name)
  return "/".join(parts)


def _batch_norms(fn: str, model: Any) -> dict[str, Any]:
  torch = require("torch", fn=fn, extra="torch")

  if not isinstance(model, torch.nn.Module):
    _checks.fail(fn, f"`model` must be a torch.nn.Module, got {type(model).__name__}.", TypeError)
  found = {
    path: module
    for path, module in model.named_modules()
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
  }
  if not found:
    _checks.fail(fn, f"`model` ({type(model).__name__}) has no BatchNorm modules.")
  return found


def from_torch_model(model: Any, *, names: NameMapping = None) -> PortedModel:
  """Every BatchNorm of a torch model, as a Flax model's ``{'params', 'batch_stats'}``.

  Each ``torch.nn.BatchNorm1d/2d/3d`` (or ``SyncBatchNorm``) found by ``model.named_modules()``
  goes through ``from_torch`` and lands at its Flax path; its convention (momentum, eps, the
  unbiased running variance, ``count`` from ``num_batches_tracked``) is kept per layer. The
  conventions carry torch's channel axis, 1; a channels-last Flax model uses them as
  ``convention.replace(axis=-1)``. Other modules (convolutions, linear layers) are not
  converted: their layouts differ by model (``examples/port_torch_resnet.py`` does both).

  Args:
    model: a ``torch.nn.Module``.
    names: the Flax path of each batch norm: None for ``default_flax_path``
      (``'layer1.0.bn1'`` -> ``'layer1_0/bn1'``), a callable ``torch_path -> flax_path``, or a
      dict that maps every batch norm's torch path.

  Returns:
    ``PortedModel(variables, conventions)``: ``variables = {'params': ..., 'batch_stats':
    ...}`` nested by Flax path, ``conventions = {flax_path: Convention}``.

  Example:
    >>> import torch
    >>> from bnjax.interop import from_torch_model
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> ported = from_torch_model(model, names={"1": "bn"})
    >>> sorted(ported.variables["batch_stats"]["bn"])
    ['count', 'mean', 'var']
    >>> ported.conventions["bn"].momentum
    0.9
  """
  fn = "interop.torch.from_torch_model"
  found = _batch_norms(fn, model)
  paths = flax_paths(fn, list(found), names, default_flax_path)
  variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
  layer_conventions = {}
  for torch_path, module in found.items():
    converted = from_torch(module)
    flax_path = paths[torch_path]
    if converted.params:
      put(variables["params"], flax_path, converted.params)
    put(variables["batch_stats"], flax_path, converted.stats)
    layer_conventions[flax_path] = converted.convention
  return PortedModel(variables, layer_conventions)


def to_torch_state_dict(variables: Any, model: Any, *, names: NameMapping = None) -> dict:
  """Every BatchNorm's entries of a torch state dict, from a Flax model's variables.

  The inverse of ``from_torch_model``: for each batch norm of ``model`` (the module that
  receives them), its ``params`` and ``batch_stats`` at its Flax path become
  ``{torch_path}.weight``, ``.bias``, ``.running_mean``, ``.running_var`` and
  ``.num_batches_tracked`` (``to_state_dict``), checked against the module's shapes. Load them
  with ``model.load_state_dict(state, strict=False)``, which copies them into the module in
  its own dtypes; the other entries of the state dict (convolutions, linear layers) are the
  caller's.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` as a Flax model holds them.
    model: the ``torch.nn.Module`` whose batch norms receive the values.
    names: as for ``from_torch_model``; give the same.

  Returns:
    The state dict entries of every batch norm of ``model``.

  Example:
    >>> import torch
    >>> from bnjax.interop import from_torch_model, to_torch_state_dict
    >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    >>> ported = from_torch_model(model)
    >>> stats = ported.variables["batch_stats"]["0"]
    >>> stats["mean"] = stats["mean"] + 1
    >>> state = to_torch_state_dict(ported.variables, model)
    >>> model.load_state_dict(state, strict=False).unexpected_keys
    []
    >>> model[0].running_mean
    tensor([1., 1.])
  """
  fn = "interop.torch.to_torch_state_dict"
  found = _batch_norms(fn, model)
  paths = flax_paths(fn, list(found), names, default_flax_path)
  state = {}
  for torch_path, module in found.items():
    flax_path = paths[torch_path]
    params = get(fn, variables, "params", flax_path, required=module.affine) or {}
    stats = get(fn, variables, "batch_stats", flax_path, required=True)
    if not isinstance(stats, Mapping) or not isinstance(params, Mapping):
      _checks.fail(fn, f"`variables` at {flax_path!r} must hold a batch norm's dicts of arrays.")
    if module.affine != ("scale" in params):
      _checks.fail(
        fn,
        f"the module {torch_path!r} has affine={module.affine}, but `variables['params']` at"
        f" {flax_path!r} has keys {sorted(params)}.",
      )
    entries = to_state_dict(dict(params), dict(stats), prefix=f"{torch_path}.")
    expected = dict(module.state_dict(prefix=f"{torch_path}."))
    for key, tensor in entries.items():
      if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
        _checks.fail(
          fn,
          f"{key} has shape {tuple(expected[key].shape)} in the model, got"
          f" {tuple(tensor.shape)} from {flax_path!r}.",
        )
    state.update(entries)
  return state
