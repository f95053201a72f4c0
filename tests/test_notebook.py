"""docs/notebooks/quickstart.ipynb runs end to end (tiny parameters), and is stored executed."""

import os
import re

import pytest

from _util import CACHE_DIR, MIN_COMPILE_SECONDS, ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from repvgg_jax import data  # noqa: E402

NOTEBOOK = os.path.join(ROOT, "docs", "notebooks", "quickstart.ipynb")
CELL_TIMEOUT = 300  # seconds any one cell of the tiny run may take
# One block with an identity branch (stages_1_1); one bit width (the 4-bit run is the same
# code with other shapes, and would add its compilations: ~40 s of a cold run).
TINY = {"FP_STEPS": 4, "QAT_STEPS": 2, "EVAL_IMAGES": 256, "TRAIN_IMAGES": 2048,
        "BLOCKS": (1, 2, 1, 1), "QAT_BITS": (2,)}
MERGE_LINE = re.compile(r"max relative logit difference, train form vs merged: (\S+);")


def _needs_data():
  if not os.path.isdir(data.DEFAULT_IDX_DIR):
    pytest.skip(f"{data.DEFAULT_IDX_DIR} missing (apt-get install dataset-fashion-mnist)")


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _tagged(nb, tag):
  return [i for i, c in enumerate(nb.cells) if tag in c.get("metadata", {}).get("tags", [])]


def inject(nb, overrides):
  """``nb`` with a cell tagged ``injected-parameters`` setting ``overrides`` right after
  the cell tagged ``parameters`` (papermill's convention), replacing an earlier one."""
  (i,) = _tagged(nb, "parameters")
  nb.cells = [c for c in nb.cells
              if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
  source = "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
  nb.cells.insert(i + 1, nbformat.v4.new_code_cell(
      source, metadata={"tags": ["injected-parameters"]}))
  return nb


def execute(nb, monkeypatch, timeout=CELL_TIMEOUT):
  """Runs ``nb`` in a fresh kernel (the CPU platform and the suite's compilation cache)
  from the notebook's directory; raises ``nbclient.exceptions.CellExecutionError`` at the
  first failing cell."""
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(MIN_COMPILE_SECONDS))
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()
  return nb


def _text(cell):
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def _merge_differences(nb):
  found = [float(m.group(1)) for c in nb.cells if c.cell_type == "code"
           for m in MERGE_LINE.finditer(_text(c))]
  assert len(found) == 2, found  # BN and OABN
  return found


def _has_png(cell):
  return any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def test_notebook_runs_with_tiny_parameters(monkeypatch):
  _needs_data()
  nb = execute(inject(_read(), TINY), monkeypatch)
  assert all(d < 1e-5 for d in _merge_differences(nb))
  (fig,) = _tagged(nb, "outliers-figure")
  assert _has_png(nb.cells[fig])
  printed = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
  for bits in TINY["QAT_BITS"]:
    assert re.search(rf"W{bits}A8 ClusterQAT: accuracy \d+\.\d+% before QAT", printed)
    assert re.search(rf"a0_w{bits}a8\.packed: size_bytes [\d,]+ .*accuracy \d+\.\d+%", printed)
  assert "StableHLO by jax.export: predicts as load_packed on" in printed


def test_notebook_failure_is_reported(monkeypatch):
  """A raising cell fails the run: the test above can fail."""
  _needs_data()
  nb = _read()
  (i,) = _tagged(nb, "parameters")
  nb.cells = nb.cells[:i + 1] + [nbformat.v4.new_code_cell('raise RuntimeError("x")')]
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="RuntimeError"):
    execute(nb, monkeypatch, timeout=120)


def test_stored_notebook_is_executed():
  """The committed notebook holds the outputs of a full run: every code cell ran in order,
  none failed, the figure is there, and no path of the machine it ran on is printed."""
  nb = _read()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert not any(o.output_type == "error" for c in code for o in c.outputs)
  assert not _tagged(nb, "injected-parameters")
  (fig,) = _tagged(nb, "outliers-figure")
  assert _has_png(nb.cells[fig])
  assert all(d < 1e-5 for d in _merge_differences(nb))
  text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                   for c in code for o in c.outputs)
  assert not re.search(r"(/tmp/|/home/|/root/|/work/|/Users/|site-packages|[A-Z]:\\)", text)
