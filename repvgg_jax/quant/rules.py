"""Per-layer quantizer choices as data: :class:`LayerRule` (a regex over the kernel path
and the choices it sets) and :func:`resolve` (the :class:`LayerSpec` of one layer).

A quantizer has its defaults (``bits``, ``granularity``, ``group_size``, ``cluster_dim``,
``int8_levels``) and an ordered tuple of rules. For a kernel path such as
``"stages_2_0/reparam_conv/kernel"`` the rules whose ``pattern`` fully matches it are
read in order, and each field takes the value of the FIRST matching rule that sets it
(not None); a field no matching rule sets keeps the quantizer's default. So an exact
per-layer bits rule placed before the stem/head rule changes that layer's bits and
keeps the stem/head layout.

:func:`first_last_rule` is the one place of the stem/head rule (``first_last_bits``,
one codebook row per output channel, scalar codebooks); :func:`layer_bits_rules` turns a
mixed-precision allocation (``{path: bits}``) into exact-path rules.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterable, Mapping

GRANULARITIES = ("tensor", "channel", "group")
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LayerRule:
  """The choices for every quantized kernel whose ``/``-joined path fully matches the
  regex ``pattern``; a None field leaves the choice to later rules or the defaults."""
  pattern: str
  bits: int | None = None
  granularity: str | None = None
  group_size: int | None = None  # output channels per codebook row (granularity "group")
  cluster_dim: int | None = None  # weights per codebook vector
  int8_levels: bool | None = None  # codebook levels snapped to a per-channel int8 grid

  def matches(self, name: str) -> bool:
    return _compiled(self.pattern).fullmatch(name) is not None


FIELDS = tuple(f.name for f in dataclasses.fields(LayerRule) if f.name != "pattern")


@functools.lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
  return re.compile(pattern)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """What one layer gets, resolved: ``group_size`` is 1 unless the granularity is
  ``"group"``; ``pinned``: a rule set its bits (a budget does not choose them)."""
  bits: int
  granularity: str
  group_size: int
  cluster_dim: int
  int8_levels: bool
  pinned: bool

  @property
  def per_channel(self) -> bool:
    """One codebook (or step) per row of output channels: per channel or per group."""
    return self.granularity != "tensor"


def first_last_rule(first_last: Iterable[str], bits: int | None) -> tuple[LayerRule, ...]:
  """The stem/head rule: the layers under a top-level module named in ``first_last``
  at ``bits``, per channel (no groups) with scalar codebooks; none when ``bits`` is None."""
  names = tuple(first_last)
  if bits is None or not names:
    return ()
  pattern = "(?:" + "|".join(re.escape(n) for n in names) + ")(?:/.*)?"
  return (LayerRule(pattern, bits=bits, group_size=1, cluster_dim=1),)


def layer_bits_rules(bits_of: Iterable[tuple[str, int]] | Mapping[str, int]
                     ) -> tuple[LayerRule, ...]:
  """One exact-path rule per ``(kernel path, bits)`` of a mixed-precision allocation."""
  items = bits_of.items() if isinstance(bits_of, Mapping) else bits_of
  return tuple(LayerRule(re.escape(name), bits=int(b)) for name, b in items)


def resolve(rules: Iterable[LayerRule], path: Path, *, bits: int, granularity: str,
            group_size: int, cluster_dim: int, int8_levels: bool) -> LayerSpec:
  """The :class:`LayerSpec` of kernel ``path`` under ``rules`` (see the module doc) and
  the given defaults."""
  name, got = "/".join(path), {}
  for rule in rules:
    if rule.matches(name):
      for f in FIELDS:
        if f not in got and getattr(rule, f) is not None:
          got[f] = getattr(rule, f)
  gran = got.get("granularity", granularity)
  return LayerSpec(bits=got.get("bits", bits), granularity=gran,
                   group_size=got.get("group_size", group_size) if gran == "group" else 1,
                   cluster_dim=got.get("cluster_dim", cluster_dim),
                   int8_levels=got.get("int8_levels", int8_levels), pinned="bits" in got)


def check_rules(rules: Iterable[LayerRule], check_bits) -> None:
  """ValueError naming ``rules[i].field`` and its value for a rule that is not a
  :class:`LayerRule` or sets a bad value (``check_bits(bits, what)``: the method's range)."""
  for i, r in enumerate(rules):
    what = f"rules[{i}]"
    if not isinstance(r, LayerRule):
      raise ValueError(f"{what}={r!r}: expected a LayerRule")
    try:
      _compiled(r.pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"{what}.pattern={r.pattern!r}: not a regex ({e})") from None
    if r.bits is not None:
      check_bits(r.bits, f"{what}.bits")
    if r.granularity is not None and r.granularity not in GRANULARITIES:
      raise ValueError(f"{what}.granularity={r.granularity!r}: expected one of "
                       f"{GRANULARITIES}")
    for f in ("group_size", "cluster_dim"):
      v = getattr(r, f)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"{what}.{f}={v!r}: expected a positive int")
    if r.int8_levels is not None and not isinstance(r.int8_levels, bool):
      raise ValueError(f"{what}.int8_levels={r.int8_levels!r}: expected a bool")
