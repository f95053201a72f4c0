"""The README's python blocks run as written, in order, in one namespace (like a notebook)."""

import importlib.util
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README has no python example"
  ort = importlib.util.find_spec("onnxruntime") is not None
  namespace = {}
  for code in blocks:
    if ort or "import onnxruntime" not in code:  # the [onnx] extra's block
      exec(compile(code, "README.md", "exec"), namespace)
  printed = capsys.readouterr().out.splitlines()
  assert float(printed[0]) < 1e-5  # merged vs train-form relative difference
  same, size = printed[-2 if ort else -1].split()
  assert same == "True"  # the loaded W4A8 model predicts as the QAT forward
  assert 0 < int(size) < 4_000_000  # 4-bit A0 at 10 classes: ~1/7 of float32's 33 MB
  if ort:
    assert printed[-1] == "True"  # ONNX Runtime on model.onnx predicts as load_packed
