"""Deployment of the packed model: calibration, its runtime in JAX, and exporters.

* ``calibration``: :func:`calibrate`, activation steps of a deploy model with ``act_bits``
  from a few batches (min-max, percentile or MSE).
* ``graph``: :func:`model_description` (what the packed file records about its network, so
  that :func:`load_packed` needs no config) and :func:`deploy_graph`, the ONE description of
  the deployed network (its layers in order, each with its kernel, bias, stride, groups,
  input fake-quant, SE, ReLU) that every runtime and exporter below walks.
* ``runtime``: :func:`forward_fn` (uint8 NHWC images -> float32 logits: decode, normalize,
  the graph's layers in JAX) and :func:`normalize_images`.
* ``model``: :func:`load_packed` -> :class:`DeployedModel`, callable on uint8 images.
* ``integer``: :func:`integer_forward_fn`, the same network as int8 x int8 -> int32
  convolutions and a float requantization (every codebook on a per-channel int8 grid).
* ``stablehlo``: :func:`export_stablehlo`, the forward serialized with ``jax.export``.
* ``onnx``: :func:`export_onnx`, an ONNX QDQ graph for ONNX Runtime and TensorRT
  (needs the ``[onnx]`` extra; imported when called).
* ``openvino``: :func:`repvgg_jax.deploy.openvino.onnx_fn`, ``model.onnx`` compiled by
  OpenVINO for the CPU (the ``[openvino]`` extra; imported when called).
* ``coreml``: :func:`export_coreml`, a Core ML ML program whose weights are the packed
  codebooks as LUTs (needs the ``[coreml]`` extra; imported when called).
"""

from repvgg_jax.deploy.calibration import calibrate
from repvgg_jax.deploy.coreml import export_coreml
from repvgg_jax.deploy.integer import integer_forward_fn
from repvgg_jax.deploy.model import DeployedModel, load_packed
from repvgg_jax.deploy.onnx import export_onnx
from repvgg_jax.deploy.graph import Graph, Layer, deploy_graph, model_description
from repvgg_jax.deploy.runtime import forward_fn, normalize_images
from repvgg_jax.deploy.stablehlo import export_stablehlo

__all__ = ["DeployedModel", "Graph", "Layer", "calibrate", "deploy_graph", "export_coreml", "export_onnx", "export_stablehlo",
           "forward_fn", "integer_forward_fn", "load_packed", "model_description",
           "normalize_images"]
