"""Packed deploy model: per quantized kernel, indices bit-packed at b bits +
codebook + shape; every other leaf (biases, SE) stored as float32.

File: one uncompressed ``.npz`` with a JSON metadata entry (format name and
version, per layer path/bits/shape). Written atomically (temp file, then
``os.replace``). Pytrees only: the packed model runs as the deploy model
applied to :meth:`PackedModel.to_variables`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from typing import Any, Mapping

import numpy as np

from repvgg_jax.fileio import atomic_write
from repvgg_jax.quant.cluster import assign, check_codebook

FORMAT = "repvgg-jax-packed"
VERSION = 1


def pack_bits(indices, bits: int) -> np.ndarray:
  """Flat indices (each < 2^bits) -> uint8 bytes, ``ceil(n * bits / 8)`` long;
  index i occupies stream bits ``[i*bits, (i+1)*bits)``, little-endian."""
  idx = np.asarray(indices).ravel().astype(np.uint16)
  if idx.size and int(idx.max()) >= 2 ** bits:
    raise ValueError(f"pack_bits: index {int(idx.max())} does not fit in bits={bits}")
  planes = ((idx[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
  return np.packbits(planes.ravel(), bitorder="little")


def unpack_bits(packed, bits: int, count: int) -> np.ndarray:
  """Inverse of :func:`pack_bits`: ``count`` indices as int32."""
  packed = np.asarray(packed, np.uint8)
  if packed.size != -(-count * bits // 8):
    raise ValueError(f"unpack_bits: {packed.size} bytes cannot hold {count} indices at "
                     f"bits={bits} (expected {-(-count * bits // 8)})")
  planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
  return (planes.astype(np.int32) << np.arange(bits, dtype=np.int32)).sum(axis=1)


def _flatten(tree, path=()):
  for name, sub in tree.items():
    if isinstance(sub, Mapping):
      yield from _flatten(sub, path + (name,))
    else:
      yield path + (name,), sub


@dataclasses.dataclass
class PackedModel:
  layers: dict[str, dict[str, Any]]   # path -> {bits, shape, packed, codebook}
  floats: dict[str, np.ndarray]       # path -> float32 array

  def to_variables(self) -> dict[str, Any]:
    """``{"params": ...}`` with decoded kernels (gather from the codebook)."""
    params: dict[str, Any] = {}
    items = list(self.floats.items())
    for path, l in self.layers.items():
      idx = unpack_bits(l["packed"], l["bits"], int(np.prod(l["shape"]))).reshape(l["shape"])
      c = l["codebook"]
      w = c[idx] if c.ndim == 1 else c[np.arange(c.shape[0]), idx.reshape(-1, c.shape[0])]
      items.append((path, w.reshape(l["shape"])))
    for path, v in items:
      node = params
      *head, leaf = path.split("/")
      for k in head:
        node = node.setdefault(k, {})
      node[leaf] = v
    return {"params": params}

  def _arrays(self) -> dict[str, np.ndarray]:
    meta = {"format": FORMAT, "version": VERSION,
            "layers": {p: {"bits": l["bits"], "shape": list(l["shape"])}
                       for p, l in self.layers.items()},
            "floats": sorted(self.floats)}
    arrays = {"__meta__": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    for p, l in self.layers.items():
      arrays[f"q/{p}/packed"] = l["packed"]
      arrays[f"q/{p}/codebook"] = l["codebook"]
    for p, v in self.floats.items():
      arrays[f"f/{p}"] = v
    return arrays

  def to_bytes(self) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **self._arrays())
    return buf.getvalue()

  def save(self, path) -> None:
    """Writes one file atomically (temp file in the same folder + os.replace)."""
    data = self.to_bytes()

    def write(tmp: str) -> None:
      with open(tmp, "wb") as f:
        f.write(data)
    atomic_write(path, write)

  def size_bytes(self) -> int:
    """Bytes of the saved file."""
    return len(self.to_bytes())

  def report(self) -> list[dict[str, Any]]:
    """Per layer: path, bits, weights, packed bytes (indices + codebook),
    float32 bytes; the last row is the total over all leaves."""
    rows, packed, f32 = [], 0, 0
    for p, l in self.layers.items():
      n = int(np.prod(l["shape"]))
      b = l["packed"].nbytes + l["codebook"].nbytes
      rows.append(dict(path=p, bits=l["bits"], weights=n, packed_bytes=b, float32_bytes=4 * n))
      packed, f32 = packed + b, f32 + 4 * n
    fl = sum(v.nbytes for v in self.floats.values())
    rows.append(dict(path="total", bits=None, weights=None, packed_bytes=packed + fl,
                     float32_bytes=f32 + fl, file_bytes=self.size_bytes()))
    return rows


def export(params: Mapping[str, Any], quantizer, state) -> PackedModel:
  """Packs deploy params with the codebooks ``quantizer`` uses in ``apply``."""
  books = dict(_flatten(quantizer.codebooks(params, state)))
  layers, floats = {}, {}
  for path, v in _flatten(params):
    key = "/".join(path)
    if path in books:
      c = np.asarray(books[path], np.float32)
      bits = check_codebook(v, c)
      idx = np.asarray(assign(v, books[path]))
      layers[key] = dict(bits=bits, shape=tuple(np.shape(v)), packed=pack_bits(idx, bits),
                         codebook=c)
    else:
      floats[key] = np.asarray(v, np.float32)
  return PackedModel(layers, floats)


def load_packed(path) -> PackedModel:
  """Reads and validates a file written by :meth:`PackedModel.save`."""
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise ValueError(f"load_packed: {path} is not a readable packed model ({e})") from e
  if "__meta__" not in arrays:
    raise ValueError(f"load_packed: {path} has no __meta__ entry; not a packed model")
  try:
    meta = json.loads(arrays["__meta__"].tobytes().decode())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"load_packed: {path} has corrupt metadata ({e})") from e
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(f"load_packed: {path} has format {meta.get('format')!r} version "
                     f"{meta.get('version')!r}; expected {FORMAT!r} version {VERSION}")
  layers, floats = {}, {}
  for p, l in meta["layers"].items():
    for part in ("packed", "codebook"):
      if f"q/{p}/{part}" not in arrays:
        raise ValueError(f"load_packed: {path} is missing q/{p}/{part}")
    shape, bits = tuple(l["shape"]), l["bits"]
    packed, c = arrays[f"q/{p}/packed"], arrays[f"q/{p}/codebook"]
    if packed.size != -(-int(np.prod(shape)) * bits // 8):
      raise ValueError(f"load_packed: {p} has {packed.size} packed bytes, expected "
                       f"{-(-int(np.prod(shape)) * bits // 8)} for shape {shape} at {bits} bits")
    if check_codebook(np.zeros(shape[-1:]), c) != bits:
      raise ValueError(f"load_packed: {p} codebook shape {c.shape} does not match bits={bits}")
    layers[p] = dict(bits=bits, shape=shape, packed=packed, codebook=c)
  for p in meta["floats"]:
    if f"f/{p}" not in arrays:
      raise ValueError(f"load_packed: {path} is missing f/{p}")
    floats[p] = arrays[f"f/{p}"]
  return PackedModel(layers, floats)
