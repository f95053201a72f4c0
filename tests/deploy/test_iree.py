"""``model.stablehlo`` compiled by IREE (llvm-cpu) and run by its runtime: the packed
model's predictions. The model has the ImageNet stem (stride-2 convs on even maps down
to 2x2 -> 1x1), the case IREE rejects unless the padding no window reads is trimmed
(``repvgg_jax.models.conv.read_padding``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import deploy
from repvgg_jax.models.repvgg import RepVGG
from _util import random_variables, tiny_variant

TINY = tiny_variant((1, 2, 1, 1))
SIZE = 32  # maps 32 -> 16 -> 8 -> 4 -> 2 -> 1, every conv of stride 2 on an even map
MEAN, STD = (0.4, 0.45, 0.5), (0.25, 0.3, 0.2)
BATCH = 8
# Float32 logits from the same program compiled twice (XLA, IREE) differ by the
# order of their sums: ~1e-7 of the largest logit here (3.6e-7 abs., 1.9e-7 relative on
# 1024 images); 1e-5 leaves 50x margin, and still catches an activation that the two
# round to different levels (a jump of one quantizer step, ~1e-3 of the logits).
TOL = 1e-5


@pytest.fixture(scope="module")
def iree():
  compiler = pytest.importorskip("iree.compiler")
  runtime = pytest.importorskip("iree.runtime")
  return compiler, runtime


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def _merged():
  x = jnp.zeros((1, SIZE, SIZE, 3))
  v = random_variables(RepVGG(TINY, num_classes=5, cifar_stem=False), x, tiny_var_channels=1)
  return jax.device_get(rv.merge(v)["params"])


@pytest.fixture(scope="module")
def packed_path(tmp_path_factory):
  """A ClusterQAT W4A8 packed file of the tiny model (as tests/deploy/test_deploy.py makes it)."""
  params = _merged()
  q = rv.make_quantizer("cluster", bits=4)
  state = q.init(params)
  model = RepVGG(TINY, num_classes=5, deploy=True, act_bits=8, cifar_stem=False)
  batches = [deploy.normalize_images(_images(8, s), MEAN, STD) for s in range(2)]
  state = rv.calibrate(model, {"params": q.apply(params, state), "quant": state}, batches,
                       method="minmax")
  desc = rv.model_description(model, image_size=SIZE, mean=MEAN, std=STD, dataset="test")
  path = tmp_path_factory.mktemp("iree") / "model.packed"
  rv.pack(params, q, state, desc).save(path)
  return path


def _compile(compiler, mlir):
  return compiler.compile_str(mlir, input_type="stablehlo", target_backends=["llvm-cpu"],
                              extra_args=["--iree-llvmcpu-target-cpu=host"])


def test_iree_runs_the_static_batch_stablehlo_with_the_packed_models_predictions(
    iree, packed_path, tmp_path):
  compiler, runtime = iree
  deployed = rv.load_packed(packed_path)
  rv.export_stablehlo(deployed.packed, tmp_path / "model.stablehlo", batch_size=BATCH)
  exported = jax.export.deserialize((tmp_path / "model.stablehlo").read_bytes())
  assert [a.shape for a in exported.in_avals] == [(BATCH, SIZE, SIZE, 3)]
  module = runtime.load_vm_flatbuffer(_compile(compiler, exported.mlir_module()),
                                      driver="local-task")
  images = _images(4 * BATCH, 5)
  got = np.concatenate([np.asarray(module.main(images[i:i + BATCH]).to_host())
                        for i in range(0, len(images), BATCH)])
  want = np.asarray(deployed(images))
  assert got.dtype == np.float32 and got.shape == want.shape == (4 * BATCH, 5)
  np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.abs(want).max())


def test_iree_rejects_the_symbolic_batch_of_uint8_images(iree, packed_path):
  # jax.export reads the batch from the uint8 argument (stablehlo.get_dimension_size);
  # IREE 3.13 cannot convert that tensor.dim of an unsigned tensor. Should this start
  # to compile, batch_size=None can be the IREE form too.
  compiler, _ = iree
  exported = jax.export.deserialize(rv.export_stablehlo(rv.load_packed(packed_path).packed))
  assert exported.in_avals[0].shape[1:] == (SIZE, SIZE, 3)
  with pytest.raises(compiler.CompilerToolError, match=r"'tensor\.dim'.*xui8>"):
    _compile(compiler, exported.mlir_module())


@pytest.mark.parametrize("batch_size", [0, -2, 2.0, "8", True])
def test_export_stablehlo_names_a_bad_batch_size(packed_path, batch_size):
  with pytest.raises(ValueError, match=f"batch_size={batch_size!r}"):
    rv.export_stablehlo(rv.load_packed(packed_path).packed, batch_size=batch_size)
