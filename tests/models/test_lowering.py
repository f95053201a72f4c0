"""The model is plain flax/lax by default, and every step lowers for accelerators.

Lowering needs no device: ``jax.export`` lowers for the platforms it is given, so a CPU
machine checks that the FP and QAT train steps and the deploy forward have no
construct only XLA:CPU takes.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

import repvgg_jax as rv
from repvgg_jax.quant import make_quantizer
from repvgg_jax.train import sharding, steps
from repvgg_jax.train.state import build_model, create_train_state, init_variables

from configs import tiny

PLATFORMS = ("cuda", "tpu")
# The tiny config's image size and classes.
IMAGE, CLASSES, BATCH = (16, 16, 3), 10, 4


def _primitives(jaxpr) -> list[str]:
  """Every primitive of ``jaxpr`` and of the jaxprs inside its equations (jit, custom
  gradients, control flow), in order."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  out = []
  for eqn in jaxpr.eqns:
    out.append(eqn.primitive.name)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          out += _primitives(sub)
  return out


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


@pytest.mark.parametrize("deploy", [False, True])
def test_default_model_is_plain_lax_convs(deploy):
  model = rv.create_model("RepVGG-A0", num_classes=CLASSES, deploy=deploy)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape),
                                                train=False))
  if deploy:
    prims = _primitives(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x))
  else:
    prims = _primitives(jax.make_jaxpr(lambda v, x: model.apply(
        v, x, train=True, mutable=["batch_stats"]))(variables, x))
  assert not {"platform_index", "platform_dependent", "cond"} & set(prims)
  convs = [p for p in prims if "conv" in p]
  # A0's 22 conv layers: the 3x3 and 1x1 branch of each in the train form, one merged
  # 3x3 in the deploy form.
  assert convs == ["conv_general_dilated"] * (22 if deploy else 44)


def test_the_matmul_form_is_picked_per_platform():
  # The test above can fail: "auto" keeps both forms in the program until lowering.
  model = rv.create_model("RepVGG-A0", num_classes=CLASSES, deploy=True, conv_impl="auto")
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  prims = _primitives(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x))
  assert "platform_index" in prims


def _exports(fn, *args) -> jax.export.Exported:
  return jax.export.export(jax.jit(fn), platforms=PLATFORMS)(*_abstract(args))


def _batch():
  return {"image": jnp.zeros((BATCH, *IMAGE), jnp.float32),
          "label": jnp.zeros((BATCH,), jnp.int32)}


@pytest.mark.parametrize("conv_impl", ["xla", "auto"])
def test_fp_train_step_lowers_for_accelerators(conv_impl):
  cfg = tiny.tiny_config()
  cfg.model.conv_impl = conv_impl
  model = build_model(cfg.model, CLASSES, deploy=False)
  state = create_train_state(model, init_variables(model, IMAGE, 0), cfg.fp)
  step = steps.make_train_step(sharding.make_mesh(jax.devices()[:1]), CLASSES)
  exported = _exports(step, state, _batch())
  assert exported.platforms == PLATFORMS


def _qat_setup(conv_impl):
  """The tiny config's merged network with 8-bit activations, a 2-bit cluster quantizer
  and its state (as tests/train/test_distill.py builds them)."""
  cfg = tiny.tiny_config()
  cfg.model.conv_impl = conv_impl
  model = build_model(cfg.model, CLASSES, deploy=False)
  merged = jax.device_get(rv.merge(init_variables(model, IMAGE, 0)))
  deploy = build_model(cfg.model, CLASSES, deploy=True, act_bits=8)
  q = make_quantizer("cluster", bits=2)
  act_steps = jax.device_get(init_variables(deploy, IMAGE, 0))["quant"]
  quant = traverse_util.unflatten_dict({**traverse_util.flatten_dict(q.init(merged["params"])),
                                        **traverse_util.flatten_dict(act_steps)})
  return cfg, deploy, merged, q, quant


@pytest.mark.parametrize("conv_impl", ["xla", "auto"])
def test_qat_train_step_lowers_for_accelerators(conv_impl):
  cfg, deploy, merged, q, quant = _qat_setup(conv_impl)
  state = create_train_state(deploy, merged, cfg.qat, quant=quant)
  step = steps.make_train_step(sharding.make_mesh(jax.devices()[:1]), CLASSES, quantizer=q)
  exported = _exports(step, state, _batch())
  assert exported.platforms == PLATFORMS


@pytest.mark.parametrize("conv_impl", ["xla", "auto"])
def test_deploy_forward_lowers_for_accelerators(conv_impl):
  _, deploy, merged, q, quant = _qat_setup(conv_impl)

  def forward(params, quant, images):
    return deploy.apply({"params": q.apply(params, quant), "quant": quant}, images)
  exported = _exports(forward, merged["params"], quant, jnp.zeros((BATCH, *IMAGE)))
  assert exported.platforms == PLATFORMS
  assert exported.out_avals[0].shape == (BATCH, CLASSES)
