"""Run with the Python of a fresh venv where only the built wheel is installed (``.ci/run``).

Checks that the installed package imports with nothing but its core dependencies, is the one from
the wheel (not the checkout), and ships its license and ``py.typed`` marker.
"""

import importlib.metadata
import pathlib
import sys

sys.path = [p for p in sys.path if pathlib.Path(p or ".").resolve() != pathlib.Path.cwd()]

import bnjax  # noqa: E402

location = pathlib.Path(bnjax.__file__).resolve()
assert "site-packages" in location.parts, f"bnjax imported from {location}, not the wheel"
assert (location.parent / "py.typed").exists(), "py.typed is missing from the wheel"
files = [str(f) for f in importlib.metadata.files("bnjax") or ()]
assert any(f.endswith("LICENSE") for f in files), f"LICENSE is missing from the wheel: {files}"
heavy = [m for m in ("flax", "optax", "tensorflow", "torch", "equinox") if m in sys.modules]
assert not heavy, f"import bnjax imported {heavy}"
params, stats = bnjax.init(3)
assert set(params) == {"scale", "bias"} and set(stats) == {"mean", "var"}
print(f"bnjax {bnjax.__version__} from the wheel at {location.parent}: ok")
