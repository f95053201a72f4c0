"""``make_loader``: one grain pipeline over every source, sharded per process, resumable.

Pipeline (grain ``MapDataset``, so every element is a pure function of its index)::

  train: source[:subset][shard] -> shuffle(per epoch) -> repeat -> random_map(augment)
         -> batch(local, drop remainder) -> threads / worker processes
  eval:  source[shard] padded to whole batches (mask False on padding) -> map -> batch

Because batch ``k`` depends only on (seed, process, k), an iterator's state is just
its position, and ``set_state`` reproduces the uninterrupted stream bit for bit,
augmentation included.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from repvgg_jax.data import sources, transforms

# grain threads reading records (and twice as many batches prefetched).
READ_THREADS = 2


def _even_split(n: int, index: int, count: int) -> tuple[int, int]:
  """[start, end) of shard ``index`` of ``count``: contiguous, sizes differ by at most one."""
  per, extra = divmod(n, count)
  start = index * per + min(index, extra)
  return start, start + per + (index < extra)


def _derived_seed(*parts: int) -> int:
  """A 32-bit seed from integers; grain's shuffle and random_map need seeds < 2**32."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _Window:
  """Records ``source[start:stop]``, then ``length - (stop - start)`` padding records.

  A padding record is a real record (so shapes match) with label 0 and
  ``mask=False``; it lets the last evaluation batch be full and every process
  yield the same number of batches. Each record gains a ``"mask"`` bool. A label
  outside ``[0, num_classes)`` raises ValueError naming it, the record and the source.
  """

  def __init__(self, source: Any, start: int, stop: int, length: int, num_classes: int):
    self.source, self.start, self.stop, self.length = source, start, stop, length
    self.num_classes = num_classes

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, Any]:
    if index < self.stop - self.start:
      record = dict(self.source[self.start + index])
      if not 0 <= int(record["label"]) < self.num_classes:
        raise ValueError(f"{self.source!r}: record {self.start + index} has label "
                         f"{int(record['label'])}, outside [0, {self.num_classes}); set "
                         f"data.num_classes to the dataset's class count")
      record["mask"] = True
      return record
    record = dict(self.source[self.start if self.stop > self.start else 0])
    record["label"], record["mask"] = 0, False
    return record


class _Preprocess:
  """Record -> {"image": uint8 (S, S, 3), "label": int32 (), "mask": bool ()}.

  A record's image is a uint8 array or encoded bytes (tfds ImageNet: the JPEG,
  decoded here at a reduced scale when the crop allows).
  """

  def __init__(self, augment: str, size: int, train: bool):
    self.augment, self.size, self.train = augment, size, train

  def __call__(self, record: dict[str, Any], rng: np.random.Generator | None = None):
    image = record["image"]
    if isinstance(image, (bytes, np.bytes_)):
      image = transforms.decode_augment(bytes(image), self.augment, self.size, self.train, rng)
    else:
      image = np.asarray(image)
      if image.ndim == 2:
        image = image[:, :, None]
      image = transforms.augment_image(image, self.augment, self.size, self.train, rng)
    return {"image": np.ascontiguousarray(transforms.to_rgb(image)),
            "label": np.int32(record["label"]),
            "mask": np.bool_(record.get("mask", True))}


class Loader:
  """An iterable over batches; ``iter(loader)`` gives a grain iterator with get/set_state.

  Attributes:
    num_examples: examples in the split (after ``train_subset``), over all processes.
    num_classes: label count.
    dataset: the dataset's name; classes: its class names (index = label), () if unknown.
    image_shape: (H, W, 3) of one image; batches are uint8 NHWC.
    mean, std: per-channel pixel statistics (in [0, 1], RGB) for
      ``transforms.normalize``; ``pixel_stats`` is ``(mean, std)``, as the train
      and eval steps take it.
    global_batch_size, local_batch_size: per step, over all processes / in this one.
    steps_per_epoch: train: ``max(1, num_examples // global_batch_size)`` (batches run
      across epoch boundaries, so this is the mean); eval: the number of batches of
      the single pass.
  """

  def __init__(self, dataset: Any, *, num_examples: int, num_classes: int, image_size: int,
               global_batch_size: int, local_batch_size: int, steps_per_epoch: int,
               train: bool, stats: sources.Stats):
    self._dataset = dataset
    self.num_examples, self.num_classes = num_examples, num_classes
    self.mean = np.asarray(stats.mean, np.float32)
    self.std = np.asarray(stats.std, np.float32)
    self.pixel_stats = (self.mean, self.std)
    self.dataset, self.classes = stats.name, tuple(stats.classes)
    self.image_shape = (image_size, image_size, 3)
    self.global_batch_size, self.local_batch_size = global_batch_size, local_batch_size
    self.steps_per_epoch, self.train = steps_per_epoch, train

  def __iter__(self):
    return iter(self._dataset)

  def __repr__(self) -> str:
    return (f"Loader(n={self.num_examples}, classes={self.num_classes}, "
            f"image_shape={self.image_shape}, local_batch={self.local_batch_size}, "
            f"train={self.train})")


def _int_field(cfg: Any, name: str, default: int) -> int:
  value = getattr(cfg, name, default)
  value = default if value is None else value
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"data.{name}={value!r} must be an int >= 0")
  return int(value)


def check_fields(cfg: Any) -> dict[str, int]:
  """ValueError naming the first bad field of a data config (``data.<field>=...``): the
  checks :func:`make_loader` makes before it reads anything (the pipeline config's
  ``validate`` asks the same). Returns the integer fields, defaults filled in."""
  source = getattr(cfg, "source", None)
  if source not in sources.SOURCES:
    raise ValueError(f"data.source={source!r}: expected one of {sources.SOURCES}")
  transforms.check_augment(getattr(cfg, "augment", "none"))
  if _int_field(cfg, "image_size", 0) == 0:
    raise ValueError(f"data.image_size={getattr(cfg, 'image_size', None)!r} must be positive")
  return {name: _int_field(cfg, name, default) for name, default in (
      ("image_size", 0), ("train_subset", 0), ("worker_count", 0))}


def make_loader(cfg: Any, split: str, *, global_batch_size: int, train: bool, seed: int = 0,
                process_index: int | None = None, process_count: int | None = None,
                cache_dir: str | None = None) -> Loader:
  """Builds the input pipeline of one process.

  Args:
    cfg: attribute object (e.g. ``ml_collections.ConfigDict``) with ``source``
      ("idx" | "folder" | "tfds" | "synthetic"), ``name``, ``data_dir``,
      ``image_size``, ``augment`` ("none" | "pad_crop_flip" | "rrc_flip"),
      ``train_subset`` (0 = all; the first N examples of the train split) and
      ``worker_count`` (grain worker processes, 0 = in-process). Optional:
      ``num_classes``, ``mean``, ``std`` and
      ``synthetic_examples`` (synthetic source).
    split: "train" or "test" ("test" reads ImageNet's "validation").
    global_batch_size: batch over all processes; must divide by ``process_count``.
    train: True: infinite, reshuffled every epoch, augmented, full batches.
      False: one pass in order, no randomness, last batch padded with ``mask=False``.
    seed: shuffle and augmentation seed.
    process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      Each process reads only its contiguous shard of the examples.
    cache_dir: where computed normalization statistics are stored (the trainer's
      workdir); None computes them each time (see ``sources.make_source``).

  Returns:
    A ``Loader`` whose iterators yield ``{"image": uint8 (B, H, W, 3) NHWC,
    "label": int32 (B,), "mask": bool (B,)}`` with ``B = global_batch_size // process_count``.
  """
  import grain  # Lazy: the package stays importable where grain is not installed.

  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"data: process_index={process_index} not in [0, {process_count})")
  if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, (int, np.integer)) \
      or global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"data: global_batch_size={global_batch_size!r} must be a positive "
                     f"multiple of process_count={process_count}")
  ints = check_fields(cfg)
  augment = getattr(cfg, "augment", "none")
  image_size, subset = ints["image_size"], ints["train_subset"]
  worker_count = ints["worker_count"]

  source, stats = sources.make_source(cfg, split, cache_dir=cache_dir)
  n = len(source)
  if subset and split == "train":
    if subset > n:
      raise ValueError(f"data: train_subset={subset} exceeds the {n} training examples")
    n = subset
  local_batch = global_batch_size // process_count
  start, stop = _even_split(n, process_index, process_count)
  preprocess = _Preprocess(augment, image_size, train)

  if train:
    if stop <= start:
      raise ValueError(f"data: process {process_index} of {process_count} gets no examples "
                       f"of the {n} in split {split!r}")
    # Per-process seeds: otherwise the k-th record of every shard would get the same crop.
    ds = grain.MapDataset.source(_Window(source, start, stop, stop - start, stats.num_classes))
    ds = ds.shuffle(seed=_derived_seed(seed, process_index, 0)).repeat(None)
    ds = ds.random_map(preprocess, seed=_derived_seed(seed, process_index, 1))
    ds = ds.batch(local_batch, drop_remainder=True)
    steps = max(1, n // global_batch_size)
  else:
    # Same batch count on every process (collectives in the eval step need it).
    steps = math.ceil(math.ceil(n / process_count) / local_batch)
    ds = grain.MapDataset.source(_Window(source, start, stop, steps * local_batch,
                                         stats.num_classes))
    ds = ds.map(preprocess).batch(local_batch)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                            prefetch_buffer_size=2 * READ_THREADS))
  if worker_count:
    # grain reads its absl flags when it starts workers and raises if they were never
    # parsed, as in a script or test that does not run under absl.app (google/grain#1355).
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return Loader(ds, num_examples=n, num_classes=stats.num_classes, image_size=image_size,
                global_batch_size=global_batch_size, local_batch_size=local_batch,
                steps_per_epoch=steps, train=train, stats=stats)
