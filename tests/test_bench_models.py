"""benchmarks/bench_models.py in --quick mode: every model and variant runs, bnjax's train step
and inference agree with Flax's (and the folded model with the unfolded one) to float32
tolerance on ResNet-18, ResNet-50 and the MLP, and the report renders. Times are not asserted."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_examples import load_script, script_help
from tolerances import UPDATE_VS_FLOAT64_FACTOR, WHOLE_MODEL_RTOL

pytest.importorskip("flax")
pytest.importorskip("optax")


@pytest.fixture(scope="module")
def bench():
  return load_script("benchmarks/bench_models.py")


@pytest.fixture(scope="module")
def quick_record(bench, tmp_path_factory):
  folder = tmp_path_factory.mktemp("bench_models")
  argv = ["--quick", "--no-malloc-env", "--no-progress", "--output", str(folder / "MODELS.md")]
  argv += ["--json", str(folder / "models.json")]
  with jax.numpy_dtype_promotion("standard"):
    assert bench.main(argv) == 0
  return json.loads((folder / "models.json").read_text()), (folder / "MODELS.md").read_text()


@pytest.mark.slow
def test_quick_run_agrees_with_flax_on_every_model(quick_record):
  record, report = quick_record
  assert sorted(record["models"]) == ["mlp", "resnet18", "resnet50"]
  for name, model in record["models"].items():
    checks = model["checks"]
    for check, value in checks.items():
      if not check.endswith("update vs float64"):
        assert value <= WHOLE_MODEL_RTOL, (name, check, value)
    # The SGD step (on the smooth twin) against float64: bnjax's batch norm loses no more than
    # Flax's two-pass one, where the rest of the model sets the float32 floor.
    bnjax_error, flax_error = (
      checks["bnjax: update vs float64"],
      checks["flax-exact: update vs float64"],
    )
    assert bnjax_error <= UPDATE_VS_FLOAT64_FACTOR * flax_error, (name, bnjax_error, flax_error)
    assert {"bnjax", "flax", "flax-exact"} <= set(model["train"])
    assert {"bnjax", "flax", "bnjax-folded"} <= set(model["inference"])
    memory = model["memory"]["train/bnjax"]
    assert memory["compile_s"] > 0 and memory["argument_bytes"] > 0
  assert "## Summary" in report and "resnet50" in report


def test_fold_pairs_cover_every_batch_norm(bench):
  with jax.numpy_dtype_promotion("standard"):
    for name in bench.MODELS:
      model = bench.flax_model(name, bench.bnjax_norm, jnp.float32)
      shape = (1, 28, 28, 1) if name == "mlp" else (1, 32, 32, 3)
      variables = jax.eval_shape(
        lambda model=model, shape=shape: model.init(
          jax.random.key(0), jnp.zeros(shape), train=False
        )
      )
      pairs = bench.fold_pairs(variables["params"])
      bns = jax.tree.leaves(variables["batch_stats"])
      assert len(pairs) == len(bns) // 2, name  # mean and var per batch norm
      expected = {"resnet18": 20, "resnet50": 53, "mlp": 3}[name]
      assert len(pairs) == expected, (name, len(pairs))


def test_the_smooth_twin_has_the_models_parameters(bench):
  # update_errors steps the smooth twin from the model's own parameters.
  def variables(name, smooth):
    model = bench.flax_model(name, bench.bnjax_norm, jnp.float32, smooth=smooth)
    x = jnp.zeros((1, 28, 28, 1) if name == "mlp" else (1, 32, 32, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

  with jax.numpy_dtype_promotion("standard"):
    for name in bench.MODELS:
      model, twin = variables(name, False), variables(name, True)
      assert jax.tree.structure(model) == jax.tree.structure(twin), name
      assert jax.tree.leaves(model) == jax.tree.leaves(twin), name


def test_readme_quotes_the_models_summary():
  root = pathlib.Path(__file__).resolve().parent.parent

  def summary(text):
    return text.split("<!-- models:start -->")[1].split("<!-- models:end -->")[0].strip()

  models = (root / "benchmarks" / "MODELS.md").read_text()
  assert summary((root / "README.md").read_text()) == summary(models)


def _render_one(bench, tmp_path, monkeypatch, model: dict, *, device: str) -> str:
  """MODELS.md rendered from one record: ``model`` as ResNet-50 on ``device``."""
  record = {
    "environment": {"device": device, "settings": "rounds=1, quick=False"},
    "models": {"resnet50": model},
  }
  monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
  (tmp_path / "models_float32.json").write_text(json.dumps(record))
  return bench.render(tmp_path / "MODELS.md")


def test_render_reports_goals_as_measured(bench, tmp_path, monkeypatch):
  times = {"bnjax": [[1.0, 1.0]], "flax": [[2.0, 2.0]], "flax-exact": [[2.0, 2.0]]}
  times["torch"] = [[0.5, 0.5]]
  memory = {
    f"train/{v}": {"temp_bytes": t, "compile_s": 1.0}
    for v, t in (("bnjax", 1.0), ("flax", 4.0), ("flax-exact", 4.0))
  }
  model = {
    "input": [1, 2],
    "train": times,
    "inference": {"bnjax": [[1.0]], "bnjax-folded": [[0.5]]},
    "memory": memory,
    "checks": {"flax-exact: loss": 0.0},
    "torch_compile": {"torch": 0.1},
  }
  text = _render_one(bench, tmp_path, monkeypatch, model, device="cpu (cpu), 1 device(s)")
  assert "| ResNet-50 train step <= 1.0x Flax's default (CPU) | cpu | 0.50x | yes |" in text
  assert "| ResNet-50 compiled temp memory <= 0.65x Flax's | cpu | 0.25x | yes |" in text
  assert "| ResNet-50 train step <= PyTorch channels_last (CPU) | cpu | 2.00x | **no**" in text
  assert np.isclose(bench.measures(model)["step/torch"], 2.0)


def test_a_failed_float64_check_is_reported(bench, tmp_path, monkeypatch):
  # A backend that cannot run the float64 reference (say, no float64 convolutions) loses that
  # check, not the model's timings: the report names the failure.
  model = {
    "input": [1, 2],
    "train": {"bnjax": [[1.0]], "flax": [[1.0]], "flax-exact": [[1.0]]},
    "inference": {"bnjax": [[1.0]]},
    "memory": {f"train/{v}": {"temp_bytes": 1.0} for v in ("bnjax", "flax", "flax-exact")},
    "checks": {"flax-exact: loss": 0.0},
    "check_failures": {"update vs float64": "failed: XlaRuntimeError: UNIMPLEMENTED: f64 conv"},
    "torch_compile": {},
  }
  text = _render_one(bench, tmp_path, monkeypatch, model, device="H200 (gpu), 1 device(s)")
  assert "- update vs float64: failed: XlaRuntimeError: UNIMPLEMENTED: f64 conv" in text
  assert "| ResNet-50 train step <= 0.97x Flax's default (GPU) | H200 | 1.00x | **no**" in text


@pytest.mark.parametrize(
  "backend, cuda, expected",
  [("gpu", True, "cuda"), ("gpu", False, "cpu"), ("cpu", True, "cpu")],
)
def test_torch_runs_where_jax_runs(bench, monkeypatch, backend, cuda, expected):
  torch = pytest.importorskip("torch")
  monkeypatch.setattr(bench.jax, "default_backend", lambda: backend)
  monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
  assert bench.torch_device() == expected


def test_device_check_script_names_its_phases_and_uses_only_accepted_flags():
  import re
  import subprocess

  root = pathlib.Path(__file__).resolve().parent.parent
  script = root / "benchmarks" / "device_check.sh"
  wrong = subprocess.run(
    ["bash", str(script), "tests", "models"],
    check=False,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert wrong.returncode == 2
  assert "unknown phase 'models'; choose from tests models-f32 models-bf16 bn" in wrong.stderr
  text = script.read_text()
  functions = {"bench_models.py": "models() {", "bench_batch_norm.py": "bn() {"}
  for name, start in functions.items():
    body = text.split(start)[1].split("\n}\n")[0]
    flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", body))
    if name == "bench_models.py":  # the phases pass more through "$@"
      flags |= set(re.findall(r"models \w+ (--[a-z][a-z0-9-]+)", text))
    usage = script_help(f"benchmarks/{name}")
    assert flags and all(flag in usage for flag in flags), (name, flags)
