"""benchmarks/_timing.py: every case is timed after an untimed call of its own, in an order
shuffled per round, so that no case always follows the same one."""

import collections
import itertools

import numpy as np
import pytest
from test_examples import load_script


@pytest.fixture(scope="module")
def timing():
  return load_script("benchmarks/_timing.py")


def recording_cases(names, log):
  return {name: (lambda name=name: log.append(name)) for name in names}


def test_every_visit_makes_one_untimed_call_then_its_timed_ones_back_to_back(timing):
  log = []
  names = ["a", "b", "c", "d"]
  times = timing.interleaved(recording_cases(names, log), rounds=3, reps=4, warmup=2)
  assert sorted(times) == names
  assert all(t.shape == (3, 4) and np.all(t >= 0) for t in times.values())
  assert log[:8] == ["a", "a", "b", "b", "c", "c", "d", "d"]  # the warm-up, case by case
  visits = [log[i : i + 5] for i in range(8, len(log), 5)]
  assert len(visits) == 3 * len(names)
  assert all(len(set(visit)) == 1 for visit in visits)  # 1 untimed + 4 timed, one case
  for r in range(3):  # each round visits every case once
    assert sorted(v[0] for v in visits[r * 4 : (r + 1) * 4]) == names


def test_no_case_always_follows_the_same_one(timing):
  # A fixed rotation (A B C, B C A, ...) gives each case one predecessor in nearly every
  # round; the shuffle gives it several.
  log = []
  names = [f"case{i}" for i in range(5)]
  timing.interleaved(recording_cases(names, log), rounds=12, reps=1, warmup=0)
  visits = log[::2]
  predecessors = collections.defaultdict(set)
  for before, after in itertools.pairwise(visits):
    predecessors[after].add(before)
  assert all(len(predecessors[name]) >= 3 for name in names), dict(predecessors)


def test_the_order_is_reproducible_from_the_seed(timing):
  def order(seed):
    log = []
    timing.interleaved(recording_cases("abcdef", log), rounds=4, reps=1, warmup=0, seed=seed)
    return log

  assert order(0) == order(0)
  assert order(0) != order(1)


def test_times_are_what_the_clock_read(timing, monkeypatch):
  clock = iter(np.arange(100.0))  # every read one second later than the last
  monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
  times = timing.interleaved({"a": lambda: None}, rounds=2, reps=3, warmup=0)
  np.testing.assert_array_equal(times["a"], np.ones((2, 3)))


@pytest.mark.parametrize(
  "rounds, reps, warmup", [(0, 1, 0), (1, 0, 0), (1, 1, -1)], ids=["rounds", "reps", "warmup"]
)
def test_a_count_out_of_range_is_rejected(timing, rounds, reps, warmup):
  expected = rf"_timing.interleaved: .* got rounds={rounds}, reps={reps}, warmup={warmup}"
  with pytest.raises(ValueError, match=expected):
    timing.interleaved({"a": lambda: None}, rounds=rounds, reps=reps, warmup=warmup)
