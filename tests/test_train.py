"""Trainer: config validation, optimizer recipe, resume, checkpoints under kill, NaN guard."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from repvgg_jax import data
from repvgg_jax.train import config as config_lib
from repvgg_jax.train import sharding, steps
from repvgg_jax.train.checkpoint import StageCheckpoints
from repvgg_jax.train.loop import NonFiniteLoss, train_stage
from repvgg_jax.train.state import (build_model, create_train_state, init_variables,
                                    learning_rate_schedule, make_optimizer,
                                    weight_decay_mask)
from repvgg_jax.train.writers import MetricWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
sys.path.insert(0, ROOT)
from configs import tiny  # noqa: E402


def _parse(monkeypatch, *overrides):
  # config_flags finds the override flags in sys.argv, as launch/main.py sees them.
  argv = ["main.py", f"--config={TINY}", *overrides]
  monkeypatch.setattr(sys, "argv", argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True)
  fv(argv)
  return fv.config


def test_command_line_sets_quant_bits(monkeypatch):
  assert _parse(monkeypatch, "--config.quant.bits=3").quant.bits == 3


def test_command_line_rejects_unknown_field(monkeypatch):
  with pytest.raises(Exception, match="bitz"):
    _parse(monkeypatch, "--config.quant.bitz=3")


def test_validate_names_every_invalid_field():
  cfg = tiny.tiny_config()
  cfg.quant.method = "kmeans"
  cfg.fp.num_steps = 0
  cfg.model.norm = "ln"
  with pytest.raises(ValueError) as e:
    config_lib.validate(cfg)
  for name in ("quant.method", "fp.num_steps", "model.norm"):
    assert name in str(e.value)


def test_command_line_overrides_blocks_and_widths(monkeypatch):
  cfg = _parse(monkeypatch, "--config.model.blocks=(1,2,3,1)",
               "--config.model.widths=(0.5,0.5,1,1)")
  config_lib.validate(cfg)
  model = build_model(cfg.model, 10, deploy=False)
  assert model.variant.blocks == (1, 2, 3, 1)
  assert model.variant.widths == (0.5, 0.5, 1, 1)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  stages = {k for k in variables["params"] if k.startswith("stages_")}
  assert stages == {"stages_0_0", "stages_1_0", "stages_1_1", "stages_2_0", "stages_2_1",
                    "stages_2_2", "stages_3_0"}
  # Width 0.5 of 64 channels in stage 0, 1 x 512 in stage 3.
  assert variables["params"]["stages_0_0"]["conv_kxk"]["conv"]["kernel"].shape[-1] == 32
  assert variables["params"]["stages_3_0"]["conv_kxk"]["conv"]["kernel"].shape[-1] == 512


@pytest.mark.parametrize("field,value", [("blocks", (1, 2, 3)), ("blocks", (1, 0, 1, 1)),
                                         ("blocks", (1.5, 1, 1, 1)), ("widths", (1, 1, -1, 1))])
def test_validate_names_bad_blocks_or_widths(field, value):
  cfg = tiny.tiny_config()
  cfg.model[field] = value
  with pytest.raises(ValueError, match=rf"model\.{field}="):
    config_lib.validate(cfg)


def test_validate_rejects_unknown_field():
  cfg = tiny.tiny_config()
  cfg.fp.lr = 0.1  # Unlocked config: the misspelling reaches validate.
  with pytest.raises(ValueError, match="unknown field fp.lr"):
    config_lib.validate(cfg)


def test_weight_decay_mask_follows_official_recipe():
  params = {"stages_0_0": {"conv_kxk": {"bn": {"scale": 1, "bias": 1}, "conv": {"kernel": 1}},
                           "conv_1x1": {"bn": {"scale": 1, "bias": 1}, "conv": {"kernel": 1}},
                           "identity": {"scale": 1, "bias": 1}},
            "head": {"kernel": 1, "bias": 1}}
  m = weight_decay_mask(params)
  assert not m["stages_0_0"]["conv_kxk"]["bn"]["scale"]
  assert not m["stages_0_0"]["conv_1x1"]["bn"]["scale"]
  assert not m["stages_0_0"]["conv_kxk"]["bn"]["bias"] and not m["head"]["bias"]
  assert m["stages_0_0"]["identity"]["scale"]
  assert m["stages_0_0"]["conv_kxk"]["conv"]["kernel"] and m["head"]["kernel"]


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_grad_clip_norm_bounds_the_first_update(clip):
  cfg = tiny.tiny_config().fp
  cfg.grad_clip_norm, cfg.weight_decay, cfg.warmup_steps = clip, 0.0, 0
  params = {"head": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))}}
  grads = {"head": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)}}
  tx = make_optimizer(cfg, params)
  both = {"params": params, "quant": {}}
  updates, _ = tx.update({"params": grads, "quant": {}}, tx.init(both), both)
  lr = cfg.base_lr * cfg.batch_size / 256
  norm = float(optax.global_norm(updates))
  # First SGD step: update = -lr * g, with g scaled to global norm `clip` when clipping.
  expected = lr * (clip if clip else float(optax.global_norm(grads)))
  np.testing.assert_allclose(norm, expected, rtol=1e-6)


def test_lr_scales_with_batch_warms_up_and_decays_to_zero():
  cfg = tiny.tiny_config().fp
  cfg.batch_size, cfg.base_lr, cfg.num_steps, cfg.warmup_steps = 512, 0.1, 100, 10
  lr = learning_rate_schedule(cfg)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(10)), 0.2, rtol=1e-6)
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-7)


def _stage(tmp_path, name="fp", num_steps=6, **kw):
  cfg = tiny.tiny_config()
  cfg.fp.num_steps = num_steps
  cfg.fp.checkpoint_every = 2
  mesh = sharding.make_mesh()
  loader = kw.pop("loader", None) or data.make_loader(
      cfg.data, "train", global_batch_size=cfg.fp.batch_size, train=True, seed=0)
  model = build_model(cfg.model, loader.num_classes, deploy=False)
  state = create_train_state(model, init_variables(model, loader.image_shape, 0), cfg.fp)
  out = train_stage(name, state, train_step=steps.make_train_step(mesh, loader.num_classes),
                    loader=loader, mesh=mesh, ckpt_dir=str(tmp_path / name), stage_cfg=cfg.fp,
                    writer=MetricWriter(str(tmp_path), enabled=False), log_every=100, **kw)
  return sharding.to_host(out)


def test_resume_after_kill_is_bit_exact(tmp_path):
  straight = _stage(tmp_path / "a")
  with pytest.raises(KeyboardInterrupt):
    _stage(tmp_path / "b", interrupt_at=4)
  assert StageCheckpoints(str(tmp_path / "b" / "fp"), every=2, keep=2).latest_step() == 4
  resumed = _stage(tmp_path / "b")
  assert int(resumed.step) == 6
  chex.assert_trees_all_equal(straight.params, resumed.params)
  chex.assert_trees_all_equal(straight.batch_stats, resumed.batch_stats)


class _PoisonAt:
  """Wraps a loader; the batch of step ``k`` (1-based) has NaN images."""

  def __init__(self, loader, k):
    self.loader, self.k = loader, k
    self.num_classes, self.image_shape = loader.num_classes, loader.image_shape

  def __iter__(self):
    inner, k = iter(self.loader), self.k

    class It:
      def __init__(self):
        self.n = 0

      def __next__(self):
        batch = dict(next(inner))
        self.n += 1
        if self.n == k:
          batch["image"] = np.full_like(batch["image"], np.nan)
        return batch

      def get_state(self):
        return inner.get_state()

      def set_state(self, s):
        inner.set_state(s)
    return It()


def test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny.tiny_config()
  loader = data.make_loader(cfg.data, "train", global_batch_size=16, train=True)
  with pytest.raises(NonFiniteLoss, match="at step 5"):
    _stage(tmp_path, loader=_PoisonAt(loader, 5))
  ckpt = StageCheckpoints(str(tmp_path / "fp"), every=2, keep=2)
  assert ckpt.latest_step() == 4
  state = create_train_state(*_tiny_model_and_vars(), cfg.fp)
  restored, _ = ckpt.restore(state)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(restored.params))


def _tiny_model_and_vars():
  cfg = tiny.tiny_config()
  model = build_model(cfg.model, 10, deploy=False)
  return model, init_variables(model, (16, 16, 3), 0)


_KILL_DURING_SAVE = textwrap.dedent("""
  import os, sys
  import numpy as np
  from repvgg_jax.train.checkpoint import StageCheckpoints
  ckpt = StageCheckpoints(sys.argv[1], every=1, keep=3)
  ckpt.save(1, {"w": np.ones((4,), np.float32)}, {"pos": 1}, force=True)
  ckpt.wait()
  # A large async save, then the process dies at once, as under SIGKILL.
  ckpt.save(2, {"w": np.ones((64, 1024, 1024), np.float32)}, {"pos": 2}, force=True)
  os._exit(0)
""")


def test_kill_during_save_leaves_a_readable_latest_checkpoint(tmp_path):
  directory = str(tmp_path / "ck")
  subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, directory], check=True,
                 cwd=ROOT, capture_output=True, timeout=120)
  ckpt = StageCheckpoints(directory, every=1, keep=3)
  step = ckpt.latest_step()
  assert step in (1, 2)
  shape = (4,) if step == 1 else (64, 1024, 1024)
  state, data_state = ckpt.restore({"w": np.zeros(shape, np.float32)})
  assert data_state == {"pos": step}
  assert (np.asarray(state["w"]) == 1).all()


@pytest.mark.parametrize("suffix", [".msgpack", ".npz"])
def test_init_from_file_round_trips_and_names_mismatches(tmp_path, suffix):
  import flax
  from flax import traverse_util
  from repvgg_jax.train.pipeline import load_variables
  cfg = tiny.tiny_config()
  model = build_model(cfg.model, 10, deploy=False)
  variables = init_variables(model, (16, 16, 3), 0)
  variables["params"]["head"]["bias"] = np.arange(10, dtype=np.float32)  # not the template's
  path = str(tmp_path / f"v{suffix}")
  if suffix == ".msgpack":
    with open(path, "wb") as f:
      f.write(flax.serialization.to_bytes(variables))
  else:
    np.savez(path, **traverse_util.flatten_dict(variables, sep="/"))
  # Templates give structure and shapes only: eval_shape, not a compiled init each.
  shapes = lambda m: jax.eval_shape(lambda: init_variables(m, (16, 16, 3), 1))
  chex.assert_trees_all_equal(load_variables(path, shapes(model)), variables)

  other = shapes(build_model(cfg.model, 7, deploy=False))
  with pytest.raises(ValueError, match=r"params/head/kernel: shape \(.*, 10\), model wants"):
    load_variables(path, other)
  bn = cfg.model.copy_and_resolve_references()
  bn.norm = "bn"
  with pytest.raises(ValueError, match="unexpected batch_stats/stem/conv_kxk/bn/tau"):
    load_variables(path, shapes(build_model(bn, 10, deploy=False)))


def test_remote_workdir_is_refused_by_name():
  from repvgg_jax.train import pipeline
  with pytest.raises(ValueError, match="workdir='gs://bucket/run'"):
    pipeline.run(tiny.tiny_config(), "gs://bucket/run")
