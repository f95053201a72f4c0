"""Shared defaults: every field the pipeline reads (see repvgg_jax/train/config.py)."""

from repvgg_jax.train.config import base_config


def get_config():
  return base_config().lock()
