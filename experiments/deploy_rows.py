"""Deployment rows on the demo model: W8A8 / W4A8 PTQ, LSQ and ClusterQAT, integer inference.

  python launch/main.py --config configs/demo.py --workdir runs/demo_fp --config.quant.method=none
  python -m experiments.deploy_rows --fp_workdir runs/demo_fp --workdir runs/deploy_rows

From the demo's FP checkpoint (``<fp_workdir>/checkpoints/fp``, ``init_from``),
each row runs ``repvgg_jax.train.train.train_and_evaluate`` with ``configs/demo.py`` and
the row's overrides in ``<workdir>/<row>`` (a row with a ``report.json`` is
skipped, so the same command continues a stopped run), then prints one
Markdown table: QAT fake-quant, packed file, ``model.stablehlo`` and integer
forward accuracy on the 10,000 test images, the packed size, and the gap to FP.
Stem and head weights are at 8 bits in every row (``quant.first_last_bits``).

Last, the standalone check of the ClusterQAT row: its ``model.stablehlo`` is
deserialized and called in a fresh Python process in which ``import repvgg_jax``
fails, on the 10,000 test images as uint8, and its argmax is compared with
``repvgg_jax.load_packed(model.packed)`` on the same images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs.*, benchmarks.*, experiments.* import however it is started

from absl import app, flags  # noqa: E402

_FP = flags.DEFINE_string("fp_workdir", None, "Workdir of the demo's FP run (its report.json "
                          "gives the FP accuracy, checkpoints/fp the weights).")
_WORKDIR = flags.DEFINE_string("workdir", None, "One subdirectory per row.")
_QAT_STEPS = flags.DEFINE_integer("qat_steps", 200, "QAT steps of the QAT rows.")
_ONLY = flags.DEFINE_list("only", [], "Run only these rows (names below); default all.")
flags.mark_flags_as_required(["fp_workdir", "workdir"])

from experiments import rows as study_rows  # noqa: E402
from experiments.rows import QUANT_ROWS  # noqa: E402

# name -> (label, config overrides): the study's rows (one table), and one of its own.
ROWS = {name: (QUANT_ROWS[name][0], QUANT_ROWS[name][3])
        for name in ("w8a8_ptq_minmax", "w8a8_ptq_mse", "w4a8_ptq_mse", "lsq_w4a8",
                     "cluster_w4a8")}
ROWS["cluster_w4a8_int8"] = ("W4A8 ClusterQAT, codebooks on int8 grids",
                             {**QUANT_ROWS["cluster_w4a8"][3], "quant.int8_levels": True})


def row_config(overrides: dict, fp_workdir: str):
  cfg = study_rows.base_config(False)  # the demo's recipe, as the study rows run it
  cfg.unlock()
  cfg.init_from = os.path.abspath(os.path.join(fp_workdir, "checkpoints", "fp"))
  cfg.eval_fp_forms = False
  cfg.qat.num_steps = _QAT_STEPS.value
  cfg.update_from_flattened_dict(overrides)
  cfg.lock()
  return cfg


_STANDALONE = textwrap.dedent("""
    import sys
    sys.modules["repvgg_jax"] = None  # importing it now fails
    import jax, numpy as np
    exp = jax.export.deserialize(open(sys.argv[1], "rb").read())
    images = np.load(sys.argv[2])
    call = jax.jit(exp.call)
    np.save(sys.argv[3], np.concatenate([np.asarray(call(images[i:i + 500]))
                                         for i in range(0, len(images), 500)]))
""")


def standalone_check(row_dir: str) -> str:
  """Argmax of model.stablehlo (no repvgg_jax) vs load_packed on the test images."""
  row_dir = os.path.abspath(row_dir)
  import numpy as np
  import repvgg_jax
  from repvgg_jax import data
  cfg = row_config({}, _FP.value)
  loader = data.make_loader(cfg.data, "test", global_batch_size=500, train=False)
  batches = list(loader)
  images = np.concatenate([np.asarray(b["image"])[np.asarray(b["mask"])] for b in batches])
  np.save(os.path.join(row_dir, "test_images.npy"), images)
  out = os.path.join(row_dir, "stablehlo_logits.npy")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  subprocess.run([sys.executable, "-c", _STANDALONE, os.path.join(row_dir, "model.stablehlo"),
                  os.path.join(row_dir, "test_images.npy"), out], check=True, env=env,
                 cwd=row_dir)
  deployed = repvgg_jax.load_packed(os.path.join(row_dir, "model.packed"))
  ours = np.concatenate([np.asarray(deployed(images[i:i + 500])).argmax(-1)
                         for i in range(0, len(images), 500)])
  theirs = np.load(out).argmax(-1)
  os.remove(os.path.join(row_dir, "test_images.npy"))
  return (f"Standalone check ({os.path.basename(row_dir)}): model.stablehlo called where "
          f"repvgg_jax cannot be imported gives the argmax of load_packed on "
          f"{int((ours == theirs).sum()):,} of {len(images):,} test images.")


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def main(argv):
  del argv
  from benchmarks import bench_common
  from repvgg_jax.train.train import train_and_evaluate
  fp = read_json(os.path.join(_FP.value, "report.json"))["forms"]["fp"]["accuracy"]
  for name, (_, overrides) in ROWS.items():
    row_dir = os.path.join(_WORKDIR.value, name)
    if (_ONLY.value and name not in _ONLY.value) or os.path.exists(
        os.path.join(row_dir, "report.json")):
      continue
    train_and_evaluate(row_config(overrides, _FP.value), row_dir)

  pct = lambda f, key="accuracy": f"{100 * f[key]:.2f}%" if key in f else "-"  # noqa: E731
  print(bench_common.header("Deployment rows, demo model (Fashion-MNIST, shallow RepVGG-A0, "
                            "OABN)"))
  print(f"FP (train form, float): {100 * fp:.2f}%; QAT rows: {_QAT_STEPS.value} steps.\n")
  print("| row | QAT fake-quant | packed | model.stablehlo | integer forward (agrees with "
        "packed) | packed bytes | packed - FP (points) |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for name, (label, _) in ROWS.items():
    path = os.path.join(_WORKDIR.value, name, "report.json")
    if not os.path.exists(path):
      print(f"| {label} | not run | | | | | |")
      continue
    f = read_json(path)["forms"]
    integer = (f"{pct(f['integer'])} ({pct(f['integer'], 'agreement')})" if "integer" in f
               else "no int8 grid")
    print(f"| {label} | {pct(f['qat'])} | {pct(f['packed'])} | {pct(f['stablehlo'])} | "
          f"{integer} | {f['packed']['size_bytes']:,} | "
          f"{100 * (f['packed']['accuracy'] - fp):+.2f} |")
  row_dir = os.path.join(_WORKDIR.value, "cluster_w4a8")
  if os.path.exists(os.path.join(row_dir, "report.json")):
    print("\n" + standalone_check(row_dir))


if __name__ == "__main__":
  app.run(main)
