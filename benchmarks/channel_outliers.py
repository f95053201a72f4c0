"""Per-channel outliers of a trained FP checkpoint's merged kernels.

  python benchmarks/channel_outliers.py --checkpoint runs/demo_fp/checkpoints/fp \
      --out docs/channel_outliers.md

``--checkpoint``: an FP-stage orbax directory (or .npz / .msgpack) of the model
of ``--config`` (default ``configs/demo.py``), e.g. the one the demo writes
under ``<workdir>/checkpoints/fp``. Writes the Markdown (machine header,
summary, per-layer table of :func:`repvgg_jax.analysis.channel_outlier_table`)
to ``--out`` (stdout if not given) and the figure of
:func:`repvgg_jax.plots.plot_channel_outliers` beside it (``.png``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import header  # noqa: E402


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"))
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--out", default="")
  args = p.parse_args()

  import matplotlib
  matplotlib.use("Agg")
  from repvgg_jax import analysis, plots
  from repvgg_jax.fileio import atomic_write, atomic_write_text
  from repvgg_jax.train.pipeline import load_variables
  from repvgg_jax.train.state import build_model, init_variables

  cfg = load_config(args.config)
  size = cfg.data.image_size
  template = init_variables(build_model(cfg.model, args.num_classes, deploy=False),
                            (size, size, 3), 0)
  per_layer = analysis.channel_outliers(load_variables(args.checkpoint, template))
  s = analysis.channel_outlier_summary(per_layer)
  notes = (f"model: {cfg.model.name}, norm {cfg.model.norm}, blocks {tuple(cfg.model.blocks)}, "
           f"{args.num_classes} classes, {size} px",)
  md = header("Per-channel outliers of merged kernels", notes=notes)
  md += "\nSummary (`repvgg_jax.analysis.channel_outlier_summary`):\n\n```json\n"
  md += json.dumps(s, indent=2) + "\n```\n\n" + analysis.channel_outlier_table(per_layer)
  if not args.out:
    print(md)
    return
  png = os.path.splitext(args.out)[0] + ".png"
  md += f"\n![per-layer and per-channel max/rms]({os.path.basename(png)})\n"
  atomic_write(png, lambda tmp: plots.plot_channel_outliers(per_layer, tmp,
                                                               title=cfg.model.norm.upper()))
  atomic_write_text(args.out, md)
  print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
  main()
