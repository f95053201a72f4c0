"""Renamed public names: the old ones still give the same objects, with a
DeprecationWarning naming the replacement; unknown names still raise AttributeError."""

import subprocess
import sys
import textwrap

import pytest

import repvgg_jax
import repvgg_jax.deploy
import repvgg_jax.layers.act_quant
import repvgg_jax.quant
from repvgg_jax.deploy.graph import model_description
from repvgg_jax.layers.oabn import bound
from repvgg_jax.quant.activation import ActQuant
from repvgg_jax.quant.cluster import quantize
from repvgg_jax.quant.packed import pack

from _util import subprocess_env


@pytest.mark.parametrize("module, old, new, obj", [
    (repvgg_jax, "export", "repvgg_jax.quant.packed.pack", pack),
    (repvgg_jax, "describe", "repvgg_jax.deploy.graph.model_description", model_description),
    (repvgg_jax, "quantize", "repvgg_jax.quant.cluster.quantize", quantize),
    (repvgg_jax, "bound", "repvgg_jax.layers.oabn.bound", bound),
    (repvgg_jax.quant, "export", "repvgg_jax.quant.packed.pack", pack),
    (repvgg_jax.deploy, "describe", "repvgg_jax.deploy.graph.model_description",
     model_description),
    (repvgg_jax.layers.act_quant, "ActQuant", "repvgg_jax.quant.activation.ActQuant",
     ActQuant),
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


def test_repvgg_jax_nn_is_layers_with_a_warning():
  # A fresh interpreter: the warning is given when the old package is first imported.
  code = textwrap.dedent("""
      import warnings
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from repvgg_jax.nn.oabn import OABN
        import repvgg_jax.nn
      import repvgg_jax.layers.oabn
      assert OABN is repvgg_jax.layers.oabn.OABN
      assert repvgg_jax.nn.conv is repvgg_jax.layers.conv
      print([str(w.message) for w in caught if w.category is DeprecationWarning])
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=subprocess_env(), check=True).stdout
  assert ("['repvgg_jax.nn is deprecated and goes in the next release: use "
          "repvgg_jax.layers']") in out


@pytest.mark.parametrize("name", ["plot_weight_histograms", "plot_channel_outliers"])
def test_the_plots_left_analysis_with_a_warning(name):
  import repvgg_jax.analysis
  import repvgg_jax.plots
  with pytest.warns(DeprecationWarning, match=rf"repvgg_jax.analysis.{name} is deprecated.*"
                                              rf"use repvgg_jax.plots.{name}"):
    assert getattr(repvgg_jax.analysis, name) is getattr(repvgg_jax.plots, name)


@pytest.mark.parametrize("name", ["weight_decay_mask", "learning_rate_schedule"])
def test_the_optimizer_left_train_state_with_a_warning(name):
  from repvgg_jax.train import optimizer, state
  with pytest.warns(DeprecationWarning, match=rf"repvgg_jax.train.state.{name} is deprecated"):
    assert getattr(state, name) is getattr(optimizer, name)
