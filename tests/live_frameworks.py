"""Runs real TensorFlow, Keras, PyTorch and Flax batch norms and bnjax side by side.

Shared by tests/test_conventions_live.py (the live checks), tools/make_tf_goldens.py (golden
files) and tools/equivalence_report.py (docs/EQUIVALENCE.md). One ``Case`` names a reference,
its layer settings in the framework's own spelling, and the bnjax ``Convention`` that must
reproduce it. Both sides run the same protocol and return a flat ``Trace``:

    for step in 0, 1, 2:   training call on x[step] (the layer's training mode), then
                           step{i}/y, step{i}/dx, step{i}/dscale, step{i}/dbias for the cotangent
                           dy[step], and step{i}/mean, step{i}/var: the running statistics after
    eval:                  inference call on x[3]: eval/y, eval/dx, eval/dscale, eval/dbias

Gradients are of sum(y * dy) with respect to x, scale and bias (GradientTape, autograd,
jax.vjp). Frameworks are imported on first use, once per process. Multi-replica and TF1 cases
run in one subprocess (tests/tf_subprocess.py): TF1 layers need TF_USE_LEGACY_KERAS=1 before
TensorFlow is imported, and MirroredStrategy needs two logical CPUs configured before TensorFlow
runs anything. Keras 3 on the JAX backend runs in another (tests/keras_jax_subprocess.py): Keras
picks its backend once, at import, and this process's Keras is TensorFlow's.

Renorm cases also trace the renorm statistics (step{i}/stddev, renorm_mean, renorm_stddev),
starting from values in the case's data, so r and d are clipped from the first step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tolerances import cross_framework

import bnjax
from bnjax import conventions as cv

HERE = pathlib.Path(__file__).resolve().parent
STEPS = 3
Trace = dict[str, np.ndarray]  # 'step0/y', ..., 'eval/dbias' -> float64 arrays


@dataclasses.dataclass(frozen=True)
class Case:
  """One comparison. ``layer`` holds the reference's own arguments (its names, its meaning)."""

  id: str
  reference: str  # a key of RUNNERS (or SUBPROCESS_REFERENCES)
  shape: tuple[int, ...]
  convention: cv.Convention  # what bnjax runs with
  layer: dict = dataclasses.field(default_factory=dict)
  dtype: str = "float32"
  mask: bool = False  # mask of shape x.shape[:-1], True = counts (Keras' channels-last masks)
  training: bool = True  # bnjax's `training` for the reference's training-mode call
  replicas: int = 1  # > 1: batch split over replicas (MirroredStrategy / shard_map)
  offset: float = 0.0  # added to every channel's mean, to show the multiply-add order
  params: tuple[str, ...] = ("scale", "bias")  # bnjax params the layer has (center/scale)

  @property
  def feature_axis(self) -> int:
    return self.convention.axis % len(self.shape)

  @property
  def reduction_size(self) -> int:
    return int(np.prod(self.shape)) // self.shape[self.feature_axis]

  @property
  def renorm(self) -> bool:
    return bool(dict(self.convention.extra).get("renorm"))


RENORM_STATS = ("stddev", "renorm_mean", "renorm_stddev")  # bnjax names; Keras: moving_stddev
STAT_KEYS = ("mean", "var", *RENORM_STATS)


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
  """x rounded to ``dtype`` and held in float32 (exact for float16 and bfloat16)."""
  return np.asarray(x, np.float32).astype(jnp.dtype(dtype)).astype(np.float32)


def make_data(case: Case) -> dict[str, np.ndarray]:
  """Inputs for ``case``: xs[4], dys[4] (in case.dtype, held as float32), params, stats, masks."""
  rng = np.random.default_rng(zlib.crc32(case.id.encode()))
  axis = case.feature_axis
  channels = case.shape[axis]
  along = [1] * len(case.shape)
  along[axis] = channels
  mean = rng.uniform(-1, 1, channels).reshape(along) + case.offset
  std = rng.uniform(1, 2, channels).reshape(along)
  data = {
    "x": np.stack(
      [_round(mean + std * rng.standard_normal(case.shape), case.dtype) for _ in range(STEPS + 1)]
    ),
    "dy": np.stack([_round(rng.standard_normal(case.shape), case.dtype) for _ in range(STEPS + 1)]),
    "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
    "bias": rng.standard_normal(channels).astype(np.float32),
    "mean": rng.standard_normal(channels).astype(np.float32),
    "var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
  }
  if case.mask:
    mask = rng.random((STEPS + 1, *case.shape[:-1])) < 0.7
    mask[:, 0] = True  # every channel sees an element
    data["mask"] = mask
  if case.renorm:  # drawn last: the other cases' data stay as they were
    data["stddev"] = np.sqrt(data["var"])  # as Keras initializes it, from the variance
    data["renorm_mean"] = rng.standard_normal(channels).astype(np.float32)
    data["renorm_stddev"] = rng.uniform(0.5, 2.0, channels).astype(np.float32)
  return data


# ---------------------------------------------------------------------------------------------
# bnjax


def _freeze(options: dict) -> tuple:
  """Options as a hashable static argument (``renorm_clipping`` is a dict); ``_thaw`` undoes it."""
  return tuple(
    sorted(
      (k, ("dict", tuple(sorted(v.items()))) if isinstance(v, dict) else v)
      for k, v in options.items()
    )
  )


def _thaw(options: tuple) -> dict:
  return {k: dict(v[1]) if isinstance(v, tuple) and v[:1] == ("dict",) else v for k, v in options}


@functools.partial(jax.jit, static_argnames=("training", "options"))
def _bnjax_step(x, dy, params, stats, mask, *, training, options):
  def f(x, params):
    return bnjax.batch_norm(x, params, stats, training=training, mask=mask, **_thaw(options))

  y, vjp, new_stats = jax.vjp(f, x, params, has_aux=True)
  dx, dparams = vjp(dy.astype(y.dtype))
  return y, new_stats, dx, dparams


@functools.cache
def _sharded_step(replicas: int, options):
  """The same step under shard_map over ``replicas`` of the 8 fake devices (a sub-mesh)."""
  mesh = Mesh(np.array(jax.devices()[:replicas]), ("replica",))

  def step(x, dy, params, stats, mask, training):
    def f(x, params):
      def local(x, params, mask):
        return bnjax.batch_norm(
          x, params, stats, training=training, mask=mask, axis_name="replica", **_thaw(options)
        )

      return jax.shard_map(
        local, mesh=mesh, in_specs=(P("replica"), P(), P("replica")), out_specs=(P("replica"), P())
      )(x, params, mask)

    y, vjp, new_stats = jax.vjp(f, x, params, has_aux=True)
    dx, dparams = vjp(dy.astype(y.dtype))
    return y, new_stats, dx, dparams

  return jax.jit(step, static_argnames=("training",))


def run_bnjax(case: Case, data: dict[str, np.ndarray]) -> Trace:
  """bnjax.batch_norm with ``case.convention.options()``, over the protocol above."""
  options = _freeze(case.convention.options())
  dtype = jnp.dtype(case.dtype)
  params = {k: jnp.asarray(data[k]) for k in case.params}
  stats = {k: jnp.asarray(data[k]) for k in STAT_KEYS if k in data}
  if case.convention.track_count:
    stats["count"] = jnp.zeros((), jnp.int32)
  step = _sharded_step(case.replicas, options) if case.replicas > 1 else None
  trace: Trace = {}
  for i in range(STEPS + 1):
    training = case.training if i < STEPS else False
    x = jnp.asarray(data["x"][i], dtype)
    dy = jnp.asarray(data["dy"][i], dtype)
    mask = None
    if "mask" in data:
      mask = jnp.asarray(data["mask"][i])[..., None]
    if step is not None:
      if mask is None:
        mask = jnp.ones(case.shape[:1] + (1,) * (len(case.shape) - 1), bool)
      y, new_stats, dx, dparams = step(x, dy, params, stats, mask, training)
    else:
      y, new_stats, dx, dparams = _bnjax_step(
        x, dy, params, stats, mask, training=training, options=options
      )
    prefix = f"step{i}" if i < STEPS else "eval"
    trace.update(_record(prefix, y, dx, dparams.get("scale"), dparams.get("bias")))
    if i < STEPS:
      stats = new_stats
      for key in STAT_KEYS:
        if key in stats:
          trace[f"{prefix}/{key}"] = np.asarray(stats[key], np.float64)
      if "count" in stats:
        trace[f"{prefix}/count"] = np.asarray(stats["count"], np.float64)
  return trace


def _as64(a) -> np.ndarray:
  """float64 copy of a jax, numpy (or 16-bit) array, through float32 (exact)."""
  return np.asarray(np.asarray(a).astype(np.float32), np.float64)


def _record(prefix, y, dx, dscale, dbias) -> Trace:
  """The step's entries; a missing parameter (None: center/scale off) has no gradient entry."""
  values = {"y": y, "dx": dx, "dscale": dscale, "dbias": dbias}
  return {
    f"{prefix}/{k}": _as64(v).reshape(-1) if k in ("dscale", "dbias") else _as64(v)
    for k, v in values.items()
    if v is not None
  }


# ---------------------------------------------------------------------------------------------
# TensorFlow and Keras (in this process)


@functools.cache
def tf():
  """TensorFlow, imported once, quietly; Keras 3 is ``tf.keras`` (TF_USE_LEGACY_KERAS unset)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow

  return tensorflow


def _tf_inputs(case, data, i):
  """x[i] and dy[i] as TensorFlow constants of the case's dtype."""
  dtype = getattr(tf(), case.dtype)
  return tf().constant(data["x"][i], dtype), tf().constant(data["dy"][i], dtype)


def _reduced_axes(case):
  return [a for a in range(len(case.shape)) if a != case.feature_axis]


def _broadcast(case, v):
  shape = [1] * len(case.shape)
  shape[case.feature_axis] = -1
  return tf().reshape(v, shape)


def run_tf_nn(case: Case, data) -> Trace:
  """tf.nn.moments (tf.nn.weighted_moments with a mask) + tf.nn.batch_normalization, with
  moving averages the user keeps in decay form, ``moving.assign_sub((moving - value) * (1 -
  decay))`` (what tf.compat.v1's assign_moving_average(zero_debias=False) did)."""
  t = tf()
  decay, eps = case.layer["decay"], case.layer["variance_epsilon"]
  gamma, beta = t.Variable(data["scale"]), t.Variable(data["bias"])
  moving_mean, moving_var = t.Variable(data["mean"]), t.Variable(data["var"])
  trace: Trace = {}
  for i in range(STEPS + 1):
    training = i < STEPS
    x, dy = _tf_inputs(case, data, i)
    with t.GradientTape() as tape:
      tape.watch(x)
      if training and "mask" in data:
        w = t.constant(data["mask"][i][..., None], x.dtype)
        mean, var = t.nn.weighted_moments(x, _reduced_axes(case), w, keepdims=True)
      elif training:
        mean, var = t.nn.moments(x, _reduced_axes(case), keepdims=True)
      else:
        mean, var = _broadcast(case, moving_mean), _broadcast(case, moving_var)
      y = t.nn.batch_normalization(
        x, mean, var, _broadcast(case, beta), _broadcast(case, gamma), eps
      )
    dx, dscale, dbias = tape.gradient(y, [x, gamma, beta], output_gradients=dy)
    prefix = f"step{i}" if training else "eval"
    trace.update(_record(prefix, y, dx, dscale, dbias))
    if training:
      for moving, value in ((moving_mean, mean), (moving_var, var)):
        moving.assign_sub((moving - t.reshape(value, [-1])) * (1 - decay))
      trace[f"{prefix}/mean"] = np.asarray(moving_mean.numpy(), np.float64)
      trace[f"{prefix}/var"] = np.asarray(moving_var.numpy(), np.float64)
  return trace


def run_tf_fused(case: Case, data) -> Trace:
  """tf.compat.v1.nn.fused_batch_norm (FusedBatchNormV3), with TF's defaults for what
  ``case.layer`` leaves out."""
  t = tf()
  gamma, beta = t.Variable(data["scale"]), t.Variable(data["bias"])
  running_mean, running_var = t.Variable(data["mean"]), t.Variable(data["var"])
  trace: Trace = {}
  for i in range(STEPS + 1):
    training = i < STEPS
    x, dy = _tf_inputs(case, data, i)
    with t.GradientTape() as tape:
      tape.watch(x)
      y, new_mean, new_var = t.compat.v1.nn.fused_batch_norm(
        x, gamma, beta, mean=running_mean, variance=running_var, is_training=training, **case.layer
      )
    dx, dscale, dbias = tape.gradient(y, [x, gamma, beta], output_gradients=dy)
    prefix = f"step{i}" if training else "eval"
    trace.update(_record(prefix, y, dx, dscale, dbias))
    if training:
      running_mean.assign(new_mean)
      running_var.assign(new_var)
      trace[f"{prefix}/mean"] = np.asarray(new_mean.numpy(), np.float64)
      trace[f"{prefix}/var"] = np.asarray(new_var.numpy(), np.float64)
  return trace


# Keras weight names -> bnjax names (interop.keras converts the same way)
KERAS_NAMES = {
  "gamma": "scale",
  "beta": "bias",
  "moving_mean": "mean",
  "moving_variance": "var",
  "moving_stddev": "stddev",
  "renorm_mean": "renorm_mean",
  "renorm_stddev": "renorm_stddev",
}


def _keras_variables(layer, unwrap) -> dict:
  """The layer's weights by bnjax name (``unwrap``: Keras 3 variable -> its tf.Variable)."""
  return {
    ours: unwrap(getattr(layer, theirs))
    for theirs, ours in KERAS_NAMES.items()
    if getattr(layer, theirs, None) is not None
  }


def _keras_layer_trace(case, data, layer, variables) -> Trace:
  """Runs a built Keras layer (Keras 3 or tf_keras) through the protocol.

  ``variables``: the underlying tf.Variables by bnjax name (``_keras_variables``). A frozen
  layer (``trainable=False``) has non-trainable weights, which a tape does not watch on its
  own, so all are watched explicitly.
  """
  t = tf()
  assert sorted(k for k in variables if k in ("scale", "bias")) == sorted(case.params), case.id
  for key, v in variables.items():
    v.assign(data[key])
  gamma, beta = variables.get("scale"), variables.get("bias")
  params = [v for v in (gamma, beta) if v is not None]
  trace: Trace = {}
  for i in range(STEPS + 1):
    training = i < STEPS
    x, dy = _tf_inputs(case, data, i)
    kwargs = {}
    if training and "mask" in data:
      kwargs["mask"] = t.constant(data["mask"][i])
    with t.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch([x, *params])
      y = layer(x, training=training, **kwargs)
    dx, *dparams = tape.gradient(y, [x, *params], output_gradients=t.cast(dy, y.dtype))
    dscale = dparams.pop(0) if gamma is not None else None
    dbias = dparams.pop(0) if beta is not None else None
    prefix = f"step{i}" if training else "eval"
    trace.update(_record(prefix, y, dx, dscale, dbias))
    if training:
      for key in STAT_KEYS:
        if key in variables:
          trace[f"{prefix}/{key}"] = np.asarray(variables[key].numpy(), np.float64)
  return trace


_POLICIES = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}


def run_keras(case: Case, data) -> Trace:
  """Keras 3 ``keras.layers.BatchNormalization`` (``tf.keras`` in TF 2.21); 16-bit inputs
  under the mixed_float16 / mixed_bfloat16 policies; ``trainable`` from ``case.layer``."""
  keras = tf().keras
  if not keras.__version__.startswith("3."):
    raise RuntimeError(
      f"tf.keras is Keras {keras.__version__}, not Keras 3: unset TF_USE_LEGACY_KERAS"
    )
  layer_kwargs = dict(case.layer)
  trainable = layer_kwargs.pop("trainable", True)
  layer = keras.layers.BatchNormalization(dtype=_POLICIES[case.dtype], **layer_kwargs)
  layer.build(case.shape)
  layer.trainable = trainable
  return _keras_layer_trace(case, data, layer, _keras_variables(layer, lambda w: w.value))


@functools.cache
def tf_keras():
  tf()
  import tf_keras as module

  return module


def run_tf_keras(case: Case, data) -> Trace:
  """tf_keras (Keras 2) ``BatchNormalization``; ``fused`` etc. from ``case.layer``."""
  layer_kwargs = dict(case.layer)
  trainable = layer_kwargs.pop("trainable", True)
  layer = tf_keras().layers.BatchNormalization(dtype=_POLICIES[case.dtype], **layer_kwargs)
  layer.build(case.shape)
  layer.trainable = trainable
  expected_fused = case.convention.running_variance == "unbiased"  # fused stores unbiased
  if layer.fused != expected_fused:
    raise AssertionError(
      f"{case.id}: tf_keras resolved fused={layer.fused}, the case's"
      f" convention assumes fused={expected_fused}"
    )
  return _keras_layer_trace(case, data, layer, _keras_variables(layer, lambda w: w))


# ---------------------------------------------------------------------------------------------
# PyTorch


@functools.cache
def torch():
  import torch as module

  return module


def run_torch(case: Case, data) -> Trace:
  """torch.nn.BatchNorm1d/2d/3d by rank; ``case.layer``: momentum, eps, memory_format."""
  t = torch()
  layer_kwargs = dict(case.layer)
  memory_format = layer_kwargs.pop("memory_format", None)
  cls = {2: t.nn.BatchNorm1d, 3: t.nn.BatchNorm1d, 4: t.nn.BatchNorm2d, 5: t.nn.BatchNorm3d}
  bn = cls[len(case.shape)](case.shape[1], **layer_kwargs)
  with t.no_grad():
    for name, key in (
      ("weight", "scale"),
      ("bias", "bias"),
      ("running_mean", "mean"),
      ("running_var", "var"),
    ):
      getattr(bn, name).copy_(t.from_numpy(data[key]))
  dtype = getattr(t, case.dtype)
  trace: Trace = {}
  for i in range(STEPS + 1):
    training = i < STEPS
    bn.train(training)
    x = t.from_numpy(data["x"][i]).to(dtype)
    if memory_format is not None:
      x = x.contiguous(memory_format=getattr(t, memory_format))
    x.requires_grad_(True)
    bn.zero_grad()
    y = bn(x)
    y.backward(t.from_numpy(data["dy"][i]).to(dtype))
    prefix = f"step{i}" if training else "eval"
    trace.update(
      _record(
        prefix,
        *(v.detach().to(t.float32).numpy() for v in (y, x.grad, bn.weight.grad, bn.bias.grad)),
      )
    )
    if training:
      trace[f"{prefix}/mean"] = _as64(bn.running_mean.numpy())
      trace[f"{prefix}/var"] = _as64(bn.running_var.numpy())
      trace[f"{prefix}/count"] = np.asarray(bn.num_batches_tracked.item(), np.float64)
  return trace


# ---------------------------------------------------------------------------------------------
# Flax


def run_flax(case: Case, data) -> Trace:
  """flax.linen.BatchNorm (``case.layer['module'] == 'linen'``) or flax.nnx.BatchNorm, with
  Flax's defaults (use_fast_variance=True) unless ``case.layer`` says otherwise."""
  from flax import linen, nnx

  layer_kwargs = dict(case.layer)
  module = layer_kwargs.pop("module")
  if module == "linen":
    bn = linen.BatchNorm(**layer_kwargs)
    params = {"scale": data["scale"], "bias": data["bias"]}
    stats = {"mean": data["mean"], "var": data["var"]}

    def call(x, params, stats, training):
      y, updates = bn.apply(
        {"params": params, "batch_stats": stats},
        x,
        use_running_average=not training,
        mutable=["batch_stats"],
      )
      return y, updates["batch_stats"]
  else:
    model = nnx.BatchNorm(case.shape[-1], rngs=nnx.Rngs(0), **layer_kwargs)
    for key in ("scale", "bias", "mean", "var"):
      getattr(model, key)[...] = jnp.asarray(data[key])
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def call(x, params, stats, training):
      model = nnx.merge(graphdef, params, stats)
      model.use_running_average = not training
      y = model(x)
      return y, nnx.state(model, nnx.BatchStat)

  def value(tree, key):
    return np.asarray(tree[key][...], np.float64)

  trace: Trace = {}
  with jax.numpy_dtype_promotion("standard"):  # Flax relies on implicit promotion
    for i in range(STEPS + 1):
      training = i < STEPS
      x = jnp.asarray(data["x"][i], case.dtype)
      dy = jnp.asarray(data["dy"][i], case.dtype)
      # stats are an argument (NNX mutates them only at their own trace level); their
      # cotangent is dropped
      y, vjp, new_stats = jax.vjp(
        functools.partial(call, training=training), x, params, stats, has_aux=True
      )
      dx, dparams, _ = vjp(dy)
      prefix = f"step{i}" if training else "eval"
      trace.update(_record(prefix, y, dx, value(dparams, "scale"), value(dparams, "bias")))
      if training:
        stats = new_stats
        trace[f"{prefix}/mean"] = value(stats, "mean")
        trace[f"{prefix}/var"] = value(stats, "var")
  return trace


RUNNERS = {
  "tf_nn": run_tf_nn,
  "tf_fused": run_tf_fused,
  "keras": run_keras,
  "tf_keras": run_tf_keras,
  "torch": run_torch,
  "flax": run_flax,
}
# reference -> the script that runs it, all of a script's cases in one process
SUBPROCESS_SCRIPTS = {
  "tf_v1_layers": "tf_subprocess.py",
  "keras_sync": "tf_subprocess.py",
  "tf_keras_sync": "tf_subprocess.py",
  "keras_jax": "keras_jax_subprocess.py",
}
SUBPROCESS_REFERENCES = tuple(SUBPROCESS_SCRIPTS)
# What each script's process needs set before it imports anything.
_SUBPROCESS_ENV = {
  "tf_subprocess.py": {"TF_USE_LEGACY_KERAS": "1"},
  "keras_jax_subprocess.py": {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"},
}
SUBPROCESS_TIMEOUT_S = 600


def run_subprocess(cases: list[Case]) -> dict[str, Trace]:
  """Traces of ``cases`` (all SUBPROCESS_REFERENCES): one process per script."""
  out: dict[str, Trace] = {}
  for script in dict.fromkeys(SUBPROCESS_SCRIPTS[c.reference] for c in cases):
    out.update(_run_script(script, [c for c in cases if SUBPROCESS_SCRIPTS[c.reference] == script]))
  return out


def _run_script(script: str, cases: list[Case]) -> dict[str, Trace]:
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    arrays, specs = {}, []
    for case in cases:
      for key, value in make_data(case).items():
        arrays[f"{case.id}|{key}"] = value
      specs.append(
        {
          "id": case.id,
          "reference": case.reference,
          "shape": list(case.shape),
          "axis": case.feature_axis,
          "layer": case.layer,
          "dtype": case.dtype,
          "replicas": case.replicas,
          "steps": STEPS,
        }
      )
    np.savez(tmp / "inputs.npz", **arrays)
    (tmp / "cases.json").write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore", **_SUBPROCESS_ENV[script])
    try:
      done = subprocess.run(
        [sys.executable, str(HERE / script), str(tmp)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
      )
    except subprocess.TimeoutExpired as e:
      stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
      raise RuntimeError(
        f"tests/{script} did not finish in {SUBPROCESS_TIMEOUT_S} s"
        f" ({len(cases)} cases); its stderr ends:\n{(stderr or '')[-4000:]}"
      ) from None
    if done.returncode != 0:
      raise RuntimeError(f"tests/{script} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    with np.load(tmp / "traces.npz") as f:
      out: dict[str, Trace] = {}
      for key in f.files:
        case_id, name = key.split("|", 1)
        out.setdefault(case_id, {})[name] = np.asarray(f[key], np.float64)
  return out


# ---------------------------------------------------------------------------------------------
# Comparison


def kind(name: str) -> str:
  """'outputs' (y), 'gradients' (dx, dscale, dbias) or 'statistics' (mean, var, count and
  renorm's stddev, renorm_mean, renorm_stddev)."""
  leaf = name.split("/")[1]
  if leaf in (*STAT_KEYS, "count"):
    return "statistics"
  return "outputs" if leaf == "y" else "gradients"


def tolerance_for(case: Case, name: str) -> dict[str, float]:
  """Outputs and dx in the input dtype; parameter gradients and statistics in float32."""
  leaf = name.split("/")[1]
  dtype = case.dtype if leaf in ("y", "dx") else "float32"
  return cross_framework(jnp.dtype(dtype), case.reduction_size)


def term_magnitudes(case: Case, data: dict[str, np.ndarray], expected: Trace) -> dict[str, float]:
  """The magnitude of the terms each traced value is computed from (tolerances.cross_framework).

  In float64 from the inputs: batch statistics in training steps (over the mask), the
  reference's own running statistics where it normalizes with them. With renorm, training
  steps compute y = xhat * (r * scale) + (d * scale + bias), with r and d from the
  reference's renorm statistics before the step.
  """
  axes = tuple(_reduced_axes(case))
  shape = [1] * len(case.shape)
  shape[case.feature_axis] = -1

  def col(v):
    return np.asarray(v, np.float64).reshape(shape)

  options = case.convention.options()
  eps = options["epsilon"]
  ones = col(np.ones(case.shape[case.feature_axis]))
  scale = col(data["scale"]) if "scale" in case.params else ones
  bias = col(data["bias"]) if "bias" in case.params else 0 * ones
  mean, var = col(data["mean"]), col(data["var"])
  out = {}
  for i in range(STEPS + 1):
    prefix = f"step{i}" if i < STEPS else "eval"
    x, dy = (np.asarray(data[k][i], np.float64) for k in ("x", "dy"))
    if i < STEPS and case.training:
      w = np.ones_like(x)
      if "mask" in data:
        w = np.broadcast_to(data["mask"][i][..., None], x.shape)
      n = w.sum(axes, keepdims=True)
      m = (w * x).sum(axes, keepdims=True) / n
      v = (w * (x - m) ** 2).sum(axes, keepdims=True) / n
    elif i < STEPS:
      m, v = mean, var
    else:
      m, v = col(expected[f"step{STEPS - 1}/mean"]), col(expected[f"step{STEPS - 1}/var"])
    r, d = ones, 0 * ones
    if case.renorm and i < STEPS and case.training:
      before = data if i == 0 else {k: expected[f"step{i - 1}/{k}"] for k in RENORM_STATS}
      r, d = _renorm_correction(
        m,
        v,
        col(before["renorm_mean"]),
        col(before["renorm_stddev"]),
        eps,
        options.get("renorm_clipping") or {},
      )
    a = scale * r / np.sqrt(v + eps)
    xhat = (x - m) / np.sqrt(v + eps)
    out[f"{prefix}/y"] = float(
      max(np.abs(x * a).max(), np.abs(m * a).max(), np.abs(d * scale).max(), np.abs(bias).max())
    )
    out[f"{prefix}/dx"] = float(np.abs(a * dy).max())
    out[f"{prefix}/dscale"] = float((np.abs(dy) * (np.abs(xhat) * r + np.abs(d))).sum(axes).max())
    out[f"{prefix}/dbias"] = float(np.abs(dy).sum(axes).max())
  return out


def _renorm_correction(mean, var, renorm_mean, renorm_stddev, eps, clipping):
  """Batch renormalization's (r, d) in float64, as bnjax._renorm and Keras compute them."""
  sigma = np.maximum(renorm_stddev, np.sqrt(eps))
  r = np.sqrt(var + eps) / sigma
  d = (mean - renorm_mean) / sigma
  if clipping.get("rmin") is not None:
    r = np.maximum(r, clipping["rmin"])
  if clipping.get("rmax") is not None:
    r = np.minimum(r, clipping["rmax"])
  if clipping.get("dmax") is not None:
    d = np.clip(d, -clipping["dmax"], clipping["dmax"])
  return r, d


def errors(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
  """(max abs error, max relative error) of ``actual`` against ``expected``."""
  diff = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
  rel = diff / np.maximum(np.abs(expected), np.finfo(np.float32).tiny)
  return float(diff.max(initial=0.0)), float(rel.max(initial=0.0))


class Errors(NamedTuple):
  """The worst differences of one kind (outputs, gradients or statistics) in one case."""

  abs: float  # max |bnjax - reference|
  rel: float  # max |bnjax - reference| / |reference| (large where the reference is ~0)
  of_tolerance: float  # max |bnjax - reference| / (rtol |reference| + atol * magnitude)


def compare(case: Case, got: Trace, expected: Trace, data=None) -> dict[str, Errors]:
  """Asserts ``got`` (bnjax) matches ``expected`` (the reference), every step, every entry.

  ``|got - expected| <= rtol * |expected| + atol * magnitude``, with the tolerances of
  ``tolerances.cross_framework`` and ``magnitude`` from ``term_magnitudes`` (statistics:
  max(1, |expected|)). Returns the worst errors per kind.
  """
  data = make_data(case) if data is None else data
  missing = sorted(set(expected) - set(got))
  assert not missing, f"{case.id}: bnjax trace lacks {missing}"
  magnitudes = term_magnitudes(case, data, expected)
  worst: dict[str, Errors] = {}
  for name in sorted(expected, key=lambda n: (n.startswith("eval"), n)):  # steps first
    have, want = got[name], expected[name]
    assert have.shape == want.shape, (case.id, name, have.shape, want.shape)
    tol = tolerance_for(case, name)
    magnitude = magnitudes.get(name, max(1.0, float(np.abs(want).max(initial=0.0))))
    np.testing.assert_allclose(
      have,
      want,
      rtol=tol["rtol"],
      atol=tol["atol"] * magnitude,
      err_msg=f"{case.id}: {name} (terms' magnitude {magnitude:.3g})",
    )
    a, r = errors(have, want)
    bound = tol["rtol"] * np.abs(want) + tol["atol"] * magnitude
    ratio = float((np.abs(have - want) / bound).max(initial=0.0))
    old = worst.get(kind(name), Errors(0.0, 0.0, 0.0))
    worst[kind(name)] = Errors(max(old.abs, a), max(old.rel, r), max(old.of_tolerance, ratio))
  return worst


# ---------------------------------------------------------------------------------------------
# The cases. Shapes are small (2..8 elements per channel where Bessel's n/(n-1) shows) and cover
# 2-D, 3-D, 4-D and 5-D inputs, channels last and first, float32 and 16-bit inputs, masks where
# the reference takes one, frozen layers, and two replicas.

_KERAS_NCHW = cv.KERAS.replace(axis=1)
# Renorm: clipping bounds that bind at some step for these inputs (the renorm statistics start
# away from the batch's), and a renorm momentum low enough for them to move.
_RENORM = dict(
  renorm=True, renorm_clipping={"rmin": 0.8, "rmax": 1.4, "dmax": 0.6}, renorm_momentum=0.7
)


def _labelled(convention: cv.Convention, label: str) -> cv.Convention:
  """The same options under a name that tells the report's rows apart (``[jax]``, ``[renorm]``)."""
  return convention.replace(name=convention.name + label)


def _keras_jax(**options) -> cv.Convention:
  """Keras 3 on the JAX backend: the KERAS preset's arithmetic (jnp.var and x * a + (bias -
  mean * a), as on TensorFlow)."""
  return _labelled(cv.keras(**options), "[jax]")


CASES: list[Case] = [
  # tf.nn.moments + tf.nn.batch_normalization, user-owned moving averages (decay form)
  Case("tf_nn-nhwc", "tf_nn", (4, 3, 2, 3), cv.TF_NN, dict(decay=0.99, variance_epsilon=1e-3)),
  Case(
    "tf_nn-nchw-decay0.9",
    "tf_nn",
    (2, 3, 2, 2),
    cv.tf_nn(decay=0.9, variance_epsilon=1e-5, axis=1),
    dict(decay=0.9, variance_epsilon=1e-5),
  ),
  Case(
    "tf_nn-2d-n3-mask",
    "tf_nn",
    (6, 4),
    cv.tf_nn(decay=0.5, variance_epsilon=1e-3),
    dict(decay=0.5, variance_epsilon=1e-3),
    mask=True,
  ),
  Case(
    "tf_nn-nhwc-offset30",
    "tf_nn",
    (4, 3, 2, 3),
    cv.TF_NN,
    dict(decay=0.99, variance_epsilon=1e-3),
    offset=30.0,
  ),
  # TF's fused kernel
  Case("tf_fused-nhwc-defaults", "tf_fused", (2, 2, 1, 3), cv.TF_FUSED_NHWC),
  Case(
    "tf_fused-nhwc-factor0.1",
    "tf_fused",
    (4, 3, 2, 3),
    cv.tf_fused(exponential_avg_factor=0.1, epsilon=1e-5),
    dict(exponential_avg_factor=0.1, epsilon=1e-5),
  ),
  Case(
    "tf_fused-nchw-factor0.3",
    "tf_fused",
    (2, 3, 2, 2),
    cv.tf_fused(exponential_avg_factor=0.3, data_format="NCHW"),
    dict(exponential_avg_factor=0.3, data_format="NCHW"),
  ),
  Case(
    "tf_fused-ndhwc",
    "tf_fused",
    (2, 2, 2, 1, 3),
    cv.tf_fused(exponential_avg_factor=0.5, data_format="NDHWC"),
    dict(exponential_avg_factor=0.5, data_format="NDHWC"),
  ),
  Case(
    "tf_fused-ncdhw-f16",
    "tf_fused",
    (2, 3, 2, 1, 2),
    cv.tf_fused(exponential_avg_factor=0.5, data_format="NCDHW"),
    dict(exponential_avg_factor=0.5, data_format="NCDHW"),
    dtype="float16",
  ),
  Case(
    "tf_fused-nhwc-bf16",
    "tf_fused",
    (4, 3, 2, 3),
    cv.tf_fused(exponential_avg_factor=0.1),
    dict(exponential_avg_factor=0.1),
    dtype="bfloat16",
  ),
  Case(
    "tf_fused-nhwc-epsilon0",
    "tf_fused",
    (2, 2, 1, 3),
    cv.tf_fused(exponential_avg_factor=0.1, epsilon=0.0),
    dict(exponential_avg_factor=0.1, epsilon=0.0),
  ),
  # Keras 3 (tf.keras in TF 2.21)
  Case("keras-nhwc-defaults", "keras", (4, 3, 2, 3), cv.KERAS),
  Case("keras-nchw", "keras", (2, 3, 2, 2), _KERAS_NCHW, dict(axis=1)),
  Case("keras-2d-n2", "keras", (2, 5), cv.keras(momentum=0.5), dict(momentum=0.5)),
  Case(
    "keras-5d-momentum0.9",
    "keras",
    (2, 2, 2, 1, 3),
    cv.keras(momentum=0.9, epsilon=1e-5),
    dict(momentum=0.9, epsilon=1e-5),
  ),
  Case("keras-3d-mask", "keras", (4, 3, 3), cv.keras(momentum=0.8), dict(momentum=0.8), mask=True),
  Case(
    "keras-nhwc-mixed_float16",
    "keras",
    (4, 3, 2, 3),
    cv.keras(momentum=0.9),
    dict(momentum=0.9),
    dtype="float16",
  ),
  Case(
    "keras-nchw-mixed_bfloat16",
    "keras",
    (4, 3, 2, 2),
    cv.keras(axis=1, momentum=0.9),
    dict(axis=1, momentum=0.9),
    dtype="bfloat16",
  ),
  Case(
    "keras-trainable-false", "keras", (4, 3, 2, 3), cv.KERAS, dict(trainable=False), training=False
  ),
  # tf_keras (Keras 2): fused (its default for 4-D/5-D) and not
  Case("tf_keras-fused-nhwc-defaults", "tf_keras", (2, 2, 1, 3), cv.TF_KERAS_FUSED),
  Case(
    "tf_keras-fused-nchw",
    "tf_keras",
    (2, 3, 2, 2),
    cv.tf_keras(fused=True, axis=1, momentum=0.5),
    dict(axis=1, momentum=0.5),
  ),
  Case(
    "tf_keras-fused-ncdhw",
    "tf_keras",
    (2, 3, 2, 1, 2),
    cv.tf_keras(fused=True, axis=1, momentum=0.9),
    dict(axis=1, momentum=0.9),
  ),
  Case(
    "tf_keras-fused-nhwc-mixed_float16",
    "tf_keras",
    (4, 3, 2, 3),
    cv.tf_keras(fused=True, momentum=0.9),
    dict(momentum=0.9),
    dtype="float16",
  ),
  Case("tf_keras-unfused-2d-defaults", "tf_keras", (3, 4), cv.TF_KERAS_UNFUSED),
  Case(
    "tf_keras-unfused-nhwc",
    "tf_keras",
    (2, 2, 1, 3),
    cv.tf_keras(fused=False, momentum=0.5),
    dict(fused=False, momentum=0.5),
  ),
  Case(
    "tf_keras-unfused-3d-mask",
    "tf_keras",
    (4, 3, 3),
    cv.tf_keras(fused=False, momentum=0.8),
    dict(momentum=0.8),
    mask=True,
  ),
  Case(
    "tf_keras-unfused-mixed_bfloat16",
    "tf_keras",
    (6, 4),
    cv.tf_keras(fused=False, momentum=0.9),
    dict(momentum=0.9),
    dtype="bfloat16",
  ),
  Case(
    "tf_keras-fused-trainable-false",
    "tf_keras",
    (2, 2, 2, 3),
    cv.TF_KERAS_FUSED,
    dict(trainable=False),
    training=False,
  ),
  # TF1 tf.compat.v1.layers.batch_normalization (subprocess, graph mode)
  Case("tf_v1_layers-fused-nhwc", "tf_v1_layers", (2, 2, 1, 3), cv.TF_V1_LAYERS_FUSED),
  Case("tf_v1_layers-unfused-2d", "tf_v1_layers", (3, 4), cv.TF_V1_LAYERS_UNFUSED),
  Case(
    "tf_v1_layers-fused-nchw",
    "tf_v1_layers",
    (2, 3, 2, 2),
    cv.tf_v1_layers(fused=True, axis=1, momentum=0.5),
    dict(axis=1, momentum=0.5),
  ),
  Case(
    "tf_v1_layers-trainable-false",
    "tf_v1_layers",
    (2, 2, 1, 3),
    cv.tf_v1_layers(fused=True, momentum=0.5, trainable=False),
    dict(momentum=0.5, trainable=False),
  ),
  # PyTorch
  Case("torch-1d-n2-defaults", "torch", (2, 4), cv.PYTORCH),
  Case("torch-1d-ncl", "torch", (2, 3, 3), cv.PYTORCH),
  Case(
    "torch-2d-momentum0.3",
    "torch",
    (2, 3, 2, 2),
    cv.pytorch(momentum=0.3, eps=1e-3),
    dict(momentum=0.3, eps=1e-3),
  ),
  Case(
    "torch-2d-channels_last", "torch", (2, 3, 2, 2), cv.PYTORCH, dict(memory_format="channels_last")
  ),
  Case("torch-3d", "torch", (2, 3, 2, 1, 2), cv.PYTORCH),
  Case("torch-2d-cumulative", "torch", (2, 3, 2, 2), cv.PYTORCH_CUMULATIVE, dict(momentum=None)),
  Case("torch-2d-float16", "torch", (4, 3, 2, 2), cv.PYTORCH, dtype="float16"),
  Case("torch-2d-bfloat16", "torch", (4, 3, 2, 2), cv.PYTORCH, dtype="bfloat16"),
  Case("torch-2d-offset30", "torch", (4, 3, 2, 2), cv.PYTORCH, offset=30.0),
  # Flax (defaults: fast variance)
  Case("flax-linen-defaults", "flax", (4, 3, 2, 3), cv.FLAX_LINEN, dict(module="linen")),
  Case("flax-nnx-defaults", "flax", (8, 3), cv.FLAX_NNX, dict(module="nnx")),
  # Two replicas: MirroredStrategy vs shard_map with axis_name (subprocess)
  Case(
    "keras-synchronized-2-replicas",
    "keras_sync",
    (8, 2, 3),
    cv.keras(synchronized=True, momentum=0.9),
    dict(momentum=0.9),
    replicas=2,
  ),
  Case(
    "tf_keras-synchronized-2-replicas",
    "tf_keras_sync",
    (8, 3),
    cv.tf_keras(fused=False, synchronized=True, momentum=0.9),
    dict(momentum=0.9),
    replicas=2,
  ),
  # Batch renormalization with clipping: tf_keras and Keras 3 (TensorFlow backend)
  Case(
    "tf_keras-renorm-nhwc",
    "tf_keras",
    (4, 3, 2, 3),
    _labelled(cv.tf_keras(fused=False, momentum=0.9, **_RENORM), "[renorm]"),
    dict(momentum=0.9, **_RENORM),
  ),
  Case(
    "keras-renorm-2d",
    "keras",
    (6, 4),
    _labelled(cv.keras(momentum=0.8, **_RENORM), "[renorm]"),
    dict(momentum=0.8, **_RENORM),
  ),
  # Keras 3 on the JAX backend (subprocess): gradients by jax.vjp of the layer's stateless_call
  Case("keras_jax-nhwc-defaults", "keras_jax", (4, 3, 2, 3), _keras_jax()),
  Case(
    "keras_jax-nchw-momentum0.5",
    "keras_jax",
    (2, 3, 2, 2),
    _keras_jax(axis=1, momentum=0.5),
    dict(axis=1, momentum=0.5),
  ),
  Case(
    "keras_jax-2d-no-center",
    "keras_jax",
    (6, 4),
    _keras_jax(momentum=0.9, epsilon=1e-5),
    dict(momentum=0.9, epsilon=1e-5, center=False),
    params=("scale",),
  ),
  Case(
    "keras_jax-nhwc-no-scale",
    "keras_jax",
    (4, 3, 2, 3),
    _keras_jax(epsilon=0.1),
    dict(epsilon=0.1, scale=False),
    params=("bias",),
  ),
  Case(
    "keras_jax-3d-mask",
    "keras_jax",
    (4, 3, 3),
    _keras_jax(momentum=0.8),
    dict(momentum=0.8),
    mask=True,
  ),
  Case("keras_jax-nhwc-offset30", "keras_jax", (4, 3, 2, 3), _keras_jax(), offset=30.0),
  Case(
    "keras_jax-nhwc-mixed_float16",
    "keras_jax",
    (4, 3, 2, 3),
    _keras_jax(momentum=0.9),
    dict(momentum=0.9),
    dtype="float16",
  ),
  Case(
    "keras_jax-nchw-mixed_bfloat16",
    "keras_jax",
    (4, 3, 2, 2),
    _keras_jax(axis=1, momentum=0.9),
    dict(axis=1, momentum=0.9),
    dtype="bfloat16",
  ),
  Case(
    "keras_jax-trainable-false",
    "keras_jax",
    (4, 3, 2, 3),
    _keras_jax(),
    dict(trainable=False),
    training=False,
  ),
  Case(
    "keras_jax-renorm-nhwc",
    "keras_jax",
    (4, 3, 2, 3),
    _labelled(_keras_jax(momentum=0.9, **_RENORM), "[renorm]"),
    dict(momentum=0.9, **_RENORM),
  ),
]
CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "case ids must be unique"


def run_reference(case: Case) -> Trace:
  """The reference's trace for ``case`` (in-process references only)."""
  return RUNNERS[case.reference](case, make_data(case))
