"""bnjax against its peers, side by side: training forward, forward + backward, inference.

Peers, each at its fastest documented setting for the layout:

  copy           jitted ``x * c``: one read and one write of x, the yardstick
  bnjax          ``bnjax.batch_norm`` with its defaults: ``variance='auto'`` (two-pass on CPU,
                 shifted sums on a GPU) and the closed-form backward
  bnjax-autodiff the same with ``backward='autodiff'``: what the closed form saves
  bnjax-shifted  on CPU, ``variance='shifted'``; on a GPU, ``bnjax-two_pass``: the algorithm
                 that 'auto' did not pick there
  flax           ``flax.linen.BatchNorm`` default (``use_fast_variance=True``, E[x^2] - E[x]^2)
  flax-exact     ``flax.linen.BatchNorm(use_fast_variance=False)``
  torch          ``torch.nn.functional.batch_norm``, NCHW-contiguous and channels_last
  keras-jax      Keras 3's ``BatchNormalization`` on the JAX backend, ``stateless_call`` in jit
  tf-fused       ``tf.compat.v1.nn.fused_batch_norm`` (FusedBatchNormV3) in ``tf.function``
  keras-tf       Keras 3's layer in ``tf.function(jit_compile=True)`` (XLA)

A training step is timed as issue 6 specifies: the forward returns ``y`` and the new statistics,
then the backward from a given ``dy`` to ``dx``, ``dscale`` and ``dbias`` (``jax.vjp`` with
``has_aux``; ``torch.autograd.grad(y, ..., grad_outputs=dy)``; ``tf.GradientTape``). Keras 3
fixes its backend at import, so the Keras and TensorFlow peers run in subprocesses of this
script (``--group``); every process times its own ``copy``, and a ratio is only ever taken
between two results of the same process.

Timing: the cases of one shape run interleaved (``_timing.interleaved``): each round visits
every case once in a shuffled order, one untimed call and then ``reps`` samples; a sample
is the mean of ``batch`` back-to-back calls (1 on CPU; on a GPU 10, so that the host's dispatch
overlaps the device's work), a time the median over all samples with the interquartile range,
a ratio the median over rounds of the per-round ratio of medians. Before timing, every peer's
training-forward ``y`` is compared with bnjax's and the largest difference is reported.

    python benchmarks/bench_batch_norm.py             # CPU: ~6 min on 2 cores; GPU: ~2 min
    python benchmarks/bench_batch_norm.py --quick     # tiny shapes, for the smoke test
    python benchmarks/bench_batch_norm.py --render    # RESULTS.md from benchmarks/results/*.json

Each run writes ``benchmarks/results/<device>.json`` (``--json``), then renders RESULTS.md
from every JSON file there, so the CPU and the GPU results sit in one report. On Linux CPUs,
glibc's allocator distorts the timing of large short-lived buffers; the script times both
with ``_common.MALLOC_ENV`` (the default, re-running itself) and, for the first shape, without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RESULTS_DIR = HERE / "results"
DEFAULT_OUTPUT = HERE / "RESULTS.md"
MODES = ("train_forward", "forward_backward", "inference")
MODE_TITLES = {
  "train_forward": "train forward",
  "forward_backward": "forward+backward",
  "inference": "inference",
}
# The fewest bytes each mode can move, in units of |x| (statistics and parameters are negligible).
# Inference reads x and writes y. In training every output needs the complete statistics, so
# unless x fits on chip x is read twice: 3|x| forward; the backward's sums need all of dy too,
# then dx reads dy and x again: 3|x| + 5|x| = 8|x| per step (2|x| and 5|x| with x on chip).
TRAFFIC = {"train_forward": 3, "forward_backward": 8, "inference": 2}


class Shape(NamedTuple):
  name: str
  shape: tuple[int, ...]
  axis: int  # the feature axis
  dtype: str


# Shared with tests/test_bench_batch_norm.py, which checks bnjax at these shapes.
SHAPES = (
  Shape("NHWC conv (ResNet stage 2)", (32, 56, 56, 128), -1, "float32"),
  Shape("NHWC conv (ResNet stage 4)", (32, 14, 14, 512), -1, "float32"),
  Shape("dense", (4096, 1024), -1, "float32"),
  Shape("NCHW conv", (32, 128, 56, 56), 1, "float32"),
  Shape("NHWC conv bf16", (32, 56, 56, 128), -1, "bfloat16"),
)
# On a GPU the CPU shapes take 50-100 us, about what JAX's dispatch of one call costs: there
# they would time the host. These are 4x larger (200-270 MB).
GPU_SHAPES = (
  Shape("NHWC conv, batch 128", (128, 56, 56, 128), -1, "float32"),
  Shape("dense, large", (16384, 4096), -1, "float32"),
  Shape("NCHW conv, batch 128", (128, 128, 56, 56), 1, "float32"),
  Shape("NHWC conv bf16, batch 128", (128, 56, 56, 128), -1, "bfloat16"),
)
QUICK_SHAPES = (
  Shape("NHWC", (4, 6, 6, 8), -1, "float32"),
  Shape("NCHW bf16", (4, 8, 6, 6), 1, "bfloat16"),
)
GROUPS = ("jax", "tf", "keras_jax")  # one process each


@dataclasses.dataclass(frozen=True)
class Config:
  rounds: int = 7
  reps: int = 6  # samples per case per round
  batch: int = 1  # back-to-back calls per sample (10 on a GPU)
  warmup: int = 2
  quick: bool = False


def data(shape: Shape):
  """x ~ N(0.5, 2^2), dy ~ N(0, 1), in the shape's dtype, as NumPy float32/float64 arrays."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape.shape, np.float32) * 2 + 0.5
  dy = rng.standard_normal(shape.shape, np.float32)
  return x, dy


def channels(shape: Shape) -> int:
  return shape.shape[shape.axis]


# --- peers on JAX (bnjax, flax, keras on the JAX backend, copy) -----------------------------


def jax_peers(shape: Shape, *, with_keras: bool, with_flax: bool):
  """{peer: {mode: (compiled fn, args)}} for the peers that run on JAX."""
  import jax
  import jax.numpy as jnp

  import bnjax

  x_np, dy_np = data(shape)
  x, dy = (jnp.asarray(v, shape.dtype) for v in (x_np, dy_np))
  c = channels(shape)
  peers = {}

  def modes(forward, params, state):
    """forward(x, params, state) -> (y, new_state)."""

    def train(x, params, state):
      return forward(x, params, state, True)

    def step(x, params, state, dy):
      y, pullback, new_state = jax.vjp(lambda x, p: train(x, p, state), x, params, has_aux=True)
      return y, pullback(dy.astype(y.dtype)), new_state

    def infer(x, params, state):
      return forward(x, params, state, False)[0]

    fns = {
      "train_forward": (train, (x, params, state)),
      "forward_backward": (step, (x, params, state, dy)),
      "inference": (infer, (x, params, state)),
    }
    return {m: (jax.jit(f).lower(*a).compile(), a) for m, (f, a) in fns.items()}

  one = jnp.ones((), shape.dtype)
  copy = jax.jit(lambda x, c: x * c).lower(x, one).compile()
  peers["copy"] = {"train_forward": (copy, (x, one))}  # timed once; the 2|x| yardstick
  params, stats = bnjax.init(c)
  # The defaults, then each default changed: the backward, and the variance algorithm that
  # 'auto' did not pick on this backend.
  other = "shifted" if bnjax._stats.resolve_variance("auto") == "two_pass" else "two_pass"
  variants = {
    "bnjax": {},
    "bnjax-autodiff": {"backward": "autodiff"},
    f"bnjax-{other}": {"variance": other},
  }
  for name, options in variants.items():
    peers[name] = modes(
      lambda x, p, s, training, options=options: bnjax.batch_norm(
        x, p, s, training=training, axis=shape.axis, **options
      ),
      params,
      stats,
    )

  if with_flax:
    import flax.linen as nn

    for name, fast in (("flax", True), ("flax-exact", False)):
      module = nn.BatchNorm(axis=shape.axis, use_fast_variance=fast, momentum=0.99)
      with jax.numpy_dtype_promotion("standard"):  # Flax relies on implicit promotion
        variables = module.init(jax.random.key(0), x[:2], use_running_average=True)

      def forward(x, p, s, training, module=module):
        y, updates = module.apply(
          {"params": p, "batch_stats": s},
          x,
          use_running_average=not training,
          mutable=["batch_stats"],
        )
        return y, updates["batch_stats"]

      with jax.numpy_dtype_promotion("standard"):
        peers[name] = modes(forward, variables["params"], variables["batch_stats"])

  if with_keras:
    import keras

    layer = keras.layers.BatchNormalization(axis=shape.axis, momentum=0.99, epsilon=1e-5)
    layer.build(shape.shape)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def forward(x, p, s, training):
      y, new_s = layer.stateless_call(p, s, x, training=training)
      return y, new_s

    peers["keras-jax"] = modes(forward, trainable, non_trainable)
  return peers


# --- PyTorch ---------------------------------------------------------------------------------


def torch_peers(shape: Shape, device: str):
  import torch
  import torch.nn.functional as F

  x_np, dy_np = data(shape)
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[shape.dtype]
  c = channels(shape)
  peers = {}
  layouts = {"torch": torch.contiguous_format}
  if len(shape.shape) == 4:
    layouts["torch-channels_last"] = torch.channels_last
  for name, memory_format in layouts.items():

    def tensor(v, memory_format=memory_format):
      t = torch.from_numpy(v)
      if shape.axis != 1:  # torch's channels are axis 1: move them there
        t = t.movedim(-1, 1)
      return t.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)

    x, dy = tensor(x_np), tensor(dy_np)
    x.requires_grad_(True)
    weight = torch.ones(c, device=device, dtype=torch.float32, requires_grad=True)
    bias = torch.zeros(c, device=device, dtype=torch.float32, requires_grad=True)
    mean, var = torch.zeros(c, device=device), torch.ones(c, device=device)

    def train(x=x, weight=weight, bias=bias, mean=mean, var=var):
      with torch.no_grad():
        return F.batch_norm(x, mean, var, weight, bias, training=True, momentum=0.01, eps=1e-5)

    def step(x=x, dy=dy, weight=weight, bias=bias, mean=mean, var=var):
      y = F.batch_norm(x, mean, var, weight, bias, training=True, momentum=0.01, eps=1e-5)
      return y, torch.autograd.grad(y, (x, weight, bias), grad_outputs=dy)

    def infer(x=x, weight=weight, bias=bias, mean=mean, var=var):
      with torch.no_grad():
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=1e-5)

    peers[name] = {
      "train_forward": (train, ()),
      "forward_backward": (step, ()),
      "inference": (infer, ()),
    }
  return peers


# --- TensorFlow (its own process: tf.keras is Keras 3 on the TensorFlow backend) --------------


def tf_peers(shape: Shape):
  import tensorflow as tf

  x_np, dy_np = data(shape)
  dtype = {"float32": tf.float32, "bfloat16": tf.bfloat16}[shape.dtype]
  x, dy = tf.cast(x_np, dtype), tf.cast(dy_np, dtype)
  c = channels(shape)
  peers = {}
  one = tf.constant(1, dtype)
  copy = tf.function(lambda x: x * one, jit_compile=True)
  peers["copy"] = {"train_forward": (copy, (x,))}

  if len(shape.shape) == 4 and shape.dtype == "float32":  # the fused kernel's own layouts
    data_format = "NHWC" if shape.axis == -1 else "NCHW"
    scale, offset = tf.Variable(tf.ones(c)), tf.Variable(tf.zeros(c))
    mean, var = tf.Variable(tf.zeros(c)), tf.Variable(tf.ones(c))

    def fused(x, training):
      y, batch_mean, batch_var = tf.compat.v1.nn.fused_batch_norm(
        x,
        scale,
        offset,
        mean=None if training else mean,
        variance=None if training else var,
        epsilon=1e-5,
        data_format=data_format,
        is_training=training,
      )
      if training:
        mean.assign(0.99 * mean + 0.01 * batch_mean)
        var.assign(0.99 * var + 0.01 * batch_var)
      return y

    @tf.function
    def fused_step(x, dy):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = fused(x, True)
      return y, tape.gradient(y, [x, scale, offset], output_gradients=dy)

    peers["tf-fused"] = {
      "train_forward": (tf.function(lambda x: fused(x, True)), (x,)),
      "forward_backward": (fused_step, (x, dy)),
      "inference": (tf.function(lambda x: fused(x, False)), (x,)),
    }

  layer = tf.keras.layers.BatchNormalization(
    axis=shape.axis, momentum=0.99, epsilon=1e-5, dtype=shape.dtype
  )
  layer.build(shape.shape)

  @tf.function(jit_compile=True)
  def keras_step(x, dy):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=True)
    return y, tape.gradient(y, [x, *layer.trainable_variables], output_gradients=dy)

  peers["keras-tf"] = {
    "train_forward": (tf.function(lambda x: layer(x, training=True), jit_compile=True), (x,)),
    "forward_backward": (keras_step, (x, dy)),
    "inference": (tf.function(lambda x: layer(x, training=False), jit_compile=True), (x,)),
  }
  return peers


# --- timing ------------------------------------------------------------------------------------


def _waiter(group: str, device: str) -> Callable:
  """A function that blocks until a result is computed."""
  if group == "tf":
    return lambda out: [np.asarray(t) for t in _flatten(out)]  # .numpy() waits for TF
  import jax

  if device == "cuda":
    import torch

    return lambda out: torch.cuda.synchronize() if _is_torch(out) else jax.block_until_ready(out)
  return lambda out: None if _is_torch(out) else jax.block_until_ready(out)


def _is_torch(out) -> bool:
  return type(out).__module__.startswith("torch") or (
    isinstance(out, tuple) and any(type(o).__module__.startswith("torch") for o in out)
  )


def _flatten(out):
  if isinstance(out, (list, tuple)):
    for o in out:
      yield from _flatten(o)
  elif out is not None:
    yield out


def time_peers(peers, config: Config, wait: Callable) -> dict[str, dict[str, np.ndarray]]:
  """times[peer][mode] = (rounds, reps) seconds per call, by ``_timing.interleaved``."""
  import _timing

  def sample(fn, args):  # ``config.batch`` calls back to back, waiting for the last
    for _ in range(config.batch - 1):
      fn(*args)
    wait(fn(*args))

  cases = {
    (p, m): functools.partial(sample, *peers[p][m]) for p in peers for m in MODES if m in peers[p]
  }
  samples = _timing.interleaved(cases, rounds=config.rounds, reps=config.reps, warmup=config.warmup)
  times = {p: {} for p in peers}
  for (p, m), seconds in samples.items():
    times[p][m] = seconds / config.batch
  return times


def max_difference(peers, reference) -> dict[str, float]:
  """Largest |y - y_bnjax| of each peer's training forward (y moved to bnjax's layout)."""
  out = {}
  for name, modes in peers.items():
    if name == "copy":
      continue
    fn, args = modes["train_forward"]
    y = fn(*args)
    y = y[0] if isinstance(y, (tuple, list)) else y
    y = _to_numpy(y)
    if y.shape != reference.shape:  # torch: channels on axis 1
      y = np.moveaxis(y, 1, -1)
    out[name] = float(np.max(np.abs(y - reference)))
  return out


def _to_numpy(y) -> np.ndarray:
  if type(y).__module__.startswith("torch"):
    return y.detach().float().cpu().numpy()
  return np.asarray(y.numpy() if hasattr(y, "numpy") else y, np.float32).astype(np.float64)


def run_group(group: str, shapes, config: Config) -> dict:
  """Results of one process: {shape name: {peer: {mode: samples, 'max_diff': ...}}}."""
  results = {}
  device = "cpu"
  if group != "tf":
    import jax

    device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
  wait = _waiter(group, device)
  for shape in shapes:
    if group == "tf":
      peers = tf_peers(shape)
    else:
      peers = jax_peers(shape, with_keras=group == "keras_jax", with_flax=group == "jax")
      if group == "keras_jax":
        peers = {k: v for k, v in peers.items() if k in ("copy", "keras-jax")}
      elif _has("torch"):
        peers |= torch_peers(shape, device)
    reference = bnjax_reference(shape)
    diffs = max_difference(peers, reference)
    times = time_peers(peers, config, wait)
    results[shape.name] = {
      p: {"times": {m: t.tolist() for m, t in modes.items()}, "max_diff": diffs.get(p)}
      for p, modes in times.items()
    }
  return results


def bnjax_reference(shape: Shape) -> np.ndarray:
  """bnjax's training-forward y at ``shape`` (NumPy float64), computed on the CPU."""
  import jax
  import jax.numpy as jnp

  import bnjax

  x_np, _ = data(shape)
  with jax.default_device(jax.devices("cpu")[0]):
    params, stats = bnjax.init(channels(shape))
    y, _ = bnjax.batch_norm(
      jnp.asarray(x_np, shape.dtype), params, stats, training=True, axis=shape.axis
    )
    y = np.asarray(y.astype(jnp.float32), np.float64)
  return np.moveaxis(y, 1, -1) if shape.axis == 1 else y


def _has(module: str) -> bool:
  import importlib.util

  return importlib.util.find_spec(module) is not None


PEER_PACKAGES = ("flax", "torch", "tensorflow", "keras")
PEER_INSTALL = "pip install -e '.[flax,tf,torch]' --group bench -c constraints.txt"


def missing_peers() -> list[str]:
  """The peers' packages that are not installed: their columns read n/a."""
  return [package for package in PEER_PACKAGES if not _has(package)]


def missing_peers_notice() -> str | None:
  """What the run prints on stderr when a peer is missing: which, and how to install them."""
  missing = missing_peers()
  if not missing:
    return None
  return (
    f"bench_batch_norm: not installed, so their columns read n/a: {', '.join(missing)}."
    f" Install them with: {PEER_INSTALL}"
  )


# --- orchestration -----------------------------------------------------------------------------


def environment(config: Config) -> dict[str, str]:
  import _common
  import jax

  versions, missing = [], missing_peers()
  for package in PEER_PACKAGES:
    if package not in missing:
      import importlib.metadata

      versions.append(f"{package} {importlib.metadata.version(package)}")
  env = _common.environment(
    config,
    **{
      "malloc env": _common.malloc_env_row(),
      "peers": ", ".join(versions) or "(none installed)",
      "peers missing (n/a)": ", ".join(missing) or "none",
    },
  )
  if jax.devices()[0].platform == "gpu":
    env["device"] += f", {jax.devices()[0].device_kind}"
  return env


def run_all(config: Config, shapes, *, allocator_variants: bool) -> dict:
  """Every group, each in its own process (the jax group in this one)."""
  import jax

  on_gpu = jax.devices()[0].platform == "gpu"
  record = {
    "environment": environment(config),
    "shapes": {s.name: s._asdict() for s in shapes},
    "groups": {},
  }
  record["groups"]["jax"] = run_group("jax", shapes, config)
  for group, needs in (("tf", "tensorflow"), ("keras_jax", "keras")):
    if _has(needs) and not (on_gpu and group == "tf"):
      record["groups"][group] = _subprocess(group, config, shapes, {})
  if allocator_variants and not on_gpu and sys.platform.startswith("linux"):
    import _common

    plain = dict.fromkeys(_common.MALLOC_ENV)
    record["glibc_defaults"] = _subprocess("jax", config, shapes[:1], plain)
  return record


def _subprocess(group: str, config: Config, shapes, env_changes) -> dict:
  env = dict(os.environ)
  env.update({k: v for k, v in env_changes.items() if v is not None})
  for k, v in env_changes.items():
    if v is None:
      env.pop(k, None)
  env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
  if group == "keras_jax":
    env["KERAS_BACKEND"] = "jax"
  if group == "tf":
    env["KERAS_BACKEND"] = "tensorflow"
  names = ",".join(s.name for s in shapes)
  cmd = [
    sys.executable,
    __file__,
    "--group",
    group,
    "--shapes",
    names,
    "--config",
    json.dumps(dataclasses.asdict(config)),
  ]
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"bench_batch_norm --group {group} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


# --- the report ----------------------------------------------------------------------------------


def _median_ms(samples) -> float:
  return float(np.median(samples)) * 1e3


def _ratio(num, den) -> float:
  num, den = np.asarray(num), np.asarray(den)
  return float(np.median(np.median(num, 1) / np.median(den, 1)))


def device_section(record: dict) -> list[str]:
  import _common

  env = record["environment"]
  lines = [f"## {env['device']}", ""]
  for shape_name, shape in record["shapes"].items():
    lines += [
      f"### {shape_name}: {tuple(shape['shape'])} {shape['dtype']}, axis {shape['axis']}",
      "",
      "| peer | "
      + " | ".join(f"{MODE_TITLES[m]} ms" for m in MODES)
      + " | fwd+bwd / flax | fwd+bwd / bnjax | max abs y diff vs bnjax |",
      "|---|" + "---|" * (len(MODES) + 3),
    ]
    for group, results in record["groups"].items():
      peers = results[shape_name]
      for peer, result in peers.items():
        if peer == "copy" and group != "jax":
          continue
        times = result["times"]
        cells = [_common.format_ms(np.asarray(times[m])) if m in times else "" for m in MODES]
        cells += [_step_ratio(times, peers, other) for other in ("flax", "bnjax")]
        diff = result["max_diff"]
        cells.append("" if diff is None else f"{diff:.1e}")
        label = peer if group == "jax" else f"{peer} (own process)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    copy = record["groups"]["jax"][shape_name]["copy"]["times"]["train_forward"]
    lines += ["", _floor_line(record, shape_name, _median_ms(copy)), ""]
  if "glibc_defaults" in record:
    lines += [
      "### The first shape with glibc's default allocator settings",
      "",
      "| peer | " + " | ".join(f"{MODE_TITLES[m]} ms" for m in MODES) + " |",
      "|---|" + "---|" * len(MODES),
    ]
    for peers in record["glibc_defaults"].values():
      for peer, result in peers.items():
        lines.append(
          f"| {peer} | "
          + " | ".join(
            _common.format_ms(np.asarray(result["times"][m])) if m in result["times"] else ""
            for m in MODES
          )
          + " |"
        )
    lines.append("")
  lines += _common.environment_section(env)
  return lines


def _step_ratio(times, peers, other) -> str:
  """forward+backward time over ``other``'s in the same process, or '' where there is none."""
  if other not in peers or "forward_backward" not in times:
    return ""
  return f"{_ratio(times['forward_backward'], peers[other]['times']['forward_backward']):.2f}"


def _floor_line(record, shape_name, copy_ms) -> str:
  peers = record["groups"]["jax"][shape_name]
  parts = []
  for m in MODES:
    moved = 2 * _median_ms(peers["bnjax"]["times"][m]) / copy_ms
    parts.append(f"{MODE_TITLES[m]} {moved:.1f}|x| (fewest possible: {TRAFFIC[m]}|x|)")
  return (
    f"bnjax's time in |x| moved at this run's copy speed (2|x| in {copy_ms:.3g} ms): "
    + "; ".join(parts)
    + "."
  )


def summary(records: list[dict]) -> list[str]:
  """One row per device and shape: the ratios the goals of issue 6 are stated in."""
  lines = [
    (
      "| device | shape | train fwd / flax | fwd+bwd / flax | fwd+bwd / torch channels_last"
      " | inference / copy | fwd+bwd in x-sized transfers at copy speed (fewest: 8) |"
    ),
    "|---|---|---|---|---|---|---|",
  ]
  for record in records:
    device = record["environment"]["device"].split(" (")[0]
    for shape_name, peers in record["groups"]["jax"].items():
      t = {p: r["times"] for p, r in peers.items()}
      torch_name = "torch-channels_last" if "torch-channels_last" in t else "torch"

      def ratio(peer, other, mode, t=t):
        return f"{_ratio(t[peer][mode], t[other][mode]):.2f}" if other in t else "n/a"

      copy_ms = _median_ms(t["copy"]["train_forward"])
      moved = 2 * _median_ms(t["bnjax"]["forward_backward"]) / copy_ms
      lines.append(
        f"| {device} | {shape_name} | {ratio('bnjax', 'flax', 'train_forward')} |"
        f" {ratio('bnjax', 'flax', 'forward_backward')} |"
        f" {ratio('bnjax', torch_name, 'forward_backward')} |"
        f" {_ratio(t['bnjax']['inference'], t['copy']['train_forward']):.2f} | {moved:.1f} |"
      )
  return lines


def goals(records: list[dict]) -> list[str]:
  """Issue 6's goals against the worst shape of each device, computed from the records."""
  lines = ["| device | goal | worst shape | measured | met |", "|---|---|---|---|---|"]
  checks = (
    ("train forward <= 1.0x flax default", "train_forward", "flax", 1.0),
    ("forward+backward <= 0.75x flax default", "forward_backward", "flax", 0.75),
    ("forward+backward <= torch channels_last (stretch)", "forward_backward", "torch", 1.0),
    ("inference within 10% of a copy", "inference", "copy", 1.1),
  )
  for record in records:
    device = record["environment"]["device"].split(" (")[0]
    for title, mode, other, limit in checks:
      worst = (0.0, "")
      for shape_name, peers in record["groups"]["jax"].items():
        t = {p: r["times"] for p, r in peers.items()}
        if other == "torch":
          other_name = "torch-channels_last" if "torch-channels_last" in t else "torch"
        else:
          other_name = other
        if other_name not in t:
          continue
        other_mode = "train_forward" if other == "copy" else mode
        ratio = _ratio(t["bnjax"][mode], t[other_name][other_mode])
        worst = max(worst, (ratio, shape_name))
      if worst[1]:
        lines.append(
          f"| {device} | {title} | {worst[1]} | {worst[0]:.2f}x |"
          f" {'yes' if worst[0] <= limit else 'no'} |"
        )
    if "(gpu)" in record["environment"]["device"]:
      lines += _bandwidth_goals(device, record["groups"]["jax"])
  return lines


def _bandwidth_goals(device: str, shapes: dict) -> list[str]:
  """The GPU goal of >= 80% of a copy's bandwidth, counting each mode's fewest bytes (TRAFFIC).

  The issue's own model (2|x| forward, 5|x| per step) assumes x stays on chip; with x larger
  than the L2 the floors are 3|x| and 8|x| (benchmarks/NOTES.md, G and K).
  """
  lines = []
  for mode in ("train_forward", "forward_backward"):
    worst = (np.inf, "")
    for shape_name, peers in shapes.items():
      # (TRAFFIC |x| / t_bnjax) / (2|x| / t_copy), per round like every other ratio
      ratio = _ratio(peers["bnjax"]["times"][mode], peers["copy"]["times"]["train_forward"])
      worst = min(worst, (TRAFFIC[mode] / 2 / ratio, shape_name))
    lines.append(
      f"| {device} | {MODE_TITLES[mode]} at >= 80% of a copy's bandwidth, moving"
      f" its floor of {TRAFFIC[mode]} x-sized transfers | {worst[1]} | {worst[0]:.0%} |"
      f" {'yes' if worst[0] >= 0.8 else 'no'} |"
    )
  return lines


def load_records(results_dir: Path = RESULTS_DIR) -> list[dict]:
  """This script's records in ``results_dir``: every JSON file but ``bench_models.py``'s
  ``models_*.json``, which live beside them."""
  paths = sorted(p for p in results_dir.glob("*.json") if not p.name.startswith("models_"))
  return [json.loads(p.read_text()) for p in paths]


def render(output: Path = DEFAULT_OUTPUT, results_dir: Path = RESULTS_DIR) -> str:
  records = load_records(results_dir)
  lines = [
    "# bnjax against its peers",
    "",
    "Written by `benchmarks/bench_batch_norm.py` from `benchmarks/results/*.json`; do not",
    "edit by hand. Times are medians in ms with the interquartile range; ratios are the",
    "median over rounds of per-round ratios, within one process. The README quotes the",
    "summary.",
    "",
    "## Summary",
    "",
    "<!-- summary:start -->",
    *summary(records),
    "<!-- summary:end -->",
    "",
    "## The goals of issue 6, at each device's worst shape",
    "",
    *goals(records),
    "",
    "Where a goal is not met, `benchmarks/NOTES.md` says what was tried, what each",
    "formulation measured against its prediction, and what would close the gap.",
    "",
  ]
  for record in records:
    lines += device_section(record)
  text = "\n".join(lines)
  output.write_text(text)
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (smoke test)")
  parser.add_argument("--render", action="store_true", help="only rewrite RESULTS.md")
  parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
  parser.add_argument("--json", type=Path, default=None, help="where this run's JSON goes")
  parser.add_argument("--group", choices=GROUPS, help=argparse.SUPPRESS)
  parser.add_argument("--shapes", help=argparse.SUPPRESS)
  parser.add_argument("--config", help=argparse.SUPPRESS)
  parser.add_argument(
    "--no-malloc-env", action="store_true", help="do not re-run with the tuned allocator settings"
  )
  args = parser.parse_args(argv)
  if args.render:
    print(render(args.output))
    return 0
  if args.group:  # a worker: one group, JSON on the last line of stdout
    config = Config(**json.loads(args.config))
    every = {s.name: s for s in SHAPES + GPU_SHAPES + QUICK_SHAPES}
    shapes = [every[n] for n in args.shapes.split(",")]
    print(json.dumps(run_group(args.group, shapes, config)))
    return 0
  import _common

  if not args.no_malloc_env and sys.platform.startswith("linux"):
    status = _common.rerun_with_malloc_env(__file__, argv)
    if status is not None:
      return status
  import jax

  notice = missing_peers_notice()
  if notice:
    print(notice, file=sys.stderr)
  on_gpu = jax.devices()[0].platform == "gpu"
  config = (
    Config(rounds=2, reps=2, warmup=0, quick=True)
    if args.quick
    else Config(batch=10 if on_gpu else 1)
  )
  shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if on_gpu else SHAPES)
  record = run_all(config, shapes, allocator_variants=not args.quick)
  device = jax.devices()[0].device_kind.replace(" ", "_")
  path = args.json or RESULTS_DIR / f"{'quick_' if args.quick else ''}{device}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(record))
  if args.quick:
    text = "\n".join(["## Summary", *summary([record]), "", *device_section(record)])
    args.output.write_text(text)
  else:
    text = render(args.output)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
