"""A plain PyTorch RepVGG (train and deploy form), for speed comparisons without timm.

timm imports torchvision, whose wheels are built for one torch build; this
module needs torch only, so any torch build (e.g. a CPU-only one) can be
timed. Same architecture as ``repvgg_jax.create_model`` (variant table,
grouped layers, symmetric padding, ReLU after each block, global average pool,
linear head); no SE, so D2se is not offered. The deploy form folds every
block's three branches into one 3x3 conv, as ``repvgg_jax.merge`` does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from repvgg_jax.models.repvgg import GROUPED_LAYERS, VARIANTS
from repvgg_jax.reparam import BN_EPSILON


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int) -> nn.Sequential:
  return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups,
                                 bias=False), nn.BatchNorm2d(cout, eps=BN_EPSILON))


def _fold(conv: nn.Conv2d | None, bn: nn.BatchNorm2d, shape: tuple, groups: int):
  """Kernel ``shape`` (OIHW, 3x3) and bias of ``bn(conv(x))``; ``conv=None`` is identity."""
  s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
  if conv is None:
    k = torch.zeros(shape)
    cin_g = shape[1]
    for c in range(shape[0]):
      k[c, c % cin_g, 1, 1] = 1.0
  else:
    k = conv.weight
    pad = (shape[-1] - k.shape[-1]) // 2
    k = nn.functional.pad(k, [pad] * 4)
  return k * s.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * s


class Block(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int, groups: int):
    super().__init__()
    self.groups = groups
    self.dense = _conv_bn(cin, cout, 3, stride, groups)
    self.one = _conv_bn(cin, cout, 1, stride, groups)
    self.identity = nn.BatchNorm2d(cin, eps=BN_EPSILON) if cin == cout and stride == 1 else None
    self.fused: nn.Conv2d | None = None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.fused is not None:
      return torch.relu(self.fused(x))
    y = self.dense(x) + self.one(x)
    if self.identity is not None:
      y = y + self.identity(x)
    return torch.relu(y)

  @torch.no_grad()
  def fuse(self) -> None:
    conv = self.dense[0]
    shape = tuple(conv.weight.shape)
    parts = [_fold(self.dense[0], self.dense[1], shape, self.groups),
             _fold(self.one[0], self.one[1], shape, self.groups)]
    if self.identity is not None:
      parts.append(_fold(None, self.identity, shape, self.groups))
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1,
                      groups=self.groups, bias=True)
    fused.weight.copy_(sum(k for k, _ in parts))
    fused.bias.copy_(sum(b for _, b in parts))
    self.fused = fused
    del self.dense, self.one
    self.identity = None


class RepVGG(nn.Module):
  def __init__(self, name: str, num_classes: int = 1000):
    super().__init__()
    if name not in VARIANTS:
      raise ValueError(f"unknown RepVGG variant {name!r}; valid names: {list(VARIANTS)}")
    v = VARIANTS[name]
    if v.se:
      raise ValueError(f"{name}: the plain PyTorch RepVGG has no SE blocks")
    cin = min(64, int(64 * v.widths[0]))
    blocks = [Block(3, cin, 2, 1)]
    layer = 1
    for i, (depth, width) in enumerate(zip(v.blocks, v.widths)):
      cout = int(64 * 2 ** i * width)
      for j in range(depth):
        groups = v.groups if layer in GROUPED_LAYERS else 1
        blocks.append(Block(cin, cout, 2 if j == 0 else 1, groups))
        cin, layer = cout, layer + 1
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.head(self.blocks(x).mean(dim=(2, 3)))


def reparameterize(model: RepVGG) -> RepVGG:
  """A deploy-form copy of ``model`` (eval-mode BN statistics folded in)."""
  deploy = copy.deepcopy(model)
  for block in deploy.blocks:
    block.fuse()
  return deploy
