"""Deprecated: the activation fake-quant layer moved to :mod:`repvgg_jax.quant.activation`,
beside its calibration (one module for activation quantization); this name goes in the
next release."""

from repvgg_jax.deprecation import renamed

__all__: list[str] = []

__getattr__ = renamed(__name__, {"ActQuant": "repvgg_jax.quant.activation.ActQuant",
                                 "SAMPLE_SIZE": "repvgg_jax.quant.activation.SAMPLE_SIZE"})
