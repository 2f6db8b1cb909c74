"""bnjax.diagnostics: each check fires on the bug it names and stays quiet on a correct loop;
debias against a float64 NumPy recomputation; every error it raises."""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import debiased_atol

import bnjax
from bnjax import diagnostics

C = 3
BATCH = 16
MEANS, STDS = np.array([5.0, -2.0, 3.0]), np.array([1.0, 2.0, 0.5])


class State(NamedTuple):  # check_epoch takes anything with `step` and `batch_stats`
  step: Any
  batch_stats: Any


def batches(steps, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(steps, BATCH, C)) * STDS + MEANS
  return x.astype(np.float32)


@functools.cache
def update(momentum):
  """One jitted training call of bnjax.batch_norm that returns the new running statistics."""
  params, _ = bnjax.init(C)
  return jax.jit(
    lambda stats, x: bnjax.batch_norm(x, params, stats, training=True, momentum=momentum)[1]
  )


def trained_stats(momentum, steps, initial=None):
  _, stats = bnjax.init(C, track_count=True)
  if initial is not None:
    stats = {**stats, "mean": jnp.full(C, initial[0]), "var": jnp.full(C, initial[1])}
  for x in batches(steps):
    stats = update(momentum)(stats, x)
  return stats


def predict_with(stats, *, training):
  params, _ = bnjax.init(C)
  return jax.jit(lambda x: bnjax.batch_norm(x, params, stats, training=training)[0])


# --- debias ---------------------------------------------------------------------------------


@pytest.mark.parametrize("initial", [None, (4.0, 2.5)], ids=["init", "pretrained"])
@pytest.mark.parametrize("steps", [1, 60])
@pytest.mark.parametrize("momentum", [0.9, 0.999])
def test_debias_recovers_the_weighted_average_of_the_batches(momentum, steps, initial):
  stats = trained_stats(momentum, steps, initial)
  init_mean, init_var = initial or (0.0, 1.0)
  debiased = diagnostics.debias(
    stats, momentum=momentum, initial_mean=init_mean, initial_var=init_var
  )

  # float64: avg_t = sum_i (1 - m) m^(t-i) b_i / (1 - m^t), with m rounded as the update rounds it
  m = float(np.float32(momentum))
  x = batches(steps).astype(np.float64)
  weights = (1 - m) * m ** np.arange(steps - 1, -1, -1) / (1 - m**steps)
  for key, batch_stat, init in (("mean", x.mean(1), init_mean), ("var", x.var(1), init_var)):
    expected = weights @ batch_stat
    magnitude = max(np.abs(batch_stat).max(), abs(init))
    np.testing.assert_allclose(
      np.asarray(debiased[key], np.float64),
      expected,
      rtol=0,
      atol=debiased_atol(steps, momentum, magnitude, BATCH),
      err_msg=key,
    )
  assert int(debiased["count"]) == steps  # the other entries come back as they were


def test_debias_after_the_fact_equals_zero_debias_during_training():
  steps, momentum = 20, 0.999
  plain = trained_stats(momentum, steps)
  params, stats = bnjax.init(C, track_count=True)
  step = jax.jit(
    lambda s, x: bnjax.batch_norm(
      x, params, s, training=True, momentum=momentum, zero_debias="mean_and_var"
    )[1]
  )
  for x in batches(steps):
    stats = step(stats, x)
  debiased = diagnostics.debias(plain, momentum=momentum)
  magnitude = float(np.abs(MEANS).max() + STDS.max() ** 2)
  for key in ("mean", "var"):
    np.testing.assert_allclose(
      debiased[key],
      stats[key],
      rtol=0,
      atol=2 * debiased_atol(steps, momentum, magnitude, BATCH),
      err_msg=key,
    )


def test_debias_leaves_statistics_without_updates_alone_and_takes_count():
  _, stats = bnjax.init(C, track_count=True)
  unchanged = diagnostics.debias(stats, momentum=0.999)
  jax.tree.map(np.testing.assert_array_equal, unchanged, stats)  # count 0: no division by 0

  trained = trained_stats(0.99, 5)
  assert diagnostics.debias(trained, momentum=0.0) == trained  # the EMA is the last batch
  without_count = {"mean": trained["mean"], "var": trained["var"]}
  expected = diagnostics.debias(trained, momentum=0.99)
  given = diagnostics.debias(without_count, momentum=0.99, count=5)
  jax.tree.map(np.testing.assert_array_equal, given, {k: expected[k] for k in without_count})


def test_debias_runs_under_jit():
  trained = trained_stats(0.999, 7)
  eager = diagnostics.debias(trained, momentum=0.999)
  jitted = jax.jit(functools.partial(diagnostics.debias, momentum=0.999))(trained)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), jitted, eager)


# --- check_stats_updated ----------------------------------------------------------------------


def test_stats_updated_catches_dropped_running_statistics():
  # tensorflow/tensorflow#11965: moving mean 0 and variance 1 after training (updates never run)
  _, initial = bnjax.init(C)
  dropped = {"block": {"bn": initial}}  # the train step computed new stats and threw them away
  kept = {"block": {"bn": trained_stats(0.9, 2)}}
  (problem,) = diagnostics.check_stats_updated(dropped, steps=5)
  assert problem.check == "stats_updated" and problem.layer == "block/bn"
  assert "layer 'block/bn': running statistics are still at their initial values" in problem.message
  assert "after 5 training steps" in problem.message
  assert diagnostics.check_stats_updated(kept, steps=5) == []
  assert diagnostics.check_stats_updated(dropped, steps=0) == []  # nothing trained yet
  assert diagnostics.check_stats_updated(dropped, steps=5, frozen={"block"}) == []


def test_layers_finds_every_layer_by_path():
  _, stats = bnjax.init(C)
  tree = {"bn0": stats, "block": {"bn1": stats, "inner": {"bn2": stats}}}
  assert list(diagnostics.layers(tree)) == ["bn0", "block/bn1", "block/inner/bn2"]
  assert list(diagnostics.layers(stats)) == [""]  # one layer's statistics


@pytest.mark.parametrize(
  "path, frozen, covered",
  [
    ("block/bn1", {"block"}, True),
    ("block/bn1", {"block/bn1"}, True),
    ("blocks/bn1", {"block"}, False),
    ("bn1", {""}, True),
    ("bn1", set(), False),
  ],
)
def test_covered_by(path, frozen, covered):
  assert diagnostics.covered_by(path, frozen) is covered


# --- check_eval_mode --------------------------------------------------------------------------


def test_eval_mode_catches_evaluation_with_batch_statistics():
  stats = trained_stats(0.9, 3)
  x = batches(1, seed=1)[0]
  assert diagnostics.check_eval_mode(predict_with(stats, training=False), x) == []
  (problem,) = diagnostics.check_eval_mode(predict_with(stats, training=True), x)
  assert problem.check == "eval_mode"
  assert "evaluation normalizes with batch statistics, not the running ones" in problem.message


# --- check_warmup -----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "momentum, steps, message",
  [
    (0.9, 29, None),  # 0.9**29 = 0.047
    (
      0.9,
      28,
      (
        "still make up 5% of the running statistics (momentum**steps); they fall"
        " under 5% after 29 steps"
      ),
    ),  # 0.9**28 = 0.052
    (
      0.999,
      100,
      (
        "momentum=0.999 after 100 steps: the initial values (mean 0, var 1) still"
        " make up 90% of the running statistics"
      ),
    ),
    (0.99, 0, None),  # nothing trained yet
    (0.0, 1, None),
    (None, 1, None),  # the cumulative average has no warm-up
  ],
)
def test_warmup(momentum, steps, message):
  problems = diagnostics.check_warmup(momentum=momentum, steps=steps)
  if message is None:
    assert problems == []
  else:
    (problem,) = problems
    assert problem.check == "warmup" and message in problem.message


# --- check_frozen -----------------------------------------------------------------------------


def test_frozen_catches_a_frozen_layer_run_with_batch_statistics():
  # keras-team/keras#7085: a frozen BatchNormalization whose moving statistics still update
  pretrained = {"block": {"bn": trained_stats(0.9, 3)}, "head_bn": trained_stats(0.9, 4)}
  moved = {**pretrained, "block": {"bn": update(0.9)(pretrained["block"]["bn"], batches(1)[0])}}
  assert diagnostics.check_frozen(pretrained, pretrained, frozen={"block"}) == []
  assert diagnostics.check_frozen(moved, pretrained, frozen={"head_bn"}) == []
  (problem,) = diagnostics.check_frozen(moved, pretrained, frozen={"block"})
  assert problem.check == "frozen" and problem.layer == "block/bn"
  assert "layer 'block/bn' is frozen but its running statistics moved" in problem.message


# --- check_epoch ------------------------------------------------------------------------------


def test_check_epoch_runs_every_check():
  _, initial = bnjax.init(C)
  x = batches(1, seed=1)[0]

  def predict(state, inputs, *, training):
    return predict_with(state.batch_stats["bn"], training=training)(inputs)

  broken = diagnostics.check_epoch(
    State(jnp.asarray(10), {"bn": initial}),
    momentum=0.99,
    predict=functools.partial(predict, training=True),
    inputs=x,
  )
  assert [p.check for p in broken] == ["stats_updated", "warmup", "eval_mode"]

  pretrained = {"bn": trained_stats(0.9, 3), "frozen_bn": trained_stats(0.9, 4)}
  trained = {**pretrained, "bn": trained_stats(0.9, 40)}
  healthy = diagnostics.check_epoch(
    State(jnp.asarray(40), trained),
    momentum=0.9,
    predict=functools.partial(predict, training=False),
    inputs=x,
    frozen={"frozen_bn"},
    reference=pretrained,
  )
  assert healthy == []


# --- errors -----------------------------------------------------------------------------------


def _stats():
  return bnjax.init(C)[1]


ERRORS = {
  "layers-of-params": (
    lambda: diagnostics.layers({"dense": {"kernel": jnp.ones((2, 2))}}),
    ValueError,
    (
      r"bnjax\.diagnostics\.layers: expected batch_stats holding at least one layer's"
      r" \{'mean', 'var'\}, got \{'dense': \{'kernel': \(2, 2\)\}\}"
    ),
  ),
  "debias-no-count": (
    lambda: diagnostics.debias(_stats(), momentum=0.9),
    ValueError,
    (
      r"debias: expected the number of updates in stats\['count'\] or `count=`, got stats with"
      r" keys \['mean', 'var'\] and count=None\. Hint: .*count=state\.step"
    ),
  ),
  "debias-momentum-none": (
    lambda: diagnostics.debias(_stats(), momentum=None, count=3),
    TypeError,
    r"debias: `momentum` must be the float the statistics were updated with, got None",
  ),
  "debias-pytorch-momentum": (
    lambda: diagnostics.debias(_stats(), momentum=1.0, count=3),
    ValueError,
    r"bnjax\.diagnostics\.debias: `momentum` must be in \[0, 1\), got 1\.0",
  ),
  "eval-one-example": (
    lambda: diagnostics.check_eval_mode(lambda x: x, jnp.ones((1, C))),
    ValueError,
    (
      r"check_eval_mode: `inputs` must be a batch holding at least two different examples,"
      r" got shape \(1, 3\)"
    ),
  ),
  "eval-scalar": (
    lambda: diagnostics.check_eval_mode(lambda x: x, jnp.ones(())),
    ValueError,
    r"`inputs` must be a batch holding at least two different examples, got shape \(\)",
  ),
  "frozen-string": (
    lambda: diagnostics.check_stats_updated({"bn": _stats()}, steps=1, frozen="bn"),
    TypeError,
    r"check_stats_updated: `frozen` must be a collection of layer paths, got 'bn'",
  ),
  "frozen-reference-lacks-layer": (
    lambda: diagnostics.check_frozen({"bn": _stats()}, {"other": _stats()}, frozen={"bn"}),
    ValueError,
    (
      r"check_frozen: expected `reference` to hold the frozen layer 'bn', got"
      r" layers \['other'\]"
    ),
  ),
  "epoch-predict-without-inputs": (
    lambda: diagnostics.check_epoch(State(1, {"bn": _stats()}), momentum=0.9, predict=print),
    ValueError,
    r"check_epoch: `predict` and `inputs` go together, got only one of them",
  ),
  "epoch-frozen-without-reference": (
    lambda: diagnostics.check_epoch(State(1, {"bn": _stats()}), momentum=0.9, frozen={"bn"}),
    ValueError,
    (
      r"check_epoch: `frozen`=\['bn'\] needs `reference`, the batch_stats those"
      r" layers must keep, got None"
    ),
  ),
}


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_errors(case):
  make_call, error, match = ERRORS[case]
  with pytest.raises(error, match=match):
    make_call()
