"""QAT distillation from the frozen float network: the loss, its gradient, the step, resume, config."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax
from repvgg_jax.quant import make_quantizer
from repvgg_jax.train import config as config_lib
from repvgg_jax.train import sharding, steps
from repvgg_jax.train.checkpoint import StageCheckpoints
from repvgg_jax.train.loop import schedule, train_stage
from repvgg_jax.train.state import build_model, create_train_state, init_variables
from repvgg_jax.train.writers import MetricWriter

from _util import killed_after
from configs import tiny


def test_distillation_loss_is_t_squared_kl_of_the_softened_logits():
  student = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
  teacher = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 1.0]])
  for t in (1.0, 2.0, 4.0):
    def log_softmax(z):
      z = z / t
      return z - np.log(np.exp(z).sum(-1, keepdims=True))
    p_t = np.exp(log_softmax(teacher))
    want = t * t * (p_t * (log_softmax(teacher) - log_softmax(student))).sum(-1)
    got = steps.distillation_loss(jnp.asarray(student), jnp.asarray(teacher), t)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  # Zero where the student already predicts as the teacher.
  np.testing.assert_allclose(steps.distillation_loss(teacher, teacher, 2.0), 0.0, atol=1e-6)


def test_the_teacher_gets_no_gradient():
  student = jnp.array([[2.0, -1.0, 0.5]])
  w = jnp.array([[1.0, 0.5, -2.0]])  # a teacher "weight" its logits depend on
  g_teacher = jax.grad(lambda w: steps.distillation_loss(student, 3.0 * w, 2.0).sum())(w)
  np.testing.assert_array_equal(g_teacher, 0.0)
  g_student = jax.grad(lambda s: steps.distillation_loss(s, 3.0 * w, 2.0).sum())(student)
  assert np.abs(g_student).sum() > 0


def _qat_setup():
  """The tiny config's merged network, its W4 ClusterQAT quantizer state, and a batch."""
  cfg = tiny.tiny_config()
  model = build_model(cfg.model, 10, deploy=False)
  merged = jax.device_get(repvgg_jax.merge(init_variables(model, (16, 16, 3), 0)))
  deploy = build_model(cfg.model, 10, deploy=True)
  q = make_quantizer("cluster", bits=2)
  return cfg, deploy, merged, q, q.init(merged["params"])


def _teacher(deploy, merged, weight, temperature=2.0):
  return steps.Distill(apply=lambda p, x: deploy.apply({"params": p}, x, train=False),
                       variables=merged["params"], weight=weight, temperature=temperature)


def _one_step(distill):
  cfg, deploy, merged, q, quant = _qat_setup()
  mesh = sharding.make_mesh(jax.devices()[:1])
  batch = {"image": jnp.asarray(np.random.default_rng(0).standard_normal((16, 16, 16, 3)),
                                jnp.float32), "label": jnp.arange(16) % 10}
  state = sharding.replicate(create_train_state(deploy, merged, cfg.qat, quant=quant), mesh)
  step = steps.make_train_step(mesh, 10, quantizer=q, distill=distill and _teacher(
      deploy, merged, *distill))
  state, metrics = step(state, sharding.shard_batch(batch, mesh))
  return sharding.to_host(state.params), sharding.to_host(metrics)


def test_a_distilled_step_at_weight_zero_is_the_plain_step():
  plain, m_plain = _one_step(None)
  zero, m_zero = _one_step((0.0,))
  chex.assert_trees_all_equal(plain, zero)
  assert float(m_zero["loss"]) == float(m_plain["loss"])
  # ... and a positive weight changes the step (the test can fail).
  half, m_half = _one_step((0.5,))
  assert float(m_half["distill_loss"]) > 0
  assert float(m_half["loss"]) != float(m_plain["loss"])
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain),
                                                      jax.tree.leaves(half)))


def _qat_stage(ckpt_dir, loader=None):
  cfg, deploy, merged, q, quant = _qat_setup()
  cfg.qat.num_steps, cfg.qat.checkpoint_every = 6, 2
  mesh = sharding.make_mesh()
  from repvgg_jax import data
  loader = loader or data.make_loader(cfg.data, "train", global_batch_size=16, train=True)
  state = create_train_state(deploy, merged, cfg.qat, quant=quant)
  step = steps.make_train_step(mesh, 10, quantizer=q, pixel_stats=loader.pixel_stats,
                               distill=_teacher(deploy, merged, 0.7, 3.0))
  out = train_stage("qat", state, train_step=step, loader=loader, mesh=mesh,
                    ckpt_dir=str(ckpt_dir), **schedule(cfg.qat),
                    writer=MetricWriter(str(ckpt_dir), enabled=False), log_every=2)
  return sharding.to_host(out)


def test_a_resumed_distilled_qat_equals_an_uninterrupted_one(tmp_path):
  from repvgg_jax import data
  straight = _qat_stage(tmp_path / "a")
  cfg = tiny.tiny_config()
  loader = data.make_loader(cfg.data, "train", global_batch_size=16, train=True)
  with pytest.raises(KeyboardInterrupt):
    _qat_stage(tmp_path / "b", loader=killed_after(loader, 4))
  assert StageCheckpoints(str(tmp_path / "b"), keep=2).latest_step() == 4
  resumed = _qat_stage(tmp_path / "b")
  assert int(resumed.step) == 6
  chex.assert_trees_all_equal(straight.params, resumed.params)
  chex.assert_trees_all_equal(straight.quant, resumed.quant)


@pytest.mark.parametrize("changes, field, value", [
    ({"qat.distill": "features"}, "qat.distill", "'features'"),
    ({"qat.distill": "logits", "qat.distill_weight": -0.5}, "qat.distill_weight", "-0.5"),
    ({"qat.distill": "logits", "qat.distill_weight": 1.5}, "qat.distill_weight", "1.5"),
    ({"qat.distill": "logits", "qat.distill_temperature": 0.0}, "qat.distill_temperature",
     "0.0"),
    ({"qat.distill": "logits", "qat.enabled": False}, "qat.distill", "'logits'"),
    ({"qat.distill": "logits", "quant.method": "none"}, "qat.distill", "'logits'"),
])
def test_bad_distillation_fields_are_refused_by_name(changes, field, value):
  cfg = tiny.tiny_config()
  cfg.update_from_flattened_dict(changes)
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(cfg)
  assert f"{field}={value}" in str(err.value)


def test_distillation_runs_in_the_trainer_and_logs_its_loss(tmp_path):
  import json
  from repvgg_jax.train.train import train_and_evaluate
  cfg = tiny.tiny_config()
  cfg.qat.distill = "logits"
  cfg.export.onnx = "off"
  report = train_and_evaluate(cfg, str(tmp_path))
  assert "packed" in report["forms"]
  with open(tmp_path / "metrics.jsonl") as f:
    logged = [json.loads(ln) for ln in f]
  assert any("qat/distill_loss" in m for m in logged)
