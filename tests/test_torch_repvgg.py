"""benchmarks/torch_repvgg.py: the plain PyTorch RepVGG the speed benchmark can time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_repvgg  # noqa: E402

import repvgg_jax  # noqa: E402


@pytest.mark.parametrize("name", ["RepVGG-A0", "RepVGG-B1g4"])
def test_same_parameter_count_as_ours(name):
  model = repvgg_jax.create_model(name, num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  theirs = sum(p.numel() for p in torch_repvgg.RepVGG(name, 1000).parameters())
  assert theirs == ours


@pytest.mark.parametrize("name", ["RepVGG-A0", "RepVGG-B1g4"])
def test_reparameterize_keeps_the_output(name):
  torch.manual_seed(0)
  model = torch_repvgg.RepVGG(name, 10)
  for m in model.modules():  # Non-trivial BN statistics and affine params.
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.uniform_(-0.5, 0.5)
      m.running_var.uniform_(0.2, 2.0)
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.uniform_(-0.2, 0.2)
  model.eval()
  x = torch.randn(2, 3, 32, 32)
  with torch.no_grad():
    y = model(x)
    y_deploy = torch_repvgg.reparameterize(model)(x)
    assert all(b.fused is None for b in model.blocks)  # The train form is untouched.
  rel = float((y - y_deploy).abs().max() / y.abs().max())
  assert rel < 1e-4, rel


def test_unknown_or_se_variant_is_named():
  with pytest.raises(ValueError, match="RepVGG-Z9"):
    torch_repvgg.RepVGG("RepVGG-Z9")
  with pytest.raises(ValueError, match="D2se"):
    torch_repvgg.RepVGG("RepVGG-D2se")
