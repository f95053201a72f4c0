"""Shared helpers of the benchmarks (and the tests' random variables): machine header,
random variables, interleaved timing, the deploy benchmarks' networks and packed models,
ONNX Runtime sessions and its ``quantize_static`` baseline, IREE."""

from __future__ import annotations

import datetime
import functools
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

THREAD_ENV = ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "KMP_AFFINITY")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def nproc() -> int:
  """CPUs this process may run on (what ``nproc`` prints)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def load_avg() -> str:
  try:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())
  except OSError:
    return "n/a"


def versions(torch_mod: Any = None) -> str:
  import flax
  import jax
  out = [f"python {platform.python_version()}", f"jax {jax.__version__}",
         f"jaxlib {getattr(jax.lib, '__version__', None) or _dist_version('jaxlib')}",
         f"flax {flax.__version__}"]
  if torch_mod is not None:
    out.append(f"torch {torch_mod.__version__}")
    timm = _dist_version("timm")  # Not imported: its torchvision may not load.
    if timm != "?":
      out.append(f"timm {timm} (installed)")
  return ", ".join(out)


def _dist_version(name: str) -> str:
  try:
    from importlib import metadata
    return metadata.version(name)
  except Exception:  # noqa: BLE001
    return "?"


def thread_settings(torch_mod: Any = None) -> list[str]:
  env = ", ".join(f"{k}={os.environ[k]!r}" for k in THREAD_ENV if k in os.environ)
  lines = [f"thread env: {env or 'none of ' + ', '.join(THREAD_ENV) + ' set'}"]
  if torch_mod is not None:
    backend = "?"
    for line in torch_mod.__config__.parallel_info().splitlines():
      if line.startswith("ATen parallel backend"):
        backend = line.split(":", 1)[1].strip()
    lines.append(f"torch: set_num_threads(os.cpu_count()={os.cpu_count()}) -> "
                 f"get_num_threads()={torch_mod.get_num_threads()}, "
                 f"get_num_interop_threads()={torch_mod.get_num_interop_threads()}, "
                 f"parallel backend {backend}")
  return lines


def header(title: str, torch_mod: Any = None, notes: tuple[str, ...] = ()) -> str:
  """Markdown header: command, date, machine, versions, thread settings."""
  import jax
  cmd = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)
  devs = jax.devices()
  lines = [f"# {title}", "",
           f"- command: `{cmd}`",
           f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
           f"- nproc: {nproc()} (os.cpu_count() = {os.cpu_count()}), "
           f"load average at start: {load_avg()}",
           f"- CPU: {cpu_model()} ({platform.machine()}, {platform.system()} "
           f"{platform.release()})",
           f"- versions: {versions(torch_mod)}",
           f"- jax backend: {jax.default_backend()}, {len(devs)} device(s): "
           f"{devs[0].device_kind}"]
  lines += [f"- {t}" for t in thread_settings(torch_mod)]
  lines += [f"- {n}" for n in notes]
  return "\n".join(lines) + "\n"


def random_variables(model: Any, x: Any, seed: int = 0, tiny_var_channels: int = 0) -> dict:
  """Variables for ``model`` filled from NumPy, without compiling its init (seconds even
  for B3/D2se on a slow CPU): the one filler of the benchmarks and the tests.

  ``x``: an input batch, or an image shape ``(H, W, C)``. Kernels ~ N(0, 1/fan_in); BN
  scales in [0.2, 1], biases and means ~ N(0, 0.1), running variances in [0.5, 2].
  ``tiny_var_channels`` > 0 sets that many channels of every identity BN to variance
  1e-6 (dead channels: the source of merged-kernel outliers). Recorded settings (OABN
  bounds, QARepVGG identity gains) keep the model's values.
  """
  import jax
  import jax.numpy as jnp
  from repvgg_jax.models.settings import expected_records
  if isinstance(x, tuple):
    x = jnp.zeros((1, *x), jnp.float32)
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  defaults = expected_records(model)

  def fill(path, s):
    names = [getattr(p, "key", str(p)) for p in path]
    leaf, shape = names[-1], s.shape
    if leaf in defaults:
      return np.asarray(defaults[leaf], s.dtype)
    if leaf == "kernel":
      return rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:-1]))
    if leaf == "scale":
      return rng.uniform(0.2, 1.0, shape).astype(np.float32)
    if leaf in ("bias", "mean"):
      return 0.1 * rng.standard_normal(shape, np.float32)
    if leaf == "var":
      v = rng.uniform(0.5, 2.0, shape).astype(np.float32)
      if tiny_var_channels and "identity" in names:
        v[:tiny_var_channels] = 1e-6
      return v
    raise ValueError(f"random_variables: no rule for {'/'.join(names)}")

  return jax.tree_util.tree_map_with_path(fill, shapes)


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                     min_sample_s: float = 0.0) -> dict[str, dict[str, float]]:
  """Per variant: median, min and max over ``repeats`` of the mean ms per call.

  Every ``fn`` must return only once its work is done (block on JAX
  outputs). Each variant is called once first (compile and warm-up, reported as
  ``first_s``); then every repeat runs every variant in turn, so drifting
  load hits all variants alike. A sample runs ``inner`` calls, enough to
  last ``min_sample_s`` (from the second call's time).
  """
  first, inner = {}, {}
  for k, fn in fns.items():
    t = time.perf_counter()
    fn()
    first[k] = time.perf_counter() - t
    t = time.perf_counter()
    fn()
    inner[k] = max(1, int(min_sample_s / max(time.perf_counter() - t, 1e-9) + 0.999))
  samples: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t = time.perf_counter()
      for _ in range(inner[k]):
        fn()
      samples[k].append((time.perf_counter() - t) / inner[k] * 1e3)
  return {k: dict(ms=statistics.median(s), min=min(s), max=max(s), first_s=first[k],
                  inner=inner[k], n=len(s)) for k, s in samples.items()}


def fmt_ms(t: dict[str, float]) -> str:
  return f"{t['ms']:.2f} ({t['min']:.2f}-{t['max']:.2f})"


def ratio(a: float | None, b: float | None) -> str:
  return "n/a" if not a or not b else f"{a / b:.2f}x"


# IREE hoists a constant expression (the codebook decode of model.stablehlo) into a
# load-time global only below a size increase (the decoded float kernels are ~8x the
# packed bytes); above it, the decode runs in every call. This lifts the limit.
IREE_FOLD_DECODE = "--iree-opt-const-expr-max-size-increase-threshold=1000000000000"


def iree_fn(exported: Any, threads: int | None = None,
            fold_decode: bool = False) -> Callable | None:
  """``f(uint8 images) -> logits`` of a ``jax.export.Exported`` of static shapes,
  compiled by IREE for llvm-cpu (host CPU) and run by its local-task driver (on
  ``threads`` worker groups when given); ``fold_decode``: with IREE_FOLD_DECODE. None
  when IREE is not installed."""
  try:
    from iree import compiler, runtime
  except ImportError:
    return None
  vmfb = compiler.compile_str(exported.mlir_module(), input_type="stablehlo",
                              target_backends=["llvm-cpu"],
                              extra_args=["--iree-llvmcpu-target-cpu=host"]
                              + ([IREE_FOLD_DECODE] if fold_decode else []))
  if threads:
    runtime.flags.parse_flags(f"--task_topology_max_group_count={threads}")
  module = runtime.load_vm_flatbuffer(vmfb, driver="local-task")
  # to_host() can be a view of a buffer the runtime reuses: copy it out.
  return lambda images: np.array(module.main(images).to_host())


# -- the deploy benchmarks' networks (runtimes.py, ort_vs_quantize_static.py) ----------

# name -> (title, RepVGG variant (blocks, widths), image size, classes). "demo": the demo's
# network; "a0": RepVGG-A0 at ImageNet size.
NETS = {"demo": ("shallow RepVGG-A0 (1, 2, 4, 1 blocks), 32 px, 10 classes",
                 (1, 2, 4, 1), 32, 10),
        "a0": ("RepVGG-A0 (2, 4, 14, 1 blocks), 224 px, 1000 classes",
               (2, 4, 14, 1), 224, 1000)}
MEAN, STD = (0.286,) * 3, (0.353,) * 3


def _variant(net: str):
  from repvgg_jax.models.repvgg import VARIANTS, Variant
  return Variant(NETS[net][1], VARIANTS["RepVGG-A0"].widths)


@functools.lru_cache(maxsize=None)
def merged_params(net: str) -> dict:
  """The merged (deploy-form) float params of ``net``, random (:func:`random_variables`,
  seed 0): speed depends on shapes and kernels, not on training."""
  import jax
  import repvgg_jax as rv
  from repvgg_jax.models.repvgg import RepVGG
  _, _, size, classes = NETS[net]
  model = RepVGG(_variant(net), num_classes=classes)
  return jax.device_get(rv.merge(random_variables(model, (size, size, 3)))["params"])


def calibration_images(net: str, batches: int = 1, batch: int = 8) -> list[np.ndarray]:
  """Random uint8 images of ``net``'s size (seed 1): the calibration batches."""
  size = NETS[net][2]
  rng = np.random.default_rng(1)
  return [rng.integers(0, 256, (batch, size, size, 3), np.uint8) for _ in range(batches)]


@functools.lru_cache(maxsize=None)
def packed_model(net: str, act_bits: int, weights: str = "codebook", bits: int = 4):
  """``net``'s merged params packed (``repvgg_jax.pack``): ``weights`` "codebook"
  (``bits``-bit ClusterQAT codebooks, stem and head at 8 bits), "int8_grid" (the same on
  per-channel int8 grids, ``int8_levels=True``) or "float" (no kernel quantized: the float
  merged network); ``act_bits`` > 0: activations calibrated on :func:`calibration_images`."""
  import jax
  import repvgg_jax as rv
  from repvgg_jax.models.repvgg import RepVGG
  _, _, size, classes = NETS[net]
  merged = merged_params(net)
  if weights == "float":  # every kernel skipped: none is quantized
    q = rv.make_quantizer("cluster", bits=4, skip=("reparam_conv", "head"))
  elif weights in ("codebook", "int8_grid"):
    q = rv.make_quantizer("cluster", bits=bits, int8_levels=weights == "int8_grid")
  else:
    raise ValueError(f"weights={weights!r}: expected 'codebook', 'int8_grid' or 'float'")
  state = q.init(merged)
  deploy = RepVGG(_variant(net), num_classes=classes, deploy=True, act_bits=act_bits)
  if act_bits:
    batches = [rv.deploy.normalize_images(b, MEAN, STD) for b in calibration_images(net)]
    # Jitted: one compile instead of an op-by-op dispatch (seconds on A0).
    params = jax.jit(q.apply)(merged, state)
    state = rv.calibrate(deploy, {"params": params, "quant": state}, batches)
  return rv.pack(merged, q, state,
                 rv.model_description(deploy, image_size=size, mean=MEAN, std=STD))


# -- ONNX Runtime ----------------------------------------------------------------------

def ort_session(model: bytes | str, threads: int, optimized: str | None = None,
                level: Any = None):
  """An ONNX Runtime CPU session of ``model`` (bytes or a path) on ``threads`` intra-op
  threads, at graph optimization ``level`` (default: all); ``optimized``: where ONNX
  Runtime writes the optimized graph."""
  import onnxruntime as ort
  so = ort.SessionOptions()
  so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level is None
                                 else level)
  so.intra_op_num_threads = threads
  if optimized:
    so.optimized_model_filepath = optimized
  return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def quantize_static_onnx(float_onnx: bytes, calibration: list[np.ndarray],
                         weight_type: str = "QInt8", extra_options: dict | None = None) -> bytes:
  """ONNX Runtime's own W8A8 of a float export (``export_onnx`` of an ``act_bits=0``
  model): the stock baseline. ONNX Runtime's basic optimizations first (constant folding:
  a codebook graph's ``Gather`` decode becomes float32 initializers), then
  ``onnxruntime.quantization.quantize_static``: QDQ, per-channel, QUInt8 activations,
  QInt8 weights, min-max over the ``calibration`` batches (uint8 NHWC images).
  ``weight_type``: another ``QuantType`` of the weights by name ("QInt4"); ``extra_options``:
  quantize_static's (``TensorQuantOverrides``, say)."""
  import onnxruntime as ort
  from onnxruntime import quantization as oq

  class Images(oq.CalibrationDataReader):
    def __init__(self):
      self.it = iter([{"images": b} for b in calibration])

    def get_next(self):
      return next(self.it, None)

  with tempfile.TemporaryDirectory() as tmp:
    folded, out = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "quantize_static.onnx")
    ort_session(float_onnx, 1, folded, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    oq.quantize_static(folded, out, Images(), quant_format=oq.QuantFormat.QDQ,
                       per_channel=True, activation_type=oq.QuantType.QUInt8,
                       weight_type=getattr(oq.QuantType, weight_type),
                       extra_options=extra_options)
    with open(out, "rb") as f:
      return f.read()
