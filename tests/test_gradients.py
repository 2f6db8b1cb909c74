"""Gradients: the closed form, jax.test_util.check_grads in float64, and none into the statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import LAYOUTS, Layout, random_inputs
from jax.test_util import check_grads
from oracle import training_grads
from tolerances import assert_close

import bnjax


def _vjp(layout, x, params, stats, dy, **options):
  def forward(x, params):
    return bnjax.batch_norm(x, params, stats, training=True, axis=layout.axis, **options)

  (y, _), pullback = jax.vjp(forward, x, params)
  return pullback((dy, jax.tree.map(jnp.zeros_like, stats)))


@pytest.mark.parametrize("name", ["dense", "nhwc", "nchw", "two-feature-axes"])
@pytest.mark.parametrize("variance", ["two_pass", "shifted", "fast"])
def test_training_gradients_match_closed_form(name, variance):
  layout = LAYOUTS[name]
  x, params, stats = random_inputs(layout)
  dy = jnp.asarray(np.random.default_rng(7).normal(size=layout.shape), jnp.float32)
  dx, dparams = _vjp(layout, x, params, stats, dy, variance=variance)
  dx_ref, dscale_ref, dbias_ref = training_grads(x, dy, scale=params["scale"], axis=layout.axis)
  n = layout.reduction_size()
  assert_close(dx, dx_ref, jnp.float32, n, "dx")
  assert_close(dparams["scale"], dscale_ref, jnp.float32, n, "dscale")
  assert_close(dparams["bias"], dbias_ref, jnp.float32, n, "dbias")


def test_masked_gradients_match_closed_form():
  layout = LAYOUTS["nhwc"]
  x, params, stats = random_inputs(layout)
  mask = np.random.default_rng(2).uniform(size=layout.shape) < 0.7
  dy = jnp.asarray(np.random.default_rng(8).normal(size=layout.shape), jnp.float32)
  dx, dparams = _vjp(layout, x, params, stats, dy, mask=jnp.asarray(mask))
  dx_ref, dscale_ref, dbias_ref = training_grads(x, dy, scale=params["scale"], mask=mask)
  n = layout.reduction_size()
  assert_close(dx, dx_ref, jnp.float32, n, "dx")
  assert_close(dparams["scale"], dscale_ref, jnp.float32, n, "dscale")
  assert_close(dparams["bias"], dbias_ref, jnp.float32, n, "dbias")


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variance", ["two_pass", "shifted"])
@pytest.mark.parametrize(
    "layout", [Layout((6, 3), -1), Layout((3, 2, 2, 2), 1)], ids=["dense", "nchw"]
)
def test_check_grads_float64_second_order(training, variance, layout):
  # Small shapes: check_grads takes finite differences along random directions, order 2.
  x, params, stats = jax.tree.map(
      lambda v: jnp.asarray(v, jnp.float64), random_inputs(layout, seed=4)
  )

  def f(x, scale, bias):
    y, _ = bnjax.batch_norm(
        x, {"scale": scale, "bias": bias}, stats,
        training=training, axis=layout.axis, variance=variance,
    )
    return y

  check_grads(f, (x, params["scale"], params["bias"]), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_gradient_into_running_stats(training):
  x, params, stats = random_inputs(LAYOUTS["nhwc"])

  def loss(x, stats):
    y, new_stats = bnjax.batch_norm(x, params, stats, training=training)
    return jnp.sum(y**2) + jnp.sum(new_stats["mean"]) + jnp.sum(new_stats["var"])

  dx, dstats = jax.grad(loss, argnums=(0, 1))(x, stats)
  for key in stats:
    np.testing.assert_array_equal(dstats[key], 0.0)
  assert bool(jnp.any(dx != 0))


def test_no_gradient_from_new_stats_to_x():
  x, params, stats = random_inputs(LAYOUTS["nhwc"])
  dx = jax.grad(
      lambda x: jnp.sum(bnjax.batch_norm(x, params, stats, training=True)[1]["var"])
  )(x)
  np.testing.assert_array_equal(dx, 0.0)
