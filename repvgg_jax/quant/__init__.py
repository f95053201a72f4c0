"""Quantization of deploy-form networks: ClusterQAT codebooks, uniform and LSQ
grids, activation fake-quant, the packed export.

* ``quantizer``: :func:`make_quantizer` (weights) -> a class per method (:class:`CodebookQuantizer`,
  :class:`UniformQuantizer`, :class:`LSQQuantizer`, on the base :class:`Quantizer`), :func:`ptq`.
* ``rules``: per-layer choices as data (:class:`LayerRule`, matched by kernel path).
* ``levels``: nearest level and squared error of a codebook (the one place for both).
* ``kmeans``: Lloyd 1-D k-means codebooks; ``optimal``: the optimal (DP) fit.
* ``cluster``: the straight-through codebook quantizer, int8 snapping.
* ``uniform``: integer grids, min-max and MSE steps, LSQ fake-quant.
* ``activation``: activation calibration (min-max, percentile, MSE).
* ``packed``: bit packing and the packed file (:func:`pack` -> :class:`PackedModel`).
* ``mixed``: per-layer bits under a size budget (sensitivities, exact allocation).
"""

from repvgg_jax.quant.activation import CALIBRATIONS, calibrated_step
from repvgg_jax.quant.cluster import assign, check_codebook, quantize, snap_to_int8
from repvgg_jax.quant.packed import PackedModel, pack, pack_bits, read_packed, unpack_bits
from repvgg_jax.quant.kmeans import check_bits, fit_codebook
from repvgg_jax.quant.optimal import optimal_codebook
from repvgg_jax.quant.levels import decode, nearest_index, squared_error
from repvgg_jax.quant.quantizer import (METHODS, QUANTIZERS, CodebookQuantizer, LSQQuantizer,
                                        Quantizer, UniformQuantizer, WeightQuantizer,
                                        make_quantizer, ptq)
from repvgg_jax.quant.rules import LayerRule
from repvgg_jax.quant.uniform import fake_quant, grid, minmax_step, mse_step

__all__ = [
    "CALIBRATIONS", "METHODS", "QUANTIZERS", "CodebookQuantizer", "LSQQuantizer", "LayerRule",
    "PackedModel", "UniformQuantizer", "WeightQuantizer", "calibrated_step", "Quantizer", "assign", "check_bits", "check_codebook", "decode",
    "fake_quant", "fit_codebook", "grid", "make_quantizer", "minmax_step", "mse_step",
    "nearest_index", "optimal_codebook", "pack", "pack_bits", "ptq", "quantize", "read_packed",
    "snap_to_int8", "squared_error", "unpack_bits",
]
