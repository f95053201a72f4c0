"""OpenVINO as a runtime of ``model.onnx`` (the ``[openvino]`` extra; imported when called).

:func:`onnx_fn` compiles an ONNX graph of :func:`repvgg_jax.export_onnx` for OpenVINO's CPU
plugin and returns ``f(uint8 NHWC images) -> float32 logits``. OpenVINO reads the QDQ graph
as it is: the int8-grid export (``int8_levels=True``, uniform, LSQ) runs as int8
convolutions, the codebook export (``Gather`` decode) as float convolutions of the decoded
kernels.

Precision: OpenVINO runs the float parts of a graph in bf16 by default on CPUs with AMX
(or AVX512-BF16), and in f16 on some ARM CPUs: faster, and no longer the numbers of
``load_packed``. :func:`onnx_fn` asks for ``INFERENCE_PRECISION_HINT="f32"`` unless told
otherwise (``precision="bf16"`` for the CPU's fast path; ``None`` for the plugin's default).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

import numpy as np

EXTRA = "pip install 'repvgg-jax[openvino]'"
# INFERENCE_PRECISION_HINT values of the CPU plugin (f16: ARM and AVX512-FP16 CPUs).
PRECISIONS = ("f32", "bf16", "f16")


def available() -> bool:
  """Whether OpenVINO imports here."""
  return importlib.util.find_spec("openvino") is not None


def _import_openvino():
  try:
    import openvino
  except ImportError:
    raise ImportError(f"OpenVINO is not installed: {EXTRA}") from None
  return openvino


def onnx_fn(model: bytes | str | os.PathLike, *, precision: str | None = "f32",
            threads: int | None = None, device: str = "CPU") -> Callable[[Any], np.ndarray]:
  """``f(uint8 NHWC images) -> float32 logits`` of an ONNX model (its bytes, or a path)
  compiled by OpenVINO (``openvino.Core().compile_model``) for ``device``; ``f.compiled``
  is the ``CompiledModel``.

  Args:
    precision: the ``INFERENCE_PRECISION_HINT`` of the float ops: ``"f32"`` (default:
      the numbers of ``load_packed``), ``"bf16"`` (OpenVINO's default on AMX CPUs),
      ``"f16"``, or None (the plugin's own default). Int8 convolutions of an int8-grid
      graph are int8 under every hint.
    threads: ``INFERENCE_NUM_THREADS`` (default: the cores of the process's CPU set).
  """
  if precision is not None and precision not in PRECISIONS:
    raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS} or None")
  ov = _import_openvino()
  core = ov.Core()
  if isinstance(model, (bytes, bytearray)):
    ov_model = core.read_model(bytes(model))
  else:
    ov_model = core.read_model(os.fspath(model))
  if threads is None and hasattr(os, "sched_getaffinity"):
    threads = len(os.sched_getaffinity(0))
  config = {}
  if precision is not None:
    config["INFERENCE_PRECISION_HINT"] = precision
  if threads:
    config["INFERENCE_NUM_THREADS"] = int(threads)
  compiled = core.compile_model(ov_model, device, config)
  request = compiled.create_infer_request()
  output = compiled.output("logits")

  def run(images):
    return np.array(request.infer({"images": np.ascontiguousarray(images, np.uint8)})[output])
  run.compiled = compiled  # its get_runtime_model(): the kernels and precisions it runs
  return run


def report_fn(model: bytes) -> Callable[[Any], np.ndarray] | None:
  """The trainer's ``forms.openvino``: :func:`onnx_fn` of ``model.onnx`` at f32, or None
  where OpenVINO is not installed."""
  return onnx_fn(model) if available() else None
