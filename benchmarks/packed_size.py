"""Packed size of RepVGG-A0 (1000 classes) vs float32, per bit width.

Sizes depend only on shapes, bits and granularity (per-channel codebooks of
2^b float32 levels), so the weights are random merged kernels and the uniform
quantizer's per-channel codebooks stand in for k-means ones (same sizes).

  python benchmarks/packed_size.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import repvgg_jax as rv


def main() -> None:
  model = rv.create_model("RepVGG-A0", deploy=True)
  x = jnp.zeros((1, 224, 224, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  print("| bits (stem/head bits) | codebooks | packed file bytes | float32 bytes | ratio |")
  print("|---|---|---|---|---|")
  for bits, fl, gran in ((2, 8, "channel"), (2, None, "channel"), (3, None, "channel"),
                         (4, 8, "channel"), (4, None, "channel"), (4, None, "tensor"),
                         (8, None, "channel"), (8, None, "tensor")):
    if True:
      q = rv.make_quantizer("uniform", bits=bits, granularity=gran, first_last_bits=fl)
      packed = rv.pack(params, q, q.init(params))
      total = packed.report()[-1]
      print(f"| {bits} ({fl or bits}) | per {gran} | {total['file_bytes']:,} | "
            f"{total['float32_bytes']:,} | {total['float32_bytes'] / total['file_bytes']:.2f}x |")


if __name__ == "__main__":
  main()
