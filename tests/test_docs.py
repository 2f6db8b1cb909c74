"""The documentation as a user meets it: every public function's docstring has its sections and
a runnable example, the examples run (doctest), and the docs site's links resolve."""

import doctest
import importlib
import inspect
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import mkdocs_hooks  # noqa: E402

# Public module -> the packages its examples need (skipped without them; CI has them all).
PUBLIC = {
  "bnjax": (),
  "bnjax.conventions": (),
  "bnjax.fold": ("flax",),
  "bnjax.linen": ("flax",),
  "bnjax.nnx": ("flax",),
  "bnjax.equinox": ("equinox",),
  "bnjax.training": ("flax", "optax"),
  "bnjax.diagnostics": ("optax",),
  "bnjax.interop.torch": ("torch",),
  "bnjax.interop.keras": ("tensorflow",),
}
# Where the functions that bnjax/__init__.py re-exports are defined.
DEFINED_IN = {"bnjax": ("bnjax._core", "bnjax._stats")}


def _module(name):
  for package in PUBLIC[name]:
    pytest.importorskip(package)
  return importlib.import_module(name)


def _public_functions():
  for name in PUBLIC:
    try:
      module = _module(name)
    except pytest.skip.Exception:
      continue
    for attribute in module.__all__:
      obj = getattr(module, attribute)
      if inspect.isfunction(obj):
        yield f"{name}.{attribute}", obj


FUNCTIONS = list(_public_functions())


@pytest.mark.parametrize("name, function", FUNCTIONS, ids=[name for name, _ in FUNCTIONS])
def test_public_function_docstring_has_args_returns_and_an_example(name, function):
  doc = inspect.getdoc(function) or ""
  parameters = [p for p in inspect.signature(function).parameters if p not in ("self", "cls")]
  if parameters:
    assert "\nArgs:\n" in doc, f"{name} has no Args: section"
    for parameter in parameters:
      assert f"  {parameter.lstrip('*')}:" in doc or f"*{parameter}:" in doc, (name, parameter)
  assert "\nReturns:\n" in doc, f"{name} has no Returns: section"
  assert "\n  >>> " in doc, f"{name} has no runnable example"


LIVE = ("torch", "tensorflow")


@pytest.mark.slow
@pytest.mark.usefixtures("standard_promotion")  # as a user runs them
@pytest.mark.parametrize(
  "name",
  [
    pytest.param(name, marks=[pytest.mark.live] if set(needs) & set(LIVE) else [])
    for name, needs in PUBLIC.items()
  ],
)
def test_doctests(name):
  module = _module(name)
  modules = [importlib.import_module(m) for m in DEFINED_IN.get(name, (name,))]
  finder = doctest.DocTestFinder()
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  for source in modules:
    for test in finder.find(source, source.__name__):
      runner.run(test)
  results = runner.summarize(verbose=False)
  assert results.failed == 0, f"{results.failed} doctest examples of {name} failed (see above)"
  assert results.attempted > 0, f"{module.__name__} has no doctest examples"


@pytest.mark.parametrize(
  "text, source, page, expected",
  [
    ("[a](docs/ACCURACY.md)", "README.md", "index.md", "[a](ACCURACY.md)"),
    ("![p](docs/accuracy.png)", "README.md", "index.md", "![p](accuracy.png)"),
    ("[r](benchmarks/RESULTS.md#cpu)", "README.md", "index.md", "[r](benchmarks.md#cpu)"),
    (
      "[e](examples/train_digits.py)",
      "README.md",
      "index.md",
      "[e](https://github.com/bnjax/bnjax/blob/main/examples/train_digits.py)",
    ),
    ("[n](NOTES.md)", "benchmarks/RESULTS.md", "benchmarks.md", "[n](benchmarks.md)"),
    ("[x](../README.md)", "docs/ACCURACY.md", "ACCURACY.md", "[x](index.md)"),
    (
      "[s](#section) [w](https://x.org)",
      "README.md",
      "index.md",
      "[s](#section) [w](https://x.org)",
    ),
  ],
)
def test_docs_hook_points_links_at_pages_or_github(text, source, page, expected):
  assert mkdocs_hooks.rewrite_links(text, source=source, page=page) == expected


def test_docs_site_lists_every_public_module():
  nav = (ROOT / "mkdocs.yml").read_text()
  for name in PUBLIC:
    page = name.split(".")[1] if "." in name else "bnjax"
    page = "interop" if name.startswith("bnjax.interop") else page
    assert f"api/{page}.md" in nav, name
    assert (ROOT / "docs" / "api" / f"{page}.md").exists(), name
