"""Random-access data sources: IDX files, image folders, tfds ArrayRecord, synthetic.

Every source is a grain ``RandomAccessDataSource`` (``__len__`` + ``__getitem__``)
whose records are ``{"image": uint8 (H, W, C), "label": int}`` with ``C`` 1 or 3
(HWC, channels last), or, for tfds ImageNet, the encoded JPEG bytes as
``"image"``. Decoding, augmentation and conversion to 3 channels happen later,
per record, in ``transforms``; normalization on the device. ``make_source`` also
returns the dataset's ``Stats`` (name, classes, normalization statistics); labels
are checked against its class count. The image-folder source lives in ``folder.py``.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from repvgg_jax.data.folder import FolderSource, folder_split_dir

# The Debian package `dataset-fashion-mnist` installs the IDX files here.
DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_IDX_DIRS = {"fashion_mnist": DEFAULT_IDX_DIR}
SOURCES = ("idx", "folder", "tfds", "synthetic")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Stats:
  """Per-channel mean and std of the pixels in [0, 1] (RGB order), the class count,
  and (where known) the dataset's name and class names (index = label)."""
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  num_classes: int
  name: str = ""
  classes: tuple[str, ...] = field(default=())


# Fashion-MNIST: measured over the 60k training images (gray, repeated to RGB).
# CIFAR-10: measured over the 50k training images. ImageNet: the usual torchvision numbers.
# Synthetic: uniform noise in [0, 1] has mean 1/2 and std 1/sqrt(12) ~= 0.2887.
STATS = {
    "fashion_mnist": Stats((0.2860,) * 3, (0.3530,) * 3, 10, "fashion_mnist"),
    "cifar10": Stats((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10, "cifar10"),
    "imagenet2012": Stats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1000, "imagenet2012"),
    "synthetic": Stats((0.5,) * 3, (0.2887,) * 3, 10, "synthetic"),
}
TFDS_NAMES = ("cifar10", "imagenet2012", "fashion_mnist")
# tfds datasets whose records keep the encoded image bytes (decoded in transforms).
ENCODED = ("imagenet2012",)
# tfds split name for each of our splits (ImageNet has no "test" with labels).
TFDS_SPLITS = {"imagenet2012": {"train": "train", "test": "validation"}}
# How each tfds dataset is prepared (docs/data.md has the details).
TFDS_PREPARE = {
    "imagenet2012": "python -m repvgg_jax.data.prepare imagenet2012 --manual_dir=ARCHIVE_DIR "
                    "--data_dir={data_dir}",
    "cifar10": "python -m repvgg_jax.data.prepare cifar10 --data_dir={data_dir}",
    "fashion_mnist": "python -m repvgg_jax.data.prepare fashion_mnist --data_dir={data_dir}",
}
# Statistics of a folder or an unknown IDX dataset come from up to this many training images.
STATS_SAMPLE = 2000


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  """Raises ValueError naming the first label outside ``[0, num_classes)`` and its example."""
  labels = np.asarray(labels)
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"{where}: example {i} has label {int(labels[i])}, outside [0, "
                     f"{num_classes}) ({bad.size} of {labels.size} labels are); set "
                     f"data.num_classes to the dataset's class count")


def _num_classes(cfg: Any, default: int | None, what: str) -> int:
  n = int(getattr(cfg, "num_classes", 0) or 0)
  if n:
    return n
  if default is None:
    raise ValueError(f"{what}: data.num_classes must be set (0 = known only for "
                     f"{sorted(STATS)})")
  return default


def _pixel_stats(images: list[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel (RGB) mean and std in [0, 1] over uint8 HWC images (gray counts for all 3)."""
  total, sq, count = np.zeros(3), np.zeros(3), 0
  for im in images:
    x = im.reshape(-1, im.shape[-1]).astype(np.float64) / 255
    total += x.sum(0) if x.shape[1] == 3 else np.repeat(x.sum(), 3)
    sq += (x * x).sum(0) if x.shape[1] == 3 else np.repeat((x * x).sum(), 3)
    count += x.shape[0]
  mean = total / count
  std = np.sqrt(np.maximum(sq / count - mean * mean, 1e-12))
  return tuple(round(float(m), 4) for m in mean), tuple(round(float(v), 4) for v in std)


def _configured_stats(cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  mean, std = tuple(getattr(cfg, "mean", ()) or ()), tuple(getattr(cfg, "std", ()) or ())
  if not mean:
    return None
  return (mean * 3 if len(mean) == 1 else mean), (std * 3 if len(std) == 1 else std)


# IDX element types (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# File name prefixes of each split: MNIST-style, and EMNIST-style ("<name>-train-...").
_IDX_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}
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


def _idx_path(data_dir: str, name: str, split: str, kind: str) -> str:
  tried = []
  for prefix in _IDX_PREFIXES[split]:
    for stem in (f"{prefix}-{kind}", f"{name}-{prefix}-{kind}"):
      base = os.path.join(data_dir, stem)
      for path in (base + ".gz", base):
        if os.path.exists(path):
          return path
      tried.append(stem)
  hint = (" (install the Debian package dataset-fashion-mnist, or set data.data_dir)"
          if name == "fashion_mnist" else "")
  raise FileNotFoundError(f"idx: no {split} {kind.split('-')[0]} file for dataset {name!r} in "
                          f"{data_dir}: tried {', '.join(tried)} (each .gz or not){hint}")


@functools.lru_cache(maxsize=4)
def _load_idx_split(data_dir: str, name: str, split: str) -> tuple[np.ndarray, np.ndarray, str]:
  images_path = _idx_path(data_dir, name, split, "images-idx3-ubyte")
  labels_path = _idx_path(data_dir, name, split, "labels-idx1-ubyte")
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim == 4 and images.shape[3] in (1, 3):
    pass
  elif images.ndim == 3:
    images = images[:, :, :, None]
  else:
    raise ValueError(f"idx: {images_path} holds images of shape {images.shape}, expected "
                     f"(N, H, W) or (N, H, W, 1 or 3)")
  if labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f"idx: {images_path} {images.shape[:3]} and {labels_path} {labels.shape} "
                     f"do not match (expected (N, H, W) images and (N,) labels)")
  if images.dtype != np.uint8:
    raise ValueError(f"idx: {images_path} holds {images.dtype} pixels, expected uint8")
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels, labels_path


class IdxSource:
  """An MNIST-style dataset from its IDX files, held in memory.

  Files (each gzip-compressed or not): ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-...`` (or ``test-...``) for the test split,
  optionally prefixed with the dataset's name (``emnist-letters-train-...``).
  Records are ``{"image": uint8 (H, W, 1 or 3), "label": int}``. The arrays are
  cached per (directory, name, split), and a pickled source (grain workers)
  reloads from the files instead of copying them.
  """

  def __init__(self, data_dir: str | None, split: str, name: str = "fashion_mnist"):
    if split not in _IDX_PREFIXES:
      raise ValueError(f"idx: unknown split {split!r}, expected one of {SPLITS}")
    data_dir = data_dir or DEFAULT_IDX_DIRS.get(name)
    if not data_dir:
      raise ValueError(f"idx: dataset {name!r} has no default directory; set data.data_dir "
                       f"to the directory holding its IDX files")
    if not os.path.isdir(data_dir):
      hint = (f"install the Debian package dataset-fashion-mnist (it puts the IDX files in "
              f"{DEFAULT_IDX_DIR}) or set data.data_dir" if name == "fashion_mnist"
              else "set data.data_dir to the directory holding the IDX files")
      raise FileNotFoundError(f"idx: data_dir {data_dir!r} is not a directory; {hint}")
    self.data_dir, self.split, self.name = data_dir, split, name
    self.images, self.labels, self.labels_path = _load_idx_split(
        os.path.abspath(data_dir), name, split)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}

  def __reduce__(self):
    return (IdxSource, (self.data_dir, self.split, self.name))

  def __repr__(self) -> str:
    return f"IdxSource({self.data_dir!r}, {self.split!r}, name={self.name!r}, n={len(self)})"


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


def _sample_stats(source: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Pixel statistics over up to ``STATS_SAMPLE`` evenly spaced records of ``source``."""
  n = len(source)
  index = np.unique(np.linspace(0, n - 1, min(n, STATS_SAMPLE)).astype(int))
  return _pixel_stats([source[int(i)]["image"] for i in index])


def _cached_stats(source: Any, key: dict, cache_dir: str | None):
  """``_sample_stats(source)``, stored in ``<cache_dir>/data_stats.json`` for that ``key``."""
  path = os.path.join(cache_dir, "data_stats.json") if cache_dir else None
  if path and os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get("key") == key:
      return tuple(cached["mean"]), tuple(cached["std"])
  mean, std = _sample_stats(source)
  from absl import logging
  logging.info("data: pixel mean %s, std %s (from %d training images%s)", mean, std,
               min(len(source), STATS_SAMPLE), f"; stored in {path}" if path else "")
  if path:
    from repvgg_jax.fileio import atomic_write_text
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, "mean": mean, "std": std}, indent=1))
  return mean, std


def _tfds_source(name: str, split: str, data_dir: str | None):
  """A tfds ArrayRecord ``data_source`` (no TensorFlow needed); records as in tfds."""
  import tensorflow_datasets as tfds  # Lazy: some accelerator images ship without tfds.

  if name not in TFDS_NAMES:
    raise ValueError(f"tfds: unknown dataset name {name!r}, expected one of {TFDS_NAMES}")
  if data_dir and "://" not in data_dir and not os.path.isdir(data_dir):
    raise FileNotFoundError(f"tfds: data_dir {data_dir!r} is not a directory. "
                            + _prepare_hint(name, data_dir))
  tfds_split = TFDS_SPLITS.get(name, {}).get(split, split)
  # ImageNet's JPEGs stay encoded: transforms.decode_augment decodes them at a reduced
  # scale when the random crop allows (most crops of a ~500x375 photo to 224 px).
  decoders = {"image": tfds.decode.SkipDecoding()} if name in ENCODED else None
  resolved = data_dir or tfds.core.constants.get_default_data_dir()
  try:
    return tfds.data_source(name, split=tfds_split, data_dir=resolved, download=False,
                            decoders=decoders)
  except Exception as e:  # tfds raises several types for a dataset that is not prepared.
    raise FileNotFoundError(
        f"tfds: {name!r} split {tfds_split!r} is not prepared (as ArrayRecord) in data_dir "
        f"{resolved} (data.data_dir={data_dir or ''!r}); nothing is downloaded at run time. "
        + _prepare_hint(name, resolved) + f" [{type(e).__name__}: {str(e)[:300]}]") from e


def _prepare_hint(name: str, data_dir: str) -> str:
  return (f"Prepare it once (needs pip install -e '.[prepare]'): "
          f"{TFDS_PREPARE[name].format(data_dir=data_dir)} (see docs/data.md)")


def make_source(cfg: Any, split: str, *, cache_dir: str | None = None) -> tuple[Any, Stats]:
  """Returns ``(source, stats)`` for ``cfg.source`` and ``split`` ("train" or "test").

  ``stats`` names the dataset and its classes and gives the normalization
  statistics: ``cfg.mean``/``cfg.std`` when set, else the known dataset's, else
  computed from the training images (stored in ``<cache_dir>/data_stats.json`` for
  the folder source when ``cache_dir`` is given). Labels are checked against the
  class count: all at once for in-memory and folder sources, per record for tfds
  (``make_loader`` checks every record).
  """
  if split not in SPLITS:
    raise ValueError(f"data: unknown split {split!r}, expected one of {SPLITS}")
  source = getattr(cfg, "source", None)
  data_dir = getattr(cfg, "data_dir", None) or None
  name = getattr(cfg, "name", None) or ""
  configured = _configured_stats(cfg)
  if source == "idx":
    src = IdxSource(data_dir, split, name or "fashion_mnist")
    known = STATS.get(src.name)
    num_classes = _num_classes(cfg, known.num_classes if known else None, f"idx {src.name!r}")
    check_labels(src.labels, num_classes, f"idx: {src.labels_path}")
    if configured is None:
      configured = ((known.mean, known.std) if known else
                    _sample_stats(IdxSource(data_dir, "train", src.name)))
    return src, Stats(*configured, num_classes, src.name)
  if source == "folder":
    src = FolderSource(data_dir, split)
    num_classes = len(src.classes)
    if getattr(cfg, "num_classes", 0) and cfg.num_classes != num_classes:
      raise ValueError(f"folder: data.num_classes={cfg.num_classes} but "
                       f"{folder_split_dir(src.data_dir, 'train')} has {num_classes} class "
                       f"directories: {list(src.classes[:10])}")
    if configured is None:
      train = src if split == "train" else FolderSource(data_dir, "train")
      key = {"data_dir": src.data_dir, "images": len(train), "classes": list(src.classes)}
      configured = _cached_stats(train, key, cache_dir)
    return src, Stats(*configured, num_classes, name or os.path.basename(src.data_dir),
                      src.classes)
  if source == "synthetic":
    num_classes = _num_classes(cfg, STATS["synthetic"].num_classes, "synthetic")
    default_n = 50_000 if split == "train" else 10_000
    n = int(getattr(cfg, "synthetic_examples", 0) or default_n)
    seed = 0 if split == "train" else 1  # Different images for the two splits.
    stats = Stats(*(configured or (STATS["synthetic"].mean, STATS["synthetic"].std)),
                  num_classes, "synthetic")
    return SyntheticSource(n, int(cfg.image_size), num_classes, seed), stats
  if source == "tfds":
    if name not in TFDS_NAMES:
      raise ValueError(f"tfds: unknown dataset name {name!r}, expected one of {TFDS_NAMES}")
    src = _tfds_source(name, split, data_dir)
    known = STATS[name]
    num_classes = _num_classes(cfg, known.num_classes, f"tfds {name!r}")
    classes = ()
    try:
      classes = tuple(src.dataset_info.features["label"].names)
    except (AttributeError, KeyError, TypeError):
      pass
    return src, Stats(*(configured or (known.mean, known.std)), num_classes, name, classes)
  raise ValueError(f"data: unknown source {source!r}, expected one of {SOURCES}")
