"""TensorFlow references that need a fresh process; run by live_frameworks.run_subprocess.

    TF_USE_LEGACY_KERAS=1 python tests/tf_subprocess.py DIR

reads DIR/cases.json and DIR/inputs.npz, writes DIR/traces.npz (keys 'case_id|step0/y', ...).
Two things must happen before TensorFlow does anything, which a shared test process cannot
promise:

- ``tf.compat.v1.layers.batch_normalization`` exists only with TF_USE_LEGACY_KERAS=1 set
  before TensorFlow is imported (``tf.keras`` is then tf_keras). It runs in TF1 graph mode: a
  ``tf.Graph``, placeholders, a ``Session`` and the ``UPDATE_OPS`` collection.
- ``tf.distribute.MirroredStrategy`` over two CPU replicas needs two logical CPU devices,
  which can only be configured before the runtime starts. Keras 3 (``import keras``, the
  TensorFlow backend) and tf_keras (``tf.keras`` here) run ``synchronized=True`` layers on it.

The protocol and the trace keys are those of live_frameworks.py; no bnjax here.
"""

import json
import os
import pathlib
import sys

import numpy as np

os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow as tf

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_CPU, [tf.config.LogicalDeviceConfiguration()] * 2)


def _record(trace, prefix, y, dx, dscale, dbias):
  for name, value in (("y", y), ("dx", dx), ("dscale", dscale), ("dbias", dbias)):
    trace[f"{prefix}/{name}"] = np.asarray(np.asarray(value).astype(np.float32), np.float64)


def run_tf_v1_layers(spec, data):
  """tf.compat.v1.layers.batch_normalization in a TF1 graph; updates run from UPDATE_OPS."""
  layer = dict(spec["layer"])
  dtype = getattr(tf, spec["dtype"])
  trace = {}
  graph = tf.Graph()
  with graph.as_default():
    x = tf.compat.v1.placeholder(dtype, spec["shape"])
    dy = tf.compat.v1.placeholder(dtype, spec["shape"])
    training = tf.compat.v1.placeholder(tf.bool, ())
    init = tf.compat.v1.constant_initializer
    y = tf.compat.v1.layers.batch_normalization(
      x,
      training=training,
      name="bn",
      gamma_initializer=init(data["scale"]),
      beta_initializer=init(data["bias"]),
      moving_mean_initializer=init(data["mean"]),
      moving_variance_initializer=init(data["var"]),
      **layer,
    )
    variables = {v.name.split("/")[-1].split(":")[0]: v for v in tf.compat.v1.global_variables()}
    gamma, beta = variables["gamma"], variables["beta"]
    grads = tf.gradients(y, [x, gamma, beta], grad_ys=dy)
    updates = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
    with tf.compat.v1.Session(graph=graph) as session:
      session.run(tf.compat.v1.global_variables_initializer())
      for i in range(spec["steps"] + 1):
        is_training = i < spec["steps"]
        feed = {x: data["x"][i], dy: data["dy"][i], training: is_training}
        out = session.run([y, grads] + ([updates] if is_training else []), feed)
        prefix = f"step{i}" if is_training else "eval"
        _record(trace, prefix, out[0], *out[1])
        if is_training:
          mean, var = session.run([variables["moving_mean"], variables["moving_variance"]])
          trace[f"{prefix}/mean"] = np.asarray(mean, np.float64)
          trace[f"{prefix}/var"] = np.asarray(var, np.float64)
  return trace


def run_synchronized(spec, data, layers_module):
  """A synchronized BatchNormalization under MirroredStrategy, batch split over replicas.

  Each replica differentiates its own sum(y * dy); the all-reduce inside the layer carries the
  other replicas' share back, so each replica's dx is that of the global loss, and the global
  dscale, dbias are the sum over replicas (what the strategy applies).
  """
  replicas = spec["replicas"]
  devices = [f"/cpu:{i}" for i in range(replicas)]
  strategy = tf.distribute.MirroredStrategy(devices)
  dtype = getattr(tf, spec["dtype"])
  with strategy.scope():
    layer = layers_module.BatchNormalization(synchronized=True, **spec["layer"])
    layer.build(spec["shape"])
  variables = [getattr(layer, n) for n in ("gamma", "beta", "moving_mean", "moving_variance")]
  for v, key in zip(variables, ("scale", "bias", "mean", "var"), strict=True):
    v.assign(data[key])
  gamma, beta = variables[0], variables[1]
  if hasattr(gamma, "value") and not isinstance(gamma, tf.Variable):  # Keras 3 KerasVariable
    gamma, beta = gamma.value, beta.value

  def shards(i):
    def per_replica(context):
      r = context.replica_id_in_sync_group
      size = spec["shape"][0] // replicas
      sl = slice(r * size, (r + 1) * size)
      return tf.constant(data["x"][i][sl], dtype), tf.constant(data["dy"][i][sl], dtype)

    return strategy.experimental_distribute_values_from_function(per_replica)

  @tf.function
  def step(inputs, training):
    def fn(inputs):
      x, dy = inputs
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
      return (y, *tuple(tape.gradient(y, [x, gamma, beta], output_gradients=dy)))

    return strategy.run(fn, args=(inputs,))

  trace = {}
  for i in range(spec["steps"] + 1):
    is_training = i < spec["steps"]
    y, dx, dscale, dbias = (
      [t.numpy() for t in strategy.experimental_local_results(v)]
      for v in step(shards(i), is_training)  # a Python bool: Keras 3 wants one
    )
    prefix = f"step{i}" if is_training else "eval"
    _record(
      trace, prefix, np.concatenate(y), np.concatenate(dx), np.sum(dscale, 0), np.sum(dbias, 0)
    )
    if is_training:
      trace[f"{prefix}/mean"] = np.asarray(variables[2].numpy(), np.float64)
      trace[f"{prefix}/var"] = np.asarray(variables[3].numpy(), np.float64)
  return trace


def main(directory):
  directory = pathlib.Path(directory)
  specs = json.loads((directory / "cases.json").read_text())
  inputs = np.load(directory / "inputs.npz")
  traces = {}
  for spec in specs:
    prefix = spec["id"] + "|"
    data = {k[len(prefix) :]: inputs[k] for k in inputs.files if k.startswith(prefix)}
    if spec["reference"] == "tf_v1_layers":
      trace = run_tf_v1_layers(spec, data)
    elif spec["reference"] == "keras_sync":
      import keras  # Keras 3, TensorFlow backend, whatever tf.keras is here

      trace = run_synchronized(spec, data, keras.layers)
    elif spec["reference"] == "tf_keras_sync":
      trace = run_synchronized(spec, data, tf.keras.layers)  # tf_keras: TF_USE_LEGACY_KERAS=1
    else:
      raise ValueError(f"unknown reference {spec['reference']!r}")
    traces.update({prefix + k: v for k, v in trace.items()})
  np.savez(directory / "traces.npz", **traces)


if __name__ == "__main__":
  main(sys.argv[1])
