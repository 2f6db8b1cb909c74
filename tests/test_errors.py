"""Every error bnjax raises: at trace time, naming the function and argument, with a hint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close

import bnjax
import bnjax.fold

X = jnp.ones((4, 5, 5, 3))
PARAMS, STATS = bnjax.init(3)
RENORM_STATS = bnjax.init(3, renorm=True)[1]
COUNT_STATS = bnjax.init(3, track_count=True)[1]


def bn(x=X, params=PARAMS, stats=STATS, **options):
  options.setdefault("training", True)
  return bnjax.batch_norm(x, params, stats, **options)


CASES = {
  # name: (call, exception, pattern in the message)
  "x-not-array": (lambda: bn(x="abc"), TypeError, r"batch_norm: `x` must be an array"),
  "x-integer": (
    lambda: bn(x=jnp.ones((4, 3), jnp.int32)),
    TypeError,
    r"`x` must have a floating or complex dtype.*got int32",
  ),
  "x-bool": (
    lambda: bn(x=jnp.ones((4, 3), bool)),
    TypeError,
    r"`x` must have a floating or complex dtype",
  ),
  "x-scalar": (lambda: bn(x=jnp.ones(())), ValueError, r"`x` must have at least one axis"),
  "axis-out-of-range": (
    lambda: bn(axis=4),
    ValueError,
    r"`axis`=4 is out of range.*\[-4, 3\].*NCHW",
  ),
  "axis-negative-out-of-range": (lambda: bn(axis=-5), ValueError, r"`axis`=-5 is out of range"),
  "axis-repeated": (
    lambda: bn(axis=(3, -1)),
    ValueError,
    r"`axis`=\(3, -1\) names the same axis twice",
  ),
  "axis-not-int": (lambda: bn(axis=1.0), TypeError, r"`axis` must be an int or a tuple of ints"),
  "axis-bool": (lambda: bn(axis=True), TypeError, r"`axis` must be an int"),
  "params-not-dict": (lambda: bn(params=[1.0]), TypeError, r"`params` must be a dict"),
  "params-unknown-key": (
    lambda: bn(params={"gamma": jnp.ones(3)}),
    ValueError,
    r"unknown keys \['gamma'\].*scale/bias",
  ),
  "params-integer": (
    lambda: bn(params={"scale": jnp.ones(3, jnp.int32)}),
    TypeError,
    r"`params\['scale'\]` must have a floating dtype",
  ),
  "params-bool": (
    lambda: bn(params={"bias": jnp.ones(3, bool)}),
    TypeError,
    r"`params\['bias'\]` must have a floating dtype",
  ),
  "params-shape": (
    lambda: bn(params={"scale": jnp.ones(5)}),
    ValueError,
    r"`params\['scale'\]` must have the shape of the feature axes \(3,\), got \(5,\).*axis=1",
  ),
  "params-channels-first-mixup": (
    lambda: bn(axis=1),
    ValueError,
    r"feature axes \(5,\), got \(3,\)",
  ),
  "stats-not-dict": (lambda: bn(stats=(1, 2)), TypeError, r"`stats` must be a dict"),
  "stats-keras-names": (
    lambda: bn(stats={"moving_mean": jnp.zeros(3), "moving_variance": jnp.ones(3)}),
    ValueError,
    r"`stats` is missing \['mean', 'var'\].*moving_mean",
  ),
  "stats-shape": (
    lambda: bn(stats={"mean": jnp.zeros(4), "var": jnp.ones(3)}),
    ValueError,
    r"`stats\['mean'\]` must have the shape",
  ),
  "stats-integer": (
    lambda: bn(stats={"mean": jnp.zeros(3, jnp.int32), "var": jnp.ones(3)}),
    TypeError,
    r"`stats\['mean'\]` must have a floating or complex dtype",
  ),
  "stats-count-float": (
    lambda: bn(stats=STATS | {"count": jnp.zeros(())}),
    TypeError,
    r"`stats\['count'\]` must be an integer scalar",
  ),
  "cumulative-without-count": (
    lambda: bn(momentum=None),
    ValueError,
    r"`momentum=None`.*`stats\['count'\]`.*track_count=True",
  ),
  "momentum-one": (
    lambda: bn(momentum=1.0),
    ValueError,
    r"`momentum` must be in \[0, 1\), got 1.0",
  ),
  "momentum-negative": (lambda: bn(momentum=-0.1), ValueError, r"`momentum` must be in \[0, 1\)"),
  "momentum-torch-style": (lambda: bn(momentum=1.5), ValueError, r"must be in \[0, 1\)"),
  "momentum-string": (lambda: bn(momentum="0.9"), TypeError, r"`momentum` must be a float"),
  "momentum-array": (
    lambda: bn(momentum=jnp.asarray(0.9)),
    TypeError,
    r"`momentum` must be a float",
  ),
  "epsilon-negative": (
    lambda: bn(epsilon=-1e-5),
    ValueError,
    r"`epsilon` must be >= 0, got -1e-05",
  ),
  "epsilon-nan": (lambda: bn(epsilon=float("nan")), ValueError, r"`epsilon` must be >= 0"),
  "epsilon-string": (
    lambda: bn(epsilon="1e-5"),
    TypeError,
    r"`epsilon` must be a non-negative float",
  ),
  "running-variance": (
    lambda: bn(running_variance="bessel"),
    ValueError,
    r"`running_variance` must be one of \('biased', 'unbiased'\)",
  ),
  "variance": (
    lambda: bn(variance="welford"),
    ValueError,
    r"`variance` must be one of \('auto', 'two_pass', 'shifted', 'fast'\)",
  ),
  "backward": (
    lambda: bn(backward="numeric"),
    ValueError,
    r"`backward` must be one of \('closed_form', 'autodiff'\), got 'numeric'",
  ),
  "update-stats-not-bool": (
    lambda: bn(update_stats=0),
    TypeError,
    r"`update_stats` must be a Python bool",
  ),
  "training-int": (
    lambda: bn(training=1),
    TypeError,
    r"`training` must be a Python bool or a boolean scalar array, got 1",
  ),
  "training-string": (lambda: bn(training="train"), TypeError, r"`training` must be a Python bool"),
  "training-float-array": (lambda: bn(training=jnp.asarray(1.0)), TypeError, r"got float32\[\]"),
  "training-vector": (lambda: bn(training=jnp.ones(2, bool)), TypeError, r"got bool\[2\]"),
  "mask-float": (
    lambda: bn(mask=jnp.ones((4, 1, 1, 1))),
    TypeError,
    r"`mask` must be boolean, got float32.*astype\(bool\)",
  ),
  "mask-shape": (
    lambda: bn(mask=jnp.ones((5, 1, 1, 1), bool)),
    ValueError,
    r"`mask` of shape \(5, 1, 1, 1\) does not broadcast to x's shape \(4, 5, 5, 3\)",
  ),
  "mask-larger": (
    lambda: bn(mask=jnp.ones((2, 4, 5, 5, 3), bool)),
    ValueError,
    r"does not broadcast",
  ),
  "groups-without-axis-name": (
    lambda: bn(axis_index_groups=[[0, 1]]),
    ValueError,
    r"`axis_index_groups` needs `axis_name`",
  ),
  "axis-name-unbound": (
    lambda: bn(axis_name="batch"),
    NameError,
    r"`axis_name`='batch' is not bound.*shard_map.*pmap.*jax.jit.*axis_name=None",
  ),
  "axis-name-unbound-jit": (
    lambda: jax.jit(lambda x: bn(x, axis_name="batch"))(X),
    NameError,
    r"is not bound",
  ),
  "dtype-integer": (
    lambda: bn(dtype=jnp.int8),
    TypeError,
    r"`dtype` must be a floating or complex dtype",
  ),
  "dtype-real-for-complex": (
    lambda: bn(
      x=jnp.ones((4, 3), jnp.complex64), params={}, stats=bnjax.init(3)[1], dtype=jnp.float32
    ),
    TypeError,
    r"`dtype`=float32 is real but `x` is complex64.*x.real",
  ),
  "complex-renorm": (
    lambda: bn(
      x=jnp.ones((4, 3), jnp.complex64), params={}, stats=bnjax.init(3, renorm=True)[1], renorm=True
    ),
    ValueError,
    r"complex `x` does not combine with \['renorm'\]",
  ),
  "complex-virtual-batches": (
    lambda: bn(
      x=jnp.ones((4, 3), jnp.complex64), params={}, stats=bnjax.init(3)[1], virtual_batch_size=2
    ),
    ValueError,
    r"\['virtual_batch_size'\]",
  ),
  "mask-ambiguous": (
    lambda: bn(
      x=jnp.ones((3, 3, 3)), params={}, stats=bnjax.init(3)[1], mask=jnp.ones((3, 3), bool)
    ),
    ValueError,
    r"`mask` of shape \(3, 3\) is ambiguous.*mask\[..., None\].*mask\[None\]",
  ),
  "moments-axes": (
    lambda: bnjax.moments(X, (0, 7)),
    ValueError,
    r"bnjax.moments: `axes`=\(0, 7\) is out of range",
  ),
  "moments-integer": (
    lambda: bnjax.moments(jnp.ones(3, jnp.int32), 0),
    TypeError,
    r"bnjax.moments: `x`",
  ),
  "moments-mask": (
    lambda: bnjax.moments(X, 0, mask=jnp.ones(2, bool)),
    ValueError,
    r"bnjax.moments: `mask`",
  ),
  "moments-variance": (
    lambda: bnjax.moments(X, 0, variance="exact"),
    ValueError,
    r"bnjax.moments: `variance`",
  ),
  "moments-axis-name": (
    lambda: bnjax.moments(X, 0, axis_name="i"),
    NameError,
    r"bnjax.moments: `axis_name`",
  ),
  "renorm-without-stats": (
    lambda: bn(renorm=True),
    ValueError,
    (
      r"`renorm=True` needs the running statistics"
      r" \['renorm_mean', 'renorm_stddev', 'stddev'\].*renorm=True"
    ),
  ),
  "renorm-not-bool": (lambda: bn(renorm=1), TypeError, r"`renorm` must be a Python bool"),
  "renorm-clipping-without-renorm": (
    lambda: bn(renorm_clipping={"rmax": 2.0}),
    ValueError,
    r"`renorm_clipping` needs `renorm=True`",
  ),
  "renorm-clipping-not-dict": (
    lambda: bn(stats=RENORM_STATS, renorm=True, renorm_clipping=[2.0]),
    TypeError,
    r"`renorm_clipping` must be a dict",
  ),
  "renorm-clipping-key": (
    lambda: bn(stats=RENORM_STATS, renorm=True, renorm_clipping={"r_max": 2.0}),
    ValueError,
    r"unknown keys \['r_max'\]",
  ),
  "renorm-clipping-value": (
    lambda: bn(stats=RENORM_STATS, renorm=True, renorm_clipping={"rmax": "2"}),
    TypeError,
    r"`renorm_clipping\['rmax'\]` must be a number",
  ),
  "renorm-clipping-order": (
    lambda: bn(stats=RENORM_STATS, renorm=True, renorm_clipping={"rmin": 2.0, "rmax": 1.5}),
    ValueError,
    r"rmin <= rmax",
  ),
  "renorm-clipping-rmin-negative": (
    lambda: bn(stats=RENORM_STATS, renorm=True, renorm_clipping={"rmin": -1.0}),
    ValueError,
    r"rmin, rmax > 0",
  ),
  "renorm-clipping-dmax": (
    lambda: bn(stats=RENORM_STATS, renorm=True, renorm_clipping={"dmax": -1.0}),
    ValueError,
    r"dmax >= 0",
  ),
  "renorm-momentum": (
    lambda: bn(stats=RENORM_STATS, renorm=True, renorm_momentum=1.0),
    ValueError,
    r"`renorm_momentum` must be in \[0, 1\)",
  ),
  "renorm-momentum-none": (
    lambda: bn(stats=RENORM_STATS, renorm=True, renorm_momentum=None),
    TypeError,
    r"`renorm_momentum` must be a float in \[0, 1\), got None",
  ),
  "zero-debias-value": (
    lambda: bn(stats=COUNT_STATS, zero_debias=True),
    ValueError,
    r"`zero_debias` must be one of \('mean', 'mean_and_var'\)",
  ),
  "zero-debias-cumulative": (
    lambda: bn(stats=COUNT_STATS, zero_debias="mean", momentum=None),
    ValueError,
    r"`zero_debias` needs a float `momentum`",
  ),
  "zero-debias-renorm": (
    lambda: bn(stats=RENORM_STATS | COUNT_STATS, zero_debias="mean", renorm=True),
    ValueError,
    r"cannot be combined",
  ),
  "zero-debias-without-count": (
    lambda: bn(zero_debias="mean"),
    ValueError,
    r"`zero_debias` need the number of updates.*track_count=True",
  ),
  "virtual-batch-size-type": (
    lambda: bn(virtual_batch_size=2.0),
    TypeError,
    r"`virtual_batch_size` must be a positive int",
  ),
  "virtual-batch-size-zero": (
    lambda: bn(virtual_batch_size=0),
    TypeError,
    r"`virtual_batch_size` must be a positive int",
  ),
  "virtual-batch-size-divides": (
    lambda: bn(virtual_batch_size=3),
    ValueError,
    r"`virtual_batch_size`=3 must divide the batch size, got x.shape\[0\]=4",
  ),
  "virtual-batch-size-feature-axis": (
    lambda: bn(x=jnp.ones((4, 5)), params={}, stats=bnjax.init(4)[1], axis=0, virtual_batch_size=2),
    ValueError,
    r"splits axis 0.*feature axis",
  ),
  "virtual-batch-size-axis-name": (
    lambda: jax.vmap(lambda x: bn(x, virtual_batch_size=2, axis_name="i"), axis_name="i")(
      jnp.ones((2, *X.shape))
    ),
    ValueError,
    r"`virtual_batch_size` with `axis_name` is not supported",
  ),
  "adjustment-not-callable": (
    lambda: bn(adjustment=(1.0, 0.0)),
    TypeError,
    r"`adjustment` must be a callable",
  ),
  "adjustment-with-virtual-batches": (
    lambda: bn(adjustment=lambda s: (1.0, 0.0), virtual_batch_size=2),
    ValueError,
    r"`adjustment` with `virtual_batch_size` is not supported",
  ),
  "init-num-features": (
    lambda: bnjax.init(0),
    ValueError,
    r"bnjax.init: `num_features` must be a positive int",
  ),
  "init-num-features-float": (lambda: bnjax.init(3.0), ValueError, r"bnjax.init: `num_features`"),
  "init-dtype": (
    lambda: bnjax.init(3, dtype=jnp.int32),
    TypeError,
    r"bnjax.init: `dtype` must be a floating dtype",
  ),
  # The probe of bad inputs (issue: faults contained): each a bnjax error naming the argument.
  "params-none": (
    lambda: bn(params={"scale": None}),
    TypeError,
    r"`params\['scale'\]` must be an array, got None. Hint: leave the key out",
  ),
  "dtype-number": (
    lambda: bn(dtype=5),
    TypeError,
    r"bnjax.batch_norm: `dtype` must be a floating or complex dtype, got 5",
  ),
  "dtype-bogus": (
    lambda: bn(dtype="bogus"),
    TypeError,
    r"`dtype` must be a floating or complex dtype, got 'bogus'",
  ),
  "init-dtype-number": (
    lambda: bnjax.init(3, dtype=5),
    TypeError,
    r"bnjax.init: `dtype` must be a floating dtype, got 5",
  ),
  "init-dtype-bogus": (
    lambda: bnjax.init(3, dtype="bogus"),
    TypeError,
    r"bnjax.init: `dtype` must be a floating dtype, got 'bogus'",
  ),
  "adjustment-shape": (
    lambda: bn(adjustment=lambda shape: (jnp.ones(5), jnp.zeros(5))),
    ValueError,
    (
      r"`adjustment` returned a scale of shape \(5,\),"
      r" which does not broadcast to x's shape \(4, 5, 5, 3\)"
    ),
  ),
  "adjustment-not-pair": (
    lambda: bn(adjustment=lambda shape: jnp.ones(3)),
    TypeError,
    r"`adjustment` must return a pair",
  ),
  "zero-debias-momentum-0": (
    lambda: bn(stats=COUNT_STATS, zero_debias="mean", momentum=0.0),
    ValueError,
    r"`zero_debias='mean'` needs `momentum` > 0",
  ),
  "epsilon-inf": (
    lambda: bn(epsilon=float("inf")),
    ValueError,
    r"`epsilon` must be finite, got inf",
  ),
  "renorm-clipping-nan": (
    lambda: bn(stats=RENORM_STATS, renorm=True, renorm_clipping={"rmax": float("nan")}),
    ValueError,
    r"`renorm_clipping\['rmax'\]` must be a number, got nan",
  ),
  "stats-float16": (
    lambda: bn(stats={k: v.astype(jnp.float16) for k, v in STATS.items()}),
    TypeError,
    r"`stats` \['mean', 'var'\] are float16; running statistics updated in half precision drift",
  ),
  "momentum-traced": (
    lambda: jax.jit(lambda m: bn(momentum=m))(0.9),
    TypeError,
    r"`momentum` must be a Python float, got a traced value.*static_argnames",
  ),
  "jvp-closed-form": (
    lambda: jax.jvp(lambda x: bn(x)[0], (X,), (X,)),
    TypeError,
    r"bnjax.batch_norm: forward-mode differentiation.*backward='autodiff'",
  ),
  "on-nonfinite": (
    lambda: bn(on_nonfinite="skip"),
    ValueError,
    r"`on_nonfinite` must be one of \('keep', 'propagate', 'raise'\)",
  ),
  "preset-name": (
    lambda: bnjax.conventions.PRESETS["pytorch"],
    KeyError,
    r"PRESETS has no preset 'pytorch'; the presets are \[.*'PYTORCH'.*upper case",
  ),
  "torch-momentum-0": (
    lambda: bnjax.conventions.pytorch(momentum=0.0),
    ValueError,
    r"`momentum=0` never updates.*update_stats=False",
  ),
  "fold-negative-variance": (
    lambda: bnjax.fold.fold_affine(
      jnp.ones((2, 3)), None, {}, {"mean": jnp.zeros(3), "var": -jnp.ones(3)}
    ),
    ValueError,
    r"`bn_stats\['var'\]` is negative in features \[0, 1, 2\]",
  ),
}


@pytest.mark.parametrize("call, error, pattern", CASES.values(), ids=CASES.keys())
def test_error(call, error, pattern):
  with pytest.raises(error, match=pattern):
    call()


def test_training_is_required():
  with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'training'"):
    bnjax.batch_norm(X, PARAMS, STATS)


def test_options_are_keyword_only():
  with pytest.raises(TypeError, match="positional"):
    bnjax.batch_norm(X, PARAMS, STATS, True)


def test_errors_are_raised_at_trace_time():
  # Nothing runs: eval_shape only traces.
  with pytest.raises(ValueError, match="out of range"):
    jax.eval_shape(lambda x: bn(x, axis=9), X)


def test_unbound_axis_name_is_harmless_in_evaluation():
  # Evaluation never communicates: like flax.linen.BatchNorm(use_running_average=True,
  # axis_name=...), it runs under plain jit.
  y, _ = jax.jit(lambda x: bn(x, training=False, axis_name="batch"))(X)
  assert_close(y, bn(X, training=False)[0], jnp.float32)  # jit and eager: an ulp apart


def test_numpy_bool_flags_are_accepted():
  y, _ = bn(training=np.bool_(True), update_stats=np.bool_(False))
  assert y.shape == X.shape


def test_half_precision_statistics_may_still_normalize_in_evaluation():
  half = {k: v.astype(jnp.bfloat16) for k, v in STATS.items()}
  y, _ = bn(stats=half, training=False)
  assert y.shape == X.shape
  _, frozen = bn(stats=half, update_stats=False)
  assert frozen["mean"].dtype == jnp.bfloat16


def test_a_count_at_its_largest_value_saturates_instead_of_wrapping():
  top = jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32)
  _, new = bn(stats={**STATS, "count": top}, momentum=None)
  assert int(new["count"]) == int(top)
  _, new = bn(stats={**STATS, "count": top - 1}, momentum=None)
  assert int(new["count"]) == int(top)


class TestModules:
  """The Flax and Equinox modules name themselves and the argument."""

  x = jnp.ones((4, 3)) + jnp.arange(12.0).reshape(4, 3)

  def test_linen(self):
    import bnjax.linen

    key = jax.random.key(0)
    with pytest.raises(
      TypeError,
      match=r"bnjax.linen.BatchNorm: `dtype` must be a floating or complex dtype, got int32",
    ):
      bnjax.linen.BatchNorm(dtype=jnp.int32).init(key, self.x, use_running_average=False)
    with pytest.raises(
      TypeError, match=r"bnjax.linen.BatchNorm: `param_dtype` must be a floating dtype, got int32"
    ):
      bnjax.linen.BatchNorm(param_dtype=jnp.int32).init(key, self.x, use_running_average=False)
    with pytest.raises(
      TypeError,
      match=r"bnjax.linen.BatchNorm: `dtype` must be a floating or complex dtype, got 'bogus'",
    ):
      bnjax.linen.BatchNorm(dtype="bogus").init(key, self.x, use_running_average=False)
    bn_module = bnjax.linen.BatchNorm()
    variables = bn_module.init(key, self.x, use_running_average=False)
    with pytest.raises(
      ValueError,
      match=r"bnjax.linen.BatchNorm: training writes the new running statistics to the"
      r" 'batch_stats' collection.*mutable=\['batch_stats'\]",
    ):
      jax.jit(lambda flag: bn_module.apply(variables, self.x, use_running_average=flag))(
        jnp.asarray(True)
      )

  def test_nnx(self):
    from flax import nnx

    import bnjax.nnx

    with pytest.raises(
      ValueError,
      match=(
        r"bnjax.nnx.BatchNorm: `num_features` must be a positive int or a tuple of them,"
        r" got 4.0"
      ),
    ):
      bnjax.nnx.BatchNorm(4.0, rngs=nnx.Rngs(0))
    with pytest.raises(
      TypeError, match=r"bnjax.nnx.BatchNorm: `param_dtype` must be a floating dtype, got int32"
    ):
      bnjax.nnx.BatchNorm(3, param_dtype=jnp.int32, rngs=nnx.Rngs(0))
    with pytest.raises(
      TypeError, match=r"bnjax.nnx.BatchNorm: `dtype` must be a floating or complex dtype, got 5"
    ):
      bnjax.nnx.BatchNorm(3, dtype=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"bnjax.nnx.BatchNorm: `on_nonfinite` must be one of"):
      bnjax.nnx.BatchNorm(3, on_nonfinite="skip", rngs=nnx.Rngs(0))

  @pytest.mark.live
  def test_torch_module_with_momentum_zero(self):
    torch = pytest.importorskip("torch")
    from bnjax.interop import torch as interop

    with pytest.raises(ValueError, match=r"`momentum=0` never updates.*update_stats=False"):
      interop.from_torch(torch.nn.BatchNorm2d(3, momentum=0.0))
