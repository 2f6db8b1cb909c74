"""The package as a user meets it: the README's code runs, CI runs the README's test command,
and `import bnjax` pulls in nothing but jax and numpy."""

import pathlib
import re
import subprocess
import sys

import pytest
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
sys.path.insert(0, str(ROOT / "tools"))
from readme_command import command  # noqa: E402

PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)


def test_readme_has_python_blocks():
  assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
@pytest.mark.slow
def test_readme_python_block_runs(index, capsys):
  exec(compile(PYTHON_BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
  assert capsys.readouterr().out.strip(), "each README block prints what it shows"


def test_readme_set_up_commands():
  demo, tests = command("demo"), command("tests")
  for line in (demo, tests):
    # dependency groups (`--group`) need pip 25.1
    assert line.startswith(
      "python3 -m venv .venv && . .venv/bin/activate && pip install -U 'pip>=25.1'"
      " && pip install -e "
    )
  assert demo.endswith("python examples/train_digits.py")
  assert "--group examples" in demo
  assert "python -m pytest" in tests
  assert "--group test -c constraints.txt" in tests


def test_ci_runs_the_readme_test_command():
  ci = (ROOT / ".ci" / "run").read_text()
  assert "tools/readme_command.py tests" in ci
  assert "-eq 5" in ci  # no tests collected fails CI


def test_readme_command_parser_rejects_missing_marker():
  with pytest.raises(SystemExit, match="no block marked"):
    command("deploy", "no markers here")


@pytest.mark.slow
def test_import_bnjax_imports_only_jax_and_numpy():
  heavy = [
    "flax",
    "equinox",
    "optax",
    "orbax",
    "tensorflow",
    "tf_keras",
    "keras",
    "torch",
    "sklearn",
  ]
  code = f"import sys, bnjax; print([m for m in {heavy!r} if m in sys.modules])"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_core_dependencies_are_jax_and_numpy_only():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  names = [re.split(r"[<>=!~\[ ]", d)[0] for d in project["dependencies"]]
  assert sorted(names) == ["jax", "numpy"]
  extras = project["optional-dependencies"]
  assert set(extras) == {"flax", "equinox", "train", "keras", "tf", "torch"}


def test_extras_take_ranges_and_the_tests_pin_in_constraints():
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  for extra, requirements in pyproject["project"]["optional-dependencies"].items():
    for requirement in requirements:
      assert "==" not in requirement and ">=" in requirement, (extra, requirement)
  pins = [
    line.strip()
    for line in (ROOT / "constraints.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
  ]
  assert {"torch==2.13.0", "tensorflow==2.21.*", "tf_keras==2.21.*"} <= set(pins)
  groups = pyproject["dependency-groups"]
  assert {"examples", "test", "lint", "docs", "release", "bench", "dev"} <= set(groups)
  test_tools = [r for r in groups["test"] if isinstance(r, str)]
  assert any(r.startswith("pytest") for r in test_tools)


def test_wheel_metadata_has_classifiers_keywords_and_urls():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert "Typing :: Typed" in project["classifiers"]
  assert any(c.startswith("Programming Language :: Python :: 3.1") for c in project["classifiers"])
  assert "jax" in project["keywords"]
  assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= set(project["urls"])


def test_public_names():
  import bnjax

  assert set(bnjax.__all__) == {
    "batch_norm",
    "conventions",
    "fold",
    "init",
    "moments",
    "__version__",
    "Params",
    "Stats",
    "Variance",
    "RunningVariance",
    "Backward",
    "ZeroDebias",
    "OnNonfinite",
  }
  assert callable(bnjax.fold.fold) and callable(bnjax.fold.fold_affine)
  assert re.fullmatch(r"\d+\.\d+\.\d+", bnjax.__version__)


# The documented differences every drop-in states, as the README's list names them, with the
# words each module's docstring uses for them.
DIFFERENCES = {
  "Accurate variance by default": "accurate",
  "Exact uneven-shard sync": "weighted by",
  "A few ulps, not bit-identity": "ulps",
}


@pytest.mark.parametrize(
  "module, original",
  [
    ("bnjax.linen", "flax.linen.BatchNorm"),
    ("bnjax.nnx", "flax.nnx.BatchNorm"),
    ("bnjax.equinox", "equinox.nn.BatchNorm"),
  ],
)
def test_readme_and_docstrings_list_the_drop_ins_and_their_differences(module, original):
  import importlib

  doc = importlib.import_module(module).BatchNorm.__doc__
  assert f"`{module}.BatchNorm` | `{original}`" in README
  assert f"Differences from ``{original}``" in doc
  for readme_words, doc_words in DIFFERENCES.items():
    assert readme_words in README
    assert doc_words in doc, (module, doc_words)


def _by_preset(text: str) -> str:
  found = re.search(r"#+ By preset\n\n(\|.*?)\n\n", text, re.DOTALL)
  assert found, "no 'By preset' table"
  return found.group(1)


def test_readme_equivalence_table_is_the_generated_one():
  # The README quotes docs/EQUIVALENCE.md, which tools/equivalence_report.py writes.
  generated = (ROOT / "docs" / "EQUIVALENCE.md").read_text()
  assert _by_preset(README) == _by_preset(generated)


@pytest.mark.parametrize(
  "module, blocked, extra",
  [
    ("bnjax.linen", "flax", "flax"),
    ("bnjax.nnx", "flax", "flax"),
    ("bnjax.training", "optax", "train"),
    ("bnjax.equinox", "equinox", "equinox"),
  ],
)
@pytest.mark.slow
def test_a_missing_extra_says_which_to_install(module, blocked, extra):
  code = (
    f"import sys; sys.modules[{blocked!r}] = None\n"
    f"try:\n  import {module}\nexcept ImportError as e:\n  print(e)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
  )
  assert f"{module} needs {blocked}: pip install 'bnjax[{extra}]'" in out.stdout, out.stderr


@pytest.mark.parametrize(
  "call, blocked, extra",
  [
    ("bnjax.interop.from_torch({})", "torch", "torch"),
    ("bnjax.interop.from_torch_model(None)", "torch", "torch"),
    ("bnjax.interop.to_state_dict({}, {})", "torch", "torch"),
    (
      "bnjax.interop.to_keras({}, {}, bnjax.conventions.KERAS, input_shape=(None, 2))",
      "keras",
      "keras",
    ),
    (
      (
        "bnjax.interop.to_keras({}, {}, bnjax.conventions.TF_KERAS_UNFUSED,"
        " input_shape=(None, 2), library='tf_keras')"
      ),
      "tf_keras",
      "tf",
    ),
  ],
  ids=["from_torch", "from_torch_model", "to_state_dict", "to_keras", "to_keras-tf_keras"],
)
def test_a_missing_framework_says_which_extra_to_install(call, blocked, extra):
  code = (
    f"import sys; sys.modules[{blocked!r}] = None\n"
    "import bnjax, bnjax.interop\n"
    f"try:\n  {call}\nexcept ImportError as e:\n  print(e)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
  )
  assert f"needs {blocked}: pip install 'bnjax[{extra}]'" in out.stdout, out.stdout + out.stderr


def test_the_wheel_carries_the_license_and_the_type_marker():
  assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
  assert (ROOT / "bnjax" / "py.typed").exists()
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


def test_interop_converters_import_from_the_package_without_their_frameworks():
  code = (
    "import sys\nfrom bnjax.interop import from_torch, to_torch, from_keras, to_keras,"
    " to_state_dict, assign_to_keras\n"
    "print([m for m in ('torch', 'tensorflow', 'keras', 'tf_keras') if m in sys.modules])"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
  )
  assert out.stdout.strip() == "[]", out.stderr
  import bnjax.interop
  import bnjax.interop.torch

  assert bnjax.interop.from_torch is bnjax.interop.torch.from_torch
  with pytest.raises(AttributeError, match="no attribute 'from_jax'"):
    bnjax.interop.from_jax  # noqa: B018
