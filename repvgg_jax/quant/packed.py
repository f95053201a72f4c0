"""Packed deploy model: per quantized kernel, indices bit-packed at b bits +
codebook + shape (+ the scale of its int8 grid, when it has one); every other
leaf (biases, SE, activation steps) stored as float32. A grouped codebook
(``group_size`` output channels per row) is stored once per group, its scale too;
:meth:`PackedModel.codebook` gives the per-channel rows every reader uses. A vector
codebook (``cluster_dim`` d > 1, ``quant/vector.py``) has one index per d weights
and centroids ``(K, d)`` / ``(rows, K, d)``.

File: one uncompressed ``.npz`` with a JSON metadata entry: format name and
version, per layer path/bits/shape, and a free ``model`` dict (what the
caller needs to rebuild the network: ``repvgg_jax.deploy`` stores the
variant, widths, classes, input size and normalization there). Written
atomically (temp file, then ``os.replace``). Pytrees only: the packed model
runs as the deploy model applied to :meth:`PackedModel.to_variables`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from typing import Any, Mapping

import numpy as np

from flax import traverse_util

from repvgg_jax.fileio import atomic_write_bytes
from repvgg_jax.quant.cluster import check_codebook
from repvgg_jax.quant.levels import decode
from repvgg_jax.quant.vector import check_vector_codebook, decode_vectors, index_shape

FORMAT = "repvgg-jax-packed"
VERSION = 3  # 3 added group_size and cluster_dim


def index_bytes(count: int, bits: int) -> int:
  """Bytes of ``count`` indices bit-packed at ``bits`` each: ``ceil(count * bits / 8)``."""
  return -(-count * bits // 8)


def pack_bits(indices, bits: int) -> np.ndarray:
  """Flat indices (each < 2^bits) -> uint8 bytes, ``ceil(n * bits / 8)`` long;
  index i occupies stream bits ``[i*bits, (i+1)*bits)``, little-endian."""
  idx = np.asarray(indices).ravel().astype(np.uint16)
  if idx.size and int(idx.max()) >= 2 ** bits:
    raise ValueError(f"pack_bits: index {int(idx.max())} does not fit in bits={bits}")
  planes = ((idx[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
  return np.packbits(planes.ravel(), bitorder="little")


def unpack_bits(packed, bits: int, count: int, xp: Any = np):
  """Inverse of :func:`pack_bits`: ``count`` indices as int32. ``xp=jax.numpy``
  decodes inside a jax program (the StableHLO export)."""
  if packed.size != index_bytes(count, bits):
    raise ValueError(f"unpack_bits: {packed.size} bytes cannot hold {count} indices at "
                     f"bits={bits} (expected {index_bytes(count, bits)})")
  planes = xp.unpackbits(xp.asarray(packed, xp.uint8), count=count * bits,
                         bitorder="little").reshape(count, bits)
  return xp.sum(planes.astype(xp.int32) << xp.arange(bits, dtype=xp.int32), axis=1)


def _key(path) -> str:
  return "/".join(path)


def _check_layer_codebook(shape, codebook, group_size: int, cluster_dim: int) -> int:
  """The bits of a stored (one row per group) codebook of a kernel of ``shape``."""
  rows = (*shape[:-1], shape[-1] // group_size)
  if cluster_dim > 1:
    return check_vector_codebook(np.zeros(rows), codebook, cluster_dim)
  return check_codebook(np.zeros(rows[-1:]), codebook)


@dataclasses.dataclass
class PackedModel:
  """``layers``: kernel path in ``params`` -> ``{bits, shape, packed, codebook,
  group_size, cluster_dim}`` (+ ``int_scale``), the codebook and scale with one row per
  group;
  ``floats``: variable path (``params/...``, ``quant/...``) -> float32 array;
  ``model``: JSON-able description of the network."""
  layers: dict[str, dict[str, Any]]
  floats: dict[str, np.ndarray]
  model: dict[str, Any] = dataclasses.field(default_factory=dict)

  def indices(self, path: str, xp: Any = np) -> np.ndarray:
    """The level indices of layer ``path`` (int32, the kernel's shape; one per vector,
    :func:`repvgg_jax.quant.vector.index_shape`, for a vector codebook)."""
    l = self.layers[path]
    shape = index_shape(l["shape"], l.get("cluster_dim", 1))
    return unpack_bits(l["packed"], l["bits"], int(np.prod(shape)), xp=xp).reshape(shape)

  def kernel(self, path: str, xp: Any = np):
    """Layer ``path``'s decoded kernel (float32, its shape)."""
    l = self.layers[path]
    if l.get("cluster_dim", 1) > 1:
      return decode_vectors(self.indices(path, xp), self.codebook(path, xp), l["shape"], xp)
    return decode(self.indices(path, xp), self.codebook(path, xp))

  def _per_channel(self, path: str, part: str, xp: Any = np):
    l = self.layers[path]
    a, g = xp.asarray(l[part]), l.get("group_size", 1)
    return xp.repeat(a, g, axis=0) if g > 1 and a.ndim else a

  def codebook(self, path: str, xp: Any = np):
    """Layer ``path``'s codebook, ``(K,)`` or one row per output channel ``(Cout, K)``."""
    return self._per_channel(path, "codebook", xp)

  def int_scale(self, path: str):
    """Layer ``path``'s int8-grid scale, ``()`` or one per output channel ``(Cout,)``."""
    return self._per_channel(path, "int_scale")

  def to_variables(self, xp: Any = np) -> dict[str, Any]:
    """``{"params": ..., "quant": ...}`` with decoded kernels (levels gathered
    from the codebooks); ``quant`` holds the activation steps, if any.
    ``xp=jax.numpy`` decodes with jnp ops (traced, inside the program)."""
    flat = {tuple(p.split("/")): xp.asarray(v) for p, v in self.floats.items()}
    for p in self.layers:
      flat[("params",) + tuple(p.split("/"))] = xp.asarray(self.kernel(p, xp))
    return traverse_util.unflatten_dict(flat)

  def _arrays(self) -> dict[str, np.ndarray]:
    meta = {"format": FORMAT, "version": VERSION, "model": self.model,
            "layers": {p: {"bits": l["bits"], "shape": list(l["shape"]),
                           "group_size": l.get("group_size", 1),
                           "cluster_dim": l.get("cluster_dim", 1),
                           "int_scale": "int_scale" in l}
                       for p, l in self.layers.items()},
            "floats": sorted(self.floats)}
    arrays = {"__meta__": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    for p, l in self.layers.items():
      arrays[f"q/{p}/packed"] = l["packed"]
      arrays[f"q/{p}/codebook"] = l["codebook"]
      if "int_scale" in l:
        arrays[f"q/{p}/int_scale"] = l["int_scale"]
    for p, v in self.floats.items():
      arrays[f"f/{p}"] = v
    return arrays

  def to_bytes(self) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **self._arrays())
    return buf.getvalue()

  def save(self, path) -> None:
    """Writes one file atomically (temp file in the same folder + os.replace)."""
    atomic_write_bytes(path, self.to_bytes())

  def size_bytes(self) -> int:
    """Bytes of the saved file."""
    return len(self.to_bytes())

  def report(self) -> list[dict[str, Any]]:
    """Per layer: path, bits, weights, packed bytes (indices + codebook + scale),
    float32 bytes; the last row is the total over all leaves."""
    rows, packed, f32 = [], 0, 0
    for p, l in self.layers.items():
      n = int(np.prod(l["shape"]))
      b = sum(l[k].nbytes for k in ("packed", "codebook", "int_scale") if k in l)
      rows.append(dict(path=p, bits=l["bits"], weights=n, packed_bytes=b, float32_bytes=4 * n))
      packed, f32 = packed + b, f32 + 4 * n
    fl = sum(v.nbytes for v in self.floats.values())
    rows.append(dict(path="total", bits=None, weights=None, packed_bytes=packed + fl,
                     float32_bytes=f32 + fl, file_bytes=self.size_bytes()))
    return rows


def pack(params: Mapping[str, Any], quantizer, state,
         model: Mapping[str, Any] | None = None) -> PackedModel:
  """Packs deploy params with the codebooks and indices ``quantizer`` uses in
  ``apply``; the other entries of ``state`` (activation steps) and every
  unquantized param are kept as float32. ``model``: the description stored
  in the file's metadata (JSON-able)."""
  kernels = quantizer.indices(params, state)
  scales = quantizer.int_scales(params, state) or {}
  layers, floats = {}, {}
  for path, v in traverse_util.flatten_dict(dict(params)).items():
    if path in kernels:
      spec = quantizer.layer(path)
      g, d = spec.group_size if spec.per_channel else 1, spec.cluster_dim
      idx, c = (np.asarray(a) for a in kernels[path])
      c = c.astype(np.float32)[::g]  # rows repeat within a group (g = 1 per tensor)
      bits = _check_layer_codebook(np.shape(v), c, g, d)
      layers[_key(path)] = dict(bits=bits, shape=tuple(np.shape(v)), packed=pack_bits(idx, bits),
                                codebook=c, group_size=g, cluster_dim=d)
      if path in scales:
        scale = np.asarray(scales[path], np.float32)
        layers[_key(path)]["int_scale"] = scale[::g] if scale.ndim else scale
    else:
      floats[_key(("params",) + path)] = np.asarray(v, np.float32)
  for path, v in traverse_util.flatten_dict(dict(state) if state else {}).items():
    if path not in kernels:  # the model's own quant variables: activation steps
      floats[_key(("quant",) + path)] = np.asarray(v, np.float32)
  return PackedModel(layers, floats, json.loads(json.dumps(dict(model or {}))))


def read_packed(path) -> PackedModel:
  """Reads and validates a file written by :meth:`PackedModel.save`; a file
  of another format or version, truncated or corrupt, raises ValueError
  naming it."""
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except FileNotFoundError:
    raise
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    # numpy's own words here can advise loading pickled data unsafely: say only what
    # the file is not.
    raise ValueError(f"read_packed: {path} is not a packed model (not a readable .npz "
                     "archive of arrays; PackedModel.save writes one)") from e
  if "__meta__" not in arrays:
    raise ValueError(f"read_packed: {path} has no __meta__ entry; not a packed model")
  try:
    meta = json.loads(arrays["__meta__"].tobytes().decode())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"read_packed: {path} has corrupt metadata ({e})") from e
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(f"read_packed: {path} has format {meta.get('format')!r} version "
                     f"{meta.get('version')!r}; this repvgg-jax reads {FORMAT!r} version "
                     f"{VERSION} (re-export it from its checkpoint)")
  layers, floats = {}, {}
  for p, l in meta["layers"].items():
    parts = ("packed", "codebook") + (("int_scale",) if l.get("int_scale") else ())
    for part in parts:
      if f"q/{p}/{part}" not in arrays:
        raise ValueError(f"read_packed: {path} is missing q/{p}/{part}")
    shape, bits = tuple(l["shape"]), l["bits"]
    g, d = l.get("group_size"), l.get("cluster_dim")
    packed, c = arrays[f"q/{p}/packed"], arrays[f"q/{p}/codebook"]
    if not (isinstance(g, int) and g >= 1 and shape[-1] % g == 0):
      raise ValueError(f"read_packed: {p} has group_size {g!r}, which does not divide its "
                       f"{shape[-1]} output channels")
    if not (isinstance(d, int) and d >= 1 and len(shape) >= 2 and shape[-2] % d == 0):
      raise ValueError(f"read_packed: {p} has cluster_dim {d!r}, which does not divide its "
                       f"input channels (shape {shape})")
    count = int(np.prod(index_shape(shape, d)))
    if packed.size != index_bytes(count, bits):
      raise ValueError(f"read_packed: {p} has {packed.size} packed bytes, expected "
                       f"{index_bytes(count, bits)} for shape {shape} at {bits} bits")
    if _check_layer_codebook(shape, c, g, d) != bits:
      raise ValueError(f"read_packed: {p} codebook shape {c.shape} does not match bits={bits}")
    layers[p] = dict(bits=bits, shape=shape, packed=packed, codebook=c, group_size=g,
                     cluster_dim=d)
    if l.get("int_scale"):
      layers[p]["int_scale"] = arrays[f"q/{p}/int_scale"]
  for p in meta["floats"]:
    if f"f/{p}" not in arrays:
      raise ValueError(f"read_packed: {path} is missing f/{p}")
    floats[p] = arrays[f"f/{p}"]
  return PackedModel(layers, floats, meta.get("model", {}))
