"""The trainer's config: every field and its default (:func:`base_config`), and its
validation: unknown or invalid fields fail at start, by name.

The ``ConfigDict`` returned by ``configs/*.py`` is locked, so a misspelt
``--config.x.y`` override is rejected by ml_collections itself; ``validate``
checks enums and ranges that a lock cannot. ``train_and_evaluate`` validates once, in
:func:`resolve`, after every command-line override.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections
from absl import logging

DTYPES = ("float32", "bfloat16")
# The other enums and ranges are their components' own: validate asks the model, the
# quantizer, the activation calibration and the loader to check their fields, so each
# rule is written once (and a component called directly refuses the same values).


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with defaults; configs override a few and lock."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.log_every = 50
  c.eval_batch_size = 256
  # Evaluate the train-form FP and merged networks. False leaves their accuracy out of
  # the report (QAT from an FP run that was already evaluated, e.g. in python -m experiments.study).
  c.eval_fp_forms = True
  # Evaluate the stock baseline beside the QAT forms: the run's merged network quantized as
  # a stock PTQ tool would at the same bits (uniform per-channel weights, MSE step, the same
  # activation steps, no QAT; qat.stock_baseline), the report's "stock PTQ" row.
  c.eval_baseline = True

  c.model = ml_collections.ConfigDict()
  c.model.name = "RepVGG-A0"          # a zoo name; model.blocks, model.widths override its own
  c.model.norm = "bn"                 # "bn" | "oabn"
  c.model.block = "repvgg"            # "repvgg" | "qarepvgg" (one BN after the branch sum)
  # OABN (docs/oabn.md): "branch" bounds each channel's 1x1 + identity centre taps by
  # oabn_tau x the rms of its 3x3 branch; "median" bounds each BN's scales by oabn_tau x
  # the layer's median; "" = by depth (branch up to 4 blocks a stage, median deeper:
  # models.oabn.resolve_bound). oabn_tau 0 = the form's default (branch 3, median 4).
  c.model.oabn_form = ""
  c.model.oabn_tau = 0.0
  c.model.oabn_bound = "tanh"         # "tanh" (smooth) | "clip"
  c.model.oabn_relative = True        # median form: tau x median (True) or tau itself
  c.model.cifar_stem = False          # stride 1 in the stem and stage 1, for 28-32 px inputs
  # Override the variant's blocks per stage / width multipliers (4 values each,
  # as the official RepVGG(num_blocks=..., width_multiplier=...)); () = the variant's.
  c.model.blocks = ()
  c.model.widths = ()
  c.model.dtype = "float32"           # compute dtype; params stay float32
  # "xla": every conv is lax.conv_general_dilated; "auto": on CPU, convs with <= 4 output
  # pixels run as matmuls (models/conv.py; several times faster for 32 px inputs there).
  c.model.conv_impl = "xla"

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"              # "idx" | "folder" | "tfds" | "synthetic"
  c.data.name = "imagenet2012"        # the dataset's name (tfds, idx; reported)
  c.data.data_dir = ""                # "" = the source's default; local or gs://
  # 0 = the dataset's own count (known datasets, folder: one class per directory);
  # labels outside [0, num_classes) are an error.
  c.data.num_classes = 0
  # Per-channel pixel mean and std in [0, 1] (1 or 3 values); () = the known dataset's,
  # or computed once from the training images (idx, folder).
  c.data.mean = ()
  c.data.std = ()
  c.data.image_size = 224
  c.data.augment = "rrc_flip"
  c.data.train_subset = 0
  c.data.worker_count = 0
  c.data.synthetic_examples = 0       # synthetic source only: 0 = the source's default
  # Local smoke mode of the ImageNet configs (``configs/imagenet_w4.py:local``): write a
  # synthetic imagenet2012 (tfds ArrayRecord, JPEG) of this many training examples into
  # data_dir ("" = <workdir>/local_tfds) first, then read it as a real run would. 0 = off.
  c.data.local_examples = 0

  # Stage 1: FP training of the multi-branch network.
  c.fp = _stage_config()
  # Stage 2: QAT of the merged network (the "merge" stage has no training).
  c.qat = _stage_config()
  c.qat.base_lr = 0.01
  c.qat.warmup_steps = 0
  # Distillation from the merged float network the stage starts from (frozen, one forward
  # per step): "off" | "logits" (loss (1 - distill_weight) * cross-entropy + distill_weight
  # * T^2 KL(teacher || student) at temperature distill_temperature; docs/quantization.md).
  c.qat.distill = "off"
  c.qat.distill_weight = 0.5
  c.qat.distill_temperature = 2.0
  c.quant = ml_collections.ConfigDict()
  # "cluster" (k-means codebooks) | "uniform" (fixed grid) | "lsq" (learned step)
  # | "none" (no QAT, no export).
  c.quant.method = "cluster"
  c.quant.bits = 4                    # weights: 1..8 for cluster, 2..8 for uniform/lsq
  # Weight codebooks or steps: "tensor" | "channel" | "group" (cluster: quant.group_size
  # consecutive output channels share one codebook; it must divide every layer's).
  c.quant.granularity = "channel"
  c.quant.group_size = 1
  # cluster: vector codebooks of d consecutive input-channel weights (one index of
  # quant.bits bits per d weights; d must divide every block layer's input channels).
  c.quant.cluster_dim = 1
  c.quant.first_last_bits = 8
  c.quant.refit_every = 100
  c.quant.clipping = "minmax"         # uniform/lsq weight step: "minmax" | "mse"
  c.quant.int8_levels = False         # cluster: codebooks on a per-channel int8 grid
  # Activations: the input of every conv and of the head, per tensor; 0 = float.
  c.quant.act_bits = 0
  c.quant.act_calibration = "minmax"  # "minmax" | "percentile" | "mse" (then LSQ in QAT)
  c.quant.act_percentile = 99.99
  c.quant.calib_batches = 16          # training batches (qat.batch_size) to calibrate on
  # Per-layer weight bits under a size budget (docs/quantization.md, "Mixed precision"):
  # one of avg_bits > 0 (the block layers' bytes of a uniform avg_bits model) or
  # bytes > 0 (packed bytes of every quantized kernel); 0 and 0: every layer at bits.
  c.quant.budget = ml_collections.ConfigDict()
  c.quant.budget.avg_bits = 0.0
  c.quant.budget.bytes = 0
  c.quant.budget.bit_choices = (1, 2, 3, 4, 6, 8)
  c.quant.budget.sensitivity = "loss"  # "loss" (one layer quantized) | "hessian" (HAWQ-v2)
  c.quant.budget.batches = 4           # training batches (qat.batch_size) it is measured on

  # Deployment files beside model.packed (docs/deploy.md); not part of any stage's
  # fingerprint: changing them re-exports without retraining.
  c.export = ml_collections.ConfigDict()
  # model.onnx (QDQ: ONNX Runtime, TensorRT), evaluated with ONNX Runtime: "auto" (when
  # onnx and onnxruntime are installed, pip install 'repvgg-jax[onnx]') | "on" | "off".
  c.export.onnx = "auto"
  # "uint8" (what ONNX Runtime fuses on x86) | "int8" (TensorRT; needs quant.act_bits <= 7).
  c.export.onnx_activations = "uint8"
  # model.mlpackage (Core ML ML program, iOS 18 / macOS 15: the codebooks as LUTs), not
  # evaluated (Core ML predicts only on Apple platforms): "auto" (when coremltools is
  # installed, pip install 'repvgg-jax[coreml]') | "on" | "off".
  c.export.coreml = "auto"
  # model.stablehlo's batch: 0 = any (a symbolic dimension; jax.export runs it),
  # N = N images per call (static shapes: what IREE compiles).
  c.export.stablehlo_batch = 0

  # Start QAT from these train-form variables instead of the FP stage: an orbax
  # checkpoint directory of a previous run's FP stage, or a .npz/.msgpack of
  # flax variables (e.g. written by repvgg_jax.convert). "" = this run's FP stage.
  c.init_from = ""

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False    # call jax.distributed.initialize at start
  c.distributed.coordinator_address = ""  # "" = auto-detected (TPU VM, SLURM)
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  return c


def _stage_config() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.enabled = True
  s.num_steps = 1000
  s.batch_size = 256                  # global
  s.base_lr = 0.1                     # per 256 examples: lr = base_lr * batch_size / 256
  s.warmup_steps = 0
  s.momentum = 0.9
  s.nesterov = False
  s.weight_decay = 1e-4
  s.label_smoothing = 0.0
  s.grad_clip_norm = 0.0              # clip gradients to this global norm; 0 = off
  # The learned quantizer steps' learning rate (LSQ weight steps, activation steps in QAT),
  # as a factor on the stage's; no effect where nothing is learned (the FP stage).
  s.quant_lr_scale = 1.0
  # A penalty on the merged kernels added to the loss (repvgg_jax/penalties.py):
  # "none" | "kure" (kurtosis, Shkolnik et al. 2020) | "channel_max" (OABN "merged":
  # per-channel max/rms above the target); its weight, and its target (0 = the
  # penalty's default: kure 1.8, channel_max 8).
  s.penalty = "none"
  s.penalty_weight = 0.0
  s.penalty_target = 0.0
  s.checkpoint_every = 500
  s.keep = 2
  s.eval_every = 0                    # evaluate every N steps during the stage; 0 = only after it
  # Trace this many steps (after the first of an invocation, which compiles) with
  # jax.profiler into <workdir>/tensorboard/<stage> (TensorBoard's profile plugin); 0 = off.
  s.profile_steps = 0
  return s


def closest_field(key: str, fields: Any, prefix: str = "") -> str | None:
  """``prefix`` + the field of ``fields`` closest to a misspelt ``key``, or None: the
  "did you mean" of ``validate`` and of the command line (``launch/main.py``)."""
  near = difflib.get_close_matches(key, list(fields), n=1)
  return prefix + near[0] if near else None


class ConfigError(ValueError):
  """An unknown or invalid config field; the message names each one."""


def _fail(problems: list[str]) -> None:
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ``ConfigError`` (a ValueError) naming every unknown or invalid field of ``cfg``."""
  problems = []
  ref = base_config()

  def walk(c: Any, r: Any, prefix: str) -> None:
    for key in c.keys():
      name = f"{prefix}{key}"
      if key not in r:
        near = closest_field(key, r.keys(), prefix)
        problems.append(f"unknown field {name}" + (f" (did you mean {near}?)" if near else ""))
      elif isinstance(r[key], ml_collections.ConfigDict):
        if isinstance(c[key], ml_collections.ConfigDict):
          walk(c[key], r[key], name + ".")
        else:
          problems.append(f"{name} must be a group of fields")
  walk(cfg, ref, "")
  _fail(problems)

  def enum(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
      problems.append(f"{name}={value!r} not in {allowed}")

  def positive(name: str, value: Any, zero_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= 0 if zero_ok else value > 0)
    if not ok:
      problems.append(f"{name}={value!r} must be {'>= 0' if zero_ok else '> 0'}")

  def owned(group: str, check: Any, *args: Any, **kwargs: Any) -> None:
    """The component's own check; its message starts with the field's name, so the
    config's group prefix names the field (``model.norm='x': ...``)."""
    try:
      check(*args, **kwargs)
    except ValueError as e:
      problems.append(f"{group}{e}")

  from repvgg_jax.data.pipeline import check_fields
  from repvgg_jax.models.repvgg import check_model
  from repvgg_jax.penalties import PENALTIES
  from repvgg_jax.quant.activation import check_act_bits, check_calibration
  from repvgg_jax.quant.quantizer import METHODS, check_options
  m = cfg.model
  owned("model.", check_model, m.name, norm=m.norm, block=m.block, oabn_form=m.oabn_form or None,
        oabn_bound=m.oabn_bound, oabn_tau=m.oabn_tau or None, conv_impl=m.conv_impl)
  if not isinstance(m.oabn_relative, bool):
    problems.append(f"model.oabn_relative={m.oabn_relative!r} must be True or False")
  for f, kind in (("blocks", int), ("widths", (int, float))):
    v = cfg.model[f]
    ok = isinstance(v, (tuple, list)) and (len(v) == 0 or (len(v) == 4 and all(
        isinstance(x, kind) and not isinstance(x, bool) and x > 0 for x in v)))
    if not ok:
      what = "ints" if kind is int else "numbers"
      problems.append(f"model.{f}={v!r} must be () or 4 positive {what}")
  enum("model.dtype", cfg.model.dtype, DTYPES)
  owned("", check_fields, cfg.data)
  positive("data.local_examples", cfg.data.local_examples, zero_ok=True)
  if cfg.data.local_examples and (cfg.data.source, cfg.data.name) != ("tfds", "imagenet2012"):
    problems.append(f"data.local_examples={cfg.data.local_examples!r} needs data.source='tfds' "
                    f"and data.name='imagenet2012' (got {cfg.data.source!r}, "
                    f"{cfg.data.name!r})")
  if isinstance(cfg.data.num_classes, bool) or not isinstance(cfg.data.num_classes, int) \
      or cfg.data.num_classes < 0:
    problems.append(f"data.num_classes={cfg.data.num_classes!r} must be an int >= 0")
  for f in ("mean", "std"):
    v = cfg.data[f]
    if not (isinstance(v, (tuple, list)) and len(v) in (0, 1, 3) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
      problems.append(f"data.{f}={v!r} must be () or 1 or 3 numbers")
    elif f == "std" and any(x <= 0 for x in v):
      problems.append(f"data.std={v!r} must be positive")
  if isinstance(cfg.data.mean, (tuple, list)) and isinstance(cfg.data.std, (tuple, list)) \
      and len(cfg.data.mean) != len(cfg.data.std):
    problems.append(f"data.mean={cfg.data.mean!r} and data.std={cfg.data.std!r} must be "
                    f"given together, of the same length")
  positive("eval_batch_size", cfg.eval_batch_size)
  if not isinstance(cfg.eval_fp_forms, bool):
    problems.append(f"eval_fp_forms={cfg.eval_fp_forms!r} must be True or False")
  if not isinstance(cfg.eval_baseline, bool):
    problems.append(f"eval_baseline={cfg.eval_baseline!r} must be True or False")
  positive("log_every", cfg.log_every)
  qc = cfg.quant
  methods = METHODS + ("none",)  # "none": no QAT, no export
  enum("quant.method", qc.method, methods)
  if qc.method in methods:  # "none" takes the widest options, the codebooks'
    owned("quant.", check_options, "cluster" if qc.method == "none" else qc.method, qc.bits,
          qc.granularity, qc.first_last_bits, clipping=qc.clipping,
          int8_levels=qc.int8_levels, group_size=qc.group_size, cluster_dim=qc.cluster_dim)
  positive("quant.refit_every", cfg.quant.refit_every)
  owned("quant.", check_act_bits, qc.act_bits)
  owned("quant.", check_calibration, qc.act_calibration, qc.act_percentile)
  if not isinstance(qc.int8_levels, bool):
    problems.append(f"quant.int8_levels={qc.int8_levels!r} must be True or False")
  if not (isinstance(cfg.quant.calib_batches, int) and cfg.quant.calib_batches > 0):
    problems.append(f"quant.calib_batches={cfg.quant.calib_batches!r} must be a positive int")
  _check_budget(cfg, problems)
  _check_export(cfg, problems, enum)

  def count(name: str, v: Any, low: int) -> None:
    """A problem naming ``name`` unless ``v`` is an int >= ``low`` (0 or 1)."""
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
      problems.append(f"{name}={v!r} must be " + ("a positive int" if low else "an int >= 0"))

  for stage in ("fp", "qat"):
    s = cfg[stage]
    for f in ("num_steps", "batch_size", "checkpoint_every", "keep"):
      count(f"{stage}.{f}", s[f], 1)
    for f in ("eval_every", "profile_steps", "warmup_steps"):
      count(f"{stage}.{f}", s[f], 0)
    positive(f"{stage}.base_lr", s.base_lr)
    positive(f"{stage}.weight_decay", s.weight_decay, zero_ok=True)
    positive(f"{stage}.grad_clip_norm", s.grad_clip_norm, zero_ok=True)
    positive(f"{stage}.quant_lr_scale", s.quant_lr_scale, zero_ok=True)
    enum(f"{stage}.penalty", s.penalty, PENALTIES)
    positive(f"{stage}.penalty_weight", s.penalty_weight, zero_ok=True)
    positive(f"{stage}.penalty_target", s.penalty_target, zero_ok=True)
    if s.penalty != "none" and not s.penalty_weight:
      problems.append(f"{stage}.penalty={s.penalty!r} needs {stage}.penalty_weight > 0")
    if not 0 <= s.momentum < 1:
      problems.append(f"{stage}.momentum={s.momentum!r} must be in [0, 1)")
    if not 0 <= s.label_smoothing < 1:
      problems.append(f"{stage}.label_smoothing={s.label_smoothing!r} must be in [0, 1)")
  from repvgg_jax.train.steps import check_distill
  q = cfg.qat
  owned("qat.", check_distill, q.distill, q.distill_weight, q.distill_temperature)
  if q.distill != "off" and (not q.enabled or qc.method == "none"):
    problems.append(f"qat.distill={q.distill!r} needs a QAT stage: qat.enabled=True and "
                    f"quant.method other than 'none' (got qat.enabled={q.enabled!r}, "
                    f"quant.method={qc.method!r})")
  _fail(problems)


EXPORT_SWITCHES = ("auto", "on", "off")


def _check_budget(cfg: ml_collections.ConfigDict, problems: list[str]) -> None:
  from repvgg_jax.quant.mixed import budget_problems
  b = cfg.quant.budget
  if not b.avg_bits and not b.bytes:
    return
  problems += [f"quant.budget.{p}" for p in budget_problems(
      b.avg_bits, b.bytes, b.bit_choices, cfg.quant.method, b.sensitivity, b.batches)]
  if cfg.quant.method == "none":
    problems.append("quant.budget needs quant.method other than 'none'")


def _check_export(cfg: ml_collections.ConfigDict, problems: list[str], enum: Any) -> None:
  from repvgg_jax.deploy import coreml, onnx
  e = cfg.export
  enum("export.coreml", e.coreml, EXPORT_SWITCHES)
  if e.coreml == "on" and not coreml.available():
    problems.append("export.coreml='on' needs coremltools: pip install 'repvgg-jax[coreml]' "
                    "(or export.coreml='auto' to skip it without it)")
  enum("export.onnx", e.onnx, EXPORT_SWITCHES)
  if e.onnx == "on" and not onnx.available():
    problems.append("export.onnx='on' needs onnx and onnxruntime: pip install "
                    "'repvgg-jax[onnx]' (or export.onnx='auto' to skip it without them)")
  if e.onnx != "off":
    try:
      onnx.check_activations(e.onnx_activations, cfg.quant.act_bits)
    except ValueError as err:
      problems.append(f"export.onnx_activations: {err}")
  b = e.stablehlo_batch
  if not (isinstance(b, int) and not isinstance(b, bool) and b >= 0):
    problems.append(f"export.stablehlo_batch={b!r} must be 0 (any batch) or a positive int")


def resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates ``cfg`` and returns a locked copy with the defaults that depend on other
  fields filled in, and warmups shortened to fit their stage.

  ``model.oabn_form`` "" becomes the depth's form and ``model.oabn_tau`` 0 the form's
  default (:func:`repvgg_jax.models.oabn.resolve_bound`), so the workdir records and
  the report state them. A ``warmup_steps`` of at least
  ``num_steps`` (a short run of a long recipe, e.g. ``--config.fp.num_steps=50``
  with the demo's 100 warmup steps) becomes ``num_steps // 10``, with a log line;
  the report states the value used.
  """
  from repvgg_jax.train.state import oabn_bound
  validate(cfg)
  cfg = cfg.copy_and_resolve_references()
  cfg.model.oabn_form, cfg.model.oabn_tau = oabn_bound(cfg.model)
  for stage in ("fp", "qat"):
    s = cfg[stage]
    if s.warmup_steps >= s.num_steps:
      short = s.num_steps // 10
      logging.warning("%s.warmup_steps=%d is not below %s.num_steps=%d: warming up for %d "
                      "steps instead", stage, s.warmup_steps, stage, s.num_steps, short)
      s.warmup_steps = short
  cfg.lock()
  return cfg

