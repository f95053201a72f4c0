"""The RepVGG zoo: each variant's blocks per stage, width multipliers, groups and SE, and
the names :func:`repvgg_jax.create_model` accepts (the official ``RepVGG-A0`` and
timm's ``repvgg_a0`` alike)."""

from __future__ import annotations

import dataclasses

# Layers 2, 4, ..., 26 (layer 1 = first block of stage 1) are grouped in g2/g4 variants.
GROUPED_LAYERS = frozenset(range(2, 27, 2))


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the zoo: blocks per stage, width multipliers, groups, SE."""
  blocks: tuple[int, int, int, int]
  widths: tuple[float, float, float, float]
  groups: int = 1
  se: bool = False


_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)
VARIANTS: dict[str, Variant] = {
    "RepVGG-A0": Variant(_A, (0.75, 0.75, 0.75, 2.5)),
    "RepVGG-A1": Variant(_A, (1, 1, 1, 2.5)),
    "RepVGG-A2": Variant(_A, (1.5, 1.5, 1.5, 2.75)),
    "RepVGG-B0": Variant(_B, (1, 1, 1, 2.5)),
    "RepVGG-B1": Variant(_B, (2, 2, 2, 4)),
    "RepVGG-B1g2": Variant(_B, (2, 2, 2, 4), groups=2),
    "RepVGG-B1g4": Variant(_B, (2, 2, 2, 4), groups=4),
    "RepVGG-B2": Variant(_B, (2.5, 2.5, 2.5, 5)),
    "RepVGG-B2g4": Variant(_B, (2.5, 2.5, 2.5, 5), groups=4),
    "RepVGG-B3": Variant(_B, (3, 3, 3, 5)),
    "RepVGG-B3g4": Variant(_B, (3, 3, 3, 5), groups=4),
    "RepVGG-D2se": Variant((8, 14, 24, 1), (2.5, 2.5, 2.5, 5), se=True),
}


def _key(name: str) -> str:
  return name.lower().replace("repvgg", "").strip("-_ ")


_BY_KEY = {_key(n): n for n in VARIANTS}


def zoo_name(name: object) -> str | None:
  """The zoo's name for ``name`` (case-insensitive; ``"repvgg_a0"`` and ``"A0"`` give
  ``"RepVGG-A0"``), or None when it names no variant."""
  return _BY_KEY.get(_key(name)) if isinstance(name, str) else None


def list_models() -> list[str]:
  """Names accepted by :func:`repvgg_jax.create_model` (timm-style ``repvgg_a0`` works too)."""
  return list(VARIANTS)
