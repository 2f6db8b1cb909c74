"""The scenarios of Flax's own BatchNorm tests, written anew, against bnjax's Linen and NNX modules.

Flax's tests (linen_test, nnx normalization_test, transforms_test, summary_test, ...) pass with
bnjax's modules swapped in, warnings as errors; this file holds bnjax's own tests of what they
exercise: complex input, rank-1 input, NNX's ``promote_dtype`` and ``view_info``, silence at one
element per channel under ``nnx.scan``/``nnx.vmap``/``tabulate``/``TrainState``, several init
calls, plus what users porting from PyTorch and Keras asked for: ``convention=`` with a layout
check, the batch counter, a tuple ``axis_name`` over nested ``vmap``s and Keras-shaped masks.
Flax runs live in each comparison; the oracle is ``tests/oracle.py``.
"""

import warnings

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from flax_compare import assert_centred_close, assert_close, data, flax_promotion
from oracle import moments as oracle_moments
from tolerances import assert_close as assert_oracle_close

import bnjax.linen
import bnjax.nnx
from bnjax import conventions


@pytest.fixture(autouse=True)
def warnings_are_errors():
  """Flax's own test configuration turns every warning into an error."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    yield


def complex_data(shape, seed=0):
  re, im = data(shape, seed=seed), data(shape, seed=seed + 1, offset=-50.0)
  return (re + 1j * im).astype(np.complex64)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.slow
def test_linen_complex_input_matches_flax(masked):
  """Flax's complex batch norm: complex mean, real variance mean(|x - mean|^2), real params;
  masked-out elements may be NaN. The running mean becomes complex after the first update.
  Flax's accurate setting is the reference: its default E|x|^2 - |E x|^2 loses digits here."""
  x = complex_data((4, 3, 2))
  mask = None
  if masked:
    mask = np.random.default_rng(2).uniform(size=(4, 3, 1)) < 0.6
    x = np.where(mask, x, np.nan + 0j).astype(np.complex64)
  ours = bnjax.linen.BatchNorm(momentum=0.9, dtype=jnp.complex64)
  theirs = fnn.BatchNorm(momentum=0.9, dtype=jnp.complex64, use_fast_variance=False)
  variables = ours.init(jax.random.key(0), x, False, mask=mask)
  y, updates = ours.apply(variables, x, False, mask=mask, mutable=["batch_stats"])
  with flax_promotion():
    y_ref, updates_ref = theirs.apply(variables, x, False, mask=mask, mutable=["batch_stats"])
  assert y.dtype == y_ref.dtype == jnp.complex64
  valid = np.broadcast_to(True if mask is None else mask, x.shape)
  for part in (np.real, np.imag):
    assert_centred_close(part(np.where(valid, y, 0)), part(np.where(valid, y_ref, 0)), 12, "y")
  stats, stats_ref = updates["batch_stats"], updates_ref["batch_stats"]
  assert stats["mean"].dtype == stats_ref["mean"].dtype == jnp.complex64
  assert stats["var"].dtype == stats_ref["var"].dtype == jnp.float32
  # The oracle: the complex mean and the real variance over the valid elements.
  xr = np.asarray(x, np.complex128)
  w = valid.astype(np.float64)
  mean = (np.where(valid, xr, 0)).sum((0, 1)) / w.sum((0, 1))
  var = (np.abs(np.where(valid, xr - mean, 0)) ** 2).sum((0, 1)) / w.sum((0, 1))
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-6)
  np.testing.assert_allclose(stats_ref["var"], stats["var"], rtol=1e-4)  # Flax: ~1e-5 here
  # Evaluation with the complex running mean, against Flax.
  variables = {**variables, **updates}
  y_eval = ours.apply(variables, x, use_running_average=True, mask=mask)
  with flax_promotion():
    y_eval_ref = theirs.apply(variables, x, use_running_average=True, mask=mask)
  np.testing.assert_allclose(
    np.where(valid, y_eval, 0), np.where(valid, y_eval_ref, 0), rtol=1e-5, atol=1e-5
  )


@pytest.mark.slow
def test_nnx_complex_input_matches_flax_linen_and_differentiates():
  """flax.nnx.BatchNorm cannot store a complex mean in its float32 BatchStat (a FutureWarning,
  an error under Flax's test configuration); bnjax's NNX module stores it as Linen's does."""
  x = complex_data((6, 4))
  ours = bnjax.nnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
  theirs = fnn.BatchNorm(momentum=0.9, use_running_average=False, use_fast_variance=False)
  with flax_promotion():
    variables = theirs.init(jax.random.key(0), x)
  y = ours(x)
  with flax_promotion():
    y_ref, updates = theirs.apply(variables, x, mutable=["batch_stats"])
  for part in (np.real, np.imag):
    assert_centred_close(part(y), part(y_ref), 6, "y")
  assert ours.mean[...].dtype == jnp.complex64
  np.testing.assert_allclose(ours.mean[...], updates["batch_stats"]["mean"], rtol=1e-6)
  np.testing.assert_allclose(ours.var[...], updates["batch_stats"]["var"], rtol=1e-4)

  def loss(y):
    return jnp.sum(jnp.abs(y) ** 3)

  grad = jax.grad(lambda x: loss(bnjax.nnx.BatchNorm(4, rngs=nnx.Rngs(0))(x)))(x)
  with flax_promotion():
    grad_ref = jax.grad(lambda x: loss(theirs.apply(variables, x, mutable=["batch_stats"])[0]))(x)
  np.testing.assert_allclose(grad, grad_ref, rtol=2e-3, atol=2e-3)


def test_rank1_input_matches_flax():
  """x of shape (C,): every element is its own channel, training outputs the bias and moves
  the running mean toward x (variance 0), evaluation uses the running statistics."""
  x = data((5,))
  ours = bnjax.linen.BatchNorm(momentum=0.9, bias_init=jax.nn.initializers.constant(0.5))
  theirs = fnn.BatchNorm(momentum=0.9, bias_init=jax.nn.initializers.constant(0.5))
  variables = ours.init(jax.random.key(0), x, use_running_average=False)
  y, updates = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  with flax_promotion():
    y_ref, _updates_ref = theirs.apply(
      variables, x, use_running_average=False, mutable=["batch_stats"]
    )
  np.testing.assert_array_equal(y, np.full(5, 0.5, np.float32))
  assert_close(y, y_ref)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * x, rtol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9, rtol=1e-6)
  with flax_promotion():
    expected = theirs.apply({**variables, **updates}, x, use_running_average=True)
  assert_close(ours.apply({**variables, **updates}, x, use_running_average=True), expected)
  model = bnjax.nnx.BatchNorm(5, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(model(x), np.zeros(5, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_nnx_with_identity_promotion_equals_linen(dtype, param_dtype, masked):
  """Flax's NNX/Linen equivalence scenario: with ``promote_dtype`` the identity, NNX computes as
  Linen does, so bnjax's two modules agree bit for bit (outputs and statistics), and each
  agrees with Flax's module to rounding."""
  x = np.random.default_rng(3).standard_normal((10, 5)).astype(np.float32)
  mask = np.array([True, False, True, False, True]) if masked else None
  options = dict(dtype=dtype, param_dtype=param_dtype, use_fast_variance=False)
  linen = bnjax.linen.BatchNorm(use_running_average=False, **options)
  variables = linen.init(jax.random.key(1), x, mask=mask)
  y_linen, updates = linen.apply(variables, x, mask=mask, mutable=["batch_stats"])
  model = bnjax.nnx.BatchNorm(
    5, use_running_average=False, promote_dtype=lambda a, **_: a, rngs=nnx.Rngs(0), **options
  )
  y_nnx = model(x, mask=mask)
  np.testing.assert_array_equal(y_nnx, y_linen)
  assert y_nnx.dtype == y_linen.dtype
  np.testing.assert_array_equal(model.mean[...], updates["batch_stats"]["mean"])
  np.testing.assert_array_equal(model.var[...], updates["batch_stats"]["var"])
  flax_model = nnx.BatchNorm(
    5, use_running_average=False, promote_dtype=lambda a, **_: a, rngs=nnx.Rngs(0), **options
  )
  with flax_promotion():
    y_flax = flax_model(x, mask=mask)
  assert y_flax.dtype == y_nnx.dtype
  # A channel with no valid element: Flax's mean over nothing is NaN; bnjax outputs the bias.
  empty = np.zeros(5, bool) if mask is None else ~mask
  assert np.all(np.isnan(np.asarray(y_flax, np.float32)[:, empty]))
  np.testing.assert_array_equal(np.asarray(y_nnx, np.float32)[:, empty], 0.0)
  np.testing.assert_allclose(
    np.asarray(y_nnx, np.float32)[:, ~empty],
    np.asarray(y_flax, np.float32)[:, ~empty],
    rtol=2e-3 if dtype == jnp.float16 else 1e-5,
    atol=2e-3,
  )


def test_nnx_default_promotion_casts_like_flax():
  """By default NNX casts x, the running statistics and the params to ``dtype`` first."""
  x = data((8, 3))
  ours, theirs = (
    cls(3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)) for cls in (bnjax.nnx.BatchNorm, nnx.BatchNorm)
  )
  for model in (ours, theirs):
    model.eval()
    model.mean[...] = jnp.asarray([100.01, 99.97, 100.2], jnp.float32)  # not bf16-representable
  with flax_promotion():
    y_ref = theirs(x)
  y = ours(x)
  assert y.dtype == y_ref.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, y_ref)
  with pytest.raises(TypeError, match=r"`promote_dtype` must be a callable"):
    bnjax.nnx.BatchNorm(3, promote_dtype="float32", rngs=nnx.Rngs(0))


def test_nnx_view_and_view_info():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)

  model = Model(nnx.Rngs(0))
  info = nnx.view_info(model)
  assert "BatchNorm:" in info and "use_running_average: bool | None = None" in info
  assert "normalize with the stored running statistics" in info
  evaluating = nnx.view(model, use_running_average=True)
  assert evaluating.bn.use_running_average is True and model.bn.use_running_average is False


@pytest.mark.slow
def test_no_warning_at_one_element_per_channel_under_nnx_transforms():
  """Batch size 1 under nnx.scan, nnx.vmap and nnx.tabulate, and a Linen TrainState step:
  silent, as Flax is (warnings are errors here)."""

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 3, rngs=rngs)
      self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.linear(x))

  @nnx.split_rngs(splits=4)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make_stack(rngs):
    return Block(rngs)

  stack = make_stack(nnx.Rngs(0))

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def through(block, x):
    return block(x)

  y = through(stack, jnp.ones((1, 3)))
  assert y.shape == (1, 3) and bool(jnp.all(jnp.isfinite(y)))
  # One example per call under nnx.vmap, statistics over the mapped axis (rank-1 input).
  shared = bnjax.nnx.BatchNorm(3, axis_name="batch", rngs=nnx.Rngs(1))
  per_example = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="batch")
  x = data((4, 3))
  y = per_example(shared, x)
  mean, var, _ = oracle_moments(x, (0,))
  assert_oracle_close(y, (x - mean) / np.sqrt(var + 1e-5), jnp.float32, 4, "per example")
  np.testing.assert_allclose(shared.mean[...], 0.01 * mean.ravel(), rtol=1e-5)
  assert "BatchNorm" in nnx.tabulate(Block(nnx.Rngs(2)), jnp.ones((1, 3)))

  class Net(fnn.Module):
    @fnn.compact
    def __call__(self, x, train):
      return bnjax.linen.BatchNorm(use_running_average=not train)(fnn.Dense(3)(x))

  net = Net()
  variables = net.init(jax.random.key(0), jnp.ones((1, 2)), False)
  state = train_state.TrainState.create(
    apply_fn=net.apply, params=variables["params"], tx=optax.sgd(0.1)
  )

  def loss(params):
    y, updates = state.apply_fn(
      {"params": params, "batch_stats": variables["batch_stats"]},
      jnp.ones((1, 2)),
      True,
      mutable=["batch_stats"],
    )
    return jnp.sum(y**2), updates

  (_, updates), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  assert "batch_stats" in updates
  assert "BatchNorm" in net.tabulate(jax.random.key(0), jnp.ones((1, 2)), False)


def test_linen_init_twice_with_an_axis_name():
  """Flax's multi-init scenario: a module called twice, axis_name unbound during init."""

  class Twice(fnn.Module):
    @fnn.compact
    def __call__(self, x):
      norm = bnjax.linen.BatchNorm(name="norm", use_running_average=False, axis_name="batch")
      x = norm(x)
      return x, norm(x)

  x = data((2, 4))
  (y1, y2), _ = Twice().init_with_output(jax.random.key(0), x)
  for given, y in ((x, y1), (np.asarray(y1), y2)):
    mean, var, _ = oracle_moments(given, (0,))
    assert_oracle_close(y, (given - mean) / np.sqrt(var + 1e-5), jnp.float32, 2, "y")


def test_linen_counts_batches_for_a_pytorch_port():
  """PyTorch's num_batches_tracked: stats from conventions.PYTORCH.init carry a count, and a
  Linen module built from the preset's options keeps it up to date, float momentum or not."""
  x = data((8, 4))
  module = bnjax.linen.BatchNorm(**conventions.PYTORCH.options(axis=-1))
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  assert "count" not in variables["batch_stats"]
  params, stats = conventions.PYTORCH.init(4)
  variables = {"params": params, "batch_stats": stats}
  for step in range(1, 3):
    _, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    variables = {**variables, **updates}
    assert int(variables["batch_stats"]["count"]) == step
  tracked = bnjax.linen.BatchNorm(convention=conventions.PYTORCH.replace(axis=-1))
  variables = tracked.init(jax.random.key(0), x, use_running_average=False)
  assert int(variables["batch_stats"]["count"]) == 0
  _, updates = tracked.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  assert int(updates["batch_stats"]["count"]) == 1
  model = bnjax.nnx.BatchNorm(4, track_count=True, rngs=nnx.Rngs(0))
  model(x)
  assert int(model.count[...]) == 1


@pytest.mark.parametrize("module", ["linen", "nnx"])
def test_convention_on_the_modules(module):
  """convention=PYTORCH gives PyTorch's arithmetic, the same numbers as bnjax.batch_norm with
  the preset's options; the layout stays the module's."""
  x = data((6, 3, 4, 4))  # NCHW
  preset = conventions.PYTORCH
  params, stats = preset.init(3)
  y_ref, stats_ref = bnjax.batch_norm(x, params, stats, training=True, **preset.options())
  if module == "linen":
    bn = bnjax.linen.BatchNorm(axis=1, convention=preset)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    new = updates["batch_stats"]
  else:
    bn = bnjax.nnx.BatchNorm(3, axis=1, convention=preset, rngs=nnx.Rngs(0))
    assert (bn.momentum, bn.epsilon, bn.running_variance) == (0.9, 1e-5, "unbiased")
    y = bn(x)
    new = {key: getattr(bn, key)[...] for key in bn.stat_keys}
  np.testing.assert_array_equal(y, y_ref)
  assert sorted(new) == ["count", "mean", "var"]
  for key in new:
    np.testing.assert_array_equal(new[key], stats_ref[key])


@pytest.mark.parametrize("module", ["linen", "nnx"])
def test_convention_layout_and_conflicts_are_refused(module):
  """PyTorch's preset is channels-first; on channels-last input whose height equals its channel
  count, normalizing axis 1 would pass unnoticed, so a layout disagreement is refused."""
  x = data((2, 3, 3, 3))  # NHWC with H == W == C

  def build(**kwargs):
    if module == "linen":
      bn = bnjax.linen.BatchNorm(**kwargs)
      return lambda x: bn.init_with_output(jax.random.key(0), x, use_running_average=False)[0]
    bn = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **kwargs)
    return bn

  name = f"bnjax.{module}.BatchNorm"
  with pytest.raises(
    ValueError,
    match=rf"{name}: `convention` 'torch.nn.BatchNorm' has its"
    r" features on axis 1, this module on `axis`=-1.*replace\(axis=-1\).*"
    r"`axis=1`",
  ):
    build(convention=conventions.PYTORCH)(x)
  channels_last = build(convention=conventions.PYTORCH.replace(axis=-1))(x)
  y_ref, _ = bnjax.batch_norm(
    x, *conventions.PYTORCH.init(3), training=True, **conventions.PYTORCH.options(axis=-1)
  )
  np.testing.assert_array_equal(channels_last, y_ref)
  assert build(convention=conventions.PYTORCH)(data((4, 3))).shape == (4, 3)  # (N, C): one axis
  with pytest.raises(ValueError, match=r"`momentum`=0.5 conflicts with `convention`"):
    build(convention=conventions.PYTORCH, momentum=0.5)(data((4, 3)))
  with pytest.raises(ValueError, match=r"`variance`='fast' conflicts"):
    build(convention=conventions.PYTORCH, use_fast_variance=True)(data((4, 3)))
  with pytest.raises(TypeError, match=r"`convention` must be a bnjax.conventions.Convention"):
    build(convention="pytorch")(data((4, 3)))


@pytest.mark.slow
def test_tuple_axis_name_over_nested_vmaps_matches_flax():
  """Flax and Equinox reduce a tuple of vmapped names with pmean; all_gather cannot batch such
  a tuple, and bnjax combines the counts with psums instead: the statistics of the whole."""
  x = data((3, 4, 5, 2))  # (a, b, examples, channels)
  ours = bnjax.linen.BatchNorm(use_running_average=False, axis_name=("a", "b"), momentum=0.9)
  theirs = fnn.BatchNorm(
    use_running_average=False, axis_name=("a", "b"), momentum=0.9, use_fast_variance=False
  )
  variables = ours.init(jax.random.key(0), x[0, 0])

  def run(module, x):
    return module.apply(variables, x, mutable=["batch_stats"])

  def nested(fn):
    inner = jax.vmap(fn, axis_name="b", in_axes=(None, 0))
    return jax.vmap(inner, axis_name="a", in_axes=(None, 0))

  y, updates = nested(run)(ours, x)
  with flax_promotion():
    y_ref, _updates_ref = nested(run)(theirs, x)
  assert_centred_close(y, y_ref, 60, "y")
  mean, var, _ = oracle_moments(x, (0, 1, 2))
  np.testing.assert_allclose(updates["batch_stats"]["mean"][0, 0], 0.1 * mean.ravel(), rtol=1e-6)
  np.testing.assert_allclose(
    updates["batch_stats"]["var"][0, 0], 0.9 + 0.1 * var.ravel(), rtol=1e-6
  )
  assert_oracle_close(y, (x - mean) / np.sqrt(var + 1e-5), jnp.float32, 60, "y")


@pytest.mark.slow
@pytest.mark.parametrize("module", ["linen", "nnx"])
def test_keras_shaped_mask(module):
  """Keras' masks have one axis fewer, aligned from the first: (N, T) for (N, T, C)."""
  x = data((4, 6, 3))
  keras_mask = np.arange(24).reshape(4, 6) % 4 != 0
  if module == "linen":
    bn = bnjax.linen.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)
    call = lambda m: bn.apply(variables, x, mask=m, mutable=["batch_stats"])
  else:
    call = lambda m: bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))(x, mask=m)
  jax.tree.map(np.testing.assert_array_equal, call(keras_mask), call(keras_mask[..., None]))
