"""Prints the zoo's parameter counts (train / deploy form, 1000 classes) as a
Markdown table. Shapes only (jax.eval_shape): runs in seconds on any machine.

  python benchmarks/param_counts.py
"""

import jax
import jax.numpy as jnp

import repvgg_jax as rv


def count(model) -> int:
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  return sum(a.size for a in jax.tree.leaves(shapes["params"]))


def main() -> None:
  print("| variant | blocks | width multipliers | groups | SE | train params | deploy params |")
  print("|---|---|---|---|---|---|---|")
  for name, v in rv.VARIANTS.items():
    train, deploy = count(rv.create_model(name)), count(rv.create_model(name, deploy=True))
    print(f"| {name} | {list(v.blocks)} | {list(v.widths)} | {v.groups} | "
          f"{'yes' if v.se else ''} | {train / 1e6:.2f}M | {deploy / 1e6:.2f}M |")


if __name__ == "__main__":
  main()
