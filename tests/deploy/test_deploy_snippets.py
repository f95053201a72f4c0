"""docs/deploy.md's runtime snippets run as written, each alone in a fresh Python where only
the packages its ``# pip install`` line names import, in a directory holding a small W4A8
model's files and a Fashion-MNIST-shaped IDX file; each prints load_packed's predictions,
and its ``logits`` (saved by a line the test appends) are load_packed's on the images as
the trainer's loader prepares them: a snippet that pads or scales otherwise fails."""

import gzip
import importlib.util
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax.data.transforms import fit
from _util import ROOT, subprocess_env, tiny_packed

DEPLOY_MD = pathlib.Path(ROOT) / "docs" / "deploy.md"
# The pip names a snippet may install -> the modules they bring.
PACKAGES = {"numpy": {"numpy"}, "onnxruntime": {"onnxruntime"}, "openvino": {"openvino"},
            "jax": {"jax", "jaxlib"}, "flatbuffers": {"flatbuffers"},
            "iree-base-compiler": {"iree"}, "iree-base-runtime": {"iree"},
            "repvgg-jax": {"repvgg_jax", "jax", "jaxlib"}}
# What a snippet that does not name them must run without (importing them fails).
RUNTIMES = {"repvgg_jax", "jax", "jaxlib", "onnx", "onnxruntime", "openvino", "iree"}
STDLIB = {"gzip"}


def snippets():
  """``{pip line: code}`` of every ```python block of docs/deploy.md."""
  out = {}
  for code in re.findall(r"```python\n(.*?)```", DEPLOY_MD.read_text(), flags=re.S):
    first = code.splitlines()[0]
    assert first.startswith("# pip install "), f"a snippet without its pip line: {first!r}"
    out[first[len("# pip install "):]] = code
  return out


def imported_modules(code):
  return {m.split(".")[0] for m in re.findall(r"^(?:import|from) ([\w.]+)", code, re.M)}


def test_every_runtime_has_a_snippet_that_names_what_it_imports():
  found = snippets()
  assert set(found) == {"onnxruntime numpy", "openvino numpy", "jax flatbuffers numpy",
                        "jax flatbuffers iree-base-compiler iree-base-runtime numpy",
                        "repvgg-jax numpy"}
  for pip, code in found.items():
    named = set().union(*(PACKAGES[p] for p in pip.split()))
    assert imported_modules(code) <= named | STDLIB, pip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A W4A8 ClusterQAT model at 32 px (random weights) as the trainer writes it:
  model.packed, model.onnx, model.stablehlo (batch 1), and 8 gray 28 px images in an IDX
  file, with load_packed's predictions on them (padded by the loader's own ``fit``)."""
  d = tmp_path_factory.mktemp("snippets")
  packed = tiny_packed("cluster", act_bits=8)
  packed.save(d / "model.packed")
  rv.export_stablehlo(packed, d / "model.stablehlo", batch_size=1)
  if importlib.util.find_spec("onnx") is not None:
    rv.export_onnx(packed, d / "model.onnx")
  images = np.random.default_rng(7).integers(0, 256, (8, 28, 28), dtype=np.uint8)
  header = np.array([0x803, 8, 28, 28], ">u4").tobytes()
  with gzip.open(d / "t10k-images-idx3-ubyte.gz", "wb") as f:
    f.write(header + images.tobytes())
  x = np.stack([fit(im[..., None], 32) for im in images])
  return d, np.asarray(rv.load_packed(d / "model.packed")(x))


@pytest.mark.parametrize("pip", sorted(snippets()))
def test_snippet_runs_alone_and_predicts_as_load_packed(pip, run_dir):
  code = snippets()[pip]
  for module in imported_modules(code) - STDLIB:
    pytest.importorskip(module)
  if "model.onnx" in code:
    pytest.importorskip("onnx")  # to write the file
  d, want = run_dir
  (d / "logits.npy").unlink(missing_ok=True)
  blocked = sorted(RUNTIMES - set().union(*(PACKAGES[p] for p in pip.split())))
  prelude = f"import sys\nfor m in {blocked!r}:\n  sys.modules[m] = None\n"
  env = subprocess_env()
  if "repvgg_jax" in blocked:
    env.pop("PYTHONPATH")
  save = "\nnp.save('logits.npy', np.asarray(logits))\n"
  out = subprocess.run([sys.executable, "-c", prelude + code + save], cwd=d, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  printed = [int(v) for v in re.findall(r"\d+", out.stdout.strip().splitlines()[-1])]
  assert printed == want.argmax(-1).tolist(), f"{pip}: {printed}"
  # load_packed's logits, but for an activation now and then a step over a rounding
  # boundary (float sums in another order: OpenVINO's convs); a 28 -> 32 padding shifted
  # by 2 px moves them by 5% to 17% of their range.
  got = np.load(d / "logits.npy")
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=0.01 * np.abs(want).max())
