"""CPU speed of RepVGG: train form vs deploy form, FP vs ClusterQAT, JAX vs PyTorch.

All variants of one table run in one process, compiled and warmed up first,
then timed interleaved (each repeat runs every variant once), so load that
drifts during the run hits them alike. Reported: the median over repeats of
the mean time per call, (min-max) over repeats, and ratios of medians.

1. Inference (``train=False``), 1000 classes, NHWC jitted JAX vs NCHW
   ``torch.inference_mode()``: the train form against the deploy form
   (``repvgg_jax.merge``; timm ``reparameterize_model`` or
   ``torch_repvgg.reparameterize``).
2. Training step, 10 classes, SGD momentum and softmax cross entropy: the
   repo's ``make_train_step`` on the train form (BN batch stats updated), the
   deploy form, and the deploy form under 4-bit ClusterQAT (plus the
   codebook refit the pipeline runs every ``--refit-every`` steps); PyTorch
   train and deploy forms with ``torch.optim.SGD``. Every variant uses the
   same constant ``--lr``; BN running stats are first set to the batch's
   statistics, so the merged network starts well scaled, as after FP training
   (merged from a random init, it diverges within one step).

Initial params are drawn in NumPy (``bench_common.random_variables``): compiling
``model.init`` costs far more than the steps themselves on a small CPU.

If ``create_model`` takes ``conv_impl``, JAX rows are given for each value.

PyTorch models (``--torch``): timm's, or ``benchmarks/torch_repvgg.py``, which
needs torch only, so a CPU-only torch build can be timed where no matching
torchvision (which timm imports) is installed.

  python benchmarks/speed.py [--repeats 7] [--only inference|train] [--torch auto|timm|plain|none]
  python benchmarks/speed.py --quick   # tiny sizes, a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import bench_common as bc
import repvgg_jax as rv
from repvgg_jax.train import sharding, steps
from repvgg_jax.train.config import base_config
from repvgg_jax.train.qat import make_refit
from repvgg_jax.train.state import build_model, create_train_state

CONV_IMPLS = ("xla", "auto")


def conv_impls(name: str) -> tuple:
  """The ``conv_impl`` values ``create_model`` accepts; ``(None,)`` without the option."""
  ok = []
  for impl in CONV_IMPLS:
    try:
      rv.create_model(name, conv_impl=impl)
    except (TypeError, ValueError):
      continue
    ok.append(impl)
  return tuple(ok) or (None,)


def jax_label(impl: str | None) -> str:
  return "JAX" if impl is None else f"JAX conv_impl={impl}"


@dataclasses.dataclass(frozen=True)
class TorchModels:
  """Where the PyTorch rows' models come from: timm, or ``torch_repvgg`` (torch only)."""
  label: str                                   # "PyTorch timm" / "PyTorch plain"
  create: Callable[[int], Any]                 # num_classes -> train-form nn.Module
  reparameterize: Callable[[Any], Any]         # train form -> deploy-form copy


def _timm_models(name: str) -> TorchModels | str:
  try:
    import timm
    import timm.utils
  except Exception as e:  # noqa: BLE001 -- e.g. a torchvision built for another torch
    return f"timm not importable ({type(e).__name__}: {e})"
  t = name.lower().replace("-", "_")
  if not timm.is_model(t):
    return f"timm has no model for {name}"
  return TorchModels("PyTorch timm",
                     lambda classes: timm.create_model(t, pretrained=False, num_classes=classes),
                     timm.utils.reparameterize_model)


def _plain_models(name: str) -> TorchModels | str:
  import torch_repvgg
  if name not in torch_repvgg.VARIANTS or torch_repvgg.VARIANTS[name].se:
    return f"the plain PyTorch RepVGG has no {name}"
  return TorchModels("PyTorch plain", lambda classes: torch_repvgg.RepVGG(name, classes),
                     torch_repvgg.reparameterize)


def load_torch(which: str, name: str) -> tuple[object, TorchModels | None, str | None]:
  """``(torch, models, note)``; ``(None, None, why)`` when skipped or not available.

  ``which``: "none", "timm", "plain", or "auto" (timm if it imports, else plain).
  """
  if which == "none":
    return None, None, "PyTorch skipped (--torch none)"
  try:
    import torch
  except ImportError as e:
    return None, None, f"PyTorch skipped: torch not importable ({e})"
  models = _timm_models(name) if which in ("timm", "auto") else None
  note = None
  if which == "plain" or (which == "auto" and isinstance(models, str)):
    note = f"PyTorch models: benchmarks/torch_repvgg.py ({models})" if models else None
    models = _plain_models(name)
  if isinstance(models, str):
    return None, None, f"PyTorch skipped: {models}"
  torch.set_num_threads(os.cpu_count())
  return torch, models, note


# ---------------------------------------------------------------- inference


def jax_inference_models(name: str, impl: str | None) -> dict:
  """Per form: ``(model, variables)``; params do not depend on the input size."""
  kw = {} if impl is None else {"conv_impl": impl}
  m = rv.create_model(name, num_classes=1000, **kw)
  md = rv.create_model(name, num_classes=1000, deploy=True, **kw)
  v = bc.random_variables(m, (32, 32, 3))
  return {"train": (m, v), "deploy": (md, jax.jit(rv.merge)(v))}


def jax_inference_fns(models: dict, x: jax.Array) -> dict:
  fns = {}
  for form, (m, v) in models.items():
    f = jax.jit(lambda v, x, m=m: m.apply(v, x, train=False))
    fns[form] = lambda f=f, v=v: jax.block_until_ready(f(v, x))
  return fns


def torch_inference_models(tm: TorchModels) -> dict:
  model = tm.create(1000).eval()
  return {"train": model, "deploy": tm.reparameterize(model).eval()}  # a copy


def torch_inference_fns(torch, models: dict, x: np.ndarray) -> dict:
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

  def run(model):
    def fn():
      with torch.inference_mode():
        return model(xt)
    return fn
  return {form: run(m) for form, m in models.items()}


def inference(args, impls, torch, tm: TorchModels | None, shapes) -> None:
  rng = np.random.default_rng(0)
  jax_models = {impl: jax_inference_models(args.model, impl) for impl in impls}
  torch_models = torch_inference_models(tm) if tm else None
  for px, batch in shapes:
    x = rng.standard_normal((batch, px, px, 3), dtype=np.float32)
    fns, rows = {}, []
    for impl in impls:
      for form, fn in jax_inference_fns(jax_models[impl], jnp.asarray(x)).items():
        fns[(jax_label(impl), form)] = fn
    if tm:
      for form, fn in torch_inference_fns(torch, torch_models, x).items():
        fns[(tm.label, form)] = fn
    t = bc.time_interleaved(fns, args.repeats, args.min_sample_s)
    print(f"\n## Inference, {args.model}, {px} px, batch {batch}, 1000 classes\n")
    print("| implementation | form | ms/batch median (min-max) | images/s | "
          "deploy speed-up | torch / this | first call s |")
    print("|---|---|---|---|---|---|---|")
    for (impl_name, form), r in t.items():
      speedup = bc.ratio(t[(impl_name, "train")]["ms"], r["ms"]) if form == "deploy" else ""
      vs = ""
      if impl_name.startswith("JAX") and tm and (tm.label, form) in t:
        vs = bc.ratio(t[(tm.label, form)]["ms"], r["ms"])
      rows.append(f"| {impl_name} | {form} | {bc.fmt_ms(r)} | {batch / r['ms'] * 1e3:.1f} | "
                  f"{speedup} | {vs} | {r['first_s']:.1f} |")
    print("\n".join(rows), flush=True)


# ---------------------------------------------------------------- training


def _fresh(state, mesh):
  """A replicated copy owning its buffers (the train step donates its state)."""
  return sharding.replicate(jax.tree.map(lambda a: jnp.array(a, copy=True), state), mesh)


def _stepper(step, state, batch) -> tuple:
  holder = {"state": state, "loss": None}

  def fn():
    s, m = step(holder["state"], batch)
    jax.block_until_ready((s, m))
    holder["state"], holder["loss"] = s, m["loss"]
  return fn, holder


def calibrate_bn(model, variables: dict, images: jax.Array, passes: int = 50) -> dict:
  """Running BN stats set (nearly) to the batch stats of ``images``.

  At random init the running stats (mean 0, var 1) do not match the
  activations, so the merged network's logits are huge and its training
  diverges within a step; calibrated, it starts like a trained one.
  """
  def body(_, stats):
    _, upd = model.apply({**variables, "batch_stats": stats}, images,
                         train=True, mutable=["batch_stats"])
    return upd["batch_stats"]
  stats = jax.jit(lambda s: jax.lax.fori_loop(0, passes, body, s))(variables["batch_stats"])
  return {**variables, "batch_stats": stats}


def calibrate_bn_torch(torch, model, x) -> None:
  """Running BN stats := the batch stats of ``x`` (cumulative average over one pass)."""
  bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  saved = [m.momentum for m in bns]
  for m in bns:
    m.reset_running_stats()
    m.momentum = None
  with torch.no_grad():
    model.train()(x)
  for m, mom in zip(bns, saved):
    m.momentum = mom


def _stage(cfg_stage, lr: float, batch_size: int):
  """Constant learning rate ``lr`` (warmup 0, a cosine too long to matter)."""
  cfg_stage.batch_size = batch_size
  cfg_stage.base_lr = lr * 256 / batch_size
  cfg_stage.warmup_steps = 0
  cfg_stage.num_steps = 10 ** 9
  return cfg_stage


def jax_train_fns(args, impl: str | None, mesh, batch: dict, px: int) -> tuple[dict, dict]:
  """Step closures for train FP, deploy FP, deploy QAT and the QAT refit."""
  cfg = base_config()
  cfg.model.name = args.model
  cfg.model.norm = args.norm
  cfg.data.image_size = px
  bs = batch["image"].shape[0]
  _stage(cfg.fp, args.lr, bs)
  _stage(cfg.qat, args.lr, bs)

  def build(deploy):
    m = build_model(cfg.model, args.classes, deploy=deploy)
    return m if impl is None else m.clone(conv_impl=impl)

  model, dmodel = build(False), build(True)
  variables = calibrate_bn(model, bc.random_variables(model, (px, px, 3)), batch["image"])
  merged = jax.device_get(jax.jit(rv.merge)(variables))
  q = rv.make_quantizer("cluster", bits=4)
  if args.quick:  # k-means init is slow; uniform codebooks have the same shapes
    uq = rv.make_quantizer("uniform", bits=4)
    quant = jax.device_get(jax.jit(lambda p: uq.codebooks(p, {}))(merged["params"]))
  else:
    quant = q.init(merged["params"])
  fns, holders = {}, {}
  for key, m, v, stage, quantizer, qs in (
      ("train FP", model, variables, cfg.fp, None, None),
      ("deploy FP", dmodel, merged, cfg.qat, None, None),
      ("deploy QAT", dmodel, merged, cfg.qat, q, quant)):
    state = _fresh(create_train_state(m, v, stage, quant=qs), mesh)
    step = steps.make_train_step(mesh, args.classes, 0.0, quantizer)
    fns[key], holders[key] = _stepper(step, state, batch)
  qat = holders["deploy QAT"]

  refit_fn = make_refit(q, mesh)

  def refit():  # as the pipeline does: jitted on device, codebooks replicated
    new = refit_fn(qat["state"].params, qat["state"].quant)
    jax.block_until_ready(new)
    qat["state"] = qat["state"].replace(quant=new)
  if args.refit:
    fns["QAT refit"] = refit
  return fns, holders


def torch_train_fns(torch, tmodels: TorchModels, classes: int, x: np.ndarray, y: np.ndarray,
                    lr: float) -> tuple[dict, dict]:
  import torch.nn.functional as F
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  yt = torch.from_numpy(y.astype(np.int64))
  tm = tmodels.create(classes)
  calibrate_bn_torch(torch, tm, xt)
  td = tmodels.reparameterize(tm.eval()).train()
  tm.train()
  fns, holders = {}, {}
  for key, model in (("train FP", tm), ("deploy FP", td)):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    holder = {"loss": None}

    def fn(model=model, opt=opt, holder=holder):
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(model(xt), yt)
      loss.backward()
      opt.step()
      holder["loss"] = loss.detach()
    fns[key], holders[key] = fn, holder
  return fns, holders


def training(args, impls, torch, tm: TorchModels | None, px: int, batch_size: int) -> None:
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch_size, px, px, 3), dtype=np.float32)
  y = rng.integers(0, args.classes, batch_size).astype(np.int32)
  batch = sharding.shard_batch({"image": x, "label": y}, mesh)
  fns, holders = {}, {}
  for impl in impls:
    f, h = jax_train_fns(args, impl, mesh, batch, px)
    fns.update({(jax_label(impl), k): v for k, v in f.items()})
    holders.update({(jax_label(impl), k): v for k, v in h.items()})
  if tm:
    f, h = torch_train_fns(torch, tm, args.classes, x, y, args.lr)
    fns.update({(tm.label, k): v for k, v in f.items()})
    holders.update({(tm.label, k): v for k, v in h.items()})
  t = bc.time_interleaved(fns, args.repeats, args.min_sample_s)
  bad = [f"{a} {b}" for (a, b), h in holders.items()
         if h["loss"] is not None and not np.isfinite(float(h["loss"]))]

  print(f"\n## Training step, {args.model} ({args.norm.upper()}), {px} px, batch {batch_size}, "
        f"{args.classes} classes\n")
  print("| implementation | network | ms/step median (min-max) | images/s | first call s |")
  print("|---|---|---|---|---|")
  for (impl_name, key), r in t.items():
    ips = f"{batch_size / r['ms'] * 1e3:.1f}" if key != "QAT refit" else ""
    per = " (per refit)" if key == "QAT refit" else ""
    print(f"| {impl_name} | {key}{per} | {bc.fmt_ms(r)} | {ips} | {r['first_s']:.1f} |")

  print(f"\n### Ratios (of medians), {px} px, batch {batch_size}\n")
  print("| ratio | implementation | value | goal |")
  print("|---|---|---|---|")
  for impl in impls:
    n = jax_label(impl)
    ms = {k: t[(n, k)]["ms"] for k in ("train FP", "deploy FP", "deploy QAT", "QAT refit")
          if (n, k) in t}
    print(f"| deploy QAT / deploy FP (step only) | {n} | "
          f"{bc.ratio(ms['deploy QAT'], ms['deploy FP'])} | <= 1.05x |")
    if "QAT refit" in ms:
      amort = ms["deploy QAT"] + ms["QAT refit"] / args.refit_every
      print(f"| deploy QAT + refit every {args.refit_every} steps / deploy FP | {n} | "
            f"{bc.ratio(amort, ms['deploy FP'])} | |")
    print(f"| train form / deploy form (FP) | {n} | "
          f"{bc.ratio(ms['train FP'], ms['deploy FP'])} | |")
    if tm:
      for key in ("train FP", "deploy FP"):
        print(f"| {tm.label} / JAX, {key} | {n} | "
              f"{bc.ratio(t[(tm.label, key)]['ms'], ms[key])} | >= 1.0x |")
  if tm:
    tt = {k: t[(tm.label, k)]["ms"] for k in ("train FP", "deploy FP")}
    print(f"| train form / deploy form (FP) | {tm.label} | "
          f"{bc.ratio(tt['train FP'], tt['deploy FP'])} | |")
  if bad:
    print(f"\nNote: non-finite loss at the end of {', '.join(bad)}; those times may be off.")
  sys.stdout.flush()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="tiny sizes and 2 repeats: a smoke test, not a measurement")
  p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7, quick 2)")
  p.add_argument("--only", choices=("inference", "train"), default=None)
  p.add_argument("--torch", choices=("auto", "timm", "plain", "none"), default="auto",
                 help="PyTorch rows: timm's RepVGG, the torch-only benchmarks/torch_repvgg.py "
                      "(any torch build, e.g. CPU-only without a matching torchvision), none; "
                      "auto: timm if it imports, else plain")
  p.add_argument("--model", default="RepVGG-A0")
  p.add_argument("--conv-impl", default=None,
                 help="comma list of conv_impl values for the JAX rows, when create_model "
                      "takes conv_impl (default: all it accepts; quick: the first)")
  p.add_argument("--norm", choices=("bn", "oabn"), default="bn",
                 help="norm of the JAX train form in the training table (timm has BN)")
  p.add_argument("--classes", type=int, default=10, help="classes of the training table")
  p.add_argument("--lr", type=float, default=1e-6,
                 help="constant SGD learning rate of every training variant; tiny, since "
                      "the merged network (no BN) diverges within steps at 1e-4 from a random "
                      "init; the value does not change the work per step")
  p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                 help="time the QAT codebook refit as the pipeline runs it (eagerly, on the "
                      "host); default on, off in quick mode")
  p.add_argument("--refit-every", type=int, default=100,
                 help="QAT steps per codebook refit, to amortize the refit time")
  p.add_argument("--min-sample-s", type=float, default=None,
                 help="repeat a call within a sample until it lasts this long (default 0.5, quick 0)")
  args = p.parse_args()
  if args.repeats is None:
    args.repeats = 2 if args.quick else 7
  if args.refit is None:
    args.refit = not args.quick
  if args.min_sample_s is None:
    args.min_sample_s = 0.0 if args.quick else 0.5
  infer_shapes = ((64, 4), (32, 8)) if args.quick else ((224, 32), (32, 256))
  train_shape = (32, 8) if args.quick else (32, 64)

  torch, tm, note = load_torch(args.torch, args.model)
  notes = [note] if note else []
  impls = conv_impls(args.model)
  if args.conv_impl and impls != (None,):
    want = tuple(args.conv_impl.split(","))
    bad = sorted(set(want) - set(impls))
    if bad:
      p.error(f"--conv-impl {bad} not accepted by create_model (accepted: {impls})")
    impls = want
  elif args.quick and impls != (None,):
    impls = impls[:1]
    notes.append(f"quick: JAX rows for conv_impl={impls[0]} only (--conv-impl to pick)")
  notes.append(f"timing: median over {args.repeats} interleaved repeats, (min-max) over "
               f"repeats; a repeat of a variant averages enough calls to last "
               f">= {args.min_sample_s} s; 'first call' includes compilation")
  if args.quick:
    notes.append("quick: ClusterQAT codebooks are uniform ones (same shapes), not q.init"
                 + ("" if args.refit else "; no refit row (--refit to add it)"))
    notes.append("QUICK MODE: tiny sizes, few repeats: a smoke test, not results")
  print(bc.header("RepVGG speed (CPU)", torch, tuple(notes)), flush=True)
  start = time.perf_counter()
  if args.only in (None, "inference"):
    inference(args, impls, torch, tm, infer_shapes)
  if args.only in (None, "train"):
    training(args, impls, torch, tm, *train_shape)
  print(f"\nwall time {time.perf_counter() - start:.0f} s, load average at end: {bc.load_avg()}")


if __name__ == "__main__":
  main()
