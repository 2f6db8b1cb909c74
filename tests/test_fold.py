"""bnjax.fold: a batch norm folded into the Dense or Conv before it computes what the pair did.

The formula against a float64 NumPy oracle; Linen and NNX models, folded and unfolded, agree in
evaluation (bnjax's and Flax's batch norms, with and without a layer bias, bfloat16 kernels,
boxed parameters, transposed convolutions); every error; the benchmark script with tiny settings.
"""

import functools
import importlib.util
import math
import re
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import freeze
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import batch_norm as oracle_batch_norm
from tolerances import assert_close, folded_atol

import bnjax
import bnjax.linen
from bnjax import fold
from bnjax import nnx as bnnnx

ROOT = Path(__file__).resolve().parent.parent
RNG_SEED = 0


def key(seed):
  """A PRNG key that compiles fast: threefry's takes seconds on a loaded 2-core machine, and
  these tests need random values, not a particular generator."""
  return jax.random.key(seed, impl="unsafe_rbg")


def random_bn(rng, c, *, scale=True, bias=True, dtype=np.float32):
  """Non-trivial batch-norm params and statistics: mean far from 0, var far from 1."""
  params = {}
  if scale:
    params["scale"] = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype)
  if bias:
    params["bias"] = rng.normal(0.0, 1.0, c).astype(dtype)
  stats = {
    "mean": rng.normal(0.0, 3.0, c).astype(np.float32),
    "var": rng.uniform(0.05, 20.0, c).astype(np.float32),
  }
  return params, stats


def oracle(kernel, bias, params, stats, epsilon, kernel_axis=-1):
  """The textbook fold in float64 NumPy."""
  kernel = np.asarray(kernel, np.float64)
  c = kernel.shape[kernel_axis]
  scale = np.asarray(params.get("scale", np.ones(c)), np.float64)
  beta = np.asarray(params.get("bias", np.zeros(c)), np.float64)
  mean, var = (np.asarray(stats[k], np.float64) for k in ("mean", "var"))
  a = scale / np.sqrt(var + epsilon)
  shape = [1] * kernel.ndim
  shape[kernel_axis] = c
  b = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
  return kernel * a.reshape(shape), (b - mean) * a + beta


# --- the formula -------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kernel_shape, kernel_axis, use_bias, bn_scale, bn_bias",
  [
    ((5, 8), -1, True, True, True),
    ((3, 4, 8), -1, False, True, True),
    ((3, 3, 4, 8), -1, True, False, True),
    ((2, 3, 3, 4, 8), -1, False, True, False),
    ((3, 3, 8, 4), -2, True, True, True),  # ConvTranspose(transpose_kernel=True)
    ((8, 4, 3, 3), 0, True, True, True),  # PyTorch's (out, in, kH, kW)
  ],
  ids=[
    "dense",
    "conv1d-nobias",
    "conv2d-noscale",
    "conv3d-nobias-nobeta",
    "convT-axis-2",
    "oihw-axis0",
  ],
)
def test_fold_affine_matches_float64_oracle(
  x64, kernel_shape, kernel_axis, use_bias, bn_scale, bn_bias
):
  rng = np.random.default_rng(RNG_SEED)
  c = kernel_shape[kernel_axis]
  kernel = rng.normal(size=kernel_shape)
  bias = rng.normal(size=c) if use_bias else None
  params, stats = random_bn(rng, c, scale=bn_scale, bias=bn_bias, dtype=np.float64)
  stats = {k: v.astype(np.float64) for k, v in stats.items()}
  new_kernel, new_bias = fold.fold_affine(
    jnp.asarray(kernel),
    None if bias is None else jnp.asarray(bias),
    params,
    stats,
    epsilon=1e-3,
    kernel_axis=kernel_axis,
  )
  want_kernel, want_bias = oracle(kernel, bias, params, stats, 1e-3, kernel_axis)
  assert new_kernel.dtype == jnp.float64 and new_bias.dtype == jnp.float64
  assert new_kernel.shape == kernel_shape and new_bias.shape == (c,)
  assert_close(new_kernel, want_kernel, np.float64, what="kernel")
  assert_close(new_bias, want_bias, np.float64, what="bias")


def test_fold_affine_float32_within_rounding_of_oracle():
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
  bias = rng.normal(size=8).astype(np.float32)
  params, stats = random_bn(rng, 8)
  new_kernel, new_bias = fold.fold_affine(kernel, bias, params, stats)
  want_kernel, want_bias = oracle(kernel, bias, params, stats, fold.DEFAULT_EPSILON)
  assert new_kernel.dtype == jnp.float32 and new_bias.dtype == jnp.float32
  assert_close(new_kernel, want_kernel, np.float32, what="kernel")
  assert_close(new_bias, want_bias, np.float32, what="bias")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
  fan_in=st.sampled_from([1, 3, 12]),
  c=st.sampled_from([1, 5]),
  use_bias=st.booleans(),
  bn_scale=st.booleans(),
  bn_bias=st.booleans(),
  log_epsilon=st.floats(-8, -1),
  seed=st.integers(0, 2**31 - 1),
)
def test_folded_dense_equals_dense_then_batch_norm_float64(
  fan_in, c, use_bias, bn_scale, bn_bias, log_epsilon, seed
):
  # The identity itself, in float64: x @ k' + b' == BN(x @ k + b), BN from the NumPy oracle.
  rng = np.random.default_rng(seed)
  x, kernel = rng.normal(size=(4, fan_in)), rng.normal(size=(fan_in, c))
  bias = rng.normal(size=c) if use_bias else None
  params, stats = random_bn(rng, c, scale=bn_scale, bias=bn_bias, dtype=np.float64)
  stats = {k: v.astype(np.float64) for k, v in stats.items()}
  epsilon = 10.0**log_epsilon
  with jax.enable_x64(True):
    new_kernel, new_bias = fold.fold_affine(kernel, bias, params, stats, epsilon=epsilon)
    folded = x @ np.asarray(new_kernel) + np.asarray(new_bias)
  pre = x @ kernel + (0.0 if bias is None else bias)
  unfolded, _ = oracle_batch_norm(pre, params, stats, training=False, epsilon=epsilon)
  inv = params.get("scale", 1.0) / np.sqrt(stats["var"] + epsilon)
  shift = (0.0 if bias is None else bias) - stats["mean"]
  terms = np.abs(x) @ np.abs(kernel * inv) + np.abs(shift * inv) + np.abs(params.get("bias", 0.0))
  assert np.all(np.abs(folded - unfolded) <= folded_atol(np.float64, fan_in) * terms)


# --- Linen -------------------------------------------------------------------------------------


class Net(nn.Module):
  """Conv -> BN -> relu -> Conv -> BN -> relu -> mean -> Dense -> BN; `folded`: no BN.

  bn1 and bn3 are bnjax's, bn2 is Flax's: both lay out their variables alike."""

  folded: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    def norm(x, name, bn=bnjax.linen.BatchNorm):
      if self.folded:
        return x
      return bn(use_running_average=not train, momentum=0.0, epsilon=1e-3, name=name)(x)

    x = nn.Conv(16, (3, 3), use_bias=self.folded, name="conv1")(x)
    x = nn.relu(norm(x, "bn1"))
    x = nn.Conv(16, (3, 3), strides=2, name="conv2")(x)
    x = nn.relu(norm(x, "bn2", nn.BatchNorm))
    x = nn.Dense(10, name="head")(x.mean((1, 2)))
    return norm(x, "bn3")


NET_PAIRS = [("conv1", "bn1"), ("conv2", "bn2"), ("head", "bn3")]


@pytest.mark.usefixtures("standard_promotion")
def test_linen_cnn_folded_matches_unfolded():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(5.0, 3.0, (4, 8, 8, 3)), jnp.float32)
  model, deploy = Net(), Net(folded=True)

  @jax.jit
  def trained(key, x):  # momentum 0: the running statistics become those of x
    variables = model.init(key, x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return {**variables, **updates}

  variables = trained(key(0), x)
  for name in ("bn1", "bn2", "bn3"):  # random scale and bias
    params, _ = random_bn(rng, variables["params"][name]["scale"].shape[0])
    variables["params"][name] = {k: jnp.asarray(v) for k, v in params.items()}
  stats = variables["batch_stats"]
  assert float(jnp.abs(stats["bn1"]["mean"]).max()) > 2.0 and float(stats["bn1"]["var"].max()) > 2.0

  @jax.jit  # `fold` checks shapes and dtypes only, so it traces
  def both(variables, x):
    folded = fold.fold(variables, NET_PAIRS, epsilon=1e-3)
    return model.apply(variables, x), deploy.apply(folded, x), folded

  expected, actual, folded = both(variables, x)

  assert jax.tree.structure(folded) == jax.tree.structure(jax.eval_shape(deploy.init, key(0), x))
  assert "batch_stats" not in folded and folded["params"]["conv1"]["bias"].dtype == jnp.float32
  # The net's largest fan-in, 3 * 3 * 16; the statistics are those of the data, so the
  # normalized outputs are O(|scale| + |bias|) and no cancellation hides in them.
  assert_close(actual, expected, np.float32, reduction_size=3 * 3 * 16, what="folded net")


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize(
  "make_layer, kernel_axis, param_dtype",
  [
    (lambda d: nn.Conv(8, (3, 3), use_bias=False, param_dtype=d), -1, jnp.float32),
    (lambda d: nn.Conv(8, (3, 3), feature_group_count=4, param_dtype=d), -1, jnp.float32),
    (lambda d: nn.Dense(8, param_dtype=d), -1, jnp.float32),
    (
      lambda d: nn.ConvTranspose(8, (3, 3), strides=(2, 2), transpose_kernel=True, param_dtype=d),
      -2,
      jnp.float32,
    ),
    (lambda d: nn.Conv(8, (3, 3), use_bias=False, param_dtype=d), -1, jnp.bfloat16),
    (lambda d: nn.Dense(8, param_dtype=d), -1, jnp.bfloat16),
  ],
  ids=[
    "conv-nobias",
    "conv-grouped-bias",
    "dense",
    "convT-transpose-kernel",
    "conv-nobias-bf16",
    "dense-bf16",
  ],
)
def test_linen_layer_folded_within_terms_bound(make_layer, kernel_axis, param_dtype):
  rng = np.random.default_rng(2)
  layer = make_layer(param_dtype)
  x = jnp.asarray(rng.normal(4.0, 2.0, (2, 5, 5, 8)), jnp.float32)
  shapes = jax.eval_shape(layer.init, key(0), x)["params"]
  fan_in = math.prod(shapes["kernel"].shape) // shapes["kernel"].shape[kernel_axis]
  layer_params = {"kernel": rng.normal(0.0, fan_in**-0.5, shapes["kernel"].shape)}
  if "bias" in shapes:
    layer_params["bias"] = rng.normal(size=8)
  layer_params = {k: jnp.asarray(v, param_dtype) for k, v in layer_params.items()}
  params, stats = random_bn(rng, 8)
  epsilon = 1e-3
  tree = {"params": {"layer": layer_params, "bn": params}, "batch_stats": {"bn": stats}}

  new = fold.fold(tree, [("layer", "bn", {"epsilon": epsilon, "kernel_axis": kernel_axis})])

  assert set(new) == {"params"} and set(new["params"]) == {"layer"}
  new = new["params"]["layer"]
  assert new["kernel"].dtype == param_dtype and new["bias"].dtype == param_dtype

  @jax.jit
  def outputs(layer_params, new, x):
    unfolded, _ = bnjax.batch_norm(
      layer.apply({"params": layer_params}, x), params, stats, training=False, epsilon=epsilon
    )
    folded = layer.clone(use_bias=True).apply({"params": new}, x)
    # |x_i * k_i| summed: the same layer on |x| and |kernel|, without a bias
    abs_params = {"kernel": jnp.abs(layer_params["kernel"].astype(jnp.float32))}
    if "bias" in layer_params:
      abs_params["bias"] = jnp.zeros(8)
    return unfolded, folded, layer.apply({"params": abs_params}, jnp.abs(x))

  results = outputs(layer_params, new, x)
  assert results[1].dtype == jnp.float32
  expected, actual, products = (np.asarray(a, np.float64) for a in results)
  # T of `folded_atol`: |inv| * sum |x_i k_i| + |(bias - mean) inv| + |beta|
  inv = np.abs(params["scale"] / np.sqrt(stats["var"].astype(np.float64) + epsilon))
  bias = np.asarray(layer_params.get("bias", np.zeros(8)), np.float64)
  terms = products * inv + np.abs((bias - stats["mean"]) * inv) + np.abs(params["bias"])
  bound = folded_atol(param_dtype, fan_in) * terms
  diff = np.abs(actual - expected)
  assert np.all(diff <= bound), float((diff / bound).max())


@pytest.mark.usefixtures("standard_promotion")
def test_linen_nested_paths_and_other_collections_pass_through():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=True)(nn.Dense(4, use_bias=False)(x))

  class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(Block(name="block")(x))

  x = jnp.ones((2, 5))
  shapes = jax.eval_shape(Outer().init, key(0), x)
  variables = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
  variables = {**variables, "intermediates": {"kept": jnp.zeros(2)}}
  for path, tree in (("block/Dense_0", variables), (("block", "Dense_0"), freeze(variables))):
    folded = fold.fold(tree, [(path, ("block", "BatchNorm_0"))])
    assert type(folded) is dict and type(folded["params"]["block"]) is dict
    assert jax.tree.map(jnp.shape, folded["params"]) == {
      "Dense_0": {"bias": (3,), "kernel": (4, 3)},
      "block": {"Dense_0": {"bias": (4,), "kernel": (5, 4)}},
    }
    assert "batch_stats" not in folded and folded["intermediates"] == variables["intermediates"]
  assert jax.tree.map(jnp.shape, variables["batch_stats"]) == {  # the input is not changed
    "block": {"BatchNorm_0": {"mean": (4,), "var": (4,)}}
  }


@pytest.mark.usefixtures("standard_promotion")
def test_linen_partitioned_kernel_keeps_its_box():
  init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, None, None, "m"))
  conv = nn.Conv(4, (3, 3), use_bias=False, kernel_init=init)
  shapes = jax.eval_shape(conv.init, key(0), jnp.ones((1, 5, 5, 2)))
  rng = np.random.default_rng(6)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
  tree = {"params": {"conv": variables["params"]}, "batch_stats": {"bn": bnjax.init(4)[1]}}
  folded = fold.fold(tree, [("conv", "bn")])
  kernel = folded["params"]["conv"]["kernel"]
  assert isinstance(kernel, nn.Partitioned) and kernel.names == (None, None, None, "m")
  np.testing.assert_allclose(
    kernel.value, variables["params"]["kernel"].value / np.sqrt(1 + 1e-5), rtol=1e-6
  )


# --- NNX ---------------------------------------------------------------------------------------


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 16, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = bnnnx.BatchNorm(16, epsilon=1e-3, rngs=rngs)
    self.block = nnx.Sequential(
      nnx.Conv(16, 16, (3, 3), strides=2, rngs=rngs),
      nnx.BatchNorm(16, rngs=rngs),
      nnx.relu,
    )
    self.up = nnx.ConvTranspose(16, 8, (3, 3), transpose_kernel=True, use_bias=False, rngs=rngs)
    self.bn_up = nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)
    self.bn_head = bnnnx.BatchNorm(10, rngs=rngs)

  def __call__(self, x):
    x = self.block(nnx.relu(self.bn1(self.conv1(x))))
    x = nnx.relu(self.bn_up(self.up(x)))
    return self.bn_head(self.head(x.mean((1, 2))))


def nnx_model(cls, rng):
  """``cls(rngs)`` with random values from NumPy: nnx's own initializers compile slowly."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))))

  def fill(path, leaf):
    name, shape = path[-2].key, leaf.shape
    value = {
      "kernel": lambda: rng.normal(0.0, (math.prod(shape) / shape[-1]) ** -0.5, shape),
      "scale": lambda: rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape),
      "mean": lambda: rng.normal(0.0, 3.0, shape),  # far from 0
      "var": lambda: rng.uniform(0.05, 20.0, shape),  # far from 1
    }.get(name, lambda: rng.normal(0.0, 1.0, shape))()
    return jnp.asarray(value, leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


NNX_PAIRS = [
  ("conv1", "bn1"),
  ("block/layers/0", ("block", "layers", 1)),
  ("up", "bn_up"),
  ("head", "bn_head"),
]


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.slow
def test_nnx_folded_in_place_matches_unfolded():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(1.0, 1.0, (4, 8, 8, 3)), jnp.float32)
  model = nnx_model(NnxNet, rng)
  model.eval()
  call = nnx.jit(lambda m, x: m(x))
  expected = call(model, x)
  folded = nnx.clone(model)

  fold.fold_nnx(folded, NNX_PAIRS)

  assert not jax.tree.leaves(nnx.state(folded, nnx.BatchStat))
  assert folded.conv1.use_bias and folded.conv1.bias[...].shape == (16,)
  assert isinstance(folded.bn1, nnx.Sequential) and not folded.bn1.layers
  actual = call(folded, x)
  assert_close(actual, expected, np.float32, reduction_size=3 * 3 * 16, what="folded nnx net")
  assert len(jax.tree.leaves(nnx.state(model, nnx.BatchStat))) == 8  # the original is kept


# --- errors ------------------------------------------------------------------------------------


def _tree():
  params, stats = bnjax.init(4)
  return {
    "params": {
      "conv": {"kernel": jnp.ones((3, 3, 2, 4))},
      "bn": params,
      "dense": {"kernel": jnp.ones((4, 5)), "bias": jnp.zeros(5)},
    },
    "batch_stats": {"bn": stats, "bn5": bnjax.init(5)[1]},
  }


K, B = jnp.ones((3, 3, 2, 4)), jnp.zeros(4)
P, S = bnjax.init(4)
AFFINE = "bnjax.fold.fold_affine: "
TREE = "bnjax.fold.fold: "

ERRORS = {
  # fold_affine
  "kernel-int": (
    lambda: fold.fold_affine(K.astype(jnp.int32), B, P, S),
    TypeError,
    AFFINE + "`kernel` must have a floating dtype .* got int32. Hint: a quantized",
  ),
  "kernel-rank1": (
    lambda: fold.fold_affine(B, B, P, S),
    ValueError,
    AFFINE + r"`kernel` must have rank >= 2 .* got shape \(4,\)",
  ),
  "kernel-axis-type": (
    lambda: fold.fold_affine(K, B, P, S, kernel_axis=1.0),
    TypeError,
    "`kernel_axis` must be an int, got 1.0",
  ),
  "kernel-axis-range": (
    lambda: fold.fold_affine(K, B, P, S, kernel_axis=4),
    ValueError,
    r"`kernel_axis`=4 is out of range .* expected values in \[-4, 3\]",
  ),
  "epsilon": (
    lambda: fold.fold_affine(K, B, P, S, epsilon=-1.0),
    ValueError,
    AFFINE + "`epsilon` must be >= 0, got -1.0",
  ),
  "params-type": (
    lambda: fold.fold_affine(K, B, [1.0], S),
    TypeError,
    r"`bn_params` must be a dict with keys \('scale', 'bias'\), got list",
  ),
  "stats-type": (
    lambda: fold.fold_affine(K, B, P, None),
    TypeError,
    "`bn_stats` must be a dict with keys .* got NoneType",
  ),
  "params-keys": (
    lambda: fold.fold_affine(K, B, {"gamma": B}, S),
    ValueError,
    r"`bn_params` has keys \['gamma'\]; a batch norm's params are",
  ),
  "stats-missing": (
    lambda: fold.fold_affine(K, B, P, {"mean": B}),
    ValueError,
    r"`bn_stats` is missing \['var'\]; got keys \['mean'\]",
  ),
  "stats-int": (
    lambda: fold.fold_affine(K, B, P, {**S, "var": jnp.ones(4, jnp.int32)}),
    TypeError,
    r"`bn_stats\['var'\]` must have a floating dtype",
  ),
  "several-feature-axes": (
    lambda: fold.fold_affine(K, B, {}, {"mean": jnp.zeros((3, 4)), "var": jnp.ones((3, 4))}),
    ValueError,
    (
      r"`bn_stats\['mean'\]` has shape \(3, 4\): the batch norm normalizes several"
      " feature axes, and only one over the layer's output features alone"
    ),
  ),
  "feature-size": (
    lambda: fold.fold_affine(K, B, *bnjax.init(6)),
    ValueError,
    (
      r"normalizes 6 features .* expected the layer's 4 output features \(`kernel`"
      r" has shape \(3, 3, 2, 4\), output features on axis -1\)\. Hint: pair"
    ),
  ),
  "bias-shape": (
    lambda: fold.fold_affine(K, jnp.zeros(5), P, S),
    ValueError,
    r"`bias` must have shape \(4,\), one value per output feature .* got \(5,\)",
  ),
  # fold
  "variables-type": (
    lambda: fold.fold([1], [("conv", "bn")]),
    TypeError,
    TREE + "`variables` must be a dict .* got list. Hint: for a flax.nnx",
  ),
  "variables-params-only": (
    lambda: fold.fold(_tree()["params"], [("conv", "bn")]),
    ValueError,
    TREE + "`variables` must hold a 'params' collection, got keys"
    r" \['bn', 'conv', 'dense'\]\. Hint: pass the whole",
  ),
  "pairs-str": (
    lambda: fold.fold(_tree(), "conv"),
    TypeError,
    "`pairs` must be a list of .* got 'conv'. Hint: ",
  ),
  "pair-length": (
    lambda: fold.fold(_tree(), [("conv",)]),
    TypeError,
    r"`pairs\[0\]` must be a \(layer, bn\) or \(layer, bn, options\) tuple",
  ),
  "path-type": (
    lambda: fold.fold(_tree(), [(0, "bn")]),
    TypeError,
    r"`pairs\[0\]` path 0 must be a non-empty 'a/b' string or a tuple of strings",
  ),
  "path-empty": (
    lambda: fold.fold(_tree(), [("", "bn")]),
    TypeError,
    r"`pairs\[0\]` path '' must be a non-empty",
  ),
  "options-type": (
    lambda: fold.fold(_tree(), [("conv", "bn", 1e-3)]),
    TypeError,
    r"`pairs\[0\]`'s third element must be a dict of options",
  ),
  "options-keys": (
    lambda: fold.fold(_tree(), [("conv", "bn", {"eps": 1e-3})]),
    ValueError,
    r"`pairs\[0\]` has unknown options \['eps'\]; expected some of",
  ),
  "options-epsilon": (
    lambda: fold.fold(_tree(), [("conv", "bn", {"epsilon": "1e-3"})]),
    TypeError,
    TREE + "`epsilon` must be a non-negative float, got '1e-3'",
  ),
  "duplicate": (
    lambda: fold.fold(_tree(), [("conv", "bn"), ("dense", "bn")]),
    ValueError,
    r"`pairs\[1\]` names 'bn', which `pairs\[0\]` already names\. Hint: each",
  ),
  "missing-layer": (
    lambda: fold.fold(_tree(), [("block/conv", "bn")]),
    ValueError,
    TREE + r"`pairs\[0\]` \('block/conv', 'bn'\): 'block/conv' is not in"
    r" variables\['params'\]: no 'block' at the top \(found \['bn', 'conv',"
    r" 'dense'\]\)\. Hint: paths are module names",
  ),
  "missing-bn": (
    lambda: fold.fold(_tree(), [("conv", "BatchNorm_0")]),
    ValueError,
    (
      r"'BatchNorm_0' is not in variables\['batch_stats'\]: no 'BatchNorm_0' at the"
      r" top \(found \['bn', 'bn5'\]\)"
    ),
  ),
  "swapped-pair": (
    lambda: fold.fold(_tree(), [("bn", "conv")]),
    ValueError,
    (
      r"the layer 'bn' must be a Dense or Conv with a 'kernel', got keys"
      r" \['bias', 'scale'\]\. Hint: each pair is \(layer, bn\)"
    ),
  ),
  "tree-feature-size": (
    lambda: fold.fold(_tree(), [("conv", "bn5")]),
    ValueError,
    (
      r"the batch norm normalizes 5 features \(`variables\['batch_stats'\]"
      r"\['bn5'\]\['mean'\]` has shape \(5,\)\), expected the layer's 4 output"
      r" features \(`variables\['params'\]\['conv'\]\['kernel'\]` has shape"
    ),
  ),
  "tree-kernel-int": (
    lambda: fold.fold(
      {**_tree(), "params": {**_tree()["params"], "conv": {"kernel": K.astype(jnp.int8)}}},
      [("conv", "bn")],
    ),
    TypeError,
    r"`variables\['params'\]\['conv'\]\['kernel'\]` must have a floating dtype",
  ),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors(name):
  call, error, match = ERRORS[name]
  with pytest.raises(error, match=match):
    call()


class _Bad(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.bn_axis1 = nnx.BatchNorm(4, axis=1, rngs=rngs)
    self.up = nnx.Linear(4, 4, rngs=rngs)


@functools.cache
def _bad_model():
  return nnx_model(_Bad, np.random.default_rng(0))  # the error cases raise before changing it


NNX_ERRORS = {
  "model-type": (
    lambda m: fold.fold_nnx({"params": {}}, [("conv", "bn")]),
    TypeError,
    ("bnjax.fold.fold_nnx: `model` must be a flax.nnx Module, got dict. Hint: for Linen"),
  ),
  "options": (
    lambda m: fold.fold_nnx(m, [("conv", "bn", {"epsilon": 1.0})]),
    TypeError,
    "fold_nnx reads epsilon and transpose_kernel from the modules",
  ),
  "missing": (
    lambda m: fold.fold_nnx(m, [("conv", "norm")]),
    ValueError,
    (
      r"'norm' is not in the model: no 'norm' of the model \(_Bad\)\. Hint: paths are"
      " attribute names"
    ),
  ),
  "not-a-layer": (
    lambda m: fold.fold_nnx(m, [("bn", "conv")]),
    ValueError,
    (
      r"the layer 'bn' must be an nnx.Linear or nnx.Conv with a `kernel`, got"
      " BatchNorm"
    ),
  ),
  "not-a-bn": (
    lambda m: fold.fold_nnx(m, [("conv", "conv/kernel")]),
    ValueError,
    "'conv/kernel' must be a batch norm with running `mean` and `var`, got Param",
  ),
  "axis": (
    lambda m: fold.fold_nnx(m, [("conv", "bn_axis1")]),
    ValueError,
    (
      r"the last axis \(axis=-1\), got axis=1: a batch norm over another axis cannot be"
      " folded"
    ),
  ),
}


@pytest.mark.parametrize("name", list(NNX_ERRORS))
def test_nnx_errors(name):
  call, error, match = NNX_ERRORS[name]
  with pytest.raises(error, match=match):
    call(_bad_model())


@pytest.mark.usefixtures("standard_promotion")
def test_nnx_error_in_a_later_pair_changes_nothing():
  model = nnx.clone(_bad_model())
  kernel = np.asarray(model.conv.kernel[...])
  with pytest.raises(ValueError, match=r"`pairs\[1\]` names 'conv', which `pairs\[0\]`"):
    fold.fold_nnx(model, [("conv", "bn"), ("conv", "bn")])
  with pytest.raises(ValueError, match=r"`pairs\[1\]` \('up', 'bn_axis1'\)"):
    fold.fold_nnx(model, [("conv", "bn"), ("up", "bn_axis1")])
  np.testing.assert_array_equal(model.conv.kernel[...], kernel)
  assert isinstance(model.bn, nnx.BatchNorm)


def test_error_messages_name_the_function():
  for name, (call, error, _) in ERRORS.items():
    with pytest.raises(error) as info:
      call()
    assert re.match(r"bnjax\.fold\.fold(_affine)?: ", str(info.value)), name


# --- the benchmark -----------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_fold_quick(tmp_path):
  pytest.importorskip("tqdm")
  path = ROOT / "benchmarks" / "bench_fold.py"
  spec = importlib.util.spec_from_file_location("_script_bench_fold", path)
  bench = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = bench  # dataclasses look their module up while the file executes
  try:
    spec.loader.exec_module(bench)
    output = tmp_path / "fold.md"
    flags = ["--quick", "--rounds", "1", "--reps", "1", "--no-malloc-env", "--no-progress"]
    assert bench.main([*flags, "--output", str(output)]) == output
  finally:
    del sys.modules[spec.name]
  text = output.read_text()
  assert "| net | unfolded (conv, BN, relu) | folded (conv, bias, relu) |" in text
  assert "## Environment" in text and "| malloc env |" in text and "| load average |" in text
  # Not a timing check: the folded nets compute what the unfolded ones do.
  assert len(re.findall(r"^\| [13]x[13]: .* \| yes \|$", text, re.MULTILINE)) == 2, text
