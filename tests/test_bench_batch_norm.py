"""benchmarks/bench_batch_norm.py: its named shapes are checked here, and the script runs.

Timing is the benchmark's job; here bnjax's numbers at the very shapes it is timed at are
compared with the float64 oracle (train forward, new statistics, the closed-form gradients),
and the quick mode runs every peer once and renders a report.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracle import batch_norm as oracle_batch_norm
from oracle import training_grads
from test_examples import load_script, script_help
from tolerances import assert_close

import bnjax

BENCH = load_script("benchmarks/bench_batch_norm.py")


@pytest.mark.parametrize("shape", BENCH.SHAPES, ids=[s.name for s in BENCH.SHAPES])
@pytest.mark.slow
def test_bnjax_at_the_benchmark_shapes_matches_the_oracle(shape):
  x_np, dy_np = BENCH.data(shape)
  x, dy = (jnp.asarray(v, shape.dtype) for v in (x_np, dy_np))
  params, stats = bnjax.init(BENCH.channels(shape))

  def forward(x, params):
    return bnjax.batch_norm(x, params, stats, training=True, axis=shape.axis)

  y, pullback, new_stats = jax.jit(lambda x, p: jax.vjp(forward, x, p, has_aux=True))(x, params)
  dx, dparams = jax.jit(pullback)(dy)
  x64 = np.asarray(x.astype(jnp.float32), np.float64)  # what bnjax saw (bf16 rounded)
  y_ref, stats_ref = oracle_batch_norm(x64, params, stats, training=True, axis=shape.axis)
  dx_ref, dscale_ref, dbias_ref = training_grads(
    x64, np.asarray(dy.astype(jnp.float32)), axis=shape.axis
  )
  n = x.size // BENCH.channels(shape)
  assert_close(y.astype(jnp.float32), y_ref, x.dtype, n, "y")
  assert_close(new_stats["var"], stats_ref["var"], jnp.float32, n, "var")
  assert_close(dx.astype(jnp.float32), dx_ref, x.dtype, n, "dx")
  assert_close(dparams["scale"], dscale_ref, jnp.float32, n, "dscale")
  assert_close(dparams["bias"], dbias_ref, jnp.float32, n, "dbias")


@pytest.mark.slow
def test_quick_run_times_every_installed_peer_and_renders(tmp_path):
  output, record = tmp_path / "results.md", tmp_path / "quick.json"
  assert (
    BENCH.main(["--quick", "--no-malloc-env", "--output", str(output), "--json", str(record)]) == 0
  )
  text = output.read_text()
  rows = {line.split(" |")[0].lstrip("| ") for line in text.splitlines() if line.startswith("| ")}
  expected = {"copy", "bnjax", "bnjax-autodiff", "flax", "flax-exact"}
  expected.add("bnjax-shifted" if jax.default_backend() == "cpu" else "bnjax-two_pass")
  optional = {
    "torch": "torch",
    "tensorflow": "keras-tf (own process)",
    "keras": "keras-jax (own process)",
  }
  expected |= {row for module, row in optional.items() if BENCH._has(module)}
  assert expected <= rows, rows
  assert "## Environment" in text and "| peers |" in text
  # Every peer computed the same normalization (bf16 peers within bf16 rounding).
  diffs = [
    float(line.rsplit("|", 2)[1])
    for line in text.splitlines()
    if line.startswith("| ") and line.rstrip().endswith("|") and "e-" in line.rsplit("|", 2)[1]
  ]
  assert diffs and max(diffs) < 0.05, diffs
  # RESULTS.md is rendered from the JSON records alone.
  results_dir = tmp_path / "results"
  results_dir.mkdir()
  record.rename(results_dir / "quick.json")
  rendered = BENCH.render(tmp_path / "RESULTS.md", results_dir)
  assert "<!-- summary:start -->" in rendered and "| cpu |" in rendered


def _record(device: str, ms: dict) -> dict:
  """A results record with one shape whose peers took ``ms[peer][mode]`` in every sample."""
  peers = {
    peer: {"times": {m: np.full((3, 2), t / 1e3).tolist() for m, t in modes.items()}}
    for peer, modes in ms.items()
  }
  return {"environment": {"device": device}, "groups": {"jax": {"s": peers}}}


@pytest.mark.parametrize("step_ms, met", [(5.0, "yes"), (5.1, "no")])
def test_goals_table_from_the_records(step_ms, met):
  ms = {
    "copy": {"train_forward": 1.0},
    "bnjax": {"train_forward": 1.5, "forward_backward": step_ms, "inference": 1.0},
    "flax": {"train_forward": 1.5, "forward_backward": 2 * step_ms},
  }
  cpu = BENCH.goals([_record("cpu (cpu), 1 device(s)", ms)])
  gpu = BENCH.goals([_record("H100 (gpu), 1 device(s)", ms)])
  assert "| cpu | train forward <= 1.0x flax default | s | 1.00x | yes |" in cpu
  assert "| cpu | forward+backward <= 0.75x flax default | s | 0.50x | yes |" in cpu
  assert "| cpu | inference within 10% of a copy | s | 1.00x | yes |" in cpu
  assert not any("bandwidth" in line for line in cpu)  # a GPU goal
  # 3|x| in 1.5 ms against 2|x| in 1.0 ms: the copy's bandwidth; 8|x| in 5.0 ms: 80% of it.
  assert (
    "| H100 | train forward at >= 80% of a copy's bandwidth, moving its floor of 3"
    " x-sized transfers | s | 100% | yes |"
  ) in gpu
  bandwidth = f"{8 / 2 / step_ms:.0%}"
  assert (
    "| H100 | forward+backward at >= 80% of a copy's bandwidth, moving its floor of 8"
    f" x-sized transfers | s | {bandwidth} | {met} |"
  ) in gpu


def test_the_report_reads_its_own_records_not_the_model_benchmarks(tmp_path):
  record = _record("cpu (cpu), 1 device(s)", {"copy": {"train_forward": 1.0}})
  (tmp_path / "cpu.json").write_text(json.dumps(record))
  (tmp_path / "models_cpu_float32.json").write_text(json.dumps({"models": {}}))
  assert BENCH.load_records(tmp_path) == [record]


def test_a_missing_peer_is_named_in_the_notice_and_the_environment(monkeypatch):
  installed = {"flax", "tensorflow"}
  monkeypatch.setattr(BENCH, "_has", lambda package: package in installed)
  assert BENCH.missing_peers() == ["torch", "keras"]
  notice = BENCH.missing_peers_notice()
  assert "columns read n/a: torch, keras." in notice and BENCH.PEER_INSTALL in notice
  assert BENCH.environment(BENCH.Config(quick=True))["peers missing (n/a)"] == "torch, keras"
  installed |= {"torch", "keras"}
  assert BENCH.missing_peers_notice() is None


def test_readme_quotes_the_results_summary():
  root = BENCH.HERE.parent

  def summary(text):
    return text.split("<!-- summary:start -->")[1].split("<!-- summary:end -->")[0].strip()

  results = (root / "benchmarks" / "RESULTS.md").read_text()
  assert summary((root / "README.md").read_text()) == summary(results)


@pytest.mark.slow
def test_benchmarks_readme_lists_the_flags_the_scripts_take():
  import pathlib
  import re

  root = pathlib.Path(__file__).resolve().parent.parent
  readme = (root / "benchmarks" / "README.md").read_text()
  listed = re.search(r"Flags of `bench_batch_norm.py`: (.*?)\.\s", readme, re.DOTALL)
  assert listed, "the flags sentence of benchmarks/README.md"
  models = re.search(r"Flags of `bench_models.py`: (.*?)\. The\s+other", readme, re.DOTALL)
  assert models, "the flags sentence of bench_models.py"
  shared = re.search(r"`_common.timing_parser`\) take (.*?)\. `--help`", readme, re.DOTALL)
  assert shared, "the shared flags sentence"
  for script, text in (
    ("bench_batch_norm.py", listed.group(1)),
    ("bench_models.py", models.group(1)),
    ("bench_traced_flag.py", shared.group(1)),
  ):
    usage = script_help(f"benchmarks/{script}")
    for flag in re.findall(r"`(--[a-z-]+)`", text):
      assert flag in usage, (script, flag)
