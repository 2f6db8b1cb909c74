"""bnjax's conventions against the real TensorFlow, Keras, PyTorch and Flax, side by side.

Each case (tests/live_frameworks.py) runs the framework's own batch norm and bnjax with the
matching ``bnjax.conventions`` preset over three training steps and one inference step, and
compares outputs, gradients (dx, dscale, dbias) and running statistics after every step, within
``tolerances.cross_framework``. Cases skip where their framework is not installed; CI installs
them all. TF1 layers and the two-replica MirroredStrategy cases run in one subprocess, Keras 3 on
the JAX backend in another.
"""

import dataclasses
import importlib.util

import jax.numpy as jnp
import live_frameworks as lf
import numpy as np
import pytest

import bnjax
import bnjax.diagnostics
from bnjax import conventions as cv

pytestmark = pytest.mark.live  # compares with TensorFlow, Keras or PyTorch

REQUIRES = {
  "tf_nn": "tensorflow",
  "tf_fused": "tensorflow",
  "keras": "tensorflow",
  "tf_keras": "tf_keras",
  "torch": "torch",
  "flax": "flax",
}
IN_PROCESS = [c for c in lf.CASES if c.reference in lf.RUNNERS]
SUBPROCESS = [c for c in lf.CASES if lf.SUBPROCESS_SCRIPTS.get(c.reference) == "tf_subprocess.py"]
KERAS_JAX = [c for c in lf.CASES if c.reference == "keras_jax"]


def _require(reference):
  pytest.importorskip(REQUIRES.get(reference, "tensorflow"))
  if reference == "tf_keras":
    pytest.importorskip("tensorflow")


@pytest.mark.parametrize("case", IN_PROCESS, ids=lambda c: c.id)
def test_preset_matches_framework(case):
  _require(case.reference)
  data = lf.make_data(case)
  expected = lf.RUNNERS[case.reference](case, data)
  lf.compare(case, lf.run_bnjax(case, data), expected, data)


def _compare_all(cases, traces):
  failures = []
  for case in cases:
    try:
      lf.compare(case, lf.run_bnjax(case, lf.make_data(case)), traces[case.id])
    except AssertionError as e:
      failures.append(f"{case.id}: {e}")
  assert not failures, "\n\n".join(failures)


def test_tf1_layers_and_two_replicas_in_a_subprocess():
  """All subprocess cases in one process start (TensorFlow's import is the cost)."""
  pytest.importorskip("tensorflow")
  pytest.importorskip("tf_keras")
  _compare_all(SUBPROCESS, lf.run_subprocess(SUBPROCESS))


def test_keras_on_the_jax_backend_in_a_subprocess():
  """Keras 3 with KERAS_BACKEND=jax: every keras_jax case in one process (Keras picks its
  backend at import, and this process's Keras runs on TensorFlow)."""
  for module in ("keras", "jax"):
    if importlib.util.find_spec(module) is None:  # not imported here: it would pick a backend
      pytest.skip(f"{module} is not installed: Keras 3 on the JAX backend is not tested")
  assert KERAS_JAX, "no keras_jax cases"
  _compare_all(KERAS_JAX, lf.run_subprocess(KERAS_JAX))


# The comparison is sharp enough to tell the conventions apart: swapping in a neighbouring
# convention (what a user porting a model gets wrong) fails.
WRONG = {
  # id: (case, wrong convention, the first entry that must fail)
  "tf_keras-fused-as-unfused": ("tf_keras-fused-nhwc-defaults", cv.TF_KERAS_UNFUSED, "step0/var"),
  "tf_keras-unfused-as-fused": ("tf_keras-unfused-2d-defaults", cv.TF_KERAS_FUSED, "step0/var"),
  "torch-momentum-unconverted": (
    "torch-1d-n2-defaults",
    cv.PYTORCH.replace(momentum=0.1),
    "step0/mean",
  ),
  "torch-biased": (
    "torch-1d-n2-defaults",
    cv.PYTORCH.replace(running_variance="biased"),
    "step0/var",
  ),
  "keras-with-torch-epsilon": ("keras-nhwc-defaults", cv.KERAS.replace(epsilon=1e-5), "step0/"),
  "tf_fused-factor-as-momentum": (
    "tf_fused-nhwc-defaults",
    cv.TF_FUSED_NHWC.replace(momentum=0.99),
    "step0/mean",
  ),
  "tf_keras-renorm-unclipped": (
    "tf_keras-renorm-nhwc",
    cv.tf_keras(fused=False, momentum=0.9, renorm=True, renorm_momentum=0.7),
    "step0/",
  ),
}


@pytest.mark.parametrize("case_id, wrong, first_failure", WRONG.values(), ids=WRONG.keys())
def test_a_wrong_convention_fails(case_id, wrong, first_failure):
  case = lf.CASES_BY_ID[case_id]
  _require(case.reference)
  data = lf.make_data(case)
  expected = lf.RUNNERS[case.reference](case, data)
  wrong_case = dataclasses.replace(case, convention=wrong)
  with pytest.raises(AssertionError, match=first_failure):
    lf.compare(wrong_case, lf.run_bnjax(wrong_case, data), expected, data)


def test_tf_fused_kernel_no_longer_clamps_epsilon():
  """TF 2.21's fused kernel uses epsilon as given; older TF raised it to 1.001e-5.

  With a variance of 1e-6 the clamp changes y by a factor ~0.3, so only the unclamped preset
  matches, and ``min_epsilon=LEGACY_FUSED_MIN_EPSILON`` reproduces the old clamp's numbers.
  """
  tf = pytest.importorskip("tensorflow")
  x = (np.random.default_rng(0).standard_normal((4, 2, 2, 3)) * 1e-3).astype(np.float32)
  scale, bias = np.ones(3, np.float32), np.zeros(3, np.float32)
  params, stats = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}, bnjax.init(3)[1]

  def ours(convention):
    y, _ = bnjax.batch_norm(jnp.asarray(x), params, stats, training=True, **convention.options())
    return np.asarray(y)

  def theirs(epsilon):
    y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, scale, bias, epsilon=epsilon, is_training=True)
    return y.numpy()

  unclamped = cv.tf_fused(epsilon=0.0)
  clamped = cv.tf_fused(epsilon=0.0, min_epsilon=cv.LEGACY_FUSED_MIN_EPSILON)
  assert clamped.options()["epsilon"] == 1.001e-5
  np.testing.assert_allclose(ours(unclamped), theirs(0.0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours(clamped), theirs(1.001e-5), rtol=1e-5, atol=1e-5)
  assert np.abs(ours(clamped) - theirs(0.0)).max() > 0.1


def test_torch_refuses_one_element_per_channel_bnjax_follows_tf():
  """PyTorch raises for one element per channel in training; bnjax, like TF's fused kernel,
  uses n / max(n - 1, 1) and gives y = bias; ``diagnostics.check_batch`` reports it."""
  torch = pytest.importorskip("torch")
  with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
    torch.nn.BatchNorm1d(3)(torch.ones(1, 3))
  params, stats = cv.PYTORCH.init(3)
  y, new = bnjax.batch_norm(jnp.ones((1, 3)), params, stats, training=True, **cv.PYTORCH.options())
  assert bnjax.diagnostics.check_batch((1, 3), axis=1)
  np.testing.assert_array_equal(y, 0.0)
  np.testing.assert_allclose(new["var"], 0.9)  # 0.9 * 1 + 0.1 * 0
