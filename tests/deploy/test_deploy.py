"""Activation quantization, calibration, the self-contained packed model, StableHLO, integer inference."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import deploy
from repvgg_jax.deploy import integer
from repvgg_jax.models.repvgg import RepVGG
from repvgg_jax.quant.activation import ActQuant
from repvgg_jax.quant import activation, uniform
from _util import raises_naming, random_variables, tiny_variant

TINY = tiny_variant((1, 2, 1, 1))
SIZE = 16
MEAN, STD = (0.4, 0.45, 0.5), (0.25, 0.3, 0.2)


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _deploy_model(act_bits=8):
  return RepVGG(TINY, num_classes=5, deploy=True, act_bits=act_bits, cifar_stem=True)


@functools.lru_cache(maxsize=None)
def _merged():
  x = jnp.zeros((1, SIZE, SIZE, 3))
  v = random_variables(RepVGG(TINY, num_classes=5, cifar_stem=True), x, tiny_var_channels=1)
  return jax.device_get(rv.merge(v)["params"])


def _calibrated(method="cluster", calibration="minmax", act_bits=8, **opts):
  """(model, quantizer, quant state with activation steps) for the tiny model."""
  params = _merged()
  q = rv.make_quantizer(method, bits=4, **opts)
  state = q.init(params)
  model = _deploy_model(act_bits)
  batches = [deploy.normalize_images(_images(8, s), MEAN, STD) for s in range(2)]
  quant = rv.calibrate(model, {"params": q.apply(params, state), "quant": state}, batches,
                       method=calibration)
  return model, q, quant


def test_act_quant_forward_is_the_unsigned_or_signed_grid():
  x = jnp.asarray(np.random.default_rng(0).normal(0, 2, (4, 6)), jnp.float32)
  for signed in (False, True):
    m = ActQuant(4, signed)
    out = m.apply({"quant": {"step": jnp.float32(0.25)}}, x)
    qmin, qmax = uniform.int_range(4, signed)
    np.testing.assert_array_equal(out, np.clip(np.round(np.asarray(x) / 0.25), qmin, qmax) * 0.25)
  y, rec = ActQuant(4).apply({"quant": {"step": jnp.float32(1.0)}}, x, mutable=["intermediates"])
  np.testing.assert_array_equal(y, x)  # observing passes float through
  assert float(rec["intermediates"]["max_abs"][0]) == float(jnp.abs(x).max())


def test_calibrated_step_methods():
  rng = np.random.default_rng(0)
  sample = np.abs(rng.standard_t(2, 20000)).astype(np.float32)
  top = float(sample.max())
  assert activation.calibrated_step(top, sample, 8, False, "minmax") == np.float32(top / 255)
  p = activation.calibrated_step(top, sample, 8, False, "percentile", 99.0)
  assert p == pytest.approx(np.percentile(sample, 99.0) / 255, rel=1e-6)
  mse = activation.calibrated_step(top, sample, 4, False, "mse")

  def err(step):
    return np.sum((np.clip(np.round(sample / step), 0, 15) * step - sample) ** 2)
  assert err(mse) < err(top / 15)
  with pytest.raises(ValueError, match="act_calibration='kl'"):
    activation.calibrated_step(top, sample, 8, False, "kl")
  with pytest.raises(ValueError, match="act_bits=1"):
    activation.calibrated_step(top, sample, 1, False, "minmax")


def test_calibrate_sets_every_layer_and_the_signed_input():
  model, q, state = _calibrated()
  names = {"stem", "stages_0_0", "stages_1_0", "stages_1_1", "stages_2_0", "stages_3_0"}
  assert {k for k in state if "act" in state[k]} == names and "head_act" in state
  # The stem reads the normalized image (signed): min-max step = max|x| / 127.
  xs = [deploy.normalize_images(_images(8, s), MEAN, STD) for s in range(2)]
  top = max(float(jnp.abs(x).max()) for x in xs)
  assert float(state["stem"]["act"]["step"]) == pytest.approx(top / 127, rel=1e-6)


def test_create_model_names_bad_act_bits():
  with pytest.raises(ValueError, match="act_bits=9"):
    rv.create_model("A0", deploy=True, act_bits=9)
  with pytest.raises(ValueError, match="act_bits=8"):
    rv.create_model("A0", act_bits=8)  # the train form has no activation quantizers


def _packed(tmp_path, method="cluster", act_bits=8, **opts):
  model, q, state = _calibrated(method, act_bits=act_bits, **opts)
  desc = rv.model_description(model, image_size=SIZE, mean=MEAN, std=STD, dataset="test")
  packed = rv.pack(_merged(), q, state, desc)
  path = tmp_path / "model.packed"
  packed.save(path)
  return model, q, state, path


@pytest.mark.parametrize("method", ["cluster", "lsq"])
def test_load_packed_runs_uint8_images_as_the_qat_forward(tmp_path, method):
  model, q, state, path = _packed(tmp_path, method)
  deployed = rv.load_packed(path)
  assert deployed.model["dataset"] == "test" and deployed.model["act_bits"] == 8
  images = _images(6, 7)
  x = deploy.normalize_images(images, MEAN, STD)
  want = jax.jit(model.apply)({"params": q.apply(_merged(), state), "quant": state}, x)
  np.testing.assert_allclose(deployed(images), want, rtol=1e-5, atol=1e-6)
  gray = images[..., :1]  # repeated to RGB, as the exports tile it
  np.testing.assert_array_equal(deployed(gray), deployed(np.repeat(gray, 3, axis=-1)))
  with raises_naming(ValueError, "uint8", "float32"):
    deployed(images.astype(np.float32))


def test_load_packed_names_truncated_and_other_version_files(tmp_path):
  _, _, _, path = _packed(tmp_path)
  data = path.read_bytes()
  (tmp_path / "cut.packed").write_bytes(data[: len(data) // 2])
  with raises_naming(ValueError, "cut.packed") as e:
    rv.load_packed(tmp_path / "cut.packed")
  assert "pickle" not in str(e.value)
  packed = rv.quant.read_packed(path)
  old = dict(packed._arrays())
  import json
  meta = json.loads(old["__meta__"].tobytes())
  meta["version"] = 2  # the version before grouped and vector codebooks
  old["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  np.savez(tmp_path / "v2.packed", **old)
  with raises_naming(ValueError, "v2.packed.npz", "version 2", "version 3"):
    rv.load_packed(tmp_path / "v2.packed.npz")


_STANDALONE = textwrap.dedent("""
    import sys
    sys.modules["repvgg_jax"] = None          # importing it now fails
    import jax, numpy as np
    exp = jax.export.deserialize(open(sys.argv[1], "rb").read())
    images = np.load(sys.argv[2])
    np.save(sys.argv[3], np.asarray(exp.call(images)))
""")


def test_stablehlo_runs_without_repvgg_jax_and_matches_the_packed_model(tmp_path):
  _, _, _, path = _packed(tmp_path)
  deployed = rv.load_packed(path)
  data = rv.export_stablehlo(deployed.packed, tmp_path / "model.stablehlo")
  assert len(data) == os.path.getsize(tmp_path / "model.stablehlo")
  assert len(data) <= 1.25 * os.path.getsize(path)
  images = _images(5, 3)
  np.save(tmp_path / "images.npy", images)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  subprocess.run([sys.executable, "-c", _STANDALONE, str(tmp_path / "model.stablehlo"),
                  str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
                 check=True, env=env, cwd=tmp_path)
  np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.asarray(deployed(images)))


@pytest.mark.parametrize("method, opts", [
    ("cluster", dict(int8_levels=True)), ("lsq", {}), ("uniform", dict(clipping="mse"))])
def test_integer_forward_gives_the_fake_quant_predictions(tmp_path, method, opts):
  _, q, state, path = _packed(tmp_path, method, **opts)
  deployed = rv.load_packed(path)
  images = _images(64, 11)
  fake, integer = np.asarray(deployed(images)), np.asarray(deployed.integer(images))
  # Float rounding of the sums can move an activation across a rounding
  # boundary; the logits stay within a few steps of the last layer.
  assert np.abs(fake - integer).max() <= 0.05 * np.abs(fake).max()
  assert np.mean(fake.argmax(1) == integer.argmax(1)) >= 0.95
  for p, w in q.kernels(_merged()).items():
    k = np.asarray(deployed.packed.layers["/".join(p)]["codebook"]) / np.asarray(
        deployed.packed.layers["/".join(p)]["int_scale"])[..., None]
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)  # levels = scale x int8


@pytest.mark.parametrize("act_bits", [8, 7, 5])
def test_integer_forward_compiled_is_the_integer_chain_eager(tmp_path, act_bits):
  # The last stage runs on 2x2 maps: where XLA CPU once folded the zero pad of 7-bit
  # (zero-point 0) activations into the int8 conv and summed garbage under jit.
  _, _, _, path = _packed(tmp_path, "cluster", act_bits=act_bits, int8_levels=True)
  deployed = rv.load_packed(path)
  images = _images(16, 12)
  compiled = np.asarray(deployed.integer(images))
  with jax.disable_jit():
    eager = np.asarray(integer.integer_forward_fn(deployed.packed)(images))
  # Float rounding of the requantization only (XLA fuses it differently under jit).
  np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-4 * np.abs(eager).max())


def test_integer_forward_refuses_codebooks_off_the_int8_grid(tmp_path):
  _, _, _, path = _packed(tmp_path, "cluster")
  with raises_naming(ValueError, "stem/reparam_conv/kernel", "int8"):
    rv.load_packed(path).integer(_images(2))
