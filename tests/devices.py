"""The devices the multi-device tests split a batch over, and the mark that skips them where
fewer are visible.

On CPU, ``conftest.py`` makes 8 fake devices, and every multi-device test runs. On one GPU
(``benchmarks/device_check.sh`` runs the tests with ``JAX_PLATFORMS=cuda,cpu``) the same files
collect and the tests marked ``multidevice`` are skipped with a reason, so one command runs the
rest there.
"""

import functools

import jax
import pytest

DEVICES = 8

multidevice = pytest.mark.skipif(
  jax.device_count() < DEVICES,
  reason=f"needs {DEVICES} devices (the CPU run's fake ones); this run sees {jax.device_count()}",
)


@functools.cache
def device_mesh(axis_name: str = "d") -> jax.sharding.Mesh:
  """A one-axis mesh over the first ``DEVICES`` devices, built when a test first asks."""
  return jax.make_mesh((DEVICES,), (axis_name,))
