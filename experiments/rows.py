"""The rows of experiments/study.py: regimes, quantization rows, seeds, configs, study.json.

No flags and no training here: the study script and its tests share these
functions. A *regime* is a way of training the FP network (a norm, an OABN
form, a penalty, a block); a *quantization row* is a deployment setting applied
to a regime's FP checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import statistics

from repvgg_jax.fileio import atomic_write_text

REGIMES = ("bn", "oabn_median", "oabn_branch", "oabn_merged", "kure", "qarepvgg")
# Regimes the study ran and no longer can (their config fields are gone), with the
# overrides they ran with: a ledger that holds their rows still reports them.
# oabn_branch_warm: the branch bound loosened 15-fold at the first FP step, tightening to
# branch_tau over the first third of the FP steps; it did not mend the deep branch
# network (docs/oabn.md, "A bound that starts loose"), and the warm-up was removed.
RETIRED_REGIMES = {
    "oabn_branch_warm": lambda s: {"model.norm": "oabn", "model.oabn_form": "branch",
                                   "model.oabn_tau": s["branch_tau"],
                                   "fp.bound_warmup_steps": s.get("fp_steps", 3000) // 3,
                                   "fp.bound_warmup_start": 15.0},
}
# Regime settings that the flags choose (their defaults here); part of FIXED.
# KURE's weight is far below the paper's order (0.5-1): the merged kernels of RepVGG
# start with kurtosis in the hundreds (an identity tap per channel among 9 * Cin
# weights), so (kurt - 1.8)^2 ~ 1e5 would swamp the cross-entropy at 0.5; at 1e-3 the
# weighted penalty is of the order of the cross-entropy.
REGIME_DEFAULTS = {"branch_tau": 3.0, "merged_weight": 0.05, "merged_target": 8.0,
                   "kure_weight": 1e-3}
# Fields a regime sets only when the config has them (before model.oabn_form existed,
# OABN was the median form).
OPTIONAL_FIELDS = {"oabn_median": ("model.oabn_form",)}

_PTQ = {"qat.enabled": False}
_A8 = {"quant.act_bits": 8, "quant.act_calibration": "mse"}


def _lsq(bits: int) -> dict:
  return {"quant.method": "lsq", "quant.bits": bits, "quant.clipping": "mse", **_A8}


def _cluster(bits: int, act: bool = True) -> dict:
  return {"quant.method": "cluster", "quant.bits": bits,
          **(_A8 if act else {"quant.act_bits": 0})}


# name -> (label, kind "PTQ" | "QAT", weight bits, config overrides: flattened field
# names, ConfigDict.update_from_flattened_dict); experiments/deploy_rows.py and
# bits.py take their rows from here. Stem and head are at first_last_bits.
QUANT_ROWS = {
    "w8a8_ptq_minmax": ("W8A8 PTQ, min-max", "PTQ", 8,
                        {"quant.method": "uniform", "quant.bits": 8, "quant.act_bits": 8,
                         "quant.act_calibration": "minmax", **_PTQ}),
    "w8a8_ptq_mse": ("W8A8 PTQ, MSE", "PTQ", 8,
                     {"quant.method": "uniform", "quant.bits": 8, "quant.clipping": "mse",
                      **_A8, **_PTQ}),
    "w4a8_ptq_mse": ("W4A8 PTQ, MSE", "PTQ", 4,
                     {"quant.method": "uniform", "quant.bits": 4, "quant.clipping": "mse",
                      **_A8, **_PTQ}),
    **{f"lsq_w{b}a8": (f"W{b}A8 LSQ", "QAT", b, _lsq(b)) for b in (4, 3, 2)},
    **{f"cluster_w{b}a8": (f"W{b}A8 ClusterQAT", "QAT", b, _cluster(b)) for b in (4, 3, 2)},
    **{f"cluster_w{b}": (f"W{b} ClusterQAT (float activations)", "QAT", b, _cluster(b, False))
       for b in (4, 2)},
}
# Quantization rows run on every FP seed; the others on seed 0 only.
EVERY_SEED = ("w8a8_ptq_minmax", "cluster_w2a8")
# The goals compare the default OABN with BN over seeds on these rows too: they run on
# every seed for the goal regimes (the setting ``goal_regimes``, GOAL_REGIMES unless
# given; after the EVERY_SEED rows).
GOAL_REGIMES = ("bn", "oabn_branch")
GOAL_ROWS = ("w4a8_ptq_mse", "cluster_w4a8", "cluster_w3a8")
# The order rows run in, so that a partial study already compares the regimes.
SEED0_FIRST = ("w8a8_ptq_minmax", "w4a8_ptq_mse", "cluster_w2a8", "cluster_w4a8", "lsq_w2a8",
               "lsq_w4a8", "cluster_w3a8", "lsq_w3a8")
SEED0_LAST = ("w8a8_ptq_mse", "cluster_w4", "cluster_w2")
assert sorted(SEED0_FIRST + SEED0_LAST) == sorted(QUANT_ROWS)

# Named studies (``--recipe``): the flags each sets unless given on the command line.
# full_a0: the paper's network, A0's own 2, 4, 14, 1 blocks at the demo's 32 px; 6000 FP
# steps (the demo's 3000 left the deep network still climbing on seed 0: the report's
# convergence column shows the last two evals of every seed).
RECIPES = {
    "demo": {"blocks": ["1", "2", "4", "1"], "fp_steps": 3000, "out": "experiments/results/results.md"},
    "full_a0": {"blocks": [], "fp_steps": 6000, "seeds": 3,
                "regimes": ["bn", "oabn_branch", "qarepvgg", "oabn_median", "kure"],
                "goal_regimes": ["bn", "oabn_branch", "qarepvgg", "oabn_median"],
                "out": "experiments/results/results_full_a0.md"},
}

# Fields of study.json that fix every row's config: a resumed study must keep them.
# (The seeds and regimes may change: more seeds or regimes add rows.)
FIXED = ("smoke", "model", "blocks", "cifar_stem", "image_size", "data_source", "data_dir",
         "train_subset", "fp_steps", "qat_steps", "batch_size", "first_last_bits",
         "fp_eval_every", *REGIME_DEFAULTS)
DIVERGED = "diverged.json"  # written in a row's directory when its training hit a NaN/inf


class SettingsChanged(ValueError):
  """A resumed study was given settings that change its rows' configs."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One pipeline run: ``quant`` "fp" is the FP row of ``regime`` at ``seed``."""
  regime: str
  quant: str
  seed: int = 0

  @property
  def name(self) -> str:
    return f"{self.quant}_{self.regime}_s{self.seed}"

  @property
  def kind(self) -> str:
    """"FP", "PTQ" or "QAT"."""
    return "FP" if self.quant == "fp" else QUANT_ROWS[self.quant][1]


def make_rows(seeds: int, regimes=REGIMES, goal_regimes=GOAL_REGIMES,
              retired: bool = False) -> list[Row]:
  """Every row, in the order they run: seed 0 of every regime first (FP, then the
  quantization rows in SEED0_FIRST order, each across the regimes), then the FP,
  W8A8 min-max and W2A8 ClusterQAT rows of the other seeds, then their GOAL_ROWS of
  ``goal_regimes``, then SEED0_LAST. ``retired``: RETIRED_REGIMES are known too (the
  rows of a ledger, to report)."""
  known = (*REGIMES, *RETIRED_REGIMES) if retired else REGIMES
  unknown = [r for r in (*regimes, *goal_regimes) if r not in known]
  if unknown:
    raise ValueError(f"regimes {unknown} not in {REGIMES}")
  rows = [Row(g, q, 0) for q in ("fp",) + SEED0_FIRST for g in regimes]
  rows += [Row(g, q, s) for s in range(1, seeds) for q in ("fp",) + EVERY_SEED for g in regimes]
  rows += [Row(g, q, s) for s in range(1, seeds) for q in GOAL_ROWS for g in regimes
           if g in goal_regimes]
  rows += [Row(g, q, 0) for q in SEED0_LAST for g in regimes]
  return rows


def rows_of(s: dict) -> list[Row]:
  """The rows of the study settings ``s`` (settings stored before ``goal_regimes``
  existed have GOAL_REGIMES; a ledger's may hold RETIRED_REGIMES)."""
  return make_rows(s["seeds"], s["regimes"], s.get("goal_regimes", GOAL_REGIMES), retired=True)


def regime_overrides(regime: str, s: dict) -> dict:
  """Config overrides of ``regime`` on top of the base config, with the study settings ``s``
  (``branch_tau``, ``merged_weight``, ``merged_target``, ``kure_weight``); a retired
  regime's are those it ran with (fields the config no longer has)."""
  table = {
      "bn": {"model.norm": "bn"},
      "oabn_median": {"model.norm": "oabn", "model.oabn_form": "median", "model.oabn_tau": 4.0},
      "oabn_branch": {"model.norm": "oabn", "model.oabn_form": "branch",
                      "model.oabn_tau": s["branch_tau"]},
      "oabn_merged": {"model.norm": "bn", "fp.penalty": "channel_max",
                      "fp.penalty_weight": s["merged_weight"],
                      "fp.penalty_target": s["merged_target"]},
      "kure": {"model.norm": "bn", "fp.penalty": "kure", "fp.penalty_weight": s["kure_weight"],
               "fp.penalty_target": 1.8},
      "qarepvgg": {"model.block": "qarepvgg", "model.norm": "bn"},
  }
  if regime in RETIRED_REGIMES:
    return RETIRED_REGIMES[regime](s)
  if regime not in table:
    raise ValueError(f"regime {regime!r} not in {REGIMES}")
  return table[regime]


def has_field(cfg, key: str) -> bool:
  group, field = key.split(".")
  return group in cfg and field in cfg[group]


def missing_fields(regime: str, cfg=None) -> list[str]:
  """The config fields ``regime`` needs that this version's config lacks."""
  if cfg is None:
    from repvgg_jax.train.config import base_config
    cfg = base_config()
  return [k for k in regime_overrides(regime, REGIME_DEFAULTS)
          if k not in OPTIONAL_FIELDS.get(regime, ()) and not has_field(cfg, k)]


def available_regimes() -> list[str]:
  return [g for g in REGIMES if not missing_fields(g)]


def check_regimes(regimes) -> None:
  """Raises ValueError naming each regime this version's config cannot express."""
  bad = [f"{g} (needs {', '.join(missing_fields(g))})" for g in regimes if missing_fields(g)]
  if bad:
    raise ValueError("regimes not supported by this version of repvgg_jax's config: "
                     + "; ".join(bad))


def base_config(smoke: bool):
  """The studies' base: the demo config (the tiny one for ``smoke``) without distillation,
  the recipe every study's rows ran with; a study that varies it sets ``qat.distill`` per
  row (``experiments.qat_length``)."""
  if smoke:
    from configs.tiny import tiny_config
    cfg = tiny_config()
  else:
    from configs.demo import get_config
    cfg = get_config()
  cfg.qat.distill = "off"
  return cfg


def settings(smoke: bool, blocks=None, fp_steps: int = 3000, qat_steps: int = 200,
             batch_size: int = 64, train_subset: int = 0, data_dir: str = "",
             first_last_bits: int = 8, seeds: int | None = None,
             regimes=REGIMES, goal_regimes=GOAL_REGIMES, **regime_settings) -> dict:
  """The study settings (study.json ``settings``). ``smoke``: the tiny config on
  synthetic data with its own few steps, one seed; the size arguments are then ignored."""
  cfg = base_config(smoke)
  extra = set(regime_settings) - set(REGIME_DEFAULTS)
  if extra:
    raise ValueError(f"unknown regime settings {sorted(extra)}; known: {list(REGIME_DEFAULTS)}")
  if smoke:
    blocks, fp_eval_every = list(cfg.model.blocks), 2
    fp_steps, qat_steps, batch_size = cfg.fp.num_steps, cfg.qat.num_steps, cfg.fp.batch_size
    train_subset, data_dir = cfg.data.train_subset, cfg.data.data_dir
  else:
    given = list(cfg.model.blocks) if blocks is None else list(blocks)
    fp_eval_every = 500
    if len(given) not in (0, 4) or not all(str(b).isdigit() and int(b) > 0 for b in given):
      raise ValueError(f"blocks={','.join(map(str, given))}: expected 4 positive ints, or "
                       "none for the variant's own")
    blocks = [int(b) for b in given]
  seeds = (1 if smoke else 3) if seeds is None else seeds
  if seeds < 1:
    raise ValueError(f"seeds={seeds} must be >= 1")
  make_rows(1, regimes, goal_regimes)  # names an unknown regime
  check_regimes(regimes)
  return {"smoke": smoke, "model": cfg.model.name, "blocks": blocks,
          "cifar_stem": cfg.model.cifar_stem, "image_size": cfg.data.image_size,
          "data_source": cfg.data.source, "data_dir": data_dir, "train_subset": train_subset,
          "fp_steps": fp_steps, "qat_steps": qat_steps, "batch_size": batch_size,
          "first_last_bits": first_last_bits, "fp_eval_every": fp_eval_every,
          **REGIME_DEFAULTS, **regime_settings, "seeds": seeds, "regimes": list(regimes),
          "goal_regimes": list(goal_regimes)}


def fp_ckpt_dir(workdir: str, regime: str, seed: int) -> str:
  return os.path.join(workdir, Row(regime, "fp", seed).name, "checkpoints", "fp")


def row_config(row: Row, s: dict, workdir: str):
  """The validated pipeline config of ``row`` under the study settings ``s``."""
  from repvgg_jax.train import config as config_lib
  cfg = base_config(s["smoke"])
  cfg.model.blocks = tuple(s["blocks"])
  cfg.fp.num_steps, cfg.qat.num_steps = s["fp_steps"], s["qat_steps"]
  cfg.fp.batch_size = cfg.qat.batch_size = s["batch_size"]
  for stage in (cfg.fp, cfg.qat):
    stage.warmup_steps = min(stage.warmup_steps, stage.num_steps // 10)
  cfg.data.train_subset, cfg.data.data_dir = s["train_subset"], s["data_dir"]
  cfg.seed = row.seed
  cfg.quant.first_last_bits = s["first_last_bits"]
  if has_field(cfg, "export.coreml"):
    cfg.export.coreml = "off"  # not evaluated (Core ML predicts only on Apple platforms)
  overrides = regime_overrides(row.regime, s)
  missing = missing_fields(row.regime, cfg)
  if missing:
    raise ValueError(f"row {row.name}: the config has no field {', '.join(missing)}")
  cfg.update_from_flattened_dict({k: v for k, v in overrides.items() if has_field(cfg, k)})
  if row.quant == "fp":
    cfg.quant.method = "none"
    cfg.fp.eval_every = s["fp_eval_every"]
  else:
    cfg.update_from_flattened_dict(QUANT_ROWS[row.quant][3])
    cfg.init_from = fp_ckpt_dir(workdir, row.regime, row.seed)
    cfg.eval_fp_forms = False  # The FP row of the regime and seed has them.
  config_lib.validate(cfg)
  return cfg


def machine() -> dict:
  import flax
  import jax
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "nproc": nproc,
          "cpu": cpu, "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version()}


def read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_fixed(old: dict, new: dict, where: str) -> None:
  """``SettingsChanged`` naming each FIXED field of ``new`` that differs from ``old``
  (the settings stored at ``where``, a workdir or a ledger)."""
  diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in FIXED if old.get(k) != new[k]]
  if diff:
    raise SettingsChanged(f"{where} holds a study with other settings ({'; '.join(diff)}); "
                          "pass the same flags or another --workdir / --out")


def load_study(workdir: str, new: dict | None, command: str = "") -> dict:
  """study.json of ``workdir``. With ``new`` settings: checked against the stored ones
  (``SettingsChanged`` naming each FIXED field that differs), then stored with a run
  entry (``command`` and :func:`machine`)."""
  path = os.path.join(workdir, "study.json")
  study = read_json(path) or {"settings": None, "runs": []}
  if new is None:
    if study["settings"] is None:
      raise FileNotFoundError(f"{path} not found: run the study first")
    return study
  if study["settings"] is not None:
    check_fixed(study["settings"], new, workdir)
  study["settings"] = new
  study["runs"].append({"command": command, **machine()})
  os.makedirs(workdir, exist_ok=True)
  atomic_write_text(path, json.dumps(study, indent=2))
  return study


def status(workdir: str, row: Row) -> str | None:
  """``"report"``, ``"diverged"`` or None (not finished) for ``row``."""
  if os.path.exists(os.path.join(workdir, row.name, "report.json")):
    return "report"
  if os.path.exists(os.path.join(workdir, row.name, DIVERGED)):
    return "diverged"
  return None


def row_seconds(workdir: str, row: Row) -> float | None:
  """Wall seconds of a finished row: ``study_seconds.json`` the study writes after it,
  else the stage seconds of its report."""
  d = os.path.join(workdir, row.name)
  t = read_json(os.path.join(d, "study_seconds.json"))
  if t is not None:
    return float(t["seconds"])
  rep = read_json(os.path.join(d, "report.json"))
  return float(sum(rep.get("seconds", {}).values())) if rep else None


def estimate(workdir: str, rows: list[Row], todo: list[Row]) -> tuple[float | None, dict]:
  """Seconds left for ``todo`` from the median seconds of the finished rows of each
  kind (FP / PTQ / QAT), and those medians; None if a kind to run has none finished."""
  medians = {}
  for kind in ("FP", "PTQ", "QAT"):
    t = [row_seconds(workdir, r) for r in rows if r.kind == kind and status(workdir, r)]
    t = [x for x in t if x is not None]
    if t:
      medians[kind] = float(statistics.median(t))
  if any(r.kind not in medians for r in todo):
    return None, medians
  return sum(medians[r.kind] for r in todo), medians


def select(rows: list[Row], pattern: str) -> list[Row]:
  """The rows whose name matches the regex ``pattern`` ('' = all)."""
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"only={pattern!r} is not a regular expression: {e}") from None
  return [r for r in rows if rx.search(r.name)]
