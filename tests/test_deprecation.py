"""Renamed public names: the old ones still give the same objects, with a
DeprecationWarning naming the replacement; unknown names still raise AttributeError."""

import pytest

import repvgg_jax
import repvgg_jax.deploy
import repvgg_jax.quant
from repvgg_jax.deploy.runtime import model_description
from repvgg_jax.nn.oabn import bound
from repvgg_jax.quant.cluster import quantize
from repvgg_jax.quant.packed import pack


@pytest.mark.parametrize("module, old, new, obj", [
    (repvgg_jax, "export", "repvgg_jax.quant.packed.pack", pack),
    (repvgg_jax, "describe", "repvgg_jax.deploy.runtime.model_description", model_description),
    (repvgg_jax, "quantize", "repvgg_jax.quant.cluster.quantize", quantize),
    (repvgg_jax, "bound", "repvgg_jax.nn.oabn.bound", bound),
    (repvgg_jax.quant, "export", "repvgg_jax.quant.packed.pack", pack),
    (repvgg_jax.deploy, "describe", "repvgg_jax.deploy.runtime.model_description",
     model_description),
])
def test_an_old_name_warns_and_gives_the_new_object(module, old, new, obj):
  with pytest.warns(DeprecationWarning, match=rf"{module.__name__}\.{old} is deprecated.*"
                                              rf"use {new}"):
    assert getattr(module, old) is obj
  assert old not in module.__all__


def test_an_unknown_name_is_still_an_attribute_error():
  with pytest.raises(AttributeError, match="'repvgg_jax' has no attribute 'exprot'"):
    repvgg_jax.exprot  # noqa: B018
  assert repvgg_jax.pack is pack and repvgg_jax.model_description is model_description


def test_repvgg_blocks_is_layers_with_a_warning():
  from repvgg_jax.models.repvgg import RepVGG
  from _util import TINY_DEPLOY
  model = RepVGG(TINY_DEPLOY, deploy=True)
  with pytest.warns(DeprecationWarning, match=r"RepVGG.blocks\(\) is deprecated.*layers\(\)"):
    assert model.blocks() == model.layers()
  assert [b.name for b in model.layers()][:2] == ["stem", "stages_0_0"]
