"""The examples and the benchmark scripts run with tiny settings and return sane results."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative_path: str):
  """Imports a script by file path (examples/ and benchmarks/ are not packages)."""
  path = ROOT / relative_path
  name = f"_script_{path.stem}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up while the file executes
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


def script_help(relative_path: str) -> str:
  """A script's ``--help`` text, from a fresh interpreter as a user would run it."""
  return subprocess.run(
    [sys.executable, str(ROOT / relative_path), "--help"],
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  ).stdout


def example(name: str, *packages: str):
  """Loads examples/<name>.py once per test module, skipping when a package it needs is missing."""

  @pytest.fixture(scope="module", name=name)
  def fixture():
    for package in packages:
      pytest.importorskip(package)
    return load_script(f"examples/{name}.py")

  return fixture


train_digits = example("train_digits", "flax", "optax", "sklearn", "tqdm", "matplotlib")
tape_pitfall = example("tape_pitfall", "optax")
cold_start = example("cold_start", "matplotlib")
finetune_frozen = example("finetune_frozen", "flax", "optax", "sklearn", "tqdm")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.usefixtures("standard_promotion")  # Flax and optax rely on standard promotion
@pytest.mark.slow
def test_train_digits_defaults_reach_95_percent(train_digits, tmp_path, capsys):
  # The README's demo with its default settings: ~99% after 8 epochs with dropout, ~15 s on
  # 2 CPU cores (mostly XLA compilation). Only the plot goes elsewhere.
  plot = tmp_path / "digits.png"
  metrics = train_digits.main(["--no-progress", "--plot", str(plot)])
  out = capsys.readouterr().out
  assert metrics["eval_accuracy"] >= 0.95, metrics
  assert len(metrics["history"]) == 8 and "eval acc" in out
  assert f"plot written to {plot}" in out
  assert plot.read_bytes().startswith(PNG_SIGNATURE)
  assert metrics["problems"] == [] and "diagnostics" not in out
  # The plotted running statistics end near the statistics of the layer's input over the
  # training set under the final parameters: within a fifth of their spread over the channels
  # (the initial 0 and 1 are several spreads away).
  for key in ("mean", "var"):
    population = metrics["population"][key]
    np.testing.assert_allclose(
      metrics["running"][key], population, rtol=0, atol=0.2 * population.std(), err_msg=key
    )


@pytest.mark.slow
def test_tape_pitfall_threaded_statistics_vs_dropped(tape_pitfall, capsys):
  # tensorflow/tensorflow#32864: BatchNormalization's moving statistics in a GradientTape loop
  results = tape_pitfall.main(["--steps", "60", "--momentum", "0.9"])
  threaded, dropped = results["threaded"], results["dropped"]
  assert abs(threaded["mean"] - 104.5) < 0.5 and abs(threaded["var"] - 8.25) < 0.8, threaded
  assert abs(threaded["eval_mean"] - 150) < 1, threaded
  assert (dropped["mean"], dropped["var"]) == (0.0, 1.0)
  assert abs(dropped["eval_mean"] - 254.5) < 2, dropped  # x normalized with mean 0, var 1
  assert threaded["problems"] == []
  assert [p.check for p in dropped["problems"]] == ["stats_updated"]
  assert "running statistics are still at their initial values" in capsys.readouterr().out


def test_cold_start_debiased_is_right_from_the_start(cold_start, tmp_path, capsys):
  plot = tmp_path / "cold.png"
  history = cold_start.main(["--steps", "100", "--plot", str(plot)])["history"]
  at_50 = {name: (h["mean"][49], h["var"][49]) for name, h in history.items()}
  assert abs(at_50["0.999 debiased"][0] - 5) < 0.3 and abs(at_50["0.999 debiased"][1] - 4) < 0.6
  assert at_50["momentum 0.999"][0] < 0.5  # 0.999**50 = 95% of the initial 0 remains
  assert abs(at_50["momentum 0.9"][0] - 5) < 1
  out = capsys.readouterr().out
  assert "momentum=0.999 after 100 steps" in out and "momentum=0.9 " not in out
  assert plot.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.slow
def test_finetune_frozen_layers_stay_put(finetune_frozen, capsys):
  # keras-team/keras#9965: a frozen BatchNormalization normalized with batch statistics
  flags = ["--pretrain-epochs", "1", "--finetune-epochs", "1", "--no-progress"]
  results = finetune_frozen.main(flags)
  keras, tf1 = results["Keras 3"], results["TF1"]
  for name, change in keras["changes"].items():
    if name.startswith("bn"):
      assert change == 0.0, name  # frozen: bit for bit
    else:
      assert change > 0.0, name  # trainable: trained
  assert keras["problems"] == []
  assert keras["accuracy"] > 0.5, keras  # chance on 5 classes is 0.2
  # TF1 style: the parameters stay, the statistics move, the diagnostics say so
  assert all(tf1["changes"][f"bn{i}/{k}"] == 0.0 for i in (1, 2) for k in ("scale", "bias"))
  assert all(tf1["changes"][f"bn{i}/{k}"] > 0.0 for i in (1, 2) for k in ("mean", "var"))
  assert [(p.check, p.layer) for p in tf1["problems"]] == [("frozen", "bn1"), ("frozen", "bn2")]
  assert "layer 'bn2' is frozen but its running statistics moved" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_traced_flag_quick(tmp_path):
  pytest.importorskip("tqdm")
  bench = load_script("benchmarks/bench_traced_flag.py")
  output = tmp_path / "traced.md"
  flags = ["--quick", "--rounds", "1", "--reps", "1", "--no-malloc-env", "--no-progress"]
  assert bench.main([*flags, "--output", str(output)]) == output
  text = output.read_text()
  assert "| shape | static eval | traced eval (False) |" in text
  assert text.count("\n| NHWC ") == 3, text  # the times, ratios and HLO tables
  assert "## Environment" in text and "| malloc env |" in text
  # A structural check, not a timing one: the traced flag compiles to a conditional whose False
  # branch has no reduction; static eval has none either; static train has one.
  hlo_rows = [line for line in text.splitlines() if line.endswith("| yes | no | no | yes |")]
  assert len(hlo_rows) == 3, text
