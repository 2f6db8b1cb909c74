"""Keras 3 on the JAX backend; run by live_frameworks.run_subprocess.

    KERAS_BACKEND=jax python tests/keras_jax_subprocess.py DIR

reads DIR/cases.json and DIR/inputs.npz, writes DIR/traces.npz (keys 'case_id|step0/y', ...).
Keras chooses its backend once, when it is first imported, and the test process imports
TensorFlow's (``tf.keras``), so the JAX backend needs a process of its own.

Each case builds ``keras.layers.BatchNormalization`` under the float32, mixed_float16 or
mixed_bfloat16 policy and runs the protocol of live_frameworks.py through the layer's own
``stateless_call``, jitted as Keras's JAX trainer jits it: ``jax.vjp`` of it gives dx, dgamma
and dbeta for the cotangent dy, and its new non-trainable variables are the moving statistics
after the step (they are fed back in). No bnjax here.
"""

import functools
import json
import os
import pathlib
import sys

import numpy as np

os.environ["KERAS_BACKEND"] = "jax"
import jax
import keras

POLICIES = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
# Keras weight names -> bnjax names, as in live_frameworks.KERAS_NAMES
NAMES = {
  "gamma": "scale",
  "beta": "bias",
  "moving_mean": "mean",
  "moving_variance": "var",
  "moving_stddev": "stddev",
  "renorm_mean": "renorm_mean",
  "renorm_stddev": "renorm_stddev",
}
STATS = ("mean", "var", "stddev", "renorm_mean", "renorm_stddev")


def _as64(value):
  return np.asarray(np.asarray(value).astype(np.float32), np.float64)


def run_keras_jax(spec, data):
  """One case through the protocol: three training calls, then one inference call."""
  layer_kwargs = dict(spec["layer"])
  trainable = layer_kwargs.pop("trainable", True)
  layer = keras.layers.BatchNormalization(dtype=POLICIES[spec["dtype"]], **layer_kwargs)
  layer.build(tuple(spec["shape"]))
  layer.trainable = trainable
  for name, key in NAMES.items():
    if getattr(layer, name, None) is not None:
      getattr(layer, name).assign(data[key])
  # Variable values by bnjax name; stateless_call takes them as (trainable, non-trainable) lists
  # in the layer's order, which `trainable=False` changes (gamma and beta become non-trainable).
  variables = {
    k: getattr(layer, n) for n, k in NAMES.items() if getattr(layer, n, None) is not None
  }
  names = {id(v): k for k, v in variables.items()}
  trainable_names = [names[id(v)] for v in layer.trainable_variables]
  frozen_names = [names[id(v)] for v in layer.non_trainable_variables]
  values = {k: v.value for k, v in variables.items()}
  dtype = layer.compute_dtype

  @functools.partial(jax.jit, static_argnames="training")
  def step(x, dy, values, mask, *, training):
    def call(x, values):
      y, new_frozen = layer.stateless_call(
        [values[k] for k in trainable_names],
        [values[k] for k in frozen_names],
        x,
        training=training,
        mask=mask,
      )
      return y, dict(zip(frozen_names, new_frozen, strict=True))

    y, vjp, new_frozen = jax.vjp(call, x, values, has_aux=True)
    dx, dvalues = vjp(dy.astype(y.dtype))
    return y, dx, dvalues, new_frozen

  trace = {}
  for i in range(spec["steps"] + 1):
    training = i < spec["steps"]
    x = jax.numpy.asarray(data["x"][i], dtype)
    dy = jax.numpy.asarray(data["dy"][i], dtype)
    mask = jax.numpy.asarray(data["mask"][i]) if training and "mask" in data else None
    y, dx, dvalues, new_frozen = step(x, dy, values, mask, training=training)
    prefix = f"step{i}" if training else "eval"
    trace[f"{prefix}/y"], trace[f"{prefix}/dx"] = _as64(y), _as64(dx)
    for key, leaf in (("scale", "dscale"), ("bias", "dbias")):
      if key in dvalues:
        trace[f"{prefix}/{leaf}"] = _as64(dvalues[key])
    if training:
      values = {**values, **new_frozen}
      for key in STATS:
        if key in values:
          trace[f"{prefix}/{key}"] = _as64(values[key])
  return trace


def main(directory):
  if not keras.__version__.startswith("3.") or keras.backend.backend() != "jax":
    raise RuntimeError(
      f"need Keras 3 on the JAX backend, got Keras {keras.__version__} on"
      f" {keras.backend.backend()!r}"
    )
  directory = pathlib.Path(directory)
  specs = json.loads((directory / "cases.json").read_text())
  inputs = np.load(directory / "inputs.npz")
  traces = {}
  for spec in specs:
    if spec["reference"] != "keras_jax":
      raise ValueError(f"unknown reference {spec['reference']!r}")
    prefix = spec["id"] + "|"
    data = {k[len(prefix) :]: inputs[k] for k in inputs.files if k.startswith(prefix)}
    trace = run_keras_jax(spec, data)
    traces.update({prefix + k: v for k, v in trace.items()})
  np.savez(directory / "traces.npz", **traces)


if __name__ == "__main__":
  main(sys.argv[1])
