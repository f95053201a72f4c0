"""Trainer: config validation, optimizer recipe, resume, checkpoints under kill, NaN guard."""

import glob
import os
import subprocess
import sys
import textwrap

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from repvgg_jax import create_model, data
from repvgg_jax.quant import make_quantizer
from repvgg_jax.quant.activation import check_calibration
from repvgg_jax.train import config as config_lib
from repvgg_jax.train import sharding, state as state_lib, steps
from repvgg_jax.train.checkpoint import StageCheckpoints
from repvgg_jax.train.loop import NonFiniteLoss, Profile, schedule, train_stage
from repvgg_jax.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask
from repvgg_jax.train.state import build_model, create_train_state, init_variables
from repvgg_jax.train.writers import MetricWriter

from _util import ROOT, WrappedLoader, killed_after, raises_naming
from configs import tiny  # on sys.path from conftest.py

TINY = os.path.join(ROOT, "configs", "tiny.py")


def _parse(monkeypatch, *overrides):
  # config_flags finds the override flags in sys.argv, as launch/main.py sees them.
  argv = ["main.py", f"--config={TINY}", *overrides]
  monkeypatch.setattr(sys, "argv", argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True)
  fv(argv)
  return fv.config


def test_validate_names_every_invalid_field():
  cfg = tiny.tiny_config()
  cfg.quant.method = "kmeans"
  cfg.fp.num_steps = 0
  cfg.model.norm = "ln"
  with pytest.raises(ValueError) as e:
    config_lib.validate(cfg)
  for name in ("quant.method", "fp.num_steps", "model.norm"):
    assert name in str(e.value)


def test_validate_names_a_bad_conv_impl():
  cfg = tiny.tiny_config()
  cfg.model.conv_impl = "cudnn"
  with pytest.raises(config_lib.ConfigError, match=r"model.conv_impl='cudnn'"):
    config_lib.validate(cfg)


def test_model_conv_impl_reaches_the_model():
  cfg = tiny.tiny_config()
  assert build_model(cfg.model, 10, deploy=False).conv_impl == "auto"  # tiny's (CPU)
  cfg.model.conv_impl = "xla"
  assert build_model(cfg.model, 10, deploy=True).conv_impl == "xla"
  assert config_lib.base_config().model.conv_impl == "xla"


def _direct_error(call):
  with pytest.raises(ValueError) as err:
    call()
  return str(err.value)


@pytest.mark.parametrize("group,field,value,call", [
    ("model", "norm", "gn", lambda: create_model("A0", norm="gn")),
    ("model", "oabn_bound", "soft", lambda: create_model("A0", oabn_bound="soft")),
    ("model", "name", "RepVGG-Z9", lambda: create_model("RepVGG-Z9")),
    ("quant", "bits", 9, lambda: make_quantizer("cluster", bits=9)),
    ("quant", "clipping", "aciq", lambda: make_quantizer("cluster", clipping="aciq")),
    ("quant", "act_bits", 1, lambda: create_model("A0", deploy=True, act_bits=1)),
    ("quant", "act_percentile", 40.0, lambda: check_calibration("minmax", 40.0)),
    ("data", "augment", "mixup", None), ("data", "image_size", 0, None),
])
def test_validate_refuses_what_the_component_refuses_in_its_words(group, field, value, call):
  """Each rule is the component's: validate's line is the component's own message
  with the field's group in front (the loader's already names it)."""
  cfg = tiny.tiny_config()
  cfg[group][field] = value
  if call is None:  # the loader refuses before it reads anything
    call = lambda: data.make_loader(cfg.data, "train", global_batch_size=8, train=True)
  expected = _direct_error(call)
  if group != "data":
    expected = f"{group}.{expected}"
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(cfg)
  assert expected in str(err.value)


def test_validate_refuses_the_branch_form_on_qarepvgg_blocks():
  cfg = tiny.tiny_config()  # OABN
  cfg.model.oabn_form, cfg.model.block = "branch", "qarepvgg"
  with raises_naming(config_lib.ConfigError, "model.oabn_form='branch'", "block='qarepvgg'"):
    config_lib.validate(cfg)


@pytest.mark.parametrize("form, tau, expected", [
    ("branch", 0.0, 3.0), ("median", 0.0, 4.0), ("median", 2.5, 2.5)])
def test_resolve_fills_in_the_forms_default_tau(form, tau, expected):
  cfg = tiny.tiny_config()
  cfg.model.oabn_form, cfg.model.oabn_tau = form, tau
  resolved = config_lib.resolve(cfg)
  assert resolved.model.oabn_tau == expected and cfg.model.oabn_tau == tau
  assert build_model(resolved.model, 3, deploy=False).bound_tau == expected
  assert build_model(cfg.model, 3, deploy=False).bound_tau == expected  # unresolved: same
  cfg.model.oabn_tau = -1.0
  with raises_naming(config_lib.ConfigError, "model.oabn_tau=-1.0", "> 0"):
    config_lib.validate(cfg)


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


@pytest.mark.parametrize("field,value,needle", [
    ("act_bits", 9, "quant.act_bits=9"), ("act_bits", 1, "quant.act_bits=1"),
    ("act_calibration", "kl", "quant.act_calibration='kl'"),
    ("clipping", "aciq", "quant.clipping='aciq'"), ("calib_batches", 0, "quant.calib_batches=0"),
])
def test_validate_names_bad_quantization_fields(field, value, needle):
  cfg = tiny.tiny_config()
  cfg.quant[field] = value
  with raises_naming(ValueError, needle):
    config_lib.validate(cfg)


@pytest.mark.parametrize("changes,names", [
    (dict(onnx="yes"), ["export.onnx='yes'", "'auto'", "'on'", "'off'"]),
    (dict(onnx_activations="int4"), ["activations='int4'"]),
    # act_bits 8: activations in [0, 255]; act_bits 7 would fit.
    (dict(onnx_activations="int8"), ["export.onnx_activations", "'int8'", "[0, 255]",
                                     "quant.act_bits=7"]),
    (dict(stablehlo_batch=-1), ["export.stablehlo_batch=-1"]),
    (dict(coreml="true"), ["export.coreml='true'", "'auto'", "'on'", "'off'"]),
])
def test_validate_names_bad_export_fields(changes, names):
  cfg = tiny.tiny_config()
  cfg.quant.act_bits = 8
  cfg.export.update(changes)
  with raises_naming(ValueError, *names):
    config_lib.validate(cfg)
  cfg.quant.act_bits = 7  # [0, 127] fits int8: only the other fields stay wrong
  if changes == dict(onnx_activations="int8"):
    config_lib.validate(cfg)


@pytest.mark.parametrize("field,names", [
    ("onnx", ["export.onnx='on'", "onnxruntime", "repvgg-jax[onnx]"]),
    ("coreml", ["export.coreml='on'", "coremltools", "repvgg-jax[coreml]"]),
])
def test_validate_export_on_needs_its_packages(monkeypatch, field, names):
  import importlib
  cfg = tiny.tiny_config()
  cfg.export[field] = "on"
  monkeypatch.setattr(importlib.import_module(f"repvgg_jax.deploy.{field}"), "available",
                      lambda: False)
  with raises_naming(ValueError, *names):
    config_lib.validate(cfg)
  cfg.export[field] = "auto"
  config_lib.validate(cfg)


def test_validate_uniform_and_lsq_need_two_bits():
  cfg = tiny.tiny_config()
  cfg.quant.method, cfg.quant.bits = "lsq", 1
  with raises_naming(ValueError, "quant.bits=1", "2..8"):
    config_lib.validate(cfg)


def test_validate_rejects_unknown_field():
  cfg = tiny.tiny_config()
  cfg.fp.lr = 0.1  # Unlocked config: the misspelling reaches validate.
  with raises_naming(ValueError, "fp.lr"):
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
  norm = float(optax.tree.norm(updates))
  # First SGD step: update = -lr * g, with g scaled to global norm `clip` when clipping.
  expected = lr * (clip if clip else float(optax.tree.norm(grads)))
  np.testing.assert_allclose(norm, expected, rtol=1e-6)


def test_lr_scales_with_batch_warms_up_and_decays_to_zero():
  cfg = tiny.tiny_config().fp
  cfg.batch_size, cfg.base_lr, cfg.num_steps, cfg.warmup_steps = 512, 0.1, 100, 10
  lr = learning_rate_schedule(cfg)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(10)), 0.2, rtol=1e-6)
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-7)


def _stage(tmp_path, name="fp", num_steps=6, log_every=100, checkpoint_every=2, **kw):
  cfg = tiny.tiny_config()
  cfg.fp.num_steps = num_steps
  cfg.fp.checkpoint_every = checkpoint_every
  cfg.fp.eval_every = kw.pop("eval_every", 0)
  mesh = sharding.make_mesh()
  loader = kw.pop("loader", None) or data.make_loader(
      cfg.data, "train", global_batch_size=cfg.fp.batch_size, train=True, seed=0)
  model = build_model(cfg.model, loader.num_classes, deploy=False)
  state = create_train_state(model, init_variables(model, loader.image_shape, 0), cfg.fp)
  train_step = steps.make_train_step(mesh, loader.num_classes, pixel_stats=loader.pixel_stats)
  writer = kw.pop("writer", None) or MetricWriter(str(tmp_path), enabled=False)
  out = train_stage(name, state, train_step=train_step, loader=loader, mesh=mesh,
                    ckpt_dir=str(tmp_path / name), **schedule(cfg.fp), writer=writer,
                    log_every=log_every, **kw)
  return sharding.to_host(out)


def _tiny_loader():
  cfg = tiny.tiny_config()
  return data.make_loader(cfg.data, "train", global_batch_size=cfg.fp.batch_size, train=True)


def test_resume_after_kill_is_bit_exact(tmp_path):
  straight = _stage(tmp_path / "a")
  with pytest.raises(KeyboardInterrupt):
    _stage(tmp_path / "b", loader=killed_after(_tiny_loader(), 4))
  assert StageCheckpoints(str(tmp_path / "b" / "fp"), keep=2).latest_step() == 4
  resumed = _stage(tmp_path / "b")
  assert int(resumed.step) == 6
  chex.assert_trees_all_equal(straight.params, resumed.params)
  chex.assert_trees_all_equal(straight.batch_stats, resumed.batch_stats)


def _poison_at(loader, k):
  """The batch of step k (1-based) holds NaN images (float: normalize passes NaN on)."""
  def change(n, batch):
    if n == k:
      batch["image"] = np.full(batch["image"].shape, np.nan, np.float32)
    return batch
  return WrappedLoader(loader, change)


@pytest.mark.parametrize("log_every", [1, 3])
def test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path, log_every):
  # Step 5 goes bad; with log_every=3 it is seen at step 6 (a log and save step), before
  # that step is saved: the last good checkpoint, step 4, stays the latest.
  with pytest.raises(NonFiniteLoss, match="at step 5"):
    _stage(tmp_path, loader=_poison_at(_tiny_loader(), 5), log_every=log_every)
  cfg = tiny.tiny_config()
  ckpt = StageCheckpoints(str(tmp_path / "fp"), keep=2)
  assert ckpt.latest_step() == 4
  state = create_train_state(*_tiny_model_and_vars(), cfg.fp)
  restored, _, _ = ckpt.restore(state)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(restored.params))


def test_no_host_transfer_between_sync_steps(tmp_path, monkeypatch):
  """Between sync steps nothing crosses between host and device but the batch (an
  explicit device_put): every step that is not a log/save step runs under
  ``jax.transfer_guard("disallow")``, which refuses implicit transfers in each direction
  (a Python or numpy value fed to the step each time fails here). On the CPU backend,
  where CI runs, the guard's device-to-host direction does not fire (np.asarray,
  device_get and float() pass under "disallow_explicit", jax 0.10), so those reads are
  also counted where every path goes through, ``ArrayImpl._value``: they happen only at
  log/save steps, and a fetch added to every step fails this test."""
  from jax._src.array import ArrayImpl
  import threading
  calls, current, guard = [], {"step": 0}, []
  value = ArrayImpl._value

  def counting(self):
    if threading.current_thread() is threading.main_thread():
      calls.append(current["step"])
    return value.fget(self)

  def guard_steps(n, batch):  # runs in the loop's thread as it asks for batch n
    current["step"] = n
    while guard:
      guard.pop().__exit__(None, None, None)
    if n % 4:  # steps 4 and 8 log and save: the rest run guarded until the next batch
      guard.append(jax.transfer_guard("disallow"))
      guard[-1].__enter__()
    return batch

  monkeypatch.setattr(ArrayImpl, "_value", property(counting))
  try:
    _stage(tmp_path, loader=WrappedLoader(_tiny_loader(), guard_steps), num_steps=8,
           log_every=4, checkpoint_every=4)
  finally:
    while guard:
      guard.pop().__exit__(None, None, None)
  steps_with_reads = sorted(set(calls) - {0})  # 0: resume/set-up before the first step
  assert steps_with_reads and set(steps_with_reads) <= {4, 8}, steps_with_reads


def test_throughput_and_eta_leave_out_the_compiling_first_step(tmp_path, monkeypatch):
  """On a fake clock: the first step takes 100 s (compilation), the others 1 s each; the
  first log (step 3) counts steps 2 and 3 only: 2 steps, 2 batches of 16, in 2 s."""
  from repvgg_jax.train import loop
  clock = {"now": 0.0, "calls": 0}
  monkeypatch.setattr(loop, "time", type("Clock", (), {"time": staticmethod(
      lambda: clock["now"])}))
  make = steps.make_train_step

  def timed_make(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def step(state, batch):
      clock["calls"] += 1
      clock["now"] += 100.0 if clock["calls"] == 1 else 1.0
      return step_fn(state, batch)
    return step
  monkeypatch.setattr(steps, "make_train_step", timed_make)
  rows = []

  class Writer:
    def write_scalars(self, step, scalars):
      rows.append((step, dict(scalars)))

    def start_stage(self, stage, step):
      pass
  lines = []  # the loop's log lines (absl's handler may not reach caplog in a worker)
  monkeypatch.setattr(loop.logging, "info",
                      lambda fmt, *args: lines.append(str(fmt) % args if args else str(fmt)))
  _stage(tmp_path, num_steps=6, log_every=3, checkpoint_every=6, writer=Writer())
  assert dict(rows)[3]["fp/images_per_s"] == 16.0  # 32 images in 2 s, not 48 in 102
  assert "fp: step 3/6, 16.0 images/s, 1.00 steps/s, ETA 0:00:03" in lines


def test_profile_traces_the_steps_after_the_first_into_its_logdir(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda d: calls.append(("start", d)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
  seen = []

  def record(step, state):
    seen.append((step, list(calls)))
    return state
  _stage(tmp_path, num_steps=6, hooks=[Profile(str(tmp_path / "tb"), 3), record])
  # Started after step 1 (it compiles), stopped after step 4: steps 2-4 traced.
  assert [len(c) for _, c in seen] == [1, 1, 1, 2, 2, 2]
  assert calls == [("start", str(tmp_path / "tb")), ("stop",)]


def test_profile_writes_a_trace_tensorboard_reads(tmp_path):
  _stage(tmp_path, num_steps=4, hooks=[Profile(str(tmp_path / "tb"), 2)])
  assert glob.glob(str(tmp_path / "tb" / "plugins" / "profile" / "*" / "*.xplane.pb"))


def test_a_profile_longer_than_the_stage_is_closed_with_it(tmp_path):
  hook = Profile(str(tmp_path / "tb"), 50)
  _stage(tmp_path, num_steps=3, hooks=[hook])
  assert not hook.tracing
  assert glob.glob(str(tmp_path / "tb" / "plugins" / "profile" / "*" / "*.xplane.pb"))


def test_eval_every_logs_accuracy_and_the_best(tmp_path):
  rows = []

  class Writer:
    def write_scalars(self, step, scalars):
      rows.append((step, dict(scalars)))

    def start_stage(self, stage, step):  # A fresh stage, from step 0.
      assert step == 0
  accuracies = iter([0.25, 0.5, 0.375])
  _stage(tmp_path, num_steps=6, eval_every=2, writer=Writer(),
         evaluate=lambda state: next(accuracies))
  evals = [(s, m["fp/eval_accuracy"], m["fp/best_eval_accuracy"]) for s, m in rows
           if "fp/eval_accuracy" in m]
  assert evals == [(2, 0.25, 0.25), (4, 0.5, 0.5), (6, 0.375, 0.5)]
  train_rows = [m for _, m in rows if "fp/loss" in m]
  assert train_rows and all(m["fp/images_per_s"] > 0 for m in train_rows)
  # The best accuracy is checkpointed, so a resumed stage keeps it.
  _, _, meta = StageCheckpoints(str(tmp_path / "fp"), keep=2).restore(
      create_train_state(*_tiny_model_and_vars(), tiny.tiny_config().fp))
  assert meta == {"best_eval_accuracy": 0.5}


def _tiny_model_and_vars():
  cfg = tiny.tiny_config()
  model = build_model(cfg.model, 10, deploy=False)
  return model, init_variables(model, (16, 16, 3), 0)


def test_init_compiled_at_o1_is_the_default_compilations_init_bit_for_bit():
  # init_variables compiles at XLA's -O1 on CPU for speed; the values must not move (the
  # studies' FP networks depend on them). The tiny model has every layer kind A0 has.
  model, fast = _tiny_model_and_vars()
  x = jnp.zeros((1, 16, 16, 3), jnp.float32)
  default = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.PRNGKey(0))
  assert state_lib.INIT_COMPILER_OPTIONS  # ... which this compares with the default
  chex.assert_trees_all_equal(fast, flax.core.unfreeze(default))


_KILL_DURING_SAVE = textwrap.dedent("""
  import os, sys
  import numpy as np
  from repvgg_jax.train.checkpoint import StageCheckpoints
  ckpt = StageCheckpoints(sys.argv[1], keep=3)
  ckpt.save(1, {"w": np.ones((4,), np.float32)}, {"pos": 1})
  ckpt.wait()
  # A large async save, then the process dies at once, as under SIGKILL.
  ckpt.save(2, {"w": np.ones((64, 1024, 1024), np.float32)}, {"pos": 2})
  os._exit(0)
""")


def test_kill_during_save_leaves_a_readable_latest_checkpoint(tmp_path):
  directory = str(tmp_path / "ck")
  subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, directory], check=True,
                 cwd=ROOT, capture_output=True, timeout=120)
  ckpt = StageCheckpoints(directory, keep=3)
  step = ckpt.latest_step()
  assert step in (1, 2)
  shape = (4,) if step == 1 else (64, 1024, 1024)
  state, data_state, _ = ckpt.restore({"w": np.zeros(shape, np.float32)})
  assert data_state == {"pos": step}
  assert (np.asarray(state["w"]) == 1).all()


@pytest.mark.parametrize("suffix", [".msgpack", ".npz"])
def test_init_from_file_round_trips_and_names_mismatches(tmp_path, suffix):
  import flax
  from flax import traverse_util
  from repvgg_jax.train.checkpoint import load_variables
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
  with raises_naming(ValueError, "params/head/kernel",
                     str(np.shape(variables["params"]["head"]["kernel"])),
                     str(other["params"]["head"]["kernel"].shape)):
    load_variables(path, other)
  bn = cfg.model.copy_and_resolve_references()
  bn.norm = "bn"
  with raises_naming(ValueError, "settings/stem/bound_tau"):
    load_variables(path, shapes(build_model(bn, 10, deploy=False)))


def test_remote_workdir_is_refused_by_name():
  from repvgg_jax.train.train import train_and_evaluate
  with pytest.raises(ValueError, match="workdir='gs://bucket/run'"):
    train_and_evaluate(tiny.tiny_config(), "gs://bucket/run")


@pytest.mark.parametrize("changes,names", [
    (dict(avg_bits=2.0, bytes=1000), ["quant.budget.avg_bits=2.0", "bytes=1000"]),
    (dict(avg_bits=0.5), ["quant.budget.avg_bits=0.5", "1..8"]),
    (dict(bytes=-3), ["quant.budget.bytes=-3"]),
    (dict(avg_bits=2.0, bit_choices=(2, 9)), ["quant.budget.bit_choices=(2, 9)", "bit choice 9"]),
    (dict(avg_bits=2.0, sensitivity="fisher"), ["quant.budget.sensitivity='fisher'"]),
    (dict(avg_bits=2.0, batches=0), ["quant.budget.batches=0"]),
])
def test_validate_names_bad_budget_fields(changes, names):
  cfg = tiny.tiny_config()
  cfg.quant.budget.update(changes)
  with raises_naming(ValueError, *names):
    config_lib.validate(cfg)


def test_run_eta_adds_the_later_stages_images_at_this_stages_image_rate():
  from repvgg_jax.train.loop import run_eta
  # 100 steps at 2 steps/s; then 50 QAT steps of 128 images at 64 images/s.
  assert run_eta(100, 2.0, 64.0, later_images=50 * 128) == (50.0, 150.0)
  assert run_eta(100, 2.0, 64.0, later_images=0) == (50.0, 50.0)


def test_eta_text_gives_the_run_eta_only_before_a_later_stage():
  from repvgg_jax.train.loop import eta_text
  text = eta_text(100, 2.0, 64.0, [("qat", 50, 128)])
  assert "stage ETA 0:00:50" in text and "run ETA ~0:02:30" in text
  assert "qat's 50 steps" in text
  assert eta_text(100, 2.0, 64.0) == "ETA 0:00:50"
