"""The types of the public API: Literal options that the trace-time checks derive their choices
from, TypedDict state, NoReturn error helpers, and the named scope bnjax's ops carry."""

import re
import typing

import jax
import jax.numpy as jnp
import pytest

import bnjax
from bnjax import _checks, _core, _stats

LITERALS = {
  "variance": (bnjax.Variance, _checks.VARIANCE_ALGORITHMS),
  "running_variance": (bnjax.RunningVariance, _checks.RUNNING_VARIANCES),
  "backward": (bnjax.Backward, _checks.BACKWARDS),
  "zero_debias": (bnjax.ZeroDebias, _checks.ZERO_DEBIAS),
  "on_nonfinite": (bnjax.OnNonfinite, _checks.ON_NONFINITE),
}


@pytest.mark.parametrize("option", list(LITERALS))
def test_checks_choices_are_the_literals_arguments(option):
  literal, choices = LITERALS[option]
  assert choices == typing.get_args(literal)
  hints = typing.get_type_hints(_core.batch_norm)
  assert literal in (hints[option], *typing.get_args(hints[option]))  # X or X | None


@pytest.mark.parametrize("option", list(LITERALS))
def test_a_value_outside_the_literal_is_refused_with_the_choices(option):
  _, choices = LITERALS[option]
  params, stats = bnjax.init(2, track_count=True)
  with pytest.raises(ValueError, match=re.escape(f"`{option}` must be one of {choices!r}")):
    bnjax.batch_norm(jnp.ones((4, 2)), params, stats, training=True, **{option: "nope"})


def test_moments_variance_is_the_literal():
  assert typing.get_type_hints(_stats.moments)["variance"] == bnjax.Variance


def test_params_and_stats_typed_dicts():
  assert bnjax.Params.__required_keys__ == frozenset()
  assert bnjax.Params.__optional_keys__ == {"scale", "bias"}
  assert bnjax.Stats.__required_keys__ == {"mean", "var"}
  assert bnjax.Stats.__optional_keys__ == {"count", "renorm_mean", "renorm_stddev", "stddev"}
  params, stats = bnjax.init(3, track_count=True, renorm=True)
  assert set(params) <= set(typing.get_type_hints(bnjax.Params))
  assert set(stats) == set(typing.get_type_hints(bnjax.Stats))
  hints = typing.get_type_hints(_core.batch_norm)
  assert hints["params"] is bnjax.Params and hints["stats"] is bnjax.Stats


def test_error_helpers_never_return():
  assert typing.get_type_hints(_checks.fail)["return"] is typing.NoReturn


def test_batch_norm_ops_carry_a_named_scope():
  params, stats = bnjax.init(3)
  lowered = jax.jit(lambda x: bnjax.batch_norm(x, params, stats, training=True)).lower(
    jnp.ones((4, 3))
  )
  assert "bnjax.batch_norm" in lowered.as_text(debug_info=True)
  moments = jax.jit(lambda x: bnjax.moments(x, 0)).lower(jnp.ones((4, 3)))
  assert "bnjax.moments" in moments.as_text(debug_info=True)


def test_float_momentum_refuses_the_cumulative_average():
  # Where None (the cumulative average) has no meaning, the typed helper refuses it.
  with pytest.raises(TypeError, match=r"bnjax.f: `momentum` must be a float in \[0, 1\), got None"):
    _checks.float_momentum("f", None, name="momentum")
  assert _checks.float_momentum("f", 0.5, name="renorm_momentum") == 0.5
