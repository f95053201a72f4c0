"""Penalties on merged kernels (KURE, channel max/rms): values, gradients, the train step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from repvgg_jax import analysis, penalties
from repvgg_jax.models.repvgg import RepVGG
from repvgg_jax.train import config as config_lib
from repvgg_jax.train.train import train_and_evaluate
from _util import raises_naming, random_variables, tiny_variant
from configs import tiny  # on sys.path from conftest.py

NET = tiny_variant((1, 2, 1, 1))


def _variables(tiny_var_channels=2):
  model = RepVGG(NET, num_classes=5)
  x = jnp.zeros((1, 32, 32, 3))
  return random_variables(model, x, tiny_var_channels=tiny_var_channels)


def test_kurtosis_of_uniform_and_gaussian_samples():
  rng = np.random.default_rng(0)
  assert abs(float(penalties.kurtosis(jnp.asarray(rng.uniform(-1, 1, 200_000)))) - 1.8) < 0.02
  assert abs(float(penalties.kurtosis(jnp.asarray(rng.standard_normal(200_000)))) - 3.0) < 0.05


def test_channel_ratio_is_the_one_the_diagnostics_report():
  v = _variables()
  got = [np.asarray(penalties.channel_ratio(w)) for w in penalties.merged_kernels(v).values()]
  want = [r["ratio"] for r in analysis.channel_outliers(v).values()]
  assert sorted(float(g.max()) for g in got) == pytest.approx(
      sorted(float(w.max()) for w in want), rel=1e-4)


def test_channel_max_is_zero_below_the_target_and_positive_above():
  w = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 3, 8, 4)), jnp.float32)
  assert float(penalties.channel_max([w], 8.0)) == 0.0
  w = w.at[1, 1, 0, 2].set(100.0)
  ratio = float(penalties.channel_ratio(w)[2])
  assert float(penalties.channel_max([w], 8.0)) == pytest.approx((ratio - 8.0) ** 2 / 4, rel=1e-5)


@pytest.mark.parametrize("name", ["kure", "channel_max"])
def test_a_gradient_step_on_the_penalty_reduces_the_outliers(name):
  v = _variables()
  f = jax.jit(penalties.make_penalty(name))  # jitted, as in the train step
  before = f(v)
  g = jax.jit(jax.grad(lambda p: f({**v, "params": p})))(v["params"])
  norm = float(optax.tree_utils.tree_norm(g))
  assert np.isfinite(norm) and norm > 0
  params = jax.tree.map(lambda p, d: p - 1e-2 * d / norm, v["params"], g)
  after = f({**v, "params": params})
  assert float(after) < float(before)


def test_unknown_penalty_and_missing_weight_are_named():
  with pytest.raises(ValueError, match="penalty='l2'"):
    penalties.make_penalty("l2")
  cfg = tiny.tiny_config()
  cfg.fp.penalty = "kure"
  with raises_naming(config_lib.ConfigError, "fp.penalty='kure'", "fp.penalty_weight"):
    config_lib.validate(cfg)


def test_fp_stage_logs_and_trains_with_the_penalty(tmp_path):
  cfg = tiny.tiny_config()
  cfg.model.norm = "bn"
  cfg.quant.method = "none"
  cfg.fp.penalty, cfg.fp.penalty_weight = "channel_max", 0.1
  report = train_and_evaluate(cfg, str(tmp_path))
  assert report["config"]["fp"]["penalty"] == "channel_max"
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    logged = [json.loads(ln) for ln in f]
  values = [m["fp/penalty"] for m in logged if "fp/penalty" in m]
  assert values and all(np.isfinite(values)) and max(values) > 0


def test_init_from_with_other_oabn_settings_names_both(tmp_path):
  cfg = tiny.tiny_config()  # OABN, branch form, tau 0 = the form's default 3
  cfg.quant.method = "none"
  train_and_evaluate(cfg, str(tmp_path / "fp"))
  other = tiny.tiny_config()
  other.model.oabn_tau = 2.0
  other.init_from = str(tmp_path / "fp" / "checkpoints" / "fp")
  with raises_naming(ValueError, "init_from", other.init_from, "bound_tau=3.0", "2.0"):
    train_and_evaluate(other, str(tmp_path / "qat"))
  assert not os.path.exists(tmp_path / "qat" / "checkpoints" / "qat")
