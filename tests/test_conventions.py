"""bnjax.conventions without the frameworks: preset values, converters, immutability, errors.

The presets' behaviour is checked against the real libraries in test_conventions_live.py and,
where those are absent, against golden files in test_goldens.py. MXNet is not installable here:
its preset is checked against the values read from MXNet's source (see mxnet_gluon).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import conventions as cv


def test_presets_hold_each_framework_defaults():
  expected = {
    # name: (axis, momentum, epsilon, running_variance, variance, track_count)
    "TF_NN": (-1, 0.99, 1e-3, "biased", "two_pass", False),
    "TF_FUSED_NHWC": (-1, 0.0, 1e-3, "unbiased", "two_pass", False),
    "TF_FUSED_NCHW": (1, 0.0, 1e-3, "unbiased", "two_pass", False),
    "KERAS": (-1, 0.99, 1e-3, "biased", "two_pass", False),
    "KERAS_SYNCHRONIZED": (-1, 0.99, 1e-3, "biased", "fast", False),
    "TF_KERAS_FUSED": (-1, 0.99, 1e-3, "unbiased", "two_pass", False),
    "TF_KERAS_UNFUSED": (-1, 0.99, 1e-3, "biased", "two_pass", False),
    "TF_V1_LAYERS_FUSED": (-1, 0.99, 1e-3, "unbiased", "two_pass", False),
    "TF_V1_LAYERS_UNFUSED": (-1, 0.99, 1e-3, "biased", "two_pass", False),
    "PYTORCH": (1, 0.9, 1e-5, "unbiased", "two_pass", True),
    "PYTORCH_CUMULATIVE": (1, None, 1e-5, "unbiased", "two_pass", True),
    "FLAX_LINEN": (-1, 0.99, 1e-5, "biased", "fast", False),
    "FLAX_NNX": (-1, 0.99, 1e-5, "biased", "fast", False),
    "MXNET_GLUON": (1, 0.9, 1e-5, "biased", "two_pass", False),  # gluon/nn/basic_layers.py
  }
  assert set(cv.PRESETS) == set(expected) and set(expected) <= set(cv.__all__)
  for name, values in expected.items():
    c = cv.PRESETS[name]
    got = (c.axis, c.momentum, c.epsilon, c.running_variance, c.variance, c.track_count)
    assert got == values, name
    assert getattr(cv, name) is c


@pytest.mark.slow
def test_options_are_batch_norm_keywords_and_run():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 2, 2)), jnp.float32)
  for name, convention in cv.PRESETS.items():
    params, stats = convention.init(x.shape[convention.axis])
    y, new = bnjax.batch_norm(x, params, stats, training=True, **convention.options())
    assert y.shape == x.shape and set(new) == set(stats), name
  assert "count" in cv.PYTORCH.init(3)[1] and "count" not in cv.KERAS.init(3)[1]


def test_options_apply_overrides_and_the_epsilon_floor():
  assert cv.KERAS.options(axis=1, momentum=0.5)["axis"] == 1
  assert cv.KERAS.options(mask=None)["mask"] is None
  legacy = cv.tf_fused(epsilon=1e-6, min_epsilon=cv.LEGACY_FUSED_MIN_EPSILON)
  assert legacy.epsilon == 1e-6 and legacy.options()["epsilon"] == 1.001e-5
  assert legacy.options(epsilon=1e-7)["epsilon"] == 1.001e-5
  assert legacy.options(epsilon=1e-2)["epsilon"] == 1e-2


def test_convention_is_immutable_hashable_and_a_jit_static_argument():
  with pytest.raises(dataclasses.FrozenInstanceError):
    cv.KERAS.momentum = 0.5  # type: ignore[misc]
  with pytest.raises(TypeError):
    cv.PRESETS["KERAS"] = cv.PYTORCH  # type: ignore[index]
  assert cv.KERAS.replace(axis=1) == cv.keras(axis=1)
  assert cv.KERAS.replace(axis=1) is not cv.KERAS and cv.KERAS.axis == -1
  assert hash(cv.PYTORCH) == hash(cv.pytorch())

  g = jax.jit(
    lambda x, c: bnjax.batch_norm(x, *c.init(2), training=True, **c.options())[0], static_argnums=1
  )
  assert g(jnp.ones((3, 2)), cv.KERAS).shape == (3, 2)


def test_extra_carries_future_batch_norm_options():
  c = cv.tf_v1_layers(fused=True, trainable=False)
  assert c.extra == (("update_stats", False),)
  assert c.options()["update_stats"] is False
  assert cv.Convention(
    name="n", axis=-1, momentum=0.9, epsilon=1e-3, extra={"update_stats": False, "dtype": None}
  ).extra == (("dtype", None), ("update_stats", False))


def test_keras_builders_carry_tf_only_features_in_their_own_names():
  def adjustment(shape):
    return jnp.ones(shape[-1:]), jnp.zeros(shape[-1:])

  c = cv.tf_keras(
    fused=False,
    renorm=True,
    renorm_clipping={"rmax": 3.0},
    renorm_momentum=0.9,
    virtual_batch_size=2,
    adjustment=adjustment,
  )
  assert dict(c.extra) == {
    "renorm": True,
    "renorm_clipping": {"rmax": 3.0},
    "renorm_momentum": 0.9,
    "virtual_batch_size": 2,
    "adjustment": adjustment,
  }
  assert cv.keras(renorm=True).options()["renorm"] is True
  assert cv.keras(renorm_momentum=0.99).extra == ()  # defaults stay out
  params, stats = cv.keras(renorm=True).init(3)  # the renorm statistics come with init
  assert {"renorm_mean", "renorm_stddev"} <= set(stats)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)
  bnjax.batch_norm(x, params, stats, training=True, **cv.keras(renorm=True).options())
  debiased = cv.KERAS.replace(track_count=True, extra={"zero_debias": "mean"})
  assert "count" in debiased.init(3)[1]


@pytest.mark.parametrize(
  "torch_momentum, ours",
  [(0.1, 0.9), (0.01, 0.99), (0.001, 0.999), (1.0, 0.0), (0.3, 0.7), (None, None)],
)
def test_torch_momentum_converts_exactly_both_ways(torch_momentum, ours):
  assert cv.from_torch_momentum(torch_momentum) == ours
  assert cv.to_torch_momentum(ours) == torch_momentum
  assert cv.pytorch(momentum=torch_momentum).momentum == ours


@pytest.mark.parametrize("factor, ours", [(1.0, 0.0), (0.1, 0.9), (0.01, 0.99), (0.25, 0.75)])
def test_exponential_avg_factor_converts_exactly_both_ways(factor, ours):
  assert cv.from_exponential_avg_factor(factor) == ours
  assert cv.to_exponential_avg_factor(ours) == factor
  assert cv.tf_fused(exponential_avg_factor=factor).momentum == ours


def test_decimal_conversion_avoids_binary_rounding():
  assert 1 - 0.9 != 0.1  # what a plain subtraction gives
  assert cv.to_torch_momentum(0.9) == 0.1


ERRORS = {
  # name: (call, exception, pattern)
  "from-torch-zero": (
    lambda: cv.from_torch_momentum(0.0),
    ValueError,
    (
      r"conventions.from_torch_momentum: PyTorch's `momentum=0` never"
      r" updates.*update_stats=False"
    ),
  ),
  "from-torch-above-one": (lambda: cv.from_torch_momentum(1.5), ValueError, r"\(0, 1\]"),
  "from-torch-string": (
    lambda: cv.from_torch_momentum("0.1"),
    TypeError,
    r"`momentum` must be a float, got '0.1'",
  ),
  "from-torch-bool": (lambda: cv.from_torch_momentum(True), TypeError, r"must be a float"),
  "to-torch-one": (
    lambda: cv.to_torch_momentum(1.0),
    ValueError,
    r"to_torch_momentum: `momentum` must be in \[0, 1\), got 1.0",
  ),
  "to-torch-string": (lambda: cv.to_torch_momentum("x"), TypeError, r"must be a float"),
  "from-factor-zero": (
    lambda: cv.from_exponential_avg_factor(0.0),
    ValueError,
    r"`exponential_avg_factor` must be in \(0, 1\]",
  ),
  "to-factor-one": (
    lambda: cv.to_exponential_avg_factor(1.0),
    ValueError,
    r"to_exponential_avg_factor: `momentum` must be in \[0, 1\)",
  ),
  "name": (
    lambda: cv.Convention(name=1, axis=-1, momentum=0.9, epsilon=1e-3),
    TypeError,
    r"conventions.Convention: `name` must be a str",
  ),
  "axis-float": (
    lambda: cv.KERAS.replace(axis=1.0),
    TypeError,
    r"`axis` must be an int or a tuple of ints, got 1.0",
  ),
  "axis-bool": (lambda: cv.KERAS.replace(axis=True), TypeError, r"`axis` must be an int"),
  "axis-empty": (lambda: cv.KERAS.replace(axis=()), TypeError, r"`axis` must be an int"),
  "momentum": (
    lambda: cv.KERAS.replace(momentum=1.0),
    ValueError,
    r"Convention: `momentum` must be in \[0, 1\)",
  ),
  "epsilon": (lambda: cv.KERAS.replace(epsilon=-1.0), ValueError, r"`epsilon` must be >= 0"),
  "min-epsilon": (
    lambda: cv.KERAS.replace(min_epsilon="1e-5"),
    TypeError,
    r"`epsilon` must be a non-negative float",
  ),
  "running-variance": (
    lambda: cv.KERAS.replace(running_variance="bessel"),
    ValueError,
    r"`running_variance` must be one of",
  ),
  "variance": (
    lambda: cv.KERAS.replace(variance="welford"),
    ValueError,
    r"`variance` must be one of",
  ),
  "track-count": (
    lambda: cv.KERAS.replace(track_count=1),
    TypeError,
    r"`track_count` must be a Python bool",
  ),
  "cumulative-without-count": (
    lambda: cv.KERAS.replace(momentum=None),
    ValueError,
    (
      r"`momentum=None` \(cumulative average\) needs"
      r" `track_count=True`"
    ),
  ),
  "extra-unknown": (
    lambda: cv.KERAS.replace(extra={"renorm_typo": True}),
    TypeError,
    (
      r"`extra` has \['renorm_typo'\], which are not keyword options of"
      r" bnjax.batch_norm"
    ),
  ),
  "extra-training": (
    lambda: cv.KERAS.replace(extra={"training": True}),
    TypeError,
    r"\['training'\]",
  ),
  "extra-clash": (
    lambda: cv.KERAS.replace(extra={"epsilon": 1e-5}),
    ValueError,
    r"`extra` repeats the fields \['epsilon'\]",
  ),
  "options-unknown": (
    lambda: cv.KERAS.options(eps=1e-5),
    TypeError,
    r"Convention.options: `overrides` has \['eps'\]",
  ),
  "zero-debias-without-count": (
    lambda: cv.KERAS.replace(extra={"zero_debias": "mean"}),
    ValueError,
    (
      r"`zero_debias='mean'` counts the batches seen: it"
      r" needs `track_count=True`"
    ),
  ),
  "tf_keras-fused-renorm": (
    lambda: cv.tf_keras(fused=True, renorm=True),
    ValueError,
    r"`fused=True` excludes \['renorm'\]: tf_keras only fuses",
  ),
  "data-format": (
    lambda: cv.tf_fused(data_format="NWC"),
    ValueError,
    r"tf_fused: `data_format` must be one of \('NHWC', 'NDHWC', 'NCHW', 'NCDHW'\)",
  ),
  "keras-synchronized": (
    lambda: cv.keras(synchronized=1),
    TypeError,
    r"conventions.keras: `synchronized` must be a Python bool",
  ),
  "tf_keras-fused": (
    lambda: cv.tf_keras(fused=None),
    TypeError,
    r"tf_keras: `fused` must be a Python bool",
  ),
  "tf_keras-synchronized": (
    lambda: cv.tf_keras(fused=False, synchronized="yes"),
    TypeError,
    r"`synchronized` must be a Python bool",
  ),
  "tf_keras-fused-synchronized": (
    lambda: cv.tf_keras(fused=True, synchronized=True),
    ValueError,
    r"`fused=True` and `synchronized=True` exclude each other",
  ),
  "tf_v1-trainable": (
    lambda: cv.tf_v1_layers(fused=True, trainable=None),
    TypeError,
    r"tf_v1_layers: `trainable` must be a Python bool",
  ),
  "flax-fast": (
    lambda: cv.flax_linen(use_fast_variance="no"),
    TypeError,
    r"flax_linen: `use_fast_variance` must be a Python bool",
  ),
  "pytorch-momentum-zero": (
    lambda: cv.pytorch(momentum=0.0),
    ValueError,
    r"from_torch_momentum: PyTorch.s `momentum=0` never updates",
  ),
}


@pytest.mark.parametrize("call, error, pattern", ERRORS.values(), ids=ERRORS.keys())
def test_errors(call, error, pattern):
  with pytest.raises(error, match=pattern):
    call()
