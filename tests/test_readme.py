"""The README's python blocks run as written, in order, in one namespace (like a notebook)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README has no python example"
  namespace = {}
  for code in blocks:
    exec(compile(code, "README.md", "exec"), namespace)
  printed = capsys.readouterr().out.splitlines()
  assert float(printed[0]) < 1e-5  # merged vs train-form relative difference
  same, size = printed[-1].split()
  assert same == "True"  # the loaded W4A8 model predicts as the QAT forward
  assert 0 < int(size) < 4_000_000  # 4-bit A0 at 10 classes: ~1/7 of float32's 33 MB
