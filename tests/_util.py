"""Shared test helpers: variables with random, non-trivial values; a small packed model;
subprocess environments; copies of a finished run; checks of what an error names."""

import contextlib
import copy
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import deploy
from repvgg_jax.models.repvgg import RepVGG, Variant
from repvgg_jax.quant.rules import LayerRule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The one random-variables filler, the benchmarks' (tests import it from here).
from benchmarks.bench_common import random_variables  # noqa: E402,F401
# The persistent compilation cache of the suite (conftest.py) and of its subprocesses:
# a compilation made once is reused by every later test and run.
CACHE_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
MIN_COMPILE_SECONDS = 0  # cache every compilation (conftest.py says why)


def subprocess_env(**extra):
  """The environment of a test's Python subprocess: the repository on PYTHONPATH, the CPU
  platform, the suite's compilation cache, and no XLA_FLAGS of this process (a test that
  fakes devices passes its own); ``extra`` is added last."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(MIN_COMPILE_SECONDS))
  env.pop("XLA_FLAGS", None)
  env.update(extra)
  return env


@contextlib.contextmanager
def raises_naming(exc_type, *names):
  """``pytest.raises(exc_type)`` whose message must name each of ``names`` (substrings, not
  regexes): the bad field and value, not the sentence around them. Yields the ExceptionInfo."""
  with pytest.raises(exc_type) as info:
    yield info
  msg = str(info.value)
  for name in names:
    assert name in msg, f"the message does not name {name!r}: {msg!r}"


def copy_run(run, tmp_path):
  """A copy of the workdir of ``run`` (``(workdir, report)``, conftest's ``tiny_run``) in
  ``tmp_path``, for a test that changes it."""
  dest = str(tmp_path / "copy")
  shutil.copytree(run[0], dest)
  return dest


# The exporters' tiny model: standard strides at 32 px, stride-2 convs on even maps down
# to 1x1, as the demo has.
def tiny_variant(blocks=(1, 2, 1, 1), widths=(0.25, 0.25, 0.25, 0.25), **kw) -> Variant:
  """A RepVGG of a few blocks at a fraction of A0's widths: the tests' one factory of
  small variants (``kw``: ``groups``, ``se``)."""
  return Variant(tuple(blocks), tuple(widths), **kw)


TINY_DEPLOY = tiny_variant()
IMAGE_SIZE = 32
MEAN, STD = (0.4, 0.45, 0.5), (0.25, 0.3, 0.2)


def uint8_images(n, seed=0, channels=3, size=IMAGE_SIZE):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def _merged_params(variant):
  x = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
  return jax.device_get(rv.merge(random_variables(RepVGG(variant, num_classes=5), x))["params"])


def tiny_packed(method="cluster", act_bits=8, variant=None, bits=4, image_size=IMAGE_SIZE,
                **opts):
  """The packed model of a random 5-class ``variant`` (default TINY_DEPLOY) quantized by
  ``method`` at ``bits`` (``opts``: the quantizer's), activations calibrated (min-max
  on random ``image_size`` images) at ``act_bits`` (0: float). Made once per test process
  for the same arguments (the codebook fits are the cost); each call gets its own copy."""
  return copy.deepcopy(_tiny_packed(method, act_bits, variant or TINY_DEPLOY, bits,
                                    image_size, tuple(sorted(opts.items()))))


@functools.lru_cache(maxsize=None)
def _tiny_packed(method, act_bits, variant, bits, image_size, opts):
  opts = dict(opts)
  params = _merged_params(variant)
  q = rv.make_quantizer(method, bits=bits, **opts)
  state = q.init(params)
  model = RepVGG(variant, num_classes=5, deploy=True, act_bits=act_bits)
  if act_bits:
    batches = [deploy.normalize_images(uint8_images(8, s, size=image_size), MEAN, STD)
               for s in range(2)]
    state = rv.calibrate(model, {"params": q.apply(params, state), "quant": state}, batches)
  return rv.pack(params, q, state, rv.model_description(model, image_size=image_size,
                                                        mean=MEAN, std=STD))


# Every codebook layout the exporters write, a layout a layer of TINY_DEPLOY (rules by layer
# path), so one model's codebook fits check them all: tiny_packed("cluster", **MIXED_LAYOUTS[k]).
MIXED_LAYOUTS = {
    # 2, 3 and 8 bits per channel, 4 per tensor, 2 per group of 4 output channels; the stem
    # and head at 5 bits (a 6-bit Core ML LUT).
    "scalar": dict(first_last_bits=5, rules=(
        LayerRule("stages_0_0/.*", bits=2), LayerRule("stages_1_0/.*", bits=3),
        LayerRule("stages_1_1/.*", bits=8), LayerRule("stages_2_0/.*", granularity="tensor"),
        LayerRule("stages_3_0/.*", bits=2, granularity="group", group_size=4))),
    # Vectors of 2 weights at 4, 3 and 2 bits (the last per group of 4), of 4 per tensor and
    # per group of 4; the stem and head scalar, 4 bits per channel.
    "vector": dict(first_last_bits=4, rules=(
        LayerRule("stages_0_0/.*", cluster_dim=2),
        LayerRule("stages_1_0/.*", bits=3, cluster_dim=2),
        LayerRule("stages_1_1/.*", bits=2, cluster_dim=2, granularity="group", group_size=4),
        LayerRule("stages_2_0/.*", cluster_dim=4, granularity="tensor"),
        LayerRule("stages_3_0/.*", cluster_dim=4, granularity="group", group_size=4))),
}


def assert_every_rule_matches(rules, paths):
  """Fails naming the first of ``rules`` that matches none of the kernel ``paths``
  (``/``-joined): a layout test whose layer was renamed would no longer test it."""
  for rule in rules:
    assert any(rule.matches(p) for p in paths), rule


def mixed_packed(kind):
  """``tiny_packed`` of ``MIXED_LAYOUTS[kind]``; fails if a rule no longer matches a layer."""
  packed = tiny_packed("cluster", **MIXED_LAYOUTS[kind])
  assert_every_rule_matches(MIXED_LAYOUTS[kind]["rules"], packed.layers)
  return packed


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


class WrappedLoader:
  """Wraps a loader; ``change(n, batch)`` may alter or replace the n-th batch (1-based),
  or raise (a kill). The iterator keeps the loader's get/set_state, for checkpoints."""

  def __init__(self, loader, change):
    self.loader, self.change = loader, change
    for name in ("num_classes", "image_shape", "pixel_stats"):
      if hasattr(loader, name):
        setattr(self, name, getattr(loader, name))

  def __iter__(self):
    inner, change = iter(self.loader), self.change

    class It:
      def __init__(self):
        self.n = 0

      def __next__(self):
        self.n += 1
        return change(self.n, dict(next(inner)))

      def get_state(self):
        return inner.get_state()

      def set_state(self, s):
        inner.set_state(s)
    return It()


def killed_after(loader, k):
  """The loader of a run killed (KeyboardInterrupt) when it asks for batch k + 1."""
  def change(n, batch):
    if n > k:
      raise KeyboardInterrupt(f"simulated kill after step {k}")
    return batch
  return WrappedLoader(loader, change)


def deployed_accuracy(workdir, form="packed"):
  """Top-1 of the run's ``model.packed`` (``form="integer"``: its integer forward) over
  the test split of the run's own data config (report.json), counted here image by image,
  not by the pipeline's evaluation: what a report's accuracy must equal."""
  import json

  import ml_collections

  from repvgg_jax import data
  from repvgg_jax.data.local_tfds import local_data_config
  with open(os.path.join(workdir, "report.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f)["config"])
  data_cfg = local_data_config(cfg.data, workdir) if cfg.data.local_examples else cfg.data
  model = rv.load_packed(os.path.join(workdir, "model.packed"))
  fn = model.integer if form == "integer" else model
  loader = data.make_loader(data_cfg, "test", global_batch_size=cfg.eval_batch_size,
                            train=False, seed=cfg.seed, cache_dir=workdir)
  correct = count = 0
  for batch in loader:
    keep = np.asarray(batch["mask"]).astype(bool)
    pred = np.asarray(fn(np.asarray(batch["image"]))).argmax(-1)
    correct += int((pred == np.asarray(batch["label"]))[keep].sum())
    count += int(keep.sum())
  assert count == loader.num_examples  # every test image once, the padding masked out
  return correct / count


def codebook_mse(w, codebook) -> float:
  """Mean squared quantization error of ``w`` under a per-tensor ``(K,)`` or per-channel
  ``(Cout, K)`` codebook, in float64 (what the codebook fits minimize)."""
  from repvgg_jax.quant.levels import squared_error
  w = np.asarray(w, np.float64)
  with jax.enable_x64(True):
    sse = squared_error(jnp.asarray(w), jnp.asarray(codebook, jnp.float64))
  return float(np.sum(sse)) / w.size


def vector_squared_error(w, codebook, d):
  """Sum of squared distances of ``w``'s d-vectors to the centroids they quantize to: a
  scalar for a ``(K, d)`` codebook, ``(Cout,)`` for ``(Cout, K, d)``."""
  from repvgg_jax.quant.vector import quantize_vectors
  err = jnp.square(w - quantize_vectors(w, codebook, d))
  if jnp.ndim(codebook) == 2:
    return jnp.sum(err)
  return jnp.sum(err.reshape(-1, err.shape[-1]), axis=0)
