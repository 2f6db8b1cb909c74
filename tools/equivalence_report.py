"""Runs the live comparisons of bnjax with TensorFlow, Keras, PyTorch and Flax and writes the
measured errors to docs/EQUIVALENCE.md (the table the README quotes).

    python tools/equivalence_report.py            # needs the tf, torch and flax extras

Every number in the file is computed here, from the cases of tests/live_frameworks.py (the
same cases and comparison as tests/test_conventions_live.py, which also asserts them): for each
case, the worst difference between bnjax and the real framework over three training steps and
one inference step, in outputs (y), gradients (dx, dscale, dbias) and running statistics.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import live_frameworks as lf  # noqa: E402

KINDS = ("outputs", "gradients", "statistics")
LIBRARIES = ("tensorflow", "keras", "tf_keras", "torch", "flax", "jax", "numpy")


def measure() -> list[tuple[lf.Case, dict[str, lf.Errors]]]:
  sub = [c for c in lf.CASES if c.reference in lf.SUBPROCESS_REFERENCES]
  traces = lf.run_subprocess(sub)
  rows = []
  for case in lf.CASES:
    data = lf.make_data(case)
    expected = traces[case.id] if case.id in traces else lf.RUNNERS[case.reference](case, data)
    rows.append((case, lf.compare(case, lf.run_bnjax(case, data), expected, data)))
  return rows


def _e(x: float) -> str:
  return "0" if x == 0 else f"{x:.1e}"


def render(rows, seconds: float) -> str:
  versions = ", ".join(f"{n} {importlib.metadata.version(n)}" for n in LIBRARIES)
  lines = [
    "# bnjax against the frameworks, measured",
    "",
    "Written by `python tools/equivalence_report.py`; do not edit by hand. Each case runs the",
    "real framework and bnjax with the matching `bnjax.conventions` preset side by side over",
    "three training steps and one inference step (tests/live_frameworks.py), both in float32",
    "arithmetic on the same inputs, and records the worst difference in outputs (y), gradients",
    "(dx, dscale, dbias of sum(y * dy)) and running statistics after every step.",
    "",
    "- *abs*: max |bnjax - framework|. *rel*: max |bnjax - framework| / |framework|; it is large",
    "  only where the framework's value is near zero (gradients at 2 elements per channel).",
    "- *of tol.*: the largest fraction used of the allowed difference,",
    "  `tolerances.cross_framework`: 16 eps sqrt(n) relative to the value and to the magnitude",
    "  of the terms it is computed from (eps of the input dtype for 16-bit outputs). Below 1",
    "  everywhere, or the tests fail.",
    "- 16-bit cases: outputs and dx in float16/bfloat16 (one ulp is 1e-3/8e-3), statistics and",
    "  dscale, dbias in float32.",
    "",
    f"Versions: {versions}. Python {platform.python_version()}, {platform.machine()} CPU.",
    f"Generated {datetime.date.today().isoformat()} in {seconds:.0f} s.",
    "",
    "## By preset",
    "",
    (
      "| preset (convention) | input | cases | outputs abs | gradients abs | statistics abs"
      " | of tol. |"
    ),
    "|---|---|---|---|---|---|---|",
  ]
  by_preset: dict[tuple[str, str], list] = {}
  for case, worst in rows:
    by_preset.setdefault((case.convention.name, case.dtype), []).append(worst)
  for (name, dtype), worsts in by_preset.items():
    top = {k: max((w[k].abs for w in worsts if k in w), default=0.0) for k in KINDS}
    ratio = max(w[k].of_tolerance for w in worsts for k in w)
    lines.append(
      f"| `{name}` | {dtype} | {len(worsts)} | "
      + " | ".join(_e(top[k]) for k in KINDS)
      + f" | {ratio:.2f} |"
    )
  lines += [
    "",
    "## By case",
    "",
    (
      "| reference | case | input | outputs abs / rel | gradients abs / rel | statistics abs / rel"
      " | of tol. |"
    ),
    "|---|---|---|---|---|---|---|",
  ]
  for case, worst in rows:
    cells = [f"{_e(worst[k].abs)} / {_e(worst[k].rel)}" if k in worst else "-" for k in KINDS]
    ratio = max(w.of_tolerance for w in worst.values())
    shape = "x".join(map(str, case.shape))
    lines.append(
      f"| {case.reference} | {case.id} | {shape} {case.dtype} | "
      + " | ".join(cells)
      + f" | {ratio:.2f} |"
    )
  lines += [
    "",
    "MXNet Gluon's preset (`MXNET_GLUON`) is not in the table: MXNet is retired and not",
    "installable here; its values come from MXNet's source (see",
    "`bnjax.conventions.mxnet_gluon`).",
    "",
  ]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--out",
    default=str(ROOT / "docs" / "EQUIVALENCE.md"),
    help="where to write the markdown table (default: docs/EQUIVALENCE.md)",
  )
  args = parser.parse_args(argv)
  start = time.perf_counter()
  rows = measure()
  text = render(rows, time.perf_counter() - start)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  print(f"wrote {out} ({len(rows)} cases)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
