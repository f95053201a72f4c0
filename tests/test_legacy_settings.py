"""Variables and checkpoints written before the settings had a collection of their own
(OABN bounds and QARepVGG identity gains inside batch_stats, tests/data/legacy_settings/,
written by the code of f620bb7) load with today's code and merge to the kernels that code
merged them to."""

import os
import shutil

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

import repvgg_jax as rv
from repvgg_jax.models.repvgg import RepVGG, Variant
from repvgg_jax.models.settings import check_settings, join_settings, split_settings
from repvgg_jax.reparam import SETTING_KEYS
from repvgg_jax.train.checkpoint import StageCheckpoints
from repvgg_jax.train.checkpoint import load_variables
from repvgg_jax.train.state import create_train_state, init_variables

from _util import ROOT

DATA = os.path.join(ROOT, "tests", "data", "legacy_settings")
NET = Variant((1, 2, 1, 1), (0.125, 0.125, 0.125, 0.125))  # as make.py built them
FORMS = {"oabn_branch": dict(norm="oabn", oabn_form="branch"),
         "oabn_median": dict(norm="oabn", oabn_form="median"),
         "qarepvgg": dict(block="qarepvgg")}


def _npz(name):
  with np.load(os.path.join(DATA, name)) as z:
    return traverse_util.unflatten_dict({tuple(k.split("/")): z[k] for k in z.files})


def _leaves(tree, keys):
  flat = traverse_util.flatten_dict(tree)
  return {k: v for k, v in flat.items() if k[-1] in keys}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_old_variables_merge_to_the_same_kernels(form):
  old = _npz(f"{form}_variables.npz")
  assert set(old) == {"params", "batch_stats"} and _leaves(old["batch_stats"], SETTING_KEYS)
  want = _npz(f"{form}_merged.npz")
  chex.assert_trees_all_close(rv.merge(old), want, rtol=1e-6, atol=1e-7)

  new = split_settings(old)
  assert not _leaves(new["batch_stats"], SETTING_KEYS)  # running statistics only
  assert set(_leaves(new["settings"], SETTING_KEYS)) == set(_leaves(old["batch_stats"],
                                                                     SETTING_KEYS))
  chex.assert_trees_all_close(rv.merge(new), want, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_equal(join_settings(new), old)
  model = RepVGG(NET, num_classes=10, **FORMS[form])
  check_settings(model, old)
  check_settings(model, new)
  # Today's model initialises the same layout.
  fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                            train=False))
  assert (jax.tree_util.tree_structure(fresh) ==
          jax.tree_util.tree_structure(jax.tree.map(jnp.asarray, new)))


def test_a_changed_setting_changes_the_merge():
  """The merge reads the settings it is given: the comparison above can fail."""
  new = split_settings(_npz("oabn_branch_variables.npz"))
  new["settings"] = jax.tree.map(lambda v: v * 0.5 if v.dtype == np.float32 else v,
                                 new["settings"])
  got = traverse_util.flatten_dict(rv.merge(new))
  want = traverse_util.flatten_dict(_npz("oabn_branch_merged.npz"))
  assert any(not np.allclose(got[k], want[k], rtol=1e-4) for k in want)


@pytest.mark.parametrize("form", ["oabn_branch", "bn"])  # bn: no settings at all then or now
def test_old_fp_checkpoint_resumes_and_initialises_qat(tmp_path, form):
  ckpt_dir = str(tmp_path / "fp")
  shutil.copytree(os.path.join(DATA, f"{form}_fp"), ckpt_dir)
  model = RepVGG(NET, num_classes=10, **FORMS.get(form, {}))
  stage = ml_collections.ConfigDict(dict(
      base_lr=0.1, batch_size=4, warmup_steps=0, num_steps=10, momentum=0.9,
      nesterov=False, weight_decay=1e-4, grad_clip_norm=0.0))
  template = init_variables(model, (32, 32, 3), 0)
  want = _npz(f"{form}_merged.npz")

  # A resume of the stage: the checkpoint is read into today's TrainState.
  ckpt = StageCheckpoints(ckpt_dir, keep=1, create=False)
  state, data_state, _ = ckpt.restore(create_train_state(model, template, stage))
  ckpt.close()
  assert data_state == {"epoch": 0}
  old = _npz(f"{form}_variables.npz")  # what make.py saved in that checkpoint
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.params), old["params"])
  assert not _leaves(state.batch_stats, SETTING_KEYS)
  assert bool(_leaves(state.settings, SETTING_KEYS)) == (form != "bn")
  chex.assert_trees_all_close(
      rv.merge({"params": state.params, "batch_stats": state.batch_stats,
                "settings": state.settings}), want, rtol=1e-6, atol=1e-7)

  # init_from: the QAT stage starts from it.
  variables = load_variables(ckpt_dir, template)
  check_settings(model, variables)
  chex.assert_trees_all_close(rv.merge(variables), want, rtol=1e-6, atol=1e-7)
  assert os.listdir(ckpt_dir) == ["3"]  # nothing moved aside as unreadable
