"""Wrote this folder at commit f620bb7, the last before the settings collection
(``python tests/data/legacy_settings/make.py tests/data/legacy_settings`` in a checkout of
it): variables in the old layout (OABN bounds and QARepVGG identity gains inside
batch_stats), their merged kernels as that code merged them, and one FP-stage orbax
checkpoint each of plain BN and OABN branch. tests/test_legacy_settings.py reads them with today's code."""
import os, sys
import jax, numpy as np
from flax import traverse_util
import ml_collections
from repvgg_jax import merge
from repvgg_jax.models.repvgg import RepVGG
from repvgg_jax.train.state import create_train_state
from repvgg_jax.models.repvgg import Variant
TINY = Variant((1, 2, 1, 1), (0.125, 0.125, 0.125, 0.125))
from repvgg_jax.train.checkpoint import StageCheckpoints
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
forms = {"bn": {}, "oabn_branch": dict(norm="oabn", oabn_form="branch"),
         "oabn_median": dict(norm="oabn", oabn_form="median"),
         "qarepvgg": dict(block="qarepvgg")}
for name, kw in forms.items():
  m = RepVGG(TINY, num_classes=10, **kw)
  v = m.init(jax.random.key(0), x, train=False)
  _, upd = m.apply(v, x, train=True, mutable=["batch_stats"])
  v = {**v, **upd}
  # random gammas so the bounds are active
  v = jax.tree_util.tree_map_with_path(lambda p, a: a * (1 + jax.random.uniform(jax.random.key(len(str(p))), a.shape)) if str(p).endswith("'scale']") else a, v)
  assert set(v) == {"params", "batch_stats"}, set(v)  # no settings collection yet
  flat = traverse_util.flatten_dict(v, sep="/")
  np.savez(os.path.join(out, f"{name}_variables.npz"), **{k: np.asarray(a) for k, a in flat.items()})
  merged = traverse_util.flatten_dict(merge(v), sep="/")
  np.savez(os.path.join(out, f"{name}_merged.npz"), **{k: np.asarray(a) for k, a in merged.items()})
  if name in ("bn", "oabn_branch"):  # bn: a model with no settings at all
    stage = ml_collections.ConfigDict(dict(base_lr=0.1, batch_size=4, warmup_steps=0, num_steps=10, momentum=0.9, nesterov=False, weight_decay=1e-4, grad_clip_norm=0.0))
    st = create_train_state(m, v, stage)
    ck = StageCheckpoints(os.path.join(out, f"{name}_fp"), every=1, keep=1)
    ck.save(3, st, {"epoch": 0})
    ck.close()
print("ok")
