"""End-to-end model benchmarks: what a user's train step costs with bnjax, Flax and PyTorch.

ResNet-18 and ResNet-50 (the standard ImageNet architecture: 7x7/2 stem, 3x3/2 max pool, four
stages of basic or bottleneck blocks with projection shortcuts, global average pool, 1000
classes; this file's own Flax and PyTorch definitions) and an MLP (784 -> 3 x 1024 -> 10, each
hidden layer Dense -> BatchNorm -> relu). For each model, in one process, interleaved
(``_timing.interleaved``: rounds that visit every variant in a shuffled order, each visit one
untimed call, then the timed ones back to back, as in a training loop):

  train step   forward in training mode, softmax cross-entropy, ``jax.value_and_grad``, optax
               SGD with momentum 0.9, the new ``batch_stats``: one ``jax.jit`` program, with
               ``bnjax.linen.BatchNorm`` (default settings), ``flax.linen.BatchNorm`` with
               ``use_fast_variance=True`` (Flax's default) and ``False``; the same model and step
               in PyTorch (channels_last, ``torch.optim.SGD``), eager and under ``torch.compile``
               where it compiles on this machine.
  inference    the model in evaluation (running statistics): bnjax, Flax (default), bnjax with
               the batch norms folded into the convolutions (``bnjax.fold.fold``) and PyTorch.

Times are medians with the interquartile range over ``--rounds`` rounds of ``--reps`` calls; a
ratio is the median over rounds of the per-round ratio of medians. For the JAX programs it also
records the compile time and ``compiled.memory_analysis()`` (temporary, argument and output
bytes). Before timing, every variant's loss and new running statistics are checked against
bnjax's, the folded model's logits against the unfolded one's, and the parameter update with
bnjax and with Flax's two-pass batch norm against the same step in float64, leaf by leaf
relative to that leaf's update. That last check runs on the model's smooth twin (GELU and
average pooling in place of ReLU and max pooling): where a pre-activation sits within float32's
rounding of 0, or two pooled values within it of each other, the two precisions take different
branches, and one such element moves some leaves' updates by a fifth or more whichever batch
norm runs (``NOTES.md``, M).

On a GPU the ResNets take batch 128 of 224x224 (the MLP 1024), PyTorch runs on the GPU too
(cuDNN's autotuning on, as XLA autotunes; each timed call waits for its kernels), and the
float64 check steps the batch's first 16 examples. ``device_check.sh`` runs it there.

    python benchmarks/bench_models.py            # ~8 min on 2 CPU cores
    python benchmarks/bench_models.py --quick    # small inputs, 2 rounds, ~3 min: a smoke test
    python benchmarks/bench_models.py --render   # MODELS.md from results/models_*.json

Writes ``results/models_<device>.json`` and renders ``MODELS.md`` from every such file (CPU and
GPU side by side).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import _timing
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnjax.linen
from bnjax import fold

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
MODELS = ("resnet18", "resnet50", "mlp")
MOMENTUM, EPSILON, LEARNING_RATE = 0.9, 1e-5, 0.1


@dataclasses.dataclass(frozen=True)
class Config:
  batch: int = 8
  image_size: int = 128
  mlp_batch: int = 256
  rounds: int = 5
  reps: int = 3
  warmup: int = 1
  quick: bool = False
  torch_compile: bool = True
  float64_check: bool = True
  # Examples of the batch in the float64 check (None: all); its programs are not timed.
  float64_check_batch: int | None = None
  dtype: str = "float32"
  output: Path = HERE / "MODELS.md"


QUICK = Config(batch=8, image_size=64, mlp_batch=64, rounds=2, reps=1, warmup=0, quick=True)
GPU = Config(
  batch=128, image_size=224, mlp_batch=1024, rounds=7, reps=5, warmup=2, float64_check_batch=16
)


# --- Flax models ---------------------------------------------------------------------------------

# A norm factory, (name, train, dtype) -> a batch-norm module; None builds the folded model
# (convolutions and dense layers with a bias, no batch norm).
Norm = Callable[[str, bool, Any], nn.Module] | None


def bnjax_norm(name: str, train: bool, dtype) -> nn.Module:
  return bnjax.linen.BatchNorm(
    use_running_average=not train, momentum=MOMENTUM, epsilon=EPSILON, dtype=dtype, name=name
  )


def flax_norm(name: str, train: bool, dtype, *, fast: bool) -> nn.Module:
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=MOMENTUM,
    epsilon=EPSILON,
    use_fast_variance=fast,
    dtype=dtype,
    name=name,
  )


class ConvNorm(nn.Module):
  """conv -> batch norm (or, folded, conv with a bias), named ``conv{i}`` / ``bn{i}``."""

  features: int
  kernel: int
  stride: int
  index: str
  norm: Any
  dtype: Any

  @nn.compact
  def __call__(self, x, *, train: bool):
    pad = (self.kernel - 1) // 2
    x = nn.Conv(
      self.features,
      (self.kernel, self.kernel),
      (self.stride, self.stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=self.norm is None,
      dtype=self.dtype,
      name=f"conv{self.index}",
    )(x)
    return x if self.norm is None else self.norm(f"bn{self.index}", train, self.dtype)(x)


class Block(nn.Module):
  """The basic block (ResNet-18/34) or the bottleneck (ResNet-50 and deeper)."""

  width: int
  stride: int
  bottleneck: bool
  norm: Any
  dtype: Any
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x, *, train: bool):
    def unit(features, kernel, stride, index):
      module = ConvNorm(features, kernel, stride, index, self.norm, self.dtype, name=f"unit{index}")
      return lambda v: module(v, train=train)

    if self.bottleneck:
      out = self.width * 4
      y = self.activation(unit(self.width, 1, 1, "1")(x))
      y = self.activation(unit(self.width, 3, self.stride, "2")(y))
      y = unit(out, 1, 1, "3")(y)
    else:
      out = self.width
      y = self.activation(unit(self.width, 3, self.stride, "1")(x))
      y = unit(self.width, 3, 1, "2")(y)
    if self.stride != 1 or x.shape[-1] != out:
      x = unit(out, 1, self.stride, "_proj")(x)
    return self.activation(y + x)


class ResNet(nn.Module):
  """The standard ResNet; ``smooth``: GELU and average pooling (the float64 check's twin)."""

  stages: Sequence[int]
  bottleneck: bool
  norm: Any
  classes: int = 1000
  dtype: Any = jnp.float32
  smooth: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    activation = nn.gelu if self.smooth else nn.relu
    pool = nn.avg_pool if self.smooth else nn.max_pool
    x = ConvNorm(64, 7, 2, "", self.norm, self.dtype, name="stem")(x, train=train)
    x = pool(activation(x), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stages):
      for index in range(blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        block = Block(
          64 * 2**stage,
          stride,
          self.bottleneck,
          self.norm,
          self.dtype,
          activation,
          name=f"s{stage}b{index}",
        )
        x = block(x, train=train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


class MLP(nn.Module):
  """Dense -> batch norm -> ReLU (``smooth``: GELU), ``layers`` times, then the head."""

  norm: Any
  hidden: int = 1024
  layers: int = 3
  classes: int = 10
  dtype: Any = jnp.float32
  smooth: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = x.reshape(x.shape[0], -1)
    for i in range(self.layers):
      x = nn.Dense(self.hidden, use_bias=self.norm is None, dtype=self.dtype, name=f"dense{i}")(x)
      if self.norm is not None:
        x = self.norm(f"bn{i}", train, self.dtype)(x)
      x = nn.gelu(x) if self.smooth else nn.relu(x)
    return nn.Dense(self.classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


def flax_model(name: str, norm: Norm, dtype, *, smooth: bool = False) -> nn.Module:
  """The benchmark's model ``name``; ``smooth``: its twin without kinks, for the float64 check."""
  if name == "mlp":
    return MLP(norm=norm, dtype=dtype, smooth=smooth)
  stages, bottleneck = {"resnet18": ((2, 2, 2, 2), False), "resnet50": ((3, 4, 6, 3), True)}[name]
  return ResNet(stages, bottleneck, norm, dtype=dtype, smooth=smooth)


def fold_pairs(params: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple]:
  """Every (conv, bn) and (dense, bn) pair of this file's models, as paths for ``fold.fold``."""
  pairs = []
  for key, value in params.items():
    if not isinstance(value, dict):
      continue
    if key.startswith("bn"):
      layer = ("conv" if f"conv{key[2:]}" in params else "dense") + key[2:]
      pairs.append(("/".join((*prefix, layer)), "/".join((*prefix, key))))
    else:
      pairs.extend(fold_pairs(value, (*prefix, key)))
  return pairs


def input_shape(name: str, config: Config) -> tuple[int, ...]:
  if name == "mlp":
    return (config.mlp_batch, 28, 28, 1)
  return (config.batch, config.image_size, config.image_size, 3)


def classes(name: str) -> int:
  return 10 if name == "mlp" else 1000


def data(name: str, config: Config) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  x = rng.normal(size=input_shape(name, config)).astype(np.float32)
  y = rng.integers(0, classes(name), size=x.shape[0]).astype(np.int32)
  return x, y


# --- the JAX programs ------------------------------------------------------------------------


def jax_train_step(model: nn.Module, tx: optax.GradientTransformation):
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = model.apply(
        {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return step


def compiled(fn, *args) -> tuple[Any, dict[str, float]]:
  """``jax.jit(fn)`` compiled for ``args``, with its compile time and memory in bytes."""
  start = time.perf_counter()
  program = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - start
  memory = program.memory_analysis()
  stats = {"compile_s": seconds}
  for field in ("temp", "argument", "output", "generated_code"):
    value = getattr(memory, f"{field}_size_in_bytes", None) if memory is not None else None
    stats[f"{field}_bytes"] = float(value) if value is not None else float("nan")
  return program, stats


def jax_cases(name: str, config: Config) -> tuple[dict, dict, dict]:
  """``(train, inference, facts)``: callables per variant, and the checks and memory."""
  dtype = jnp.dtype(config.dtype)
  norms = {
    "bnjax": bnjax_norm,
    "flax": functools.partial(flax_norm, fast=True),
    "flax-exact": functools.partial(flax_norm, fast=False),
  }
  x_np, y_np = data(name, config)
  x, y = jnp.asarray(x_np, dtype), jnp.asarray(y_np)
  init_model = flax_model(name, norms["bnjax"], dtype)
  with jax.numpy_dtype_promotion("standard"):
    variables = init_model.init(jax.random.key(0), x[:2], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.sgd(LEARNING_RATE, momentum=0.9)
  opt_state = tx.init(params)
  train, inference, facts = {}, {}, {"memory": {}, "checks": {}}
  outputs = {}
  with jax.numpy_dtype_promotion("standard"):  # Flax relies on implicit promotion
    for variant, norm in norms.items():
      model = flax_model(name, norm, dtype)
      args = (params, batch_stats, opt_state, x, y)
      program, memory = compiled(jax_train_step(model, tx), *args)
      facts["memory"][f"train/{variant}"] = memory
      train[variant] = functools.partial(program, *args)
      outputs[variant] = jax.block_until_ready(program(*args))

      def predict(params, batch_stats, x, model=model):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

      if variant != "flax-exact":
        program, memory = compiled(predict, params, batch_stats, x)
        facts["memory"][f"inference/{variant}"] = memory
        inference[variant] = functools.partial(program, params, batch_stats, x)
    # bnjax with the batch norms folded into the convolutions.
    folded = fold.fold(variables, fold_pairs(params))
    folded_model = flax_model(name, None, dtype)

    def predict_folded(params, x):
      return folded_model.apply({"params": params}, x, train=False)

    program, memory = compiled(predict_folded, folded["params"], x)
    facts["memory"]["inference/bnjax-folded"] = memory
    inference["bnjax-folded"] = functools.partial(program, folded["params"], x)
    facts["checks"] = check_outputs(outputs, inference)
    if config.float64_check:
      accurate = {variant: norms[variant] for variant in ("bnjax", "flax-exact")}
      n = config.float64_check_batch or len(x_np)
      try:
        errors = update_errors(name, accurate, params, batch_stats, x_np[:n], y[:n], tx, dtype)
        facts["checks"].update(errors)
      except Exception as error:  # a backend without float64 convolutions, say
        facts["check_failures"] = {"update vs float64": f"failed: {type(error).__name__}: {error}"}
  return train, inference, facts


def _relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def _update_error(after, reference_after, before) -> float:
  """Largest difference of the new params to a reference's, relative to the largest update.

  Per leaf, relative to that leaf's own largest update (new - old, from the reference): a
  bias whose gradient nearly cancels is compared with its update, not with itself.
  """
  worst = 0.0
  leaves = zip(jax.tree.leaves(after), jax.tree.leaves(reference_after), jax.tree.leaves(before))
  for new, ref, old in leaves:
    new, ref, old = (np.asarray(v, np.float64) for v in (new, ref, old))
    update = float(np.max(np.abs(ref - old)))
    worst = max(worst, float(np.max(np.abs(new - ref))) / max(update, 1e-30))
  return worst


def update_errors(name: str, norms: dict, params, batch_stats, x, y, tx, dtype) -> dict:
  """Each of ``norms``' SGD step on the smooth twin of model ``name``, against the same step
  in float64 with Flax's two-pass batch norm: ``_update_error`` of the new parameters.

  On the smooth twin both precisions take the same path through the network, so what differs
  is how accurately each batch norm (and the rest of float32) computes it.
  """
  with jax.enable_x64(True):
    wide = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), (params, batch_stats))
    model = flax_model(
      name, lambda n, t, d: flax_norm(n, t, jnp.float64, fast=False), jnp.float64, smooth=True
    )
    args = (*wide, tx.init(wide[0]), jnp.asarray(x, jnp.float64), y)
    reference = jax.tree.map(np.asarray, jax.jit(jax_train_step(model, tx))(*args)[0])
  errors = {}
  for variant, norm in norms.items():
    step = jax_train_step(flax_model(name, norm, dtype, smooth=True), tx)
    new = jax.jit(step)(params, batch_stats, tx.init(params), jnp.asarray(x, dtype), y)[0]
    errors[f"{variant}: update vs float64"] = _update_error(new, reference, params)
  return errors


def check_outputs(outputs: dict, inference: dict) -> dict[str, float]:
  """Largest relative differences to bnjax: loss, running statistics, inference logits."""
  reference = outputs["bnjax"]
  checks = {}
  for variant in ("flax-exact", "flax"):
    _, stats, _, loss = outputs[variant]
    checks[f"{variant}: loss"] = _relative(loss, reference[3])
    checks[f"{variant}: running statistics"] = max(
      _relative(a, b) for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(reference[1]))
    )
  logits = np.asarray(inference["bnjax"]())
  checks["flax: inference logits"] = _relative(inference["flax"](), logits)
  checks["bnjax-folded: inference logits"] = _relative(inference["bnjax-folded"](), logits)
  return checks


# --- PyTorch ------------------------------------------------------------------------------------


def torch_model(name: str):
  import torch
  from torch import nn as tnn

  class TorchConvNorm(tnn.Sequential):
    def __init__(self, cin, cout, kernel, stride):
      super().__init__(
        tnn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, bias=False),
        tnn.BatchNorm2d(cout, momentum=1 - MOMENTUM, eps=EPSILON),
      )

  class TorchBlock(tnn.Module):
    def __init__(self, cin, width, stride, bottleneck):
      super().__init__()
      out = width * 4 if bottleneck else width
      if bottleneck:
        self.body = tnn.Sequential(
          TorchConvNorm(cin, width, 1, 1),
          tnn.ReLU(),
          TorchConvNorm(width, width, 3, stride),
          tnn.ReLU(),
          TorchConvNorm(width, out, 1, 1),
        )
      else:
        self.body = tnn.Sequential(
          TorchConvNorm(cin, width, 3, stride), tnn.ReLU(), TorchConvNorm(width, width, 3, 1)
        )
      self.proj = TorchConvNorm(cin, out, 1, stride) if stride != 1 or cin != out else None

    def forward(self, x):
      shortcut = x if self.proj is None else self.proj(x)
      return torch.relu(self.body(x) + shortcut)

  if name == "mlp":
    layers, width = [tnn.Flatten()], 784
    for _ in range(3):
      layers += [
        tnn.Linear(width, 1024, bias=False),
        tnn.BatchNorm1d(1024, momentum=1 - MOMENTUM, eps=EPSILON),
        tnn.ReLU(),
      ]
      width = 1024
    return tnn.Sequential(*layers, tnn.Linear(width, 10))
  stages, bottleneck = {"resnet18": ((2, 2, 2, 2), False), "resnet50": ((3, 4, 6, 3), True)}[name]
  layers = [TorchConvNorm(3, 64, 7, 2), tnn.ReLU(), tnn.MaxPool2d(3, 2, 1)]
  cin = 64
  for stage, blocks in enumerate(stages):
    for index in range(blocks):
      width = 64 * 2**stage
      layers.append(TorchBlock(cin, width, 2 if stage > 0 and index == 0 else 1, bottleneck))
      cin = width * 4 if bottleneck else width
  return tnn.Sequential(*layers, tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, 1000))


def torch_device() -> str:
  """Where PyTorch runs: on the GPU when JAX runs on one (and PyTorch sees it), else the CPU."""
  import torch

  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_cases(name: str, config: Config) -> tuple[dict, dict, dict]:
  import torch

  torch.manual_seed(0)
  device = torch_device()
  # cuDNN picks its fastest convolution per shape, as XLA's autotuner does for JAX.
  torch.backends.cudnn.benchmark = True
  # On a GPU the step is queued asynchronously: each timed call waits for its kernels.
  finish = torch.cuda.synchronize if device == "cuda" else lambda: None
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
  x_np, y_np = data(name, config)
  x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device, dtype)  # NCHW, as torch
  y = torch.from_numpy(y_np).long().to(device)
  memory_format = torch.contiguous_format if name == "mlp" else torch.channels_last
  x = x.contiguous(memory_format=memory_format)
  train, inference, facts = {}, {}, {"compile": {}}
  variants = [("torch", False)] + ([("torch.compile", True)] if config.torch_compile else [])
  for variant, compile_it in variants:
    model = torch_model(name).to(device, dtype, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    forward = model
    if compile_it:
      forward = torch.compile(model)

    def step(model=model, forward=forward, optimizer=optimizer):
      model.train()
      loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      finish()
      return loss.detach()

    def predict(model=model, forward=forward):
      model.eval()
      with torch.no_grad():
        logits = forward(x)
      finish()
      return logits

    try:
      start = time.perf_counter()
      step()
      predict()
      facts["compile"][variant] = time.perf_counter() - start
    except Exception as error:  # torch.compile needs a working C++ toolchain on CPU
      facts["compile"][variant] = f"failed: {type(error).__name__}: {str(error)[:200]}"
      continue
    train[variant], inference[variant] = step, predict
  return train, inference, facts


# --- timing ------------------------------------------------------------------------------------


def _wait(value):
  if hasattr(value, "block_until_ready") or isinstance(value, (tuple, list, dict)):
    jax.block_until_ready(value)
  return value


def interleaved(cases: dict[str, Callable[[], Any]], config: Config, progress) -> dict:
  """``{case: (rounds, reps) seconds}`` by ``_timing.interleaved``, as nested lists for JSON."""
  times = _timing.interleaved(
    {name: (lambda call=call: _wait(call())) for name, call in cases.items()},
    rounds=config.rounds,
    reps=config.reps,
    warmup=config.warmup,
    on_round=progress,
  )
  return {name: t.tolist() for name, t in times.items()}


def run_model(name: str, config: Config, progress) -> dict:
  train, inference, facts = jax_cases(name, config)
  try:
    torch_train, torch_inference, torch_facts = torch_cases(name, config)
  except ImportError:
    torch_train, torch_inference, torch_facts = {}, {}, {"compile": {"torch": "not installed"}}
  return {
    "input": list(input_shape(name, config)),
    "check_failures": facts.get("check_failures", {}),
    "train": interleaved({**train, **torch_train}, config, progress),
    "inference": interleaved({**inference, **torch_inference}, config, progress),
    "memory": facts["memory"],
    "checks": facts["checks"],
    "torch_compile": torch_facts["compile"],
  }


def environment(config: Config) -> dict[str, str]:
  versions = []
  for package in ("flax", "optax", "torch"):
    try:
      versions.append(f"{package} {importlib.metadata.version(package)}")
    except importlib.metadata.PackageNotFoundError:
      versions.append(f"{package} (not installed)")
  env = _common.environment(
    config,
    **{
      "malloc env": _common.malloc_env_row(),
      "peers": ", ".join(versions),
      "sizes": (
        f"ResNets: batch {config.batch} at {config.image_size}x{config.image_size}x3;"
        f" MLP: batch {config.mlp_batch} of 28x28; {config.dtype}"
      ),
      "float64 check": (
        "off"
        if not config.float64_check
        else f"on the first {config.float64_check_batch} examples"
        if config.float64_check_batch
        else "on the whole batch"
      ),
    },
  )
  if importlib.util.find_spec("torch") is not None:
    import torch

    env["torch threads"] = str(torch.get_num_threads())
    env["torch device"] = torch_device()
  return env


# --- the report --------------------------------------------------------------------------------


def _median_ratio(num, den) -> float:
  num, den = np.asarray(num), np.asarray(den)
  return float(np.median(np.median(num, axis=1) / np.median(den, axis=1)))


def _ratio(times: dict, a: str, b: str) -> str:
  if a not in times or b not in times:
    return "n/a"
  return _common.format_ratio(np.asarray(times[a]), np.asarray(times[b]))


def _ms(times: dict, case: str) -> str:
  return _common.format_ms(np.asarray(times[case]).ravel()) if case in times else "n/a"


def _mb(memory: dict, key: str, field: str) -> str:
  value = memory.get(key, {}).get(f"{field}_bytes", float("nan"))
  return "n/a" if not np.isfinite(value) else f"{value / 2**20:.1f}"


def _device(record: dict) -> str:
  return record["environment"]["device"].split(" (")[0]


GOALS = (
  # (description, device kind, model, measure, bound)
  ("ResNet-50 train step <= 1.0x Flax's default (CPU)", "cpu", "resnet50", "step/flax", 1.0),
  ("ResNet-50 train step <= 0.97x Flax's default (GPU)", "gpu", "resnet50", "step/flax", 0.97),
  ("ResNet-50 compiled temp memory <= 0.65x Flax's", "any", "resnet50", "temp/flax", 0.65),
  ("ResNet-50 train step <= PyTorch channels_last (CPU)", "cpu", "resnet50", "step/torch", 1.0),
)


def measures(model: dict) -> dict[str, float]:
  t, memory = model["train"], model["memory"]
  found = {"step/flax": _median_ratio(t["bnjax"], t["flax"])}
  if "torch" in t:
    found["step/torch"] = _median_ratio(t["bnjax"], t["torch"])
  temp = memory["train/bnjax"]["temp_bytes"], memory["train/flax"]["temp_bytes"]
  if all(np.isfinite(temp)) and temp[1] > 0:
    found["temp/flax"] = temp[0] / temp[1]
  return found


def goal_rows(records: list[dict]) -> list[str]:
  lines = ["| goal | device | measured | met |", "|---|---|---|---|"]
  for description, kind, model, measure, bound in GOALS:
    for record in records:
      is_gpu = "(gpu)" in record["environment"]["device"]
      if kind != "any" and (kind == "gpu") != is_gpu:
        continue
      value = measures(record["models"][model]).get(measure)
      if value is None:
        lines.append(f"| {description} | {_device(record)} | n/a | n/a |")
        continue
      met = "yes" if value <= bound else "**no** (NOTES.md, M)"
      lines.append(f"| {description} | {_device(record)} | {value:.2f}x | {met} |")
  return lines


def summary(records: list[dict]) -> list[str]:
  lines = [
    (
      "| device | model | train step / Flax default | / Flax exact | / PyTorch channels_last"
      " | / torch.compile | temp memory / Flax | folded inference / unfolded |"
    ),
    "|---|---|---|---|---|---|---|---|",
  ]
  for record in records:
    for name, model in record["models"].items():
      t, i, memory = model["train"], model["inference"], model["memory"]
      temp = [memory[f"train/{v}"]["temp_bytes"] for v in ("bnjax", "flax")]
      temp_ratio = f"{temp[0] / temp[1]:.2f}" if all(np.isfinite(temp)) and temp[1] else "n/a"
      lines.append(
        f"| {_device(record)} | {name} | {_ratio(t, 'bnjax', 'flax')} |"
        f" {_ratio(t, 'bnjax', 'flax-exact')} | {_ratio(t, 'bnjax', 'torch')} |"
        f" {_ratio(t, 'bnjax', 'torch.compile')} | {temp_ratio} |"
        f" {_ratio(i, 'bnjax-folded', 'bnjax')} |"
      )
  return lines


def device_section(record: dict) -> list[str]:
  lines = [f"## {_device(record)}", ""]
  for name, model in record["models"].items():
    t, i, memory = model["train"], model["inference"], model["memory"]
    lines += [
      f"### {name}, input {tuple(model['input'])}",
      "",
      "| variant | train step ms | inference ms | compile s (train) | temp MB | args MB | out MB |",
      "|---|---|---|---|---|---|---|",
    ]
    for variant in dict.fromkeys([*t, *i]):
      key = f"train/{variant}" if f"train/{variant}" in memory else f"inference/{variant}"
      compile_s = memory.get(f"train/{variant}", {}).get("compile_s")
      if compile_s is None:
        torch_compile = model["torch_compile"].get(variant)
        compile_s = torch_compile if isinstance(torch_compile, float) else None
      lines.append(
        f"| {variant} | {_ms(t, variant)} | {_ms(i, variant)} |"
        f" {'n/a' if compile_s is None else f'{compile_s:.1f}'} | {_mb(memory, key, 'temp')} |"
        f" {_mb(memory, key, 'argument')} | {_mb(memory, key, 'output')} |"
      )
    failed = {k: v for k, v in model["torch_compile"].items() if isinstance(v, str)}
    failed |= {k: v[:300] for k, v in model.get("check_failures", {}).items()}
    lines += ["", "Checks against bnjax (largest difference relative to the largest value):", ""]
    lines += [f"- {k}: {v:.1e}" for k, v in model["checks"].items()]
    lines += [f"- {k}: {v}" for k, v in failed.items()]
    lines.append("")
  lines += _common.environment_section(record["environment"])
  return lines


def render(output: Path) -> str:
  records = [json.loads(p.read_text()) for p in sorted(RESULTS_DIR.glob("models_*.json"))]
  records = [r for r in records if "quick=True" not in r["environment"]["settings"]]
  text = "\n".join(
    [
      "# Model benchmarks",
      "",
      "Written by `python benchmarks/bench_models.py` (see its docstring for the method);",
      "bnjax's time over each peer's, median [25th, 75th percentile] over rounds. Below 1: bnjax",
      "is faster. Temp memory: XLA's temporary buffers of the compiled train step.",
      "",
      "## Summary",
      "",
      "<!-- models:start -->",
      *summary(records),
      "<!-- models:end -->",
      "",
      "## Goals (issue 15)",
      "",
      *goal_rows(records),
      "",
      *[line for record in records for line in device_section(record)],
    ]
  )
  output.write_text(text)
  return text


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny inputs, 2 rounds (smoke test)")
  parser.add_argument("--render", action="store_true", help="only rewrite MODELS.md from JSON")
  parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of %(default)s")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument(
    "--no-torch-compile",
    dest="torch_compile",
    action="store_false",
    help="skip the torch.compile variant (its compile takes minutes on a CPU)",
  )
  parser.add_argument(
    "--no-float64-check",
    dest="float64_check",
    action="store_false",
    help="skip the SGD update's check against float64 (three more compiles per model)",
  )
  parser.add_argument("--rounds", type=int, default=None, help="rounds over the cases")
  parser.add_argument("--reps", type=int, default=None, help="timed calls per case per round")
  parser.add_argument("--output", type=Path, default=Config.output, help="the markdown report")
  parser.add_argument("--json", type=Path, default=None, help="where to write the JSON record")
  parser.add_argument(
    "--no-malloc-env", action="store_true", help="do not re-run with the tuned allocator settings"
  )
  parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress")
  args = parser.parse_args(argv)
  if args.render:
    print(render(args.output))
    return 0
  models = [m for m in args.models.split(",") if m]
  unknown = sorted(set(models) - set(MODELS))
  if unknown:
    parser.error(f"unknown models {unknown}; choose from {MODELS}")
  if not args.no_malloc_env and sys.platform.startswith("linux"):
    status = _common.rerun_with_malloc_env(__file__, argv)
    if status is not None:
      return status
  on_gpu = jax.devices()[0].platform == "gpu"
  config = QUICK if args.quick else (GPU if on_gpu else Config())
  config = dataclasses.replace(
    config,
    dtype=args.dtype,
    torch_compile=args.torch_compile and not args.quick,
    float64_check=args.float64_check,
    rounds=args.rounds or config.rounds,
    reps=args.reps or config.reps,
  )
  bar = None
  if args.progress and sys.stderr.isatty():
    from tqdm.auto import tqdm

    bar = tqdm(total=2 * config.rounds * len(models), desc="bench_models")
  record = {"environment": environment(config), "models": {}}
  for name in models:
    record["models"][name] = run_model(name, config, (bar.update if bar else lambda n=1: None))
  if bar:
    bar.close()
  device = jax.devices()[0].device_kind.replace(" ", "_")
  suffix = f"{'quick_' if args.quick else ''}{device}_{config.dtype}"
  path = args.json or RESULTS_DIR / f"models_{suffix}.json"
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
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.exit(main())
