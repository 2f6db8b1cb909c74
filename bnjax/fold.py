"""``bnjax.fold``: fold an inference batch norm into the Dense or Conv layer before it.

In evaluation a batch norm is a fixed affine map per feature. When it directly follows a
layer ``y = x @ kernel + bias`` (or a convolution), it can be merged into that layer. Per
output feature ``c``, computed in this order in float32 or wider::

    inv[c]          = rsqrt(var[c] + epsilon) * scale[c]
    kernel'[..., c] = kernel[..., c] * inv[c]        (c indexes the output-feature axis)
    bias'[c]        = (bias[c] - mean[c]) * inv[c] + bn_bias[c]   (bias = 0 if the layer has none)

Then ``layer'(x) = BN(layer(x))`` with the running statistics, up to rounding, and the batch
norm disappears from the inference graph. The result is cast back to the kernel's and the
bias's dtypes. A missing ``scale`` counts as 1 and a missing ``bn_bias`` as 0, as in
``bnjax.batch_norm``.

The output features are the LAST kernel axis for Flax's ``Dense`` ``(in, out)``,
``DenseGeneral`` with one output axis ``(*in, out)``, ``Conv`` and ``ConvLocal``
``(*window, in, out)`` and ``ConvTranspose`` ``(*window, in, out)``; only
``ConvTranspose(transpose_kernel=True)`` keeps them at axis -2 (``(*window, out, in)``).
Grouped and depthwise convolutions (``feature_group_count``) fold like any other: each output
feature has its own kernel slice.
Only a batch norm over the layer's output features alone folds: in Flax that is ``axis=-1``.

Three entry points:

- ``fold_affine(kernel, bias, bn_params, bn_stats)``: the arrays.
- ``fold(variables, pairs)``: a Flax Linen variable tree (``bnjax.linen.BatchNorm`` and
  ``flax.linen.BatchNorm`` have the same layout). Returns a new tree without the batch norms.
- ``fold_nnx(model, pairs)``: a Flax NNX model, changed in place.

The folded Linen model is the same model built without the batch norms, and with
``use_bias=True`` on every folded layer (a layer followed by a batch norm is usually built
without a bias; the folded layer needs one). A flag on the model class does that::

    import flax.linen as nn
    import bnjax

    class Net(nn.Module):
      folded: bool = False

      @nn.compact
      def __call__(self, x):
        x = nn.Conv(32, (3, 3), use_bias=self.folded, name="conv")(x)
        if not self.folded:
          x = nn.BatchNorm(use_running_average=True, name="bn")(x)
        return nn.relu(x)

    variables = ...                                   # trained Net(): params and batch_stats
    folded = bnjax.fold.fold(variables, [("conv", "bn")])
    y = Net(folded=True).apply(folded, x)             # == Net().apply(variables, x)

``fold`` is pure and traceable (its checks look at shapes and dtypes only), so it also runs
under ``jax.jit``. This module imports only jax and numpy; ``fold_nnx`` imports Flax when
called.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.core as jax_core
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax import _checks

__all__ = ["DEFAULT_EPSILON", "fold", "fold_affine", "fold_nnx"]

DEFAULT_EPSILON = 1e-5  # bnjax.batch_norm, bnjax.linen.BatchNorm and Flax's BatchNorm
PAIR_OPTIONS = ("epsilon", "kernel_axis")
_PATH_HINT = (
  " Hint: paths are module names as they appear in the variable tree, e.g. 'Conv_0', a nested"
  " 'block1/Conv_0' or ('block1', 'Conv_0'); `jax.tree.map(jnp.shape, variables)` shows them."
)
_PAIR_HINT = (
  " Hint: each pair is (layer, bn): the Dense or Conv first, then the batch norm that"
  " normalizes its output."
)


def fold_affine(
  kernel: jax.Array,
  bias: jax.Array | None,
  bn_params: Mapping[str, jax.Array] | None,
  bn_stats: Mapping[str, jax.Array],
  *,
  epsilon: float = DEFAULT_EPSILON,
  kernel_axis: int = -1,
) -> tuple[jax.Array, jax.Array]:
  """Folds a batch norm in evaluation into the kernel and bias of the layer before it.

  Per output feature ``c``, in this order, in float32 or wider (float64 if any input is)::

      inv[c]          = rsqrt(var[c] + epsilon) * scale[c]
      kernel'[..., c] = kernel[..., c] * inv[c]          (along ``kernel_axis``)
      bias'[c]        = (bias[c] - mean[c]) * inv[c] + bn_bias[c]

  so that ``x @ kernel' + bias' == BN(x @ kernel + bias)`` with the running statistics (and
  likewise for convolutions), up to rounding.

  Args:
    kernel: the layer's kernel, floating, rank >= 2. Flax's Dense ``(in, out)`` and Conv
      ``(*window, in, out)`` hold the output features on the last axis.
    bias: the layer's bias, shape ``(C,)``, or None for a layer without one (it counts as 0).
    bn_params: ``{'scale': (C,), 'bias': (C,)}``; a missing key (or None) means scale 1 / bias 0.
    bn_stats: ``{'mean': (C,), 'var': (C,)}``, the running statistics; other keys (``count``,
      the renorm statistics) are ignored, as evaluation ignores them.
    epsilon: the batch norm's epsilon (bnjax and Flax: 1e-5; Keras: 1e-3; PyTorch: 1e-5).
      A negative running variance (damaged statistics) raises, where the values are known
      at trace time (not under ``jit``).
    kernel_axis: the kernel's output-feature axis: -1 for every Flax layer except
      ``ConvTranspose(transpose_kernel=True)`` (-2); 0 for PyTorch's ``(out, in, *window)``.

  Returns:
    ``(kernel', bias')``: ``kernel'`` in ``kernel``'s dtype and shape, ``bias'`` of shape
    ``(C,)`` in ``bias``'s dtype (``kernel``'s dtype when ``bias`` is None).

  Example:
    >>> import jax.numpy as jnp
    >>> from bnjax import fold
    >>> kernel, bias = jnp.ones((2, 1)), jnp.zeros(1)
    >>> stats = {"mean": jnp.array([1.0]), "var": jnp.array([4.0])}
    >>> kernel2, bias2 = fold.fold_affine(kernel, bias, {}, stats, epsilon=0.0)
    >>> kernel2.ravel(), bias2
    (Array([0.5, 0.5], dtype=float32), Array([-0.5], dtype=float32))
  """
  fn = "fold.fold_affine"
  names = {name: name for name in ("kernel", "bias", "bn_params", "bn_stats")}
  epsilon = _checks.epsilon(fn, epsilon)
  return _fold(fn, "", names, kernel, bias, bn_params, bn_stats, epsilon, kernel_axis)


def fold(
  variables: Mapping[str, Any],
  pairs: Sequence[tuple[Any, ...]],
  *,
  epsilon: float = DEFAULT_EPSILON,
) -> dict[str, Any]:
  """Folds Linen batch norms into the Dense or Conv layers before them: new variables.

  For each pair ``(layer, bn)`` the layer's ``kernel`` and ``bias`` become those of
  ``fold_affine`` (a ``bias`` is added if the layer had none), and the batch norm's entries
  leave ``params`` and ``batch_stats`` (and so do module scopes left empty; ``batch_stats``
  itself when no statistics remain). The result has the variables of the same model built
  without those batch norms and with ``use_bias=True`` on the folded layers (the module
  docstring shows a ``folded`` flag that builds it), and that model computes, in evaluation,
  what the original computes with ``use_running_average=True``.

  Works for ``bnjax.linen.BatchNorm`` and ``flax.linen.BatchNorm`` (the same layout:
  ``params/{scale, bias}``, ``batch_stats/{mean, var}``). The input is not changed; the output
  is made of plain dicts (a ``FrozenDict`` comes back as a dict) sharing the untouched arrays.
  Flax's boxed parameters (``nn.Partitioned`` from ``nn.with_partitioning``) keep their box.

  A pair may carry its own options, e.g. for a batch norm converted from Keras::

      bnjax.fold.fold(variables, [("Conv_0", "BatchNorm_0"), ("Dense_0", "bn", {"epsilon": 1e-3})])

  Args:
    variables: ``{'params': ..., 'batch_stats': ..., ...}`` as ``model.init`` returns them;
      other collections pass through unchanged.
    pairs: ``(layer_path, bn_path)`` or ``(layer_path, bn_path, options)`` for each batch norm
      to fold. A path is a module's name in the tree: ``'Conv_0'``, ``'block1/Conv_0'`` or a
      tuple of keys ``('block1', 'Conv_0')``. ``options`` may set ``'epsilon'`` (this batch
      norm's epsilon) and ``'kernel_axis'`` (-2 for ``ConvTranspose(transpose_kernel=True)``).
    epsilon: the batch norms' epsilon where a pair does not give one (Flax's default, 1e-5).

  Returns:
    The folded variables.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import bnjax.linen
    >>> from bnjax import fold
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return bnjax.linen.BatchNorm(use_running_average=True)(nn.Dense(3)(x))
    >>> variables = Net().init(jax.random.key(0), jnp.ones((1, 4)))
    >>> folded = fold.fold(variables, [("Dense_0", "BatchNorm_0")])
    >>> sorted(folded), sorted(folded["params"])
    (['params'], ['Dense_0'])
    >>> x = jnp.ones((2, 4))
    >>> y_folded = nn.Dense(3).apply({"params": folded["params"]["Dense_0"]}, x)
    >>> bool(jnp.allclose(y_folded, Net().apply(variables, x), atol=1e-6))
    True
  """
  fn = "fold.fold"
  epsilon = _checks.epsilon(fn, epsilon)
  if not isinstance(variables, Mapping):
    _checks.fail(
      fn,
      "`variables` must be a dict {'params': ..., 'batch_stats': ...} as `model.init`"
      f" returns it, got {type(variables).__name__}. Hint: for a flax.nnx model use"
      " `bnjax.fold.fold_nnx(model, pairs)`.",
      TypeError,
    )
  for collection in ("params", "batch_stats"):
    if not isinstance(variables.get(collection), Mapping):
      _checks.fail(
        fn,
        f"`variables` must hold a '{collection}' collection, got keys {sorted(variables)}."
        " Hint: pass the whole `variables = model.init(...)` (or the trained state's"
        " {'params': ..., 'batch_stats': ...}), not `variables['params']` alone.",
      )
  out = _copy_tree(variables)
  params, batch_stats = out["params"], out["batch_stats"]
  for index, (layer_path, bn_path, options) in enumerate(_pairs(fn, pairs)):
    where = f"`pairs[{index}]` ({_show(layer_path)}, {_show(bn_path)}): "
    layer = _lookup(fn, where, params, layer_path, "variables['params']")
    # _copy_tree made every Mapping of `out` a dict, which the fold below updates in place.
    if not isinstance(layer, dict) or "kernel" not in layer:
      got = f"keys {sorted(layer)}" if isinstance(layer, Mapping) else type(layer).__name__
      _checks.fail(
        fn,
        f"{where}the layer {_show(layer_path)} must be a Dense or Conv with a 'kernel', got"
        f" {got}.{_PAIR_HINT}",
      )
    bn_stats = _lookup(fn, where, batch_stats, bn_path, "variables['batch_stats']")
    bn_params = _lookup(fn, where, params, bn_path, None)  # absent: no scale and no bias
    names = {
      "kernel": _item("variables['params']", (*layer_path, "kernel")),
      "bias": _item("variables['params']", (*layer_path, "bias")),
      "bn_params": _item("variables['params']", bn_path),
      "bn_stats": _item("variables['batch_stats']", bn_path),
    }
    pair_epsilon = _checks.epsilon(fn, options.get("epsilon", epsilon))
    kernel_box, bias_box = layer["kernel"], layer.get("bias")
    new_kernel, new_bias = _fold(
      fn,
      where,
      names,
      _unbox(kernel_box),
      _unbox(bias_box),
      _unbox_tree(bn_params),
      _unbox_tree(bn_stats),
      pair_epsilon,
      options.get("kernel_axis", -1),
    )
    layer["kernel"] = _rebox(kernel_box, new_kernel)
    layer["bias"] = new_bias if bias_box is None else _rebox(bias_box, new_bias)
    _remove(params, bn_path)
    _remove(batch_stats, bn_path)
  if not batch_stats:
    del out["batch_stats"]
  return out


def fold_nnx(model: Any, pairs: Sequence[tuple[Any, ...]]) -> None:
  """Folds NNX batch norms into the ``Linear``/``Conv`` layers before them, in place.

  For each pair ``(layer, bn)`` the layer's ``kernel`` and ``bias`` become those of
  ``fold_affine`` with the batch norm's own ``epsilon`` (a ``bias`` ``Param`` is added, and
  ``use_bias`` set, if the layer had none), and the batch norm is replaced by an identity (an
  empty ``nnx.Sequential``), so the model's ``__call__`` needs no change. Works for
  ``bnjax.nnx.BatchNorm`` and ``flax.nnx.BatchNorm`` after ``nnx.Linear``, ``nnx.LinearGeneral``
  (one output axis), ``nnx.Conv`` and ``nnx.ConvTranspose`` (its ``transpose_kernel`` is read).
  Every pair is checked before the model changes, so an error leaves it as it was. Copy the
  model first (``nnx.clone``) to keep the unfolded one.

  Args:
    model: an ``nnx.Module``.
    pairs: ``(layer_path, bn_path)`` attribute paths from ``model``: ``'conv1'``,
      ``'block/conv'`` or a tuple ``('layers', 0)`` (ints index lists and ``nnx.Sequential``'s
      ``layers``).

  Returns:
    None: ``model`` is changed in place.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import bnjax.nnx
    >>> from bnjax import fold
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.linear = nnx.Linear(4, 3, rngs=rngs)
    ...     self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.bn(self.linear(x))
    >>> model = Net(nnx.Rngs(0))
    >>> model.eval()
    >>> x = jnp.ones((2, 4))
    >>> y = model(x)
    >>> fold.fold_nnx(model, [("linear", "bn")])
    >>> bool(jnp.allclose(model(x), y, atol=1e-6))
    True
  """
  from flax import nnx  # only here: `import bnjax` needs jax and numpy alone

  fn = "fold.fold_nnx"
  if not isinstance(model, nnx.Module):
    _checks.fail(
      fn,
      f"`model` must be a flax.nnx Module, got {type(model).__name__}. Hint: for Linen"
      " variables use `bnjax.fold.fold(variables, pairs)`.",
      TypeError,
    )
  folded = []
  for index, (layer_path, bn_path, _) in enumerate(_pairs(fn, pairs, nnx=True)):
    where = f"`pairs[{index}]` ({_show(layer_path)}, {_show(bn_path)}): "
    layer = _get_attr_path(fn, where, model, layer_path)
    bn = _get_attr_path(fn, where, model, bn_path)
    kernel = getattr(layer, "kernel", None)
    if not isinstance(kernel, nnx.Variable):
      _checks.fail(
        fn,
        f"{where}the layer {_show(layer_path)} must be an nnx.Linear or nnx.Conv with a"
        f" `kernel`, got {type(layer).__name__}.{_PAIR_HINT}",
      )
    if not all(isinstance(getattr(bn, k, None), nnx.Variable) for k in ("mean", "var")):
      _checks.fail(
        fn,
        f"{where}{_show(bn_path)} must be a batch norm with running `mean` and `var`, got"
        f" {type(bn).__name__}.{_PAIR_HINT}",
      )
    axis = getattr(bn, "axis", -1)
    if axis not in (-1, (-1,)):
      _checks.fail(
        fn,
        f"{where}the batch norm must normalize the layer's output features, the last axis"
        f" (axis=-1), got axis={axis!r}: a batch norm over another axis cannot be folded"
        " into the kernel. Hint: if that axis is the last one, build it with axis=-1.",
      )
    bn_params = {
      k: getattr(bn, k)[...] for k in ("scale", "bias") if getattr(bn, k, None) is not None
    }
    bn_stats = {k: getattr(bn, k)[...] for k in ("mean", "var")}
    bias = getattr(layer, "bias", None)
    names = {
      "kernel": _attribute(layer_path) + ".kernel",
      "bias": _attribute(layer_path) + ".bias",
      "bn_params": _attribute(bn_path),
      "bn_stats": _attribute(bn_path),
    }
    epsilon = _checks.epsilon(fn, getattr(bn, "epsilon", DEFAULT_EPSILON))
    kernel_axis = -2 if getattr(layer, "transpose_kernel", False) else -1
    new_kernel, new_bias = _fold(
      fn,
      where,
      names,
      kernel[...],
      None if bias is None else bias[...],
      bn_params,
      bn_stats,
      epsilon,
      kernel_axis,
    )
    folded.append((layer, bias, bn_path, new_kernel, new_bias))
  for layer, bias, bn_path, new_kernel, new_bias in folded:
    layer.kernel[...] = new_kernel
    if bias is None:
      layer.bias = type(layer.kernel)(new_bias)
      if hasattr(layer, "use_bias"):
        layer.use_bias = True
    else:
      bias[...] = new_bias
    _set_attr_path(model, bn_path, nnx.Sequential())  # the identity


def _fold(fn, where, names, kernel, bias, bn_params, bn_stats, epsilon, kernel_axis):
  """Checks the arrays and computes ``fold_affine``; ``names`` spell them in messages."""
  kernel = _float_array(fn, where, names["kernel"], kernel)
  if kernel.ndim < 2:
    _checks.fail(
      fn,
      f"{where}`{names['kernel']}` must have rank >= 2 (Dense: (in, out); Conv: (*window, in,"
      f" out)), got shape {tuple(kernel.shape)}.",
    )
  if isinstance(kernel_axis, bool) or not isinstance(kernel_axis, numbers.Integral):
    _checks.fail(fn, f"{where}`kernel_axis` must be an int, got {kernel_axis!r}.", TypeError)
  kernel_axis = int(kernel_axis)
  if not -kernel.ndim <= kernel_axis < kernel.ndim:
    _checks.fail(
      fn,
      f"{where}`kernel_axis`={kernel_axis} is out of range for `{names['kernel']}` of shape"
      f" {tuple(kernel.shape)}; expected values in [{-kernel.ndim}, {kernel.ndim - 1}].",
    )
  kernel_axis = int(kernel_axis) % kernel.ndim
  features = kernel.shape[kernel_axis]

  if bn_params is None:
    bn_params = {}
  for what, value, keys in (
    ("bn_params", bn_params, _checks.PARAM_KEYS),
    ("bn_stats", bn_stats, _checks.REQUIRED_STAT_KEYS),
  ):
    if not isinstance(value, Mapping):
      _checks.fail(
        fn,
        f"{where}`{names[what]}` must be a dict with keys {keys}, got {type(value).__name__}.",
        TypeError,
      )
  unknown = sorted(set(bn_params) - set(_checks.PARAM_KEYS))
  if unknown:
    _checks.fail(
      fn,
      f"{where}`{names['bn_params']}` has keys {unknown}; a batch norm's params are"
      f" {_checks.PARAM_KEYS}.{_PAIR_HINT}",
    )
  missing = [k for k in _checks.REQUIRED_STAT_KEYS if k not in bn_stats]
  if missing:
    _checks.fail(
      fn,
      f"{where}`{names['bn_stats']}` is missing {missing}; got keys {sorted(bn_stats)}."
      " Hint: a batch norm's running statistics are 'mean' and 'var' (Flax's names).",
    )
  bn = {k: _float_array(fn, where, f"{names['bn_params']}['{k}']", v) for k, v in bn_params.items()}
  bn |= {
    k: _float_array(fn, where, f"{names['bn_stats']}['{k}']", bn_stats[k])
    for k in _checks.REQUIRED_STAT_KEYS
  }
  for key, value in bn.items():
    what = names["bn_params" if key in _checks.PARAM_KEYS else "bn_stats"] + f"['{key}']"
    if value.ndim != 1:
      _checks.fail(
        fn,
        f"{where}`{what}` has shape {tuple(value.shape)}: the batch norm normalizes several"
        " feature axes, and only one over the layer's output features alone (the last axis,"
        " axis=-1 in Flax) can be folded into the kernel.",
      )
    if value.shape[0] != features:
      _checks.fail(
        fn,
        f"{where}the batch norm normalizes {value.shape[0]} features (`{what}` has shape"
        f" {tuple(value.shape)}), expected the layer's {features} output features"
        f" (`{names['kernel']}` has shape {tuple(kernel.shape)}, output features on axis"
        f" {kernel_axis - kernel.ndim}). Hint: pair each batch norm with the layer whose"
        " output it normalizes; a batch norm over another axis than the output features"
        " (axis=-1 in Flax) cannot be folded.",
      )
  if bias is not None:
    bias = _float_array(fn, where, names["bias"], bias)
    if tuple(bias.shape) != (features,):
      _checks.fail(
        fn,
        f"{where}`{names['bias']}` must have shape ({features},), one value per output"
        f" feature of `{names['kernel']}` {tuple(kernel.shape)}, got {tuple(bias.shape)}.",
      )

  var = bn["var"]
  if not isinstance(var, jax_core.Tracer) and bool(np.any(np.asarray(var) < 0)):
    bad = [int(i) for i in np.flatnonzero(np.asarray(var) < 0)][:10]
    _checks.fail(
      fn,
      f"{where}`{names['bn_stats']}['var']` is negative in features {bad}: a variance cannot"
      " be, so the running statistics are damaged (its square root would make the folded"
      " kernel NaN). Hint: restore them from a checkpoint, or re-estimate them on data.",
    )
  dtype = max(
    (jnp.dtype(jnp.float32), *(a.dtype for a in (kernel, bias, *bn.values()) if a is not None)),
    key=lambda d: d.itemsize,
  )
  inv = lax.rsqrt(bn["var"].astype(dtype) + jnp.asarray(epsilon, dtype))
  if "scale" in bn:
    inv = inv * bn["scale"].astype(dtype)
  per_feature = tuple(features if a == kernel_axis else 1 for a in range(kernel.ndim))
  new_kernel = kernel.astype(dtype) * inv.reshape(per_feature)
  mean = bn["mean"].astype(dtype)
  new_bias = (-mean if bias is None else bias.astype(dtype) - mean) * inv
  if "bias" in bn:
    new_bias = new_bias + bn["bias"].astype(dtype)
  bias_dtype = kernel.dtype if bias is None else bias.dtype
  return new_kernel.astype(kernel.dtype), new_bias.astype(bias_dtype)


def _float_array(fn, where, name, value):
  value = _checks.array_like(fn, name, value)
  if not jnp.issubdtype(value.dtype, jnp.floating):
    _checks.fail(
      fn,
      f"{where}`{name}` must have a floating dtype (float16, bfloat16, float32, float64), got"
      f" {value.dtype}. Hint: a quantized or integer layer cannot absorb the batch norm;"
      " fold before quantizing.",
      TypeError,
    )
  return value


def _pairs(fn, pairs, *, nnx=False):
  """[(layer_path, bn_path, options)], paths as tuples of keys, checked for repeats."""
  if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
    _checks.fail(
      fn,
      f"`pairs` must be a list of (layer, bn) paths, got {pairs!r}. Hint: [('Conv_0',"
      " 'BatchNorm_0')], even for one pair.",
      TypeError,
    )
  out, seen = [], {}
  for index, pair in enumerate(pairs):
    if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) not in {2, 3}:
      _checks.fail(
        fn,
        f"`pairs[{index}]` must be a (layer, bn) or (layer, bn, options) tuple, got"
        f" {pair!r}.{_PAIR_HINT}",
        TypeError,
      )
    layer_path, bn_path = (_path(fn, f"`pairs[{index}]`", p, nnx=nnx) for p in pair[:2])
    options = pair[2] if len(pair) == 3 else {}
    if nnx and len(pair) == 3:
      _checks.fail(
        fn,
        f"`pairs[{index}]` has options {options!r}, but fold_nnx reads epsilon and"
        " transpose_kernel from the modules. Hint: pass (layer, bn) only.",
        TypeError,
      )
    if not isinstance(options, Mapping):
      _checks.fail(
        fn,
        f"`pairs[{index}]`'s third element must be a dict of options {PAIR_OPTIONS}, got"
        f" {options!r}.",
        TypeError,
      )
    unknown = sorted(set(options) - set(PAIR_OPTIONS))
    if unknown:
      _checks.fail(
        fn, f"`pairs[{index}]` has unknown options {unknown}; expected some of {PAIR_OPTIONS}."
      )
    for path in (layer_path, bn_path):
      if path in seen:
        _checks.fail(
          fn,
          f"`pairs[{index}]` names {_show(path)}, which `pairs[{seen[path]}]` already names."
          " Hint: each layer absorbs one batch norm, and each batch norm folds once.",
        )
      seen[path] = index
    out.append((layer_path, bn_path, options))
  return out


def _path(fn, where, path, *, nnx):
  """A path as a tuple of keys: 'a/b' -> ('a', 'b'); ('a', 'b') stays."""
  if isinstance(path, str):
    keys = tuple(path.split("/"))
  elif isinstance(path, Sequence) and not isinstance(path, bytes):
    keys = tuple(path)
  else:
    keys = (path,)
  if nnx:  # 'layers/0' indexes a list
    keys = tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in keys)
  allowed = (str, int) if nnx else (str,)
  valid = (isinstance(k, allowed) and not isinstance(k, bool) and k != "" for k in keys)
  if not keys or not all(valid):
    kinds = "strings and ints" if nnx else "strings"
    _checks.fail(
      fn,
      f"{where} path {path!r} must be a non-empty 'a/b' string or a tuple of {kinds}." + _PATH_HINT,
      TypeError,
    )
  return keys


def _show(path) -> str:
  return repr("/".join(map(str, path)))


def _item(tree_name, path) -> str:
  """variables['params']['block']['kernel']"""
  return tree_name + "".join(f"[{k!r}]" for k in path)


def _attribute(path) -> str:
  """model.block.layers[0]"""
  return "model" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path)


def _lookup(fn, where, tree, path, tree_name):
  """``tree[path]``; a missing key raises naming it, or gives None when ``tree_name`` is None."""
  node = tree
  for depth, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      if tree_name is None:
        return None
      under = f"under {_show(path[:depth])}" if depth else "at the top"
      keys = sorted(node) if isinstance(node, Mapping) else f"a {type(node).__name__}"
      _checks.fail(
        fn,
        f"{where}{_show(path)} is not in {tree_name}: no {key!r} {under} (found {keys})."
        + _PATH_HINT,
      )
    node = node[key]
  return node


def _remove(tree, path):
  """Deletes ``tree[path]`` if present, then the scopes along ``path`` it leaves empty."""
  nodes = [tree]
  for key in path[:-1]:
    if not isinstance(nodes[-1], Mapping) or key not in nodes[-1]:
      return
    nodes.append(nodes[-1][key])
  if not isinstance(nodes[-1], dict) or path[-1] not in nodes[-1]:
    return
  del nodes[-1][path[-1]]
  for depth in range(len(path) - 1, 0, -1):
    if nodes[depth]:
      break
    del nodes[depth - 1][path[depth - 1]]


def _copy_tree(tree):
  """Nested Mappings as new plain dicts; the leaves are shared."""
  if isinstance(tree, Mapping):
    return {k: _copy_tree(v) for k, v in tree.items()}
  return tree


def _is_box(value) -> bool:
  return hasattr(value, "unbox") and hasattr(value, "replace_boxed")


def _unbox(value):
  return value.unbox() if _is_box(value) else value


def _unbox_tree(tree):
  return {k: _unbox(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _rebox(box, value):
  return box.replace_boxed(value) if _is_box(box) else value


def _get_attr_path(fn, where, model, path):
  node = model
  for depth, key in enumerate(path):
    try:
      node = node[key] if isinstance(key, int) else getattr(node, key)
    except (AttributeError, IndexError, KeyError, TypeError):
      under = f"of {_show(path[:depth])}" if depth else "of the model"
      _checks.fail(
        fn,
        f"{where}{_show(path)} is not in the model: no {key!r} {under}"
        f" ({type(node).__name__}). Hint: paths are attribute names from the model, e.g."
        " 'conv1', 'block/bn' or ('layers', 0) for an nnx.Sequential.",
      )
  return node


def _set_attr_path(model, path, value):
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)
