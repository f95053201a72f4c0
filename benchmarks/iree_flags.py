"""IREE llvm-cpu on the demo network (W4A8 codebooks, batch 1, 1 worker group): ms per image
of the compile flags docs/deploy.md names. Run: cd benchmarks && taskset -c 0 python iree_flags.py"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from iree import compiler, runtime  # noqa: E402

import repvgg_jax as rv  # noqa: E402
from runtimes import NETS, _packed  # noqa: E402

def main() -> None:
  _, variant, size, classes = NETS["demo"]
  packed = _packed(variant, size, classes, 8, False)   # the demo's W4A8 codebooks
  exported = jax.export.deserialize(rv.export_stablehlo(packed, batch_size=1))
  mlir = exported.mlir_module()
  runtime.flags.parse_flags("--task_topology_max_group_count=1")
  x = np.random.default_rng(2).integers(0, 256, (1, size, size, 1), np.uint8)
  x3 = np.repeat(x, 3, -1) if exported.in_avals[0].shape[-1] == 3 else x
  ref = np.asarray(rv.DeployedModel(packed)(x))
  FOLD = "--iree-opt-const-expr-max-size-increase-threshold=1000000000000"
  configs = {"documented (no extra_args)": [],
             "--iree-llvmcpu-target-cpu=host": ["--iree-llvmcpu-target-cpu=host"],
             "threshold only": [FOLD],
             "host + threshold": ["--iree-llvmcpu-target-cpu=host", FOLD]}
  for name, extra in configs.items():
    t0 = time.perf_counter()
    vmfb = compiler.compile_str(mlir, input_type="stablehlo", target_backends=["llvm-cpu"], extra_args=extra)
    tc = time.perf_counter() - t0
    m = runtime.load_vm_flatbuffer(vmfb, driver="local-task")
    y = np.array(m.main(x3).to_host())
    for _ in range(3):
      m.main(x3).to_host()
    ts = []
    for _ in range(7):
      t0 = time.perf_counter(); n = 0
      while time.perf_counter() - t0 < 1.0:
        m.main(x3).to_host(); n += 1
      ts.append((time.perf_counter() - t0) / n * 1e3)
    print(f"{name}: compile {tc:.0f} s, module {len(vmfb)/1e6:.1f} MB, ms/image median {np.median(ts):.1f} (min {min(ts):.1f}, max {max(ts):.1f}), max|dlogit|/max {np.abs(y-ref).max()/np.abs(ref).max():.1e}", flush=True)


if __name__ == "__main__":
  main()
