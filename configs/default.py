"""Shared defaults: every field the pipeline reads (see repvgg_jax/train/config.py)."""

from repvgg_jax.train.config import base_config, finalize  # noqa: F401  (re-exported)


def get_config():
  return finalize(base_config())
