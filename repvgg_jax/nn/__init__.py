"""Deprecated name of :mod:`repvgg_jax.layers` (it read like ``flax.linen as nn``); goes
in the next release. Importing it, or a module under it, warns and gives the module of
``repvgg_jax.layers``."""

import importlib
import sys

from repvgg_jax.deprecation import warn_renamed

warn_renamed("repvgg_jax.nn", "repvgg_jax.layers")
for _name in ("act_quant", "conv", "oabn"):
  globals()[_name] = sys.modules[f"{__name__}.{_name}"] = importlib.import_module(
      f"repvgg_jax.layers.{_name}")
