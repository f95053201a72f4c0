"""repvgg-jax: RepVGG in JAX/Flax with Outlier-Aware BatchNorm and ClusterQAT."""

from repvgg_jax.models.repvgg import RepVGG, VARIANTS, create_model, list_models
from repvgg_jax.models.oabn import OABN
from repvgg_jax.reparam import fold_bn, identity_kernel, merge, merge_block
from repvgg_jax.quant import make_quantizer, pack
from repvgg_jax.deploy import (DeployedModel, calibrate, export_coreml, export_onnx,
                               export_stablehlo, load_packed, model_description)
from repvgg_jax import convert  # noqa: F401  (PyTorch checkpoints; torch is imported lazily)

__version__ = "0.1.0"

__all__ = [
    "OABN", "RepVGG", "VARIANTS", "create_model", "fold_bn", "identity_kernel",
    "list_models", "merge", "merge_block",
]
__all__ += ["DeployedModel", "calibrate", "export_coreml", "export_onnx", "export_stablehlo",
            "load_packed", "make_quantizer", "model_description", "pack"]
