"""RepVGG-A0 on CPU: ``conv_impl="xla"`` vs ``"auto"`` (matmuls on tiny maps).

Both variants are compiled up front and timed interleaved in one process
(each repeat runs every variant once), reporting the minimum over repeats,
so a shared, noisy machine affects them alike. Prints Markdown tables:

* whole model: FP train step (train form, value_and_grad + SGD, BN stats
  updated) and deploy-form forward at 32 px batch 128 and at 224 px batch 8
  (no output map there is small enough for the matmul forms: rows whose two
  variants lower to the same StableHLO are marked, their gap is noise);
* one block per stage at 32 px batch 128 (train fwd+bwd, deploy fwd), times
  the stage's block count, to show where the time goes;
* with ``--layers``: single 3x3 convs, XLA vs the matmul forms forced on
  (unrolled kernel or tap-pruned im2col, whichever ``models/conv.py`` picks for
  the shape), the data behind ``repvgg_jax.models.conv.MAX_OUT_PIXELS``.

  python benchmarks/conv_impl.py [--repeats 5] [--layers]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import repvgg_jax as rv
from repvgg_jax.models.repvgg import RepVGGBlock
from repvgg_jax.models import conv as conv_lib

from bench_common import cpu_model  # run as a script: benchmarks/ is on sys.path

IMPLS = ("xla", "auto")


def _load() -> float:
  try:
    return os.getloadavg()[0]
  except OSError:
    return float("nan")


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                     inner: int = 1) -> dict[str, float]:
  """Min over ``repeats`` of the mean ms per call; variants alternate."""
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile + warm up
  best = {k: float("inf") for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t = time.perf_counter()
      for _ in range(inner):
        jax.block_until_ready(fn())
      best[k] = min(best[k], (time.perf_counter() - t) / inner * 1e3)
  return best


def _compile(jitted: Any, *args: Any) -> tuple[float, str]:
  """(CPU seconds, all threads, to compile: less load-sensitive than wall time;
  the StableHLO text)."""
  lowered = jitted.lower(*args)
  t = time.process_time()
  lowered.compile()
  return time.process_time() - t, lowered.as_text()


def _train_step(model: rv.RepVGG) -> Callable[..., Any]:
  def loss_fn(params, stats, x, y):
    logits, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                              mutable=["batch_stats"])
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
    return loss, upd["batch_stats"]

  @jax.jit
  def step(params, stats, x, y):
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
    params = jax.tree.map(lambda p, d: p - 0.01 * d, params, g)
    return params, stats, loss
  return step


def whole_model(repeats: int) -> list[str]:
  rows = []
  rng = np.random.default_rng(0)
  # Train step, 32 px, batch 128.
  x = jnp.asarray(rng.standard_normal((128, 32, 32, 3), np.float32))
  y = jnp.asarray(rng.integers(0, 10, 128))
  fns, comp = {}, {}
  for impl in IMPLS:
    m = rv.create_model("RepVGG-A0", num_classes=10, conv_impl=impl)
    v = m.init(jax.random.key(0), x[:1])
    step = _train_step(m)
    comp[impl] = _compile(step, v["params"], v["batch_stats"], x, y)
    fns[impl] = functools.partial(step, v["params"], v["batch_stats"], x, y)
  rows.append(_row("train step (train form), 32 px, batch 128", time_interleaved(
      fns, repeats), comp))
  # Train step, 224 px, batch 8.
  x = jnp.asarray(rng.standard_normal((8, 224, 224, 3), np.float32))
  y = jnp.asarray(rng.integers(0, 1000, 8))
  fns, comp = {}, {}
  for impl in IMPLS:
    m = rv.create_model("RepVGG-A0", conv_impl=impl)
    v = m.init(jax.random.key(0), x[:1])
    step = _train_step(m)
    comp[impl] = _compile(step, v["params"], v["batch_stats"], x, y)
    fns[impl] = functools.partial(step, v["params"], v["batch_stats"], x, y)
  rows.append(_row("train step (train form), 224 px, batch 8", time_interleaved(
      fns, repeats), comp))
  # Deploy forward, 32 px batch 128 and 224 px batch 8.
  for px, batch, classes in ((32, 128, 10), (224, 8, 1000)):
    x = jnp.asarray(rng.standard_normal((batch, px, px, 3), np.float32))
    fns, comp = {}, {}
    for impl in IMPLS:
      m = rv.create_model("RepVGG-A0", num_classes=classes, deploy=True, conv_impl=impl)
      v = m.init(jax.random.key(0), x[:1])
      fwd = jax.jit(m.apply)
      comp[impl] = _compile(fwd, v, x)
      fns[impl] = functools.partial(fwd, v, x)
    rows.append(_row(f"deploy forward, {px} px, batch {batch}",
                     time_interleaved(fns, repeats * (3 if px == 224 else 1)), comp))
  return rows


def _row(name: str, t: dict[str, float], comp: dict[str, tuple[float, str]]) -> str:
  same = " (same program: noise)" if comp["xla"][1] == comp["auto"][1] else ""
  return (f"| {name} | {t['xla']:.1f} | {t['auto']:.1f} | {t['xla'] / t['auto']:.2f}x{same} | "
          f"{comp['xla'][0]:.1f} / {comp['auto'][0]:.1f} |")


# (name, blocks in A0, input size, Cin, Cout, stride) at 32 px input.
A0_BLOCKS_32 = (
    ("stem", 1, 32, 3, 48, 2),
    ("stage 0, block 0", 1, 16, 48, 48, 2),
    ("stage 0, block 1", 1, 8, 48, 48, 1),
    ("stage 1, block 0", 1, 8, 48, 96, 2),
    ("stage 1, blocks 1-3", 3, 4, 96, 96, 1),
    ("stage 2, block 0", 1, 4, 96, 192, 2),
    ("stage 2, blocks 1-13", 13, 2, 192, 192, 1),
    ("stage 3, block 0", 1, 2, 192, 1280, 2),
)


def per_block(repeats: int) -> list[str]:
  norm = rv.create_model("RepVGG-A0")._norm_factory()
  rng = np.random.default_rng(0)
  rows = []
  totals = {(f, i): 0.0 for f in ("train", "deploy") for i in IMPLS}
  for name, count, size, cin, cout, stride in A0_BLOCKS_32:
    x = jnp.asarray(rng.standard_normal((128, size, size, cin), np.float32))
    out = (size + 2 - 3) // stride + 1
    fns, hlo = {}, {}
    for impl in IMPLS:
      for form in ("train", "deploy"):
        blk = RepVGGBlock(cout, stride, 1, se=False, deploy=form == "deploy", norm=norm,
                          conv_impl=impl)
        v = blk.init(jax.random.key(0), x[:1], train=False)
        if form == "train":
          def f(v, x, blk=blk):
            y, _ = blk.apply(v, x, train=True, mutable=["batch_stats"])
            return jnp.sum(y * y)
          fn = jax.jit(jax.grad(f, argnums=(0, 1)))
        else:
          fn = jax.jit(functools.partial(blk.apply, train=False))
        fns[(form, impl)] = functools.partial(fn, v, x)
        hlo[(form, impl)] = fn.lower(v, x).as_text()
    t = time_interleaved(fns, repeats)
    for k in t:
      totals[k] += count * t[k]
    same = all(hlo[f, "xla"] == hlo[f, "auto"] for f in ("train", "deploy"))
    rows.append(f"| {name}{' (same program)' if same else ''} | "
                f"{size}x{size} -> {out}x{out}, {cin} -> {cout} | {count} | "
                f"{count * t['train', 'xla']:.1f} | {count * t['train', 'auto']:.1f} | "
                f"{count * t['deploy', 'xla']:.1f} | {count * t['deploy', 'auto']:.1f} |")
  rows.append(f"| sum | | 22 | {totals['train', 'xla']:.1f} | {totals['train', 'auto']:.1f} | "
              f"{totals['deploy', 'xla']:.1f} | {totals['deploy', 'auto']:.1f} |")
  return rows


# (input size, Cin, Cout, stride, groups) for single 3x3 pad-1 convs, batch 128.
LAYERS = (
    (1, 1280, 1280, 1, 1), (2, 192, 192, 1, 1), (2, 192, 1280, 2, 1), (2, 192, 192, 1, 4),
    (3, 192, 192, 1, 1), (4, 96, 96, 1, 1), (4, 96, 192, 2, 1), (4, 96, 192, 2, 4),
    (6, 96, 192, 2, 1), (8, 96, 192, 2, 1), (8, 48, 48, 1, 1),
)


def per_layer(repeats: int) -> list[str]:
  rng = np.random.default_rng(0)
  rows = []
  saved = conv_lib.MAX_OUT_PIXELS
  conv_lib.MAX_OUT_PIXELS = 1 << 30  # force the matmul forms on every size
  try:
    for size, cin, cout, stride, groups in LAYERS:
      x = jnp.asarray(rng.standard_normal((128, size, size, cin), np.float32))
      w = jnp.asarray(rng.standard_normal((3, 3, cin // groups, cout), np.float32))
      fns = {}
      for impl, conv in (("xla", lax.conv_general_dilated),
                         ("matmul", conv_lib.conv_general_dilated)):
        f = functools.partial(conv, window_strides=(stride, stride), padding=((1, 1), (1, 1)),
                              dimension_numbers=("NHWC", "HWIO", "NHWC"),
                              feature_group_count=groups)
        fwd = jax.jit(f)
        bwd = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
        fns[("fwd", impl)] = functools.partial(fwd, x, w)
        fns[("f+b", impl)] = functools.partial(bwd, x, w)
      t = time_interleaved(fns, repeats, inner=3)
      out = (size + 2 - 3) // stride + 1
      taps = len(conv_lib.live_taps(size, 3, stride, (1, 1))) ** 2
      form = "unrolled" if size * size <= taps else "im2col"
      rows.append(f"| {size}x{size} -> {out}x{out} | {cin} -> {cout} | {groups} | "
                  f"{form}, {taps} taps | {t['fwd', 'xla']:.2f} | {t['fwd', 'matmul']:.2f} | "
                  f"{t['f+b', 'xla']:.2f} | {t['f+b', 'matmul']:.2f} |")
  finally:
    conv_lib.MAX_OUT_PIXELS = saved
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--layers", action="store_true", help="also time single convs")
  args = ap.parse_args()
  ncpu = os.cpu_count()
  load0 = _load()
  out = [f"RepVGG-A0 on CPU, conv_impl xla vs auto: {ncpu} CPUs ({cpu_model()}), "
         f"jax {jax.__version__}, {jax.default_backend()}, "
         f"{datetime.date.today().isoformat()}, min of {args.repeats} interleaved repeats.",
         "", "| workload | xla ms | auto ms | speed-up | compile CPU s (xla / auto) |",
         "|---|---|---|---|---|"]
  out += whole_model(args.repeats)
  out += ["", "One block per stage, 32 px, batch 128 (ms x block count; train = "
          "forward + backward w.r.t. params and input):", "",
          "| blocks | map, channels | count | train xla | train auto | deploy xla | "
          "deploy auto |", "|---|---|---|---|---|---|---|"]
  out += per_block(args.repeats)
  if args.layers:
    out += ["", "Single 3x3 pad-1 convs, batch 128, matmul forms forced on every size (ms):",
            "", "| map | channels | groups | form | fwd xla | fwd matmul | fwd+bwd xla | "
            "fwd+bwd matmul |", "|---|---|---|---|---|---|---|---|"]
    out += per_layer(args.repeats)
  load1 = _load()
  note = f"1-min load average {load0:.1f} before, {load1:.1f} after on {ncpu} CPUs"
  if max(load0, load1) > 0.5 * (ncpu or 1):
    note += " (machine shared and loaded: absolute times are inflated and noisy)"
  out += ["", note + "."]
  print("\n".join(out))


if __name__ == "__main__":
  main()
