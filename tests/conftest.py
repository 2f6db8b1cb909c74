"""Test set-up: 8 fake CPU devices (set before jax is imported) and strict dtype promotion."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest


@pytest.fixture(autouse=True)
def strict_dtype_promotion():
  """bnjax must never rely on implicit promotion; Flax tests opt out with `standard_promotion`."""
  with jax.numpy_dtype_promotion("strict"):
    yield


@pytest.fixture
def standard_promotion():
  with jax.numpy_dtype_promotion("standard"):
    yield


@pytest.fixture
def x64():
  """Enables float64 for one test."""
  with jax.enable_x64(True):
    yield
