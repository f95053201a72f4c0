"""Random-access data sources: Fashion-MNIST IDX files, tfds ArrayRecord, synthetic.

Every source is a grain ``RandomAccessDataSource`` (``__len__`` + ``__getitem__``)
whose records are ``{"image": uint8 (H, W, C), "label": int}`` with ``C`` 1 or 3
(HWC, channels last), or, for tfds ImageNet, the encoded JPEG bytes as
``"image"``. Decoding, augmentation and conversion to 3 channels happen later,
per record, in ``transforms``; normalization on the device.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

# The Debian package `dataset-fashion-mnist` installs the IDX files here.
DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
SOURCES = ("fashion_mnist_idx", "tfds", "synthetic")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Stats:
  """Per-channel mean and std of the pixels in [0, 1] (RGB order), and the class count."""
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  num_classes: int


# Fashion-MNIST: measured over the 60k training images (gray, repeated to RGB).
# CIFAR-10: measured over the 50k training images. ImageNet: the usual torchvision numbers.
# Synthetic: uniform noise in [0, 1] has mean 1/2 and std 1/sqrt(12) ~= 0.2887.
STATS = {
    "fashion_mnist": Stats((0.2860,) * 3, (0.3530,) * 3, 10),
    "cifar10": Stats((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10),
    "imagenet2012": Stats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1000),
    "synthetic": Stats((0.5,) * 3, (0.2887,) * 3, 10),
}
TFDS_NAMES = ("cifar10", "imagenet2012", "fashion_mnist")
# tfds datasets whose records keep the encoded image bytes (decoded in transforms).
ENCODED = ("imagenet2012",)
# tfds split name for each of our splits (ImageNet has no "test" with labels).
TFDS_SPLITS = {"imagenet2012": {"train": "train", "test": "validation"}}

# IDX element types (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (gzip-compressed when the name ends in .gz) into a numpy array.

  The format: 2 zero bytes, a type byte, a dimension count ``n``, then ``n``
  big-endian uint32 sizes, then the data row-major. Returns the array in its
  native byte order (uint8 stays uint8).
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # truncated or corrupt .gz
    raise ValueError(f"read_idx: {path} is not a readable gzip file ({e})") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"read_idx: {path} is not an IDX file (magic bytes {raw[:4]!r})")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"read_idx: {path} is truncated: {len(raw)} bytes, less than the "
                     f"{header}-byte header of a {ndim}-dimensional IDX file")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != expected:
    raise ValueError(f"read_idx: {path} holds {len(raw) - header} data bytes, "
                     f"its header {shape} says {expected}")
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_path(data_dir: str, prefix: str, kind: str) -> str:
  base = os.path.join(data_dir, f"{prefix}-{kind}")
  for path in (base + ".gz", base):
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"Fashion-MNIST IDX file not found: {base}.gz (nor {base}); "
                          f"install the Debian package dataset-fashion-mnist or set "
                          f"data.data_dir to the directory holding the IDX files")


@functools.lru_cache(maxsize=4)
def _load_idx_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  prefix = _IDX_PREFIX[split]
  images = read_idx(_idx_path(data_dir, prefix, "images-idx3-ubyte"))
  labels = read_idx(_idx_path(data_dir, prefix, "labels-idx1-ubyte"))
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f"Fashion-MNIST IDX files in {data_dir} ({split}): images {images.shape} "
                     f"and labels {labels.shape} do not match (expected (N, H, W) and (N,))")
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


class IdxSource:
  """Fashion-MNIST (or MNIST) from its IDX files, held in memory.

  Records are ``{"image": uint8 (28, 28, 1), "label": int}``. Reading 60k images
  takes well under a second; the arrays are cached per (directory, split), and a
  pickled source (grain workers) reloads from the files instead of copying them.
  """

  def __init__(self, data_dir: str | None, split: str):
    data_dir = data_dir or DEFAULT_IDX_DIR
    if split not in _IDX_PREFIX:
      raise ValueError(f"fashion_mnist_idx: unknown split {split!r}, expected one of {SPLITS}")
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(f"fashion_mnist_idx: data_dir {data_dir!r} is not a directory; "
                              f"install the Debian package dataset-fashion-mnist (it puts the "
                              f"IDX files in {DEFAULT_IDX_DIR}) or set data.data_dir to the "
                              f"directory holding them")
    self.data_dir, self.split = data_dir, split
    self.images, self.labels = _load_idx_split(os.path.abspath(data_dir), split)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index][:, :, None], "label": int(self.labels[index])}

  def __reduce__(self):
    return (IdxSource, (self.data_dir, self.split))

  def __repr__(self) -> str:
    return f"IdxSource({self.data_dir!r}, {self.split!r}, n={len(self)})"


class SyntheticSource:
  """Deterministic random images of a fixed shape, for throughput benchmarks and smoke tests.

  Record ``i`` is ``{"image": uint8 (size, size, 3), "label": i % num_classes}``:
  uniform noise from a generator seeded by ``(seed, i)``, plus a class-dependent
  brightness offset on one channel so that a model can learn something from it.
  """

  def __init__(self, num_examples: int, image_size: int, num_classes: int = 10, seed: int = 0):
    if num_examples <= 0 or image_size <= 0 or num_classes <= 0:
      raise ValueError(f"synthetic: num_examples={num_examples}, image_size={image_size} and "
                       f"num_classes={num_classes} must be positive")
    self.num_examples, self.image_size = num_examples, image_size
    self.num_classes, self.seed = num_classes, seed

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    rng = np.random.default_rng((self.seed, index))
    s = self.image_size
    image = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    label = index % self.num_classes
    c = label % 3
    image[:, :, c] = image[:, :, c] // 2 + np.uint8(label * 128 // self.num_classes)
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return f"SyntheticSource(n={self.num_examples}, size={self.image_size})"


def _tfds_source(name: str, split: str, data_dir: str | None):
  """A tfds ArrayRecord ``data_source`` (no TensorFlow needed); records as in tfds."""
  import tensorflow_datasets as tfds  # Lazy: some accelerator images ship without tfds.

  if name not in TFDS_NAMES:
    raise ValueError(f"tfds: unknown dataset name {name!r}, expected one of {TFDS_NAMES}")
  if data_dir and "://" not in data_dir and not os.path.isdir(data_dir):
    raise FileNotFoundError(f"tfds: data_dir {data_dir!r} is not a directory")
  tfds_split = TFDS_SPLITS.get(name, {}).get(split, split)
  # ImageNet's JPEGs stay encoded: transforms.decode_augment decodes them at a reduced
  # scale when the random crop allows (most crops of a ~500x375 photo to 224 px).
  decoders = {"image": tfds.decode.SkipDecoding()} if name in ENCODED else None
  try:
    return tfds.data_source(name, split=tfds_split, data_dir=data_dir or None, download=False,
                            decoders=decoders)
  except Exception as e:  # tfds raises several types for a dataset that is not prepared.
    raise FileNotFoundError(f"tfds: cannot open {name!r} split {tfds_split!r} in data_dir "
                            f"{data_dir!r} (prepare it with tfds first; nothing is downloaded "
                            f"at run time): {e}") from e


def make_source(cfg: Any, split: str) -> tuple[Any, Stats]:
  """Returns ``(source, stats)`` for ``cfg.source`` and ``split`` ("train" or "test")."""
  if split not in SPLITS:
    raise ValueError(f"data: unknown split {split!r}, expected one of {SPLITS}")
  source = getattr(cfg, "source", None)
  data_dir = getattr(cfg, "data_dir", None) or None
  if source == "fashion_mnist_idx":
    return IdxSource(data_dir, split), STATS["fashion_mnist"]
  if source == "synthetic":
    num_classes = int(getattr(cfg, "num_classes", 0) or STATS["synthetic"].num_classes)
    default_n = 50_000 if split == "train" else 10_000
    n = int(getattr(cfg, "synthetic_examples", 0) or default_n)
    seed = 0 if split == "train" else 1  # Different images for the two splits.
    stats = Stats(STATS["synthetic"].mean, STATS["synthetic"].std, num_classes)
    return SyntheticSource(n, int(cfg.image_size), num_classes, seed), stats
  if source == "tfds":
    name = getattr(cfg, "name", None)
    if name not in TFDS_NAMES:
      raise ValueError(f"tfds: unknown dataset name {name!r}, expected one of {TFDS_NAMES}")
    src = _tfds_source(name, split, data_dir)
    return src, STATS[name]
  raise ValueError(f"data: unknown source {source!r}, expected one of {SOURCES}")
