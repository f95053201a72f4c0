"""Per-channel outliers of a trained FP checkpoint's merged kernels.

  python benchmarks/channel_outliers.py --checkpoint runs/demo_fp/checkpoints/fp \
      --out experiments/results/channel_outliers.md

``--checkpoint``: an FP-stage orbax directory (or .npz / .msgpack) of the model
of ``--config`` (default ``configs/demo.py``; ``--set FIELD=VALUE`` overrides), e.g. the one the demo writes
under ``<workdir>/checkpoints/fp``. Writes the Markdown (machine header,
summary, per-layer table of :func:`repvgg_jax.analysis.channel_outlier_table`; with
an OABN bound, its factors per layer, :func:`repvgg_jax.analysis.bound_factors`)
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
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="config override, e.g. --set model.blocks=() --set model.norm=oabn")
  args = p.parse_args()

  import matplotlib
  import numpy as np
  matplotlib.use("Agg")
  from repvgg_jax import analysis, plots
  from repvgg_jax.fileio import atomic_write, atomic_write_text
  from repvgg_jax.train.checkpoint import load_variables
  from repvgg_jax.train.state import build_model, init_variables

  cfg = load_config(args.config)
  import ast
  for item in args.set:
    field, _, value = item.partition("=")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):  # a bare string
      pass
    cfg.update_from_flattened_dict({field: value})
  size = cfg.data.image_size
  template = init_variables(build_model(cfg.model, args.num_classes, deploy=False),
                            (size, size, 3), 0)
  variables = load_variables(args.checkpoint, template)
  per_layer = analysis.channel_outliers(variables)
  factors = analysis.bound_factors(variables)
  s = analysis.channel_outlier_summary(per_layer)
  notes = (f"model: {cfg.model.name}, norm {cfg.model.norm}, blocks {tuple(cfg.model.blocks)}, "
           f"{args.num_classes} classes, {size} px",)
  md = header("Per-channel outliers of merged kernels", notes=notes)
  md += "\nSummary (`repvgg_jax.analysis.channel_outlier_summary`):\n\n```json\n"
  md += json.dumps(s, indent=2) + "\n```\n\n" + analysis.channel_outlier_table(per_layer)
  if factors:
    md += ("\nOABN's bound factor per layer (`repvgg_jax.analysis.bound_factors`; 1 = "
           "inactive): `branch`, on each block's identity (or 1x1) branch; `median`, on "
           "each BN's scale:\n\n"
           "| layer | median | min | channels below 0.5 |\n|---|---:|---:|---:|\n")
    md += "".join(f"| {k} | {np.median(f):.3f} | {f.min():.3f} | {(f < 0.5).sum()} of "
                  f"{f.size} |\n" for k, f in factors.items())
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
