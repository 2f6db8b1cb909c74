"""bnjax.training: steps that thread batch_stats, data parallelism, Keras-style freezing,
checkpoints that resume bit for bit, and every error it raises."""

import functools
import math
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from devices import device_mesh, multidevice
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tolerances import assert_close

import bnjax
from bnjax import training
from bnjax.linen import BatchNorm

MOMENTUM = 0.9


def plain_apply_fn(*, axis_name=None):
  """dense -> bnjax.batch_norm -> tanh -> dense, in the apply_fn protocol."""

  def apply_fn(params, batch_stats, x, *, training):
    h = x @ params["dense"]
    h, bn = bnjax.batch_norm(
      h,
      params["bn"],
      batch_stats["bn"],
      training=training,
      momentum=MOMENTUM,
      axis_name=axis_name,
    )
    return jnp.tanh(h) @ params["head"], {"bn": bn}

  return apply_fn


def plain_variables(seed=0):
  rng = np.random.default_rng(seed)  # NumPy: jax.random would compile a kernel per shape
  bn_params, bn_stats = bnjax.init(8)
  params = {
    "dense": jnp.asarray(rng.normal(size=(5, 8)) / math.sqrt(5), jnp.float32),
    "bn": bn_params,
    "head": jnp.asarray(rng.normal(size=(8, 3)) / math.sqrt(8), jnp.float32),
  }
  return params, {"bn": bn_stats}


def batch(n=64, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 5)) * 2.0 + 3.0
  return jnp.asarray(x, jnp.float32), jnp.asarray(rng.integers(0, 3, n), jnp.int32)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits, labels):
  return {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


# Built once: each jitted step compiles once for the module (shapes and dtypes do not change).
SGD = optax.sgd(0.1, momentum=0.9)
PLAIN_TRAIN_STEP = training.make_train_step(
  plain_apply_fn(), SGD, loss_fn=cross_entropy, metrics_fn=accuracy
)
PLAIN_EVAL_STEP = training.make_eval_step(
  plain_apply_fn(), loss_fn=cross_entropy, metrics_fn=accuracy
)


class Net(nn.Module):
  """Dense -> BN -> relu -> Dropout -> Dense -> BN -> Dense; layers in `frozen` run in eval mode."""

  frozen: frozenset = frozenset()
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train):
    for name in ("bn1", "bn2"):
      x = nn.Dense(8, use_bias=False)(x)
      frozen = name in self.frozen
      x = BatchNorm(use_running_average=not train or frozen, momentum=MOMENTUM, name=name)(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


@functools.cache
def linen_variables():
  """Net's variables, initialized once: `frozen` and `dropout` do not change them."""
  # An 'rbg' key: XLA's RngBitGenerator compiles in a third of the time of threefry on CPU.
  key = jax.random.key(0, impl="rbg")
  return jax.jit(lambda key: Net().init(key, batch()[0], train=False))(key)


def linen_state(tx):
  variables = linen_variables()
  return training.create_train_state(variables["params"], variables["batch_stats"], tx)


def test_train_step_is_one_optax_update_with_the_new_batch_stats():
  params, batch_stats = plain_variables()
  x, y = batch()
  state = training.create_train_state(params, batch_stats, SGD)
  new_state, metrics = PLAIN_TRAIN_STEP(state, x, y)

  @jax.jit
  def loss_and_grads(p):
    return jax.value_and_grad(
      lambda p: cross_entropy(plain_apply_fn()(p, batch_stats, x, training=True)[0], y)
    )(p)

  loss, grads = loss_and_grads(params)
  h = np.asarray(x, np.float64) @ np.asarray(params["dense"], np.float64)
  assert int(new_state.step) == 1
  assert_close(metrics["loss"], loss, jnp.float32, 64, "loss")
  jax.tree.map(  # sgd's first step: the momentum trace is the gradient
    lambda new, p, g: assert_close(new, p - 0.1 * g, jnp.float32, 64, "sgd update"),
    new_state.params,
    params,
    grads,
  )
  assert_close(new_state.batch_stats["bn"]["mean"], (1 - MOMENTUM) * h.mean(0), jnp.float32, 64)
  assert_close(
    new_state.batch_stats["bn"]["var"], MOMENTUM + (1 - MOMENTUM) * h.var(0), jnp.float32, 64
  )
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_eval_step_and_predict_use_the_running_statistics():
  apply_fn = plain_apply_fn()
  x, y = batch()
  state, _ = PLAIN_TRAIN_STEP(training.create_train_state(*plain_variables(), SGD), *batch(seed=2))
  stats = state.batch_stats["bn"]
  h = np.asarray(x, np.float64) @ np.asarray(state.params["dense"], np.float64)
  scale, bias = (np.asarray(state.params["bn"][k], np.float64) for k in ("scale", "bias"))
  normalized = (h - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
  normalized = normalized * scale + bias
  expected = np.tanh(normalized) @ np.asarray(state.params["head"], np.float64)

  outputs = training.make_predict(apply_fn)(state, x)
  metrics = PLAIN_EVAL_STEP(state, x, y)
  assert_close(outputs, expected, jnp.float32, 8, "predict")
  assert_close(metrics["loss"], cross_entropy(outputs, y), jnp.float32, 64, "eval loss")
  assert_close(metrics["accuracy"], accuracy(outputs, y)["accuracy"], jnp.float32)


def data_parallel(step, kind):
  """``step(state, x, y)`` over 8 devices, each holding an eighth of the batch; the state and
  the results are replicated."""
  if kind == "pmap":
    per_device = jax.pmap(step, axis_name="batch", in_axes=(None, 0, 0))

    def run(state, x, y):
      results = per_device(state, x.reshape(8, -1, *x.shape[1:]), y.reshape(8, -1))
      for leaf in jax.tree.leaves(results):
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))  # replicated
      return jax.tree.map(lambda leaf: leaf[0], results)

    return run
  mesh = device_mesh("batch")
  split = NamedSharding(mesh, P("batch"))
  sharded = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch"), P("batch")), out_specs=P())
  )
  return lambda state, x, y: sharded(state, jax.device_put(x, split), jax.device_put(y, split))


@pytest.mark.parametrize("kind", ["shard_map", "pmap"])
@pytest.mark.slow
@multidevice
def test_data_parallel_steps_equal_the_steps_on_the_whole_batch(kind):
  x, y = batch()
  state = training.create_train_state(*plain_variables(), SGD)
  options = {"loss_fn": cross_entropy, "metrics_fn": accuracy, "axis_name": "batch"}
  train_step = data_parallel(
    training.make_train_step(plain_apply_fn(axis_name="batch"), SGD, **options), kind
  )
  eval_step = data_parallel(training.make_eval_step(plain_apply_fn(), **options), kind)

  expected = PLAIN_TRAIN_STEP(state, x, y)
  actual = train_step(state, x, y)
  jax.tree.map(lambda a, b: assert_close(a, b, jnp.float32, 64, kind), actual, expected)
  new_state = expected[0]
  jax.tree.map(
    lambda a, b: assert_close(a, b, jnp.float32, 64, kind),
    eval_step(new_state, x, y),
    PLAIN_EVAL_STEP(new_state, x, y),
  )


def draw_step(axis_name):
  """A train step whose outputs are all one uniform draw from the key the model receives."""

  def apply_fn(params, batch_stats, x, *, training, key):
    outputs, new_stats = plain_apply_fn(axis_name=axis_name)(
      params, batch_stats, x, training=training
    )
    return jnp.zeros_like(outputs) + jax.random.uniform(key, ()), new_stats

  return training.make_train_step(
    apply_fn,
    SGD,
    loss_fn=cross_entropy,
    metrics_fn=lambda outputs, _: {"draw": outputs[0, 0]},
    axis_name=axis_name,
  )


@multidevice
def test_key_is_folded_with_the_step_and_the_device_index():
  x, y = batch()
  key = jax.random.key(7)
  state = training.create_train_state(*plain_variables(), SGD)
  one_device = draw_step(None)
  for step in (0, 5):
    _, metrics = one_device(state._replace(step=jnp.asarray(step, jnp.int32)), x, y, key)
    expected = jax.random.uniform(jax.random.fold_in(key, step), ())
    assert_close(metrics["draw"], expected, jnp.float32, 1, f"step {step}")

  eight_devices = data_parallel(functools.partial(draw_step("batch"), key=key), "shard_map")
  _, metrics = eight_devices(state, x, y)  # the mean of the devices' draws
  per_device = [
    jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, 0), d), ()) for d in range(8)
  ]
  assert_close(metrics["draw"], np.mean(per_device), jnp.float32, 8, "8 devices")


@pytest.mark.slow
def test_linen_model_with_a_frozen_layer_is_keras_trainable_false():
  # keras-team/keras#9965: frozen means inference mode, not only fixed parameters
  x, y = batch()
  frozen = frozenset({"bn1"})
  model = Net(frozen=frozen)
  tx = training.freeze(SGD, frozen=frozen)
  start = linen_state(tx)
  train_step = training.make_train_step(training.linen_apply_fn(model), tx, loss_fn=cross_entropy)
  state, _ = train_step(start, x, y)
  _, updates = jax.jit(
    lambda variables: model.apply(  # the same update, written out
      variables, x, train=True, mutable=["batch_stats"]
    )
  )({"params": start.params, "batch_stats": start.batch_stats})
  jax.tree.map(  # other programs, other fusions: a few ulps
    lambda a, b: assert_close(a, b, jnp.float32, 64), state.batch_stats, updates["batch_stats"]
  )
  state, _ = train_step(state, x, y)

  for collection in ("params", "batch_stats"):  # frozen: bit for bit what it was
    after, before = getattr(state, collection)["bn1"], getattr(start, collection)["bn1"]
    jax.tree.map(np.testing.assert_array_equal, after, before)
  moved = {  # trainable: moved
    "bn2/scale": (state.params["bn2"]["scale"], start.params["bn2"]["scale"]),
    "bn2/mean": (state.batch_stats["bn2"]["mean"], start.batch_stats["bn2"]["mean"]),
    "Dense_0/kernel": (state.params["Dense_0"]["kernel"], start.params["Dense_0"]["kernel"]),
  }
  for name, (after, before) in moved.items():
    assert not np.array_equal(after, before), name
  # optax.set_to_zero keeps no optimizer state for the frozen parameters
  trace = state.opt_state.inner_states["trainable"].inner_state[0].trace
  assert isinstance(trace["bn1"]["scale"], optax.MaskedNode)


class Noisy(nn.Module):
  """BN, plus noise from the 'noise' stream in training; switched by `training`, not `train`."""

  @nn.compact
  def __call__(self, x, *, training):
    x = BatchNorm(use_running_average=not training, momentum=MOMENTUM)(x)
    return x + jax.random.uniform(self.make_rng("noise"), ()) if training else x


def test_linen_apply_fn_names_the_training_keyword_and_the_rng_stream():
  x, y = batch()
  model = Noisy()
  apply_fn = training.linen_apply_fn(model, train_arg="training", rng_collection="noise")
  variables = model.init(jax.random.key(0), x, training=False)
  state = training.create_train_state(variables["params"], variables["batch_stats"], SGD)
  train_step = training.make_train_step(
    apply_fn,
    SGD,
    loss_fn=lambda out, _: jnp.mean(out**2),
    metrics_fn=lambda out, _: {"first": out[0, 0]},
  )
  new_state, first = train_step(state, x, y, jax.random.key(1))
  _, second = train_step(state, x, y, jax.random.key(2))
  assert float(first["first"]) != float(second["first"])  # the key reaches the 'noise' stream
  assert not np.array_equal(new_state.batch_stats["BatchNorm_0"]["mean"], np.zeros(5))
  outputs = training.make_predict(apply_fn)(new_state, x)  # training=False: no noise, no key
  stats, params = new_state.batch_stats["BatchNorm_0"], new_state.params["BatchNorm_0"]
  normalized = (np.asarray(x) - stats["mean"]) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
  assert_close(outputs, normalized * params["scale"] + params["bias"], jnp.float32, 1, "predict")


@pytest.mark.slow
@pytest.mark.usefixtures("standard_promotion")  # optax.adam promotes int32 step counts implicitly
def test_checkpoint_resume_is_bit_for_bit(tmp_path):
  x, y = batch()
  frozen = frozenset({"bn1"})
  model = Net(frozen=frozen, dropout=0.2)
  tx = training.freeze(optax.adam(1e-2), frozen=frozen)
  train_step = training.make_train_step(training.linen_apply_fn(model), tx, loss_fn=cross_entropy)
  key = jax.random.key(3)
  # Committed to the device as restored arrays are, so that one compiled step serves both runs.
  fresh = jax.device_put(linen_state(tx), jax.devices()[0])

  state = fresh
  for _ in range(2):
    state, _ = train_step(state, x, y, key)
  path = training.save_checkpoint(tmp_path / "step2", state)
  for _ in range(2):
    state, _ = train_step(state, x, y, key)

  restored = training.restore_checkpoint(path, like=fresh)
  assert int(restored.step) == 2
  for _ in range(2):
    restored, _ = train_step(restored, x, y, key)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_restore_rejects_a_state_of_another_model(tmp_path):
  params, batch_stats = plain_variables()
  tx = optax.sgd(0.1)
  state = training.create_train_state(params, batch_stats, tx)
  path = training.save_checkpoint(tmp_path / "ckpt", state)
  with_count = {"bn": {**batch_stats["bn"], "count": jnp.zeros((), jnp.int32)}}
  match = r"restore_checkpoint: the checkpoint at .* does not match `like`"
  with pytest.raises(ValueError, match=match):
    training.restore_checkpoint(path, like=state._replace(batch_stats=with_count))


@pytest.mark.slow
def test_import_training_leaves_orbax_until_a_checkpoint():
  code = (
    "import sys, bnjax.training; print('orbax.checkpoint' in sys.modules, 'flax' in sys.modules)"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["False", "False"]


def _train_step_of(**overrides):
  kwargs = {"apply_fn": plain_apply_fn(), "tx": SGD, "loss_fn": cross_entropy, **overrides}
  return training.make_train_step(kwargs.pop("apply_fn"), kwargs.pop("tx"), **kwargs)


def _call_step(**overrides):
  params, batch_stats = plain_variables()
  state = training.create_train_state(params, batch_stats, SGD)
  return _train_step_of(**overrides)(state, *batch())


def _drop_stats(params, batch_stats, x, *, training):
  return plain_apply_fn()(params, batch_stats, x, training=training)[0]


def _renamed_stats(params, batch_stats, x, *, training):
  outputs, new_stats = plain_apply_fn()(params, batch_stats, x, training=training)
  return outputs, {"BatchNorm_0": new_stats["bn"]}


ERRORS = {
  "tx-not-optax": (
    lambda: _train_step_of(tx="adam"),
    TypeError,
    (
      r"bnjax\.training\.make_train_step: `tx` must be an optax\.GradientTransformation,"
      r" got 'adam'"
    ),
  ),
  "loss-fn-not-callable": (
    lambda: _train_step_of(loss_fn="ce"),
    TypeError,
    r"make_train_step: `loss_fn` must be callable, got 'ce'",
  ),
  "eval-metrics-fn-not-callable": (
    lambda: training.make_eval_step(plain_apply_fn(), loss_fn=cross_entropy, metrics_fn=1),
    TypeError,
    r"make_eval_step: `metrics_fn` must be callable, got 1",
  ),
  "predict-apply-fn-not-callable": (
    lambda: training.make_predict(None),
    TypeError,
    r"make_predict: `apply_fn` must be callable, got None",
  ),
  "create-state-tx": (
    lambda: training.create_train_state({}, {}, tx=None),
    TypeError,
    r"create_train_state: `tx` must be an optax\.GradientTransformation, got None",
  ),
  "state-not-train-state": (
    lambda: _train_step_of()({"params": {}}, *batch()),
    TypeError,
    r"train_step: `state` must be a bnjax\.training\.TrainState, got dict",
  ),
  "apply-fn-drops-stats": (
    lambda: _call_step(apply_fn=_drop_stats),
    TypeError,
    (
      r"train_step: `apply_fn` must return \(outputs, new_batch_stats\), got an array"
      r" float32\[64, 3\]\. Hint"
    ),
  ),
  "apply-fn-renames-stats": (
    lambda: _call_step(apply_fn=_renamed_stats),
    ValueError,
    r"train_step: `apply_fn` must return new_batch_stats with the structure",
  ),
  "loss-not-scalar": (
    lambda: _call_step(loss_fn=optax.softmax_cross_entropy_with_integer_labels),
    ValueError,
    r"train_step: `loss_fn` must return a float scalar, got float32\[64\]\. Hint",
  ),
  "metrics-not-a-dict": (
    lambda: _call_step(metrics_fn=lambda out, _: out.mean()),
    TypeError,
    (
      r"train_step: `metrics_fn` must return a dict without a 'loss' key \(the step adds it\),"
      r" got an array float32\[\]"
    ),
  ),
  "metrics-with-loss": (
    lambda: _call_step(metrics_fn=lambda out, _: {"loss": out.mean()}),
    TypeError,
    r"got keys \['loss'\]",
  ),
  "linen-class-not-instance": (
    lambda: training.linen_apply_fn(Net),
    TypeError,
    r"linen_apply_fn: `model` must be a flax\.linen module instance, .*Hint: pass an instance",
  ),
  "freeze-string": (
    lambda: training.freeze(optax.sgd(0.1), frozen="bn1"),
    TypeError,
    r"freeze: `frozen` must be a collection of layer paths, got 'bn1'",
  ),
  "freeze-unknown-layer": (
    lambda: training.create_train_state(
      *plain_variables(), training.freeze(optax.sgd(0.1), frozen={"bn9"})
    ),
    ValueError,
    (
      r"freeze: `frozen` names layers without parameters: \['bn9'\]; the"
      r" parameters are \['bn/bias', 'bn/scale', 'dense', 'head'\]"
    ),
  ),
  "save-not-train-state": (
    lambda: training.save_checkpoint("/nonexistent/x", {"params": {}}),
    TypeError,
    r"save_checkpoint: `state` must be a bnjax\.training\.TrainState, got dict",
  ),
  "restore-like-not-train-state": (
    lambda: training.restore_checkpoint("/nonexistent/x", like={}),
    TypeError,
    r"restore_checkpoint: `like` must be a bnjax\.training\.TrainState, got dict",
  ),
  "restore-missing": (
    lambda: training.restore_checkpoint(
      "/nonexistent/x", like=training.create_train_state(*plain_variables(), optax.sgd(0.1))
    ),
    FileNotFoundError,
    r"restore_checkpoint: no checkpoint at /nonexistent/x: nothing there",
  ),
}


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_errors(case):
  make_call, error, match = ERRORS[case]
  with pytest.raises(error, match=match):
    make_call()


def _linear_step(**options):
  def apply_fn(params, batch_stats, inputs, *, training):
    return inputs @ params["w"], batch_stats

  tx = optax.sgd(0.1)
  state = training.create_train_state({"w": jnp.ones((3, 1))}, {}, tx)
  loss_fn = lambda y, t: jnp.mean((y - t) ** 2)
  return state, training.make_train_step(apply_fn, tx, loss_fn=loss_fn, **options)


def test_donated_state_is_reused_and_gives_the_same_step():
  x, t = jnp.arange(12.0).reshape(4, 3), jnp.zeros((4, 1))
  state, plain = _linear_step()
  expected, _ = plain(state, x, t)
  state, donating = _linear_step(donate_argnums=(0,))
  old = state
  new, _ = donating(state, x, t)
  assert old.params["w"].is_deleted()  # XLA took the buffer for the output
  np.testing.assert_array_equal(new.params["w"], expected.params["w"])
  with pytest.raises(RuntimeError, match="deleted"):
    np.asarray(old.params["w"])


@pytest.mark.parametrize(
  "donate, error, pattern",
  [
    (
      (0, 4),
      ValueError,
      r"must name arguments of train_step\('state', 'inputs', 'targets', 'key'\)",
    ),
    ("state", TypeError, r"must be an int or a tuple of ints, got 'state'"),
    ((True,), TypeError, r"must be an int or a tuple of ints"),
  ],
  ids=["out-of-range", "a-name", "a-bool"],
)
def test_donate_argnums_errors(donate, error, pattern):
  with pytest.raises(error, match=r"bnjax.training.make_train_step: `donate_argnums` " + pattern):
    _linear_step(donate_argnums=donate)
