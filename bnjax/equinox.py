"""``bnjax.equinox.BatchNorm``: a drop-in for ``equinox.nn.BatchNorm`` backed by bnjax's arithmetic.

Imported on demand (``import bnjax.equinox``, extra ``bnjax[equinox]``); ``import bnjax`` alone
never imports Equinox.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

try:
  import equinox as eqx
except ImportError as error:  # pragma: no cover - exercised by a subprocess test
  raise ImportError("bnjax.equinox needs equinox: pip install 'bnjax[equinox]'") from error

from bnjax import _checks, _module_options, _normalize, _stats
from bnjax._core import batch_norm
from bnjax._types import Backward, OnNonfinite, Stats, Variance
from bnjax.conventions import Convention
from bnjax.diagnostics import debias

__all__ = ["BatchNorm"]

_FN = "equinox.BatchNorm"
_MODES = ("ema", "batch")


def _default_floating_dtype():
  return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


class BatchNorm(eqx.nn.StatefulLayer):
  """Batch normalization for Equinox, a drop-in for ``equinox.nn.BatchNorm``.

  Same constructor, same call ``(x, state, *, key=None, inference=None) -> (y, state)`` on one
  example ``x`` of shape ``(input_size, *spatial)`` under ``jax.vmap(..., axis_name=...)`` (or
  ``pmap``, ``shard_map``), same fields and state (``eqx.nn.State``,
  ``eqx.nn.make_with_state``, ``eqx.nn.inference_mode`` work as for Equinox's layer). The
  statistics of channel c cover its elements in every example of the named axes::

      mean_B, var_B = mean and biased variance over the spatial axes and the named axes

  ``mode="batch"`` (``bnjax.batch_norm``, ``axis=0``): training normalizes with
  ``(mean_B, var_B)`` and moves the state ``(mean, var)``, started at (0, 1), by
  ``mean <- momentum * mean + (1 - momentum) * mean_B`` (likewise var) and counts the steps t;
  inference normalizes with the averages debiased as ``bnjax.diagnostics.debias`` does::

      mean_I = mean / (1 - momentum^t),   var_I = (var - momentum^t * v0) / (1 - momentum^t)

  (t = 0: the state as it is) with ``v0 = debias_initial_var``.

  ``mode="ema"``: training normalizes with the moved averages themselves (the batch's own
  statistics on the first step), and gradients flow through their batch part::

      mean_E = mean_B if first step else momentum * mean + (1 - momentum) * mean_B
      var_E  = likewise;   y = (x - mean_E) * (weight * rsqrt(var_E + eps)) + bias
      state <- (mean_E, var_E);  inference normalizes with the state.

  Both are computed from bnjax's accurate moments (the shift from the data plus a small
  correction, ``bnjax._stats``), so a channel at a large offset keeps float32 precision where
  Equinox's ``x - mean`` and ``mean((x - mean)^2)`` lose it.

  Differences from ``equinox.nn.BatchNorm``:

  - Accurate variance (two-pass about a shift on CPU, shifted sums on GPU/TPU; ``variance=``)
    and statistics in at least float32; Equinox computes them in the input's dtype.
  - ``mode="batch"`` inference removes the variance's true start, 1, from its average
    (``debias_initial_var=1.0``). Equinox divides the state by ``1 - momentum^t`` and so
    overstates the variance by ``momentum^t / (1 - momentum^t)``: 99 after one step with the
    default momentum, 0.58 after 100. ``debias_initial_var=0.0`` reproduces Equinox's values.
  - The examples' statistics are combined weighted by their counts, in one ``all_gather``
    (``bnjax.batch_norm``); every example has as many elements, so this is Equinox's
    ``pmean`` of means, computed without forming ``x - mean`` at a float32 mean. Several
    named axes (``axis_name=("a", "b")`` over nested ``vmap``s) combine exactly with two
    ``psum``s.
  - Agreement with Equinox is to a few float32 ulps, not bit for bit.

  Extensions: ``convention=`` (``bnjax.conventions``) runs that framework's arithmetic in
  ``mode="batch"``: its momentum, epsilon, batch-variance algorithm and stored variance, and
  inference with the stored statistics as they are (PyTorch, Keras), no debiasing.

  Example::

      >>> import equinox as eqx, jax, jax.numpy as jnp
      >>> import bnjax.equinox
      >>> bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(3, "batch", mode="batch")
      >>> x = jax.random.normal(jax.random.key(0), (8, 3, 4, 4)) + 1e4    # (N, C, H, W)
      >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = train(x, state)
      >>> y_eval, _ = jax.vmap(eqx.nn.inference_mode(bn), axis_name="batch",
      ...                      in_axes=(0, None), out_axes=(0, None))(x, state)
      >>> y.shape, bool(abs(y.mean()) < 1e-3)
      ((8, 3, 4, 4), True)
  """

  weight: jax.Array | None
  bias: jax.Array | None
  ema_first_time_index: eqx.nn.StateIndex | None
  ema_state_index: eqx.nn.StateIndex | None
  batch_counter: eqx.nn.StateIndex | None
  batch_state_index: eqx.nn.StateIndex | None
  axis_name: Hashable | Sequence[Hashable]
  inference: bool
  input_size: int = eqx.field(static=True)
  eps: float = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  momentum: float = eqx.field(static=True)
  mode: Literal["ema", "batch"] = eqx.field(static=True)
  variance: Variance = eqx.field(static=True)
  backward: Backward = eqx.field(static=True)
  debias_initial_var: float = eqx.field(static=True)
  convention: Convention | None = eqx.field(static=True)
  on_nonfinite: OnNonfinite = eqx.field(static=True)

  def __init__(
    self,
    input_size: int,
    axis_name: Hashable | Sequence[Hashable],
    eps: float = 1e-5,
    channelwise_affine: bool = True,
    momentum: float = 0.99,
    inference: bool = False,
    dtype: Any = None,
    mode: Literal["ema", "batch", "legacy"] = "legacy",
    *,
    variance: Variance = "auto",
    backward: Backward = "closed_form",
    debias_initial_var: float = 1.0,
    convention: Convention | None = None,
    on_nonfinite: OnNonfinite = "keep",
  ):
    """Args:
    input_size: the number of channels, the size of each example's axis 0.
    axis_name: the name (or a sequence of names) of the mapped axes whose examples share
      statistics, as given to ``jax.vmap`` / ``jax.pmap`` / ``jax.shard_map``.
    eps: added to the variance before the square root.
    channelwise_affine: learn a per-channel ``weight`` (1) and ``bias`` (0).
    momentum: weight on the old running value, in [0, 1).
    inference: True: normalize with the running statistics; ``eqx.nn.inference_mode``
      sets it, a call's ``inference`` overrides it.
    dtype: of ``weight``, ``bias`` and the running statistics; default float32 (float64
      with ``jax_enable_x64``).
    mode: ``'batch'`` or ``'ema'`` (above). Left out, it is ``'ema'`` with a warning, as in
      Equinox.
    variance: the batch-variance algorithm of ``bnjax.batch_norm``: ``'auto'``,
      ``'two_pass'``, ``'shifted'`` or ``'fast'``.
    backward: ``'closed_form'`` or ``'autodiff'`` (``mode='batch'``; see
      ``bnjax.batch_norm``). ``mode='ema'`` is differentiated by JAX.
    debias_initial_var: the initial variance ``mode='batch'`` inference removes: 1.0 (the
      state's start) or 0.0 (Equinox's formula).
    convention: a ``bnjax.conventions.Convention`` whose arithmetic replaces ``eps``,
      ``momentum`` and ``variance``; ``mode='batch'`` only.
    on_nonfinite: ``'keep'`` (default: a channel whose batch statistics are NaN or inf
      keeps its state), ``'propagate'`` (Equinox's behaviour) or ``'raise'``; see
      ``bnjax.batch_norm``.
    """
    fn = _FN
    if mode == "legacy":
      if convention is None:
        warnings.warn(
          "bnjax.equinox.BatchNorm: `mode` was not given and defaults to 'ema', as in"
          " equinox.nn.BatchNorm (for backward compatibility there). Pass mode='batch' for"
          " batch statistics in training and debiased averages in inference, or mode='ema'"
          " to keep this behaviour without the warning.",
          UserWarning,
          stacklevel=2,
        )
      mode = "batch" if convention is not None else "ema"
    _checks.choice(fn, "mode", mode, _MODES)
    # What a convention may set here: the state keeps (mean, var, count), so renorm's extra
    # statistics are refused (with_convention names them).
    defaults = {
      "momentum": 0.99,
      "epsilon": 1e-5,
      "variance": "auto",
      "backward": "closed_form",
      "running_variance": "biased",
      "update_stats": True,
      "track_count": True,
      "zero_debias": None,
      "adjustment": None,
      "on_nonfinite": "keep",
    }
    options = _module_options.with_convention(
      fn,
      convention,
      {
        **defaults,
        "momentum": momentum,
        "epsilon": eps,
        "variance": variance,
        "backward": backward,
        "on_nonfinite": on_nonfinite,
      },
      defaults,
    )
    if convention is not None and mode != "batch":
      _checks.fail(
        fn,
        f"`convention` runs {convention.name!r}'s arithmetic, which keeps batch"
        f" statistics in training: it needs mode='batch', got mode={mode!r}.",
      )
    _checks.momentum(fn, options["momentum"])
    _checks.epsilon(fn, options["epsilon"])
    _checks.choice(fn, "variance", options["variance"], _checks.VARIANCE_ALGORITHMS)
    _checks.choice(fn, "backward", options["backward"], _checks.BACKWARDS)
    _checks.choice(fn, "on_nonfinite", options["on_nonfinite"], _checks.ON_NONFINITE)
    (size,) = _checks.num_features(fn, input_size)
    if debias_initial_var not in (0.0, 1.0):
      _checks.fail(fn, f"`debias_initial_var` must be 1.0 or 0.0, got {debias_initial_var!r}.")
    dtype = _default_floating_dtype() if dtype is None else dtype
    _checks.floating_dtype(fn, "dtype", dtype)

    self.mode = mode
    if channelwise_affine:
      self.weight = jnp.ones((size,), dtype)
      self.bias = jnp.zeros((size,), dtype)
    else:
      self.weight = None
      self.bias = None
    if mode == "ema":  # Equinox's state: a first-step flag and the averages (unset until then)
      self.ema_first_time_index = eqx.nn.StateIndex(jnp.array(True))
      self.ema_state_index = eqx.nn.StateIndex(
        (jnp.zeros((size,), dtype), jnp.zeros((size,), dtype))
      )
      self.batch_counter = None
      self.batch_state_index = None
    else:  # a step count and the averages, started at (0, 1)
      self.batch_counter = eqx.nn.StateIndex(jnp.array(0))
      self.batch_state_index = eqx.nn.StateIndex(
        (jnp.zeros((size,), dtype), jnp.ones((size,), dtype))
      )
      self.ema_first_time_index = None
      self.ema_state_index = None
    self.inference = inference
    self.axis_name = axis_name
    self.input_size = size
    self.eps = options["epsilon"]
    self.channelwise_affine = channelwise_affine
    self.momentum = options["momentum"]
    self.variance = options["variance"]
    self.backward = options["backward"]
    self.debias_initial_var = float(debias_initial_var)
    self.convention = convention
    self.on_nonfinite = options["on_nonfinite"]

  def __call__(
    self,
    x: jax.Array,
    state: eqx.nn.State,
    *,
    key: Any = None,
    inference: bool | None = None,
  ) -> tuple[jax.Array, eqx.nn.State]:
    """Normalizes one example; in training also updates ``state``.

    Args:
      x: one example, ``(input_size, *spatial)``, floating or complex.
      state: the ``eqx.nn.State`` holding this layer's running statistics.
      key: ignored (Equinox's layer API).
      inference: overrides ``self.inference`` when given.

    Returns:
      ``(y, state)``: ``y`` of ``x``'s shape, and the updated state.

    Raises:
      NameError: in training, where ``axis_name`` names no mapped axis.
    """
    del key
    inference = self.inference if inference is None else inference
    x = _checks.floating_input(_FN, x)
    # The batched input is (N, C, ...): channels on axis 1.
    _module_options.check_layout(_FN, self.convention, 1, x.ndim + 1, axis_fixed=True)
    if x.shape[0] != self.input_size:
      _checks.fail(
        _FN,
        f"`x` must have `input_size`={self.input_size} channels on axis 0, got shape"
        f" {tuple(x.shape)}. Hint: the layer sees one example, channels first; vmap over the"
        " batch.",
      )
    params = {} if self.weight is None else {"scale": self.weight, "bias": self.bias}
    with jax.named_scope("bnjax.equinox.BatchNorm"):
      if self.mode == "ema":
        return self._ema(x, state, params, inference)
      return self._batch(x, state, params, inference)

  def _options(self) -> dict[str, Any]:
    options = {
      "momentum": self.momentum,
      "epsilon": self.eps,
      "variance": self.variance,
      "backward": self.backward,
      "on_nonfinite": self.on_nonfinite,
    }
    if self.convention is not None:
      options = {**self.convention.options(), **options}
      del options["axis"]
    return options

  def _out_dtype(self, x, stat):
    with jax.numpy_dtype_promotion("standard"):
      return jnp.result_type(x, stat, *(v for v in (self.weight, self.bias) if v is not None))

  def _batch(self, x, state, params, inference):
    count = state.get(self.batch_counter)
    mean, var = state.get(self.batch_state_index)
    stats: Stats = {"mean": mean, "var": var, "count": count}
    dtype = self._out_dtype(x, mean)
    if inference:
      if self.convention is None:  # Equinox's debiased averages
        stats = debias(  # pyright: ignore[reportAssignmentType]
          stats, momentum=self.momentum, initial_mean=0.0, initial_var=self.debias_initial_var
        )
      y, _ = batch_norm(x, params, stats, training=False, axis=0, dtype=dtype, **self._options())
      return y, state
    # Updated in at least float32 (half-precision averages drift), stored in the state's dtype.
    wide = _stats.stat_dtype(mean.dtype)
    stats = {**stats, "mean": mean.astype(wide), "var": var.astype(wide)}
    y, new = batch_norm(
      x,
      params,
      stats,
      training=True,
      axis=0,
      axis_name=self.axis_name,
      dtype=dtype,
      **self._options(),
    )
    state = state.set(self.batch_counter, new.get("count", count))  # present: stats had one
    return y, state.set(
      self.batch_state_index, (new["mean"].astype(mean.dtype), new["var"].astype(var.dtype))
    )

  def _ema(self, x, state, params, inference):
    running_mean, running_var = state.get(self.ema_state_index)
    dtype = self._out_dtype(x, running_mean)
    if inference:
      stats: Stats = {"mean": running_mean, "var": running_var}
      y, _ = batch_norm(x, params, stats, training=False, axis=0, dtype=dtype, epsilon=self.eps)
      return y, state
    _checks.axis_name(_FN, self.axis_name, None)
    first = state.get(self.ema_first_time_index)
    if jnp.iscomplexobj(x):
      _checks.fail(_FN, "mode='ema' takes real input; complex `x` needs mode='batch'.", TypeError)
    axes = tuple(range(1, x.ndim))
    moments = _stats.batch_moments(
      x,
      axes,
      mask=None,
      axis_name=self.axis_name,
      axis_index_groups=None,
      variance=_stats.resolve_variance(self.variance),
    )
    shape = moments.shift.shape
    stat_dtype = moments.var.dtype
    mean_r, var_r = (v.astype(stat_dtype).reshape(shape) for v in (running_mean, running_var))
    # x - mean_E = (x - K) - (mean_E - K): both terms small at any offset, as in batch_norm.
    w = jnp.asarray(1 - self.momentum, stat_dtype)
    centre = jnp.where(first, moments.delta, w * moments.delta + (1 - w) * (mean_r - moments.shift))
    var_e = jnp.where(first, moments.var, var_r + w * (moments.var - var_r))
    scale, offset = (params.get(k) for k in ("scale", "bias"))
    scale, offset = (
      None if v is None else v.astype(stat_dtype).reshape(shape) for v in (scale, offset)
    )
    m = _normalize.multiplier(var_e, scale, epsilon=self.eps)
    folded = -centre * m
    y = _normalize.affine(
      x, moments.shift, m, folded if offset is None else offset + folded, out_dtype=dtype
    )
    new_mean, new_var = (
      lax.stop_gradient(v).reshape(-1).astype(running_mean.dtype)
      for v in (moments.shift + centre, var_e)
    )
    if self.on_nonfinite != "propagate":  # a channel with NaN or inf statistics keeps its state
      finite = jnp.isfinite(new_mean) & jnp.isfinite(new_var)
      if self.on_nonfinite == "raise":
        jax.debug.callback(_checks.raise_if_nonfinite, finite)
      new_mean = jnp.where(finite, new_mean, running_mean)
      new_var = jnp.where(finite, new_var, running_var)
    # False of the flag's own type: under pmap it is typed per device, and Equinox's
    # jnp.array(False) is refused there by State.set.
    state = state.set(self.ema_first_time_index, jnp.zeros_like(first))
    return y, state.set(self.ema_state_index, (new_mean, new_var))
