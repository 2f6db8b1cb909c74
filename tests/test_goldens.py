"""bnjax against golden reference outputs, for machines without TensorFlow or PyTorch.

tests/goldens/ holds, per case of live_frameworks.py, the inputs and what the real framework
computed (written by tools/make_tf_goldens.py, which says how to regenerate them). Where the
framework is missing, bnjax is compared with the stored trace exactly as the live test compares
it with the running framework. Where the framework is installed the live test already does that,
so this file checks instead that the framework still computes what the goldens hold (cheap: no
bnjax compile), plus one bnjax-vs-golden case per in-process reference to keep this path
exercised.
"""

import importlib.util
import json
import pathlib

import live_frameworks as lf
import numpy as np
import pytest

GOLDENS = pathlib.Path(__file__).resolve().parent / "goldens"
MANIFEST = json.loads((GOLDENS / "conventions.json").read_text())
ARRAYS = np.load(GOLDENS / "conventions.npz")
FRAMEWORKS = {
  "tf_nn": ("tensorflow",),
  "tf_fused": ("tensorflow",),
  "keras": ("tensorflow",),
  "tf_keras": ("tensorflow", "tf_keras"),
  "tf_v1_layers": ("tensorflow", "tf_keras"),
  "keras_sync": ("tensorflow", "tf_keras"),
  "tf_keras_sync": ("tensorflow", "tf_keras"),
  "keras_jax": ("keras", "jax"),
  "torch": ("torch",),
  "flax": ("flax",),
}
# reference -> its first case, always compared with bnjax (in-process references; the
# subprocess ones compile a sharded step, and the live test compares them anyway)
REPRESENTATIVE = {}
for _case in lf.CASES:
  if _case.reference in lf.RUNNERS:
    REPRESENTATIVE.setdefault(_case.reference, _case.id)


def installed(reference: str) -> bool:
  return all(importlib.util.find_spec(name) is not None for name in FRAMEWORKS[reference])


def stored(case_id: str) -> tuple[dict[str, np.ndarray], lf.Trace]:
  """(inputs, reference trace) of ``case_id`` as the goldens hold them."""
  inputs, trace = {}, {}
  for key in ARRAYS.files:
    cid, rest = key.split("|", 1)
    if cid != case_id:
      continue
    if rest.startswith("input|"):
      inputs[rest[len("input|") :]] = ARRAYS[key]
    else:
      trace[rest] = np.asarray(ARRAYS[key], np.float64)
  return inputs, trace


def test_goldens_cover_every_case_as_defined_now():
  assert sorted(MANIFEST["cases"]) == sorted(lf.CASES_BY_ID), (
    "tests/goldens/ is out of date: run `python tools/make_tf_goldens.py`"
  )
  for case in lf.CASES:
    entry = MANIFEST["cases"][case.id]
    setup = (
      entry["reference"],
      entry["layer"],
      tuple(entry["shape"]),
      entry["dtype"],
      entry["mask"],
      entry["training"],
      entry["replicas"],
      entry["offset"],
    )
    assert setup == (
      case.reference,
      case.layer,
      case.shape,
      case.dtype,
      case.mask,
      case.training,
      case.replicas,
      case.offset,
    ), f"{case.id} changed since the goldens were written: run `python tools/make_tf_goldens.py`"


def test_goldens_record_library_versions_and_stay_small():
  assert {"tensorflow", "keras", "tf_keras", "torch", "flax", "jax", "numpy"} <= set(
    MANIFEST["versions"]
  )
  assert sum(p.stat().st_size for p in GOLDENS.iterdir()) < 1024 * 1024


@pytest.mark.parametrize("case", lf.CASES, ids=lambda c: c.id)
@pytest.mark.slow
def test_golden(case):
  inputs, expected = stored(case.id)
  np.testing.assert_array_equal(inputs["x"], lf.make_data(case)["x"])  # same inputs as live
  if not installed(case.reference) or REPRESENTATIVE.get(case.reference) == case.id:
    lf.compare(case, lf.run_bnjax(case, inputs), expected, inputs)
  elif case.reference in lf.RUNNERS:  # the framework still computes what the goldens hold
    now = lf.RUNNERS[case.reference](case, inputs)
    lf.compare(case, now, expected, inputs)
  else:
    pytest.skip("subprocess references: checked live by test_conventions_live.py")


def test_equivalence_report_lists_every_case():
  """docs/EQUIVALENCE.md (the README's table) is regenerated when cases change:
  `python tools/equivalence_report.py`."""
  report = (GOLDENS.parent.parent / "docs" / "EQUIVALENCE.md").read_text()
  assert "Written by `python tools/equivalence_report.py`" in report
  missing = [c.id for c in lf.CASES if f"| {c.id} |" not in report]
  assert not missing, f"docs/EQUIVALENCE.md lacks {missing}: run tools/equivalence_report.py"
