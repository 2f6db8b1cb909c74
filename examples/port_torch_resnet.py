"""Port a PyTorch ResNet to Flax with bnjax and back, and check that the logits agree.

    python examples/port_torch_resnet.py
    python examples/port_torch_resnet.py --batch-size 4 --image-size 16 --warmup-steps 1

A small ResNet (a stem, two stages of two basic blocks, the second stage with a strided
projection shortcut, global average pooling, a linear head) is built twice: in PyTorch (NCHW)
and in Flax Linen (NHWC) with ``bnjax.linen.BatchNorm``. The PyTorch model trains a few steps
first, so that its running statistics and ``num_batches_tracked`` are not the initial ones.

1. PyTorch -> Flax: ``bnjax.interop.from_torch_model`` brings every BatchNorm over (scale,
   bias, running mean and variance, the count) at the Flax path its default mapping gives
   (``layer2.0.downsample.1`` -> ``layer2_0/downsample_1``), with each layer's convention
   (momentum 0.1 is 0.9 here, the unbiased running variance); the convolution and linear
   weights are transposed to Flax's layout by this script. Then the Flax model must give
   torch's logits in evaluation, and in training mode both the logits and the new running
   statistics of one forward pass.
2. Flax -> PyTorch: a few training-mode steps in JAX move the running statistics further;
   ``bnjax.interop.to_torch_state_dict`` writes them back into the torch model, whose
   evaluation logits must then match the Flax model's.

Prints the largest differences, relative to the largest logit (or statistic).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import torch

from bnjax import conventions
from bnjax.interop import from_torch_model, to_torch_state_dict
from bnjax.interop.torch import default_flax_path
from bnjax.linen import BatchNorm


@dataclasses.dataclass(frozen=True)
class Config:
  batch_size: int = 8
  image_size: int = 32
  widths: tuple[int, int] = (16, 32)
  classes: int = 10
  warmup_steps: int = 3  # torch training steps before porting
  jax_steps: int = 2  # training-mode forward passes in JAX before porting back
  seed: int = 0


# --- PyTorch -------------------------------------------------------------------------------


class TorchBlock(torch.nn.Module):
  """ResNet's basic block: two 3x3 convolutions with BatchNorm, a projection when needed."""

  def __init__(self, in_channels: int, out_channels: int, stride: int):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(out_channels)
    self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(out_channels)
    self.downsample = None
    if stride != 1 or in_channels != out_channels:
      self.downsample = torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
        torch.nn.BatchNorm2d(out_channels),
      )

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return torch.relu(y + shortcut)


class TorchResNet(torch.nn.Module):
  def __init__(self, config: Config):
    super().__init__()
    first, second = config.widths
    self.conv1 = torch.nn.Conv2d(3, first, 3, 1, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(first)
    self.layer1 = torch.nn.Sequential(TorchBlock(first, first, 1), TorchBlock(first, first, 1))
    self.layer2 = torch.nn.Sequential(TorchBlock(first, second, 2), TorchBlock(second, second, 1))
    self.fc = torch.nn.Linear(second, config.classes)

  def forward(self, x):
    x = torch.relu(self.bn1(self.conv1(x)))
    x = self.layer2(self.layer1(x))
    return self.fc(x.mean(dim=(2, 3)))


# --- Flax, the same architecture, NHWC ---------------------------------------------------------


class Block(nn.Module):
  out_channels: int
  stride: int
  convention: conventions.Convention

  @nn.compact
  def __call__(self, x, *, train: bool):
    def conv(features, kernel, stride, name):
      pad = (kernel - 1) // 2
      return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        name=name,
      )

    def norm(name):
      return BatchNorm(use_running_average=not train, convention=self.convention, name=name)

    y = nn.relu(norm("bn1")(conv(self.out_channels, 3, self.stride, "conv1")(x)))
    y = norm("bn2")(conv(self.out_channels, 3, 1, "conv2")(y))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.out_channels:
      shortcut = norm("downsample_1")(conv(self.out_channels, 1, self.stride, "downsample_0")(x))
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  config: Config
  convention: conventions.Convention

  @nn.compact
  def __call__(self, x, *, train: bool):
    first, second = self.config.widths
    x = nn.Conv(first, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv1")(x)
    x = BatchNorm(use_running_average=not train, convention=self.convention, name="bn1")(x)
    x = nn.relu(x)
    for stage, (width, stride) in enumerate(((first, 1), (second, 2)), start=1):
      for index in range(2):
        block = Block(
          width, stride if index == 0 else 1, self.convention, name=f"layer{stage}_{index}"
        )
        x = block(x, train=train)
    return nn.Dense(self.config.classes, name="fc")(x.mean(axis=(1, 2)))


# --- the port ------------------------------------------------------------------------------------


def _numpy(tensor: torch.Tensor) -> np.ndarray:
  return tensor.detach().cpu().numpy()


def port_weights(model: torch.nn.Module, params: dict[str, Any]) -> None:
  """The convolution and linear weights, in Flax's layouts, into ``params`` (by default paths)."""
  for path, module in model.named_modules():
    if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
      continue
    scope = params
    for key in default_flax_path(path).split("/"):
      scope = scope.setdefault(key, {})
    if isinstance(module, torch.nn.Conv2d):  # (out, in, kh, kw) -> (kh, kw, in, out)
      scope["kernel"] = jnp.asarray(_numpy(module.weight).transpose(2, 3, 1, 0))
    else:  # Linear: (out, in) -> (in, out)
      scope["kernel"] = jnp.asarray(_numpy(module.weight).T)
      scope["bias"] = jnp.asarray(_numpy(module.bias))


def _relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _largest_stat_difference(flax_stats, torch_model: torch.nn.Module) -> float:
  """Largest relative difference of every running mean and variance to torch's; the counts
  (``num_batches_tracked``) must be equal."""
  worst = 0.0
  for path, module in torch_model.named_modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      stats = flax_stats
      for key in default_flax_path(path).split("/"):
        stats = stats[key]
      worst = max(
        worst,
        _relative(stats["mean"], _numpy(module.running_mean)),
        _relative(stats["var"], _numpy(module.running_var)),
      )
      if int(stats["count"]) != int(module.num_batches_tracked):
        raise SystemExit(
          f"{path}: count {int(stats['count'])} != num_batches_tracked"
          f" {int(module.num_batches_tracked)}"
        )
  return worst


def run(config: Config) -> dict[str, float]:
  torch.manual_seed(config.seed)
  rng = np.random.default_rng(config.seed)
  shape = (config.batch_size, 3, config.image_size, config.image_size)

  def batch() -> np.ndarray:
    return (rng.normal(size=shape) * 2.0 + 0.5).astype(np.float32)

  torch_model = TorchResNet(config)
  optimizer = torch.optim.SGD(torch_model.parameters(), lr=0.05, momentum=0.9)
  torch_model.train()
  for _ in range(config.warmup_steps):
    loss = torch_model(torch.from_numpy(batch())).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  # 1. PyTorch -> Flax.
  ported = from_torch_model(torch_model)
  layer_conventions = set(ported.conventions.values())
  if len(layer_conventions) != 1:
    raise SystemExit(f"expected one convention for every BatchNorm, got {layer_conventions}")
  convention = layer_conventions.pop().replace(axis=-1)  # torch's channels: axis 1 of NCHW
  variables = {"params": ported.variables["params"], "batch_stats": ported.variables["batch_stats"]}
  port_weights(torch_model, variables["params"])
  flax_model = ResNet(config, convention)

  def flax_forward(variables, x_nchw, *, train):
    x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
    if train:
      return flax_model.apply(variables, x, train=True, mutable=["batch_stats"])
    return flax_model.apply(variables, x, train=False), None

  x = batch()
  torch_model.eval()
  with torch.no_grad():
    eval_logits = _numpy(torch_model(torch.from_numpy(x)))
  flax_eval, _ = flax_forward(variables, x, train=False)
  results = {"torch_to_flax_eval_logits": _relative(flax_eval, eval_logits)}

  torch_model.train()
  with torch.no_grad():
    train_logits = _numpy(torch_model(torch.from_numpy(x)))  # updates torch's running stats
  flax_train, updates = flax_forward(variables, x, train=True)
  results["torch_to_flax_train_logits"] = _relative(flax_train, train_logits)
  results["torch_to_flax_running_stats"] = _largest_stat_difference(
    updates["batch_stats"], torch_model
  )
  variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}

  # 2. Flax -> PyTorch: JAX moves the statistics, torch receives them.
  for _ in range(config.jax_steps):
    _, updates = flax_forward(variables, batch(), train=True)
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  state = to_torch_state_dict(variables, torch_model)
  unexpected = torch_model.load_state_dict(state, strict=False).unexpected_keys
  if unexpected:
    raise SystemExit(f"state dict entries the model does not have: {unexpected}")
  results["flax_to_torch_running_stats"] = _largest_stat_difference(
    variables["batch_stats"], torch_model
  )
  x = batch()
  torch_model.eval()
  with torch.no_grad():
    eval_logits = _numpy(torch_model(torch.from_numpy(x)))
  flax_eval, _ = flax_forward(variables, x, train=False)
  results["flax_to_torch_eval_logits"] = _relative(flax_eval, eval_logits)
  return results


def main(argv: list[str] | None = None) -> dict[str, float]:
  defaults = Config()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--batch-size",
    type=int,
    default=defaults.batch_size,
    help="images per batch (default: %(default)s)",
  )
  parser.add_argument(
    "--image-size",
    type=int,
    default=defaults.image_size,
    help="height and width of the random images (default: %(default)s)",
  )
  parser.add_argument(
    "--warmup-steps",
    type=int,
    default=defaults.warmup_steps,
    help="torch SGD steps before porting, so the running statistics are not the initial ones"
    " (default: %(default)s)",
  )
  parser.add_argument(
    "--jax-steps",
    type=int,
    default=defaults.jax_steps,
    help="training-mode passes in JAX before porting back (default: %(default)s)",
  )
  parser.add_argument("--seed", type=int, default=defaults.seed, help="seed (default: %(default)s)")
  args = parser.parse_args(argv)
  if min(args.batch_size, args.image_size) < 2 or min(args.warmup_steps, args.jax_steps) < 0:
    parser.error("--batch-size and --image-size must be >= 2, the step counts >= 0")
  config = dataclasses.replace(
    defaults,
    batch_size=args.batch_size,
    image_size=args.image_size,
    warmup_steps=args.warmup_steps,
    jax_steps=args.jax_steps,
    seed=args.seed,
  )
  results = run(config)
  print("largest difference, relative to the largest value (float32 logits and statistics):")
  for name, value in results.items():
    print(f"  {name:30s} {value:.2e}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
