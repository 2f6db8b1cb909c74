"""Gradients: the closed form, `check_grads` in float64, and none into the statistics."""

import math
import re

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

  (_y, _), pullback = jax.vjp(forward, x, params)
  return pullback((dy, jax.tree.map(jnp.zeros_like, stats)))


BACKWARDS = ["closed_form", "autodiff"]


@pytest.mark.parametrize("name", ["dense", "nhwc", "nchw", "two-feature-axes"])
@pytest.mark.parametrize("variance", ["two_pass", "shifted", "fast"])
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.slow
def test_training_gradients_match_closed_form(name, variance, backward):
  layout = LAYOUTS[name]
  x, params, stats = random_inputs(layout)
  dy = jnp.asarray(np.random.default_rng(7).normal(size=layout.shape), jnp.float32)
  dx, dparams = _vjp(layout, x, params, stats, dy, variance=variance, backward=backward)
  dx_ref, dscale_ref, dbias_ref = training_grads(x, dy, scale=params["scale"], axis=layout.axis)
  n = layout.reduction_size()
  assert_close(dx, dx_ref, jnp.float32, n, "dx")
  assert_close(dparams["scale"], dscale_ref, jnp.float32, n, "dscale")
  assert_close(dparams["bias"], dbias_ref, jnp.float32, n, "dbias")


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.slow
def test_masked_gradients_match_closed_form(backward):
  layout = LAYOUTS["nhwc"]
  x, params, stats = random_inputs(layout)
  mask = np.random.default_rng(2).uniform(size=layout.shape) < 0.7
  mask[..., 0] = False  # an empty channel: y = bias there, so its dx is 0
  dy = jnp.asarray(np.random.default_rng(8).normal(size=layout.shape), jnp.float32)
  dx, dparams = _vjp(layout, x, params, stats, dy, mask=jnp.asarray(mask), backward=backward)
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
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.slow
def test_check_grads_float64_second_order(training, variance, layout, backward):
  # Small shapes: check_grads takes finite differences along random directions, order 2.
  # The closed-form backward is a custom_vjp: reverse mode only (see bnjax._normalize).
  x, params, stats = jax.tree.map(
    lambda v: jnp.asarray(v, jnp.float64), random_inputs(layout, seed=4)
  )

  def f(x, scale, bias):
    y, _ = bnjax.batch_norm(
      x,
      {"scale": scale, "bias": bias},
      stats,
      training=training,
      axis=layout.axis,
      variance=variance,
      backward=backward,
    )
    return y

  modes = ["rev"] if backward == "closed_form" and training else ["fwd", "rev"]
  check_grads(f, (x, params["scale"], params["bias"]), order=2, modes=modes)


@pytest.mark.usefixtures("x64")
@pytest.mark.slow
def test_closed_form_backward_gives_the_autodiff_hessian():
  # Forward-over-reverse (jax.hessian) works through the custom_vjp: its backward is plain JAX.
  x, params, stats = jax.tree.map(
    lambda v: jnp.asarray(v, jnp.float64), random_inputs(Layout((5, 3), -1), seed=5)
  )
  w = jnp.asarray(np.random.default_rng(3).normal(size=x.shape))

  def loss(x, backward):
    y, _ = bnjax.batch_norm(x, params, stats, training=True, backward=backward)
    return jnp.sum(jnp.sin(y) * w)

  closed = jax.hessian(loss)(x, "closed_form")
  reference = jax.hessian(loss)(x, "autodiff")
  np.testing.assert_allclose(closed, reference, rtol=1e-10, atol=1e-12)


def test_forward_mode_needs_autodiff_backward():
  x, params, stats = random_inputs(LAYOUTS["dense"])

  def f(x, backward):
    return bnjax.batch_norm(x, params, stats, training=True, backward=backward)[0]

  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda x: f(x, "closed_form"), (x,), (jnp.ones_like(x),))
  _, tangent = jax.jvp(lambda x: f(x, "autodiff"), (x,), (jnp.ones_like(x),))
  # A constant shift of every element leaves the batch-normalized output unchanged.
  np.testing.assert_allclose(tangent, 0.0, atol=1e-5)


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
  dx = jax.grad(lambda x: jnp.sum(bnjax.batch_norm(x, params, stats, training=True)[1]["var"]))(x)
  np.testing.assert_array_equal(dx, 0.0)


def _grads(x, params, stats, dy, **options):
  def loss(x, params):
    y, _ = bnjax.batch_norm(x, params, stats, training=True, **options)
    return jnp.sum(y.astype(jnp.float32) * dy)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params)


def _per_example_adjustment(shape):
  rng = np.random.default_rng(11)
  return (
    jnp.asarray(rng.uniform(0.5, 1.5, (shape[0],) + (1,) * (len(shape) - 1)), jnp.float32),
    jnp.asarray(rng.normal(size=shape[-1]), jnp.float32),
  )


CLOSED_FORM_CASES = {
  "virtual-batches": {"virtual_batch_size": 2},
  "virtual-batches-masked": {"virtual_batch_size": 4, "mask": "random"},
  "adjustment-per-channel": {
    "adjustment": lambda shape: (jnp.linspace(0.5, 1.5, shape[-1]), jnp.full((), 0.3))
  },
  "adjustment-per-example": {"adjustment": _per_example_adjustment},  # takes autodiff
  "nchw-tuple-axes": {"axis": (1, 3)},
  "bfloat16-input": {"dtype": jnp.bfloat16},
  "no-params": {"params": {}},
  "fast-variance": {"variance": "fast"},
}


@pytest.mark.parametrize("name", list(CLOSED_FORM_CASES))
def test_closed_form_backward_equals_autodiff(name):
  options = dict(CLOSED_FORM_CASES[name])
  x, params, stats = random_inputs(LAYOUTS["nhwc"], seed=9)
  if options.get("axis") == (1, 3):
    params, stats = jax.tree.map(lambda v: jnp.resize(v, (x.shape[1], x.shape[3])), (params, stats))
  params = options.pop("params", params)
  if options.get("mask") == "random":
    options["mask"] = jnp.asarray(np.random.default_rng(4).uniform(size=x.shape) < 0.6)
  x = x.astype(options.pop("dtype", jnp.float32))
  dy = jnp.asarray(np.random.default_rng(6).normal(size=x.shape), jnp.float32)
  closed = _grads(x, params, stats, dy, backward="closed_form", **options)
  autodiff = _grads(x, params, stats, dy, backward="autodiff", **options)
  n = x.size // x.shape[-1]
  for got, want, what in zip(
    jax.tree.leaves(closed), jax.tree.leaves(autodiff), ["dx", "db", "ds"]
  ):
    assert got.dtype == want.dtype, what
    assert_close(got, want, got.dtype, n, what)


@pytest.mark.slow
def test_closed_form_backward_under_vmap_with_an_axis_name():
  x, params, stats = random_inputs(LAYOUTS["nhwc"], seed=10)
  dy = jnp.asarray(np.random.default_rng(6).normal(size=x.shape), jnp.float32)

  def grads(backward):
    def loss(x, params):  # two "devices" of vmap share the statistics of the whole batch
      def per_member(x):
        return bnjax.batch_norm(x, params, stats, training=True, axis_name="b", backward=backward)[
          0
        ]

      y = jax.vmap(per_member, axis_name="b")(x.reshape((2, -1, *x.shape[1:])))
      return jnp.sum(y.reshape(x.shape) * dy)

    return jax.grad(loss, argnums=(0, 1))(x, params)

  for got, want in zip(jax.tree.leaves(grads("closed_form")), jax.tree.leaves(grads("autodiff"))):
    assert_close(got, want, jnp.float32, x.size // x.shape[-1])
  dx_ref, dscale_ref, dbias_ref = training_grads(x, dy, scale=params["scale"])
  dx, dparams = grads("closed_form")
  assert_close(dx, dx_ref, jnp.float32, x.size // x.shape[-1], "dx")
  assert_close(dparams["scale"], dscale_ref, jnp.float32, x.size // x.shape[-1], "dscale")
  assert_close(dparams["bias"], dbias_ref, jnp.float32, x.size // x.shape[-1], "dbias")


def test_closed_form_training_step_writes_only_y_and_dx():
  # Structure, not timing (that is benchmarks/bench_batch_norm.py): besides its outputs y and
  # dx, the compiled forward + backward writes no intermediate the size of x. Autodiff writes
  # several (benchmarks/NOTES.md); this guards the barriers that keep XLA from sharing `x - mean`.
  shape = (8, 6, 6, 16)
  x, params, stats = random_inputs(Layout(shape, -1))

  def step(x, params, dy, backward):
    y, pullback, new_stats = jax.vjp(
      lambda x, p: bnjax.batch_norm(x, p, stats, training=True, backward=backward),
      x,
      params,
      has_aux=True,
    )
    return y, pullback(dy), new_stats

  def full_size_values(backward):
    # x's size in any shape: bnjax reduces over a collapsed view, (288, 16) here.
    hlo = jax.jit(step, static_argnums=3).lower(x, params, x, backward).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    values = []
    for line in entry.splitlines():
      value = re.match(r"\s*(?:ROOT )?%\S+ = f32\[([\d,]*)\]", line)
      if (
        value
        and math.prod(map(int, filter(None, value.group(1).split(",")))) == x.size
        and " parameter(" not in line
        and " bitcast(" not in line
      ):
        values.append(line)
    return values

  assert len(full_size_values("closed_form")) == 2, full_size_values("closed_form")
  assert len(full_size_values("autodiff")) > 2
