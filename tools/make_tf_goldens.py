"""Writes the golden files that let tests/test_goldens.py check bnjax where TensorFlow or PyTorch
are not installed. The live tests (tests/test_conventions_live.py) stay the primary check.

For every case of tests/live_frameworks.py it runs the REAL reference (TensorFlow, Keras,
tf_keras, TF1 layers and MirroredStrategy in a subprocess, PyTorch, Flax) and stores:

    tests/goldens/conventions.npz    inputs (x, dy, scale, bias, mean, var, mask) and the
                                     reference's trace (step0/y ... eval/dbias), float32
    tests/goldens/conventions.json   per case: reference, layer settings, shape, dtype, the
                                     bnjax convention it was paired with; library versions

Regenerate after changing a case, or to record newer library versions, from the repository root
with the test extras installed (pip install -e '.[flax,tf,torch]' --group test -c constraints.txt):

    python tools/make_tf_goldens.py            # all cases, about a minute
    python tools/make_tf_goldens.py --check    # compare with the stored files, write nothing

bnjax is not run here: the goldens hold only what the references computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import platform
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "goldens"
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import live_frameworks as lf  # noqa: E402
import numpy as np  # noqa: E402

LIBRARIES = ("tensorflow", "keras", "tf_keras", "torch", "flax", "jax", "numpy")


def versions() -> dict[str, str]:
  found = {"python": platform.python_version()}
  for name in LIBRARIES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = "not installed"
  return found


def describe(case: lf.Case) -> dict:
  """The case's setup as JSON: what the stored trace was computed from."""
  return {
    "reference": case.reference,
    "layer": case.layer,
    "shape": list(case.shape),
    "dtype": case.dtype,
    "mask": case.mask,
    "training": case.training,
    "replicas": case.replicas,
    "offset": case.offset,
    "convention": dict(dataclasses.asdict(case.convention).items()),
  }


def traces(cases: list[lf.Case]) -> dict[str, lf.Trace]:
  sub = [c for c in cases if c.reference in lf.SUBPROCESS_REFERENCES]
  out = lf.run_subprocess(sub) if sub else {}
  for case in cases:
    if case.reference not in lf.SUBPROCESS_REFERENCES:
      out[case.id] = lf.run_reference(case)
  return out


def build(cases: list[lf.Case]) -> tuple[dict, dict[str, np.ndarray]]:
  manifest = {
    "generator": "python tools/make_tf_goldens.py",
    "versions": versions(),
    "cases": {c.id: describe(c) for c in cases},
  }
  arrays = {}
  for case_id, trace in traces(cases).items():
    for key, value in lf.make_data(lf.CASES_BY_ID[case_id]).items():
      arrays[f"{case_id}|input|{key}"] = value
    for key, value in trace.items():
      arrays[f"{case_id}|{key}"] = np.asarray(value, np.float32)  # float32 values, exactly
  return manifest, arrays


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--check",
    action="store_true",
    help="compare the references' current traces with the stored goldens"
    " (to 1e-5) instead of writing them",
  )
  args = parser.parse_args(argv)
  manifest, arrays = build(lf.CASES)
  if args.check:
    stored = np.load(GOLDENS / "conventions.npz")
    bad = []
    for key, value in arrays.items():
      if key not in stored.files or not np.allclose(stored[key], value, rtol=1e-5, atol=1e-5):
        bad.append(key)
    print(
      f"{len(arrays) - len(bad)} of {len(arrays)} arrays match"
      + (f"; differ: {bad}" if bad else "")
    )
    return 1 if bad else 0
  GOLDENS.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(GOLDENS / "conventions.npz", **arrays)
  (GOLDENS / "conventions.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
  size = sum(p.stat().st_size for p in GOLDENS.iterdir())
  print(
    f"wrote {len(manifest['cases'])} cases, {len(arrays)} arrays, {size / 1024:.0f} KiB"
    f" to {GOLDENS}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
