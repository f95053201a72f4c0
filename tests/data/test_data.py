"""Data package: IDX reader, tfds (mocked) source, determinism, resume, sharding, eval mask,
augmentation and input validation. Everything runs on tiny files written to tmp_path."""

import gzip
import json
import os
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from repvgg_jax import data
from repvgg_jax.train import config as config_lib

from _util import raises_naming

FMNIST_DIR = data.DEFAULT_IDX_DIR  # Where the Debian package dataset-fashion-mnist installs.


# ----------------------------------------------------------------------------- helpers

def _write(path, raw):
  path = str(path)
  with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
    f.write(raw)
  return path


def _idx_u8(a):
  """IDX bytes of a uint8 array, written from the format description (not the reader)."""
  a = np.ascontiguousarray(a, np.uint8)
  return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def _fmnist_dir(tmp_path, n_train=24, n_test=10, gz=True, seed=0):
  """A Fashion-MNIST-like directory; labels are 0..n-1, so a label identifies its example."""
  d = tmp_path / "fmnist"
  d.mkdir()
  rng = np.random.default_rng(seed)
  arrays = {}
  for prefix, split, n in (("train", "train", n_train), ("t10k", "test", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8)
    ext = ".gz" if gz else ""
    _write(d / f"{prefix}-images-idx3-ubyte{ext}", _idx_u8(images))
    _write(d / f"{prefix}-labels-idx1-ubyte{ext}", _idx_u8(labels))
    arrays[split] = (images, labels)
  return str(d), arrays


def _cfg(**fields):
  """The trainer's data config group with overrides (unlocked, so extra fields are allowed)."""
  c = config_lib.base_config().data
  c.source, c.image_size, c.augment, c.synthetic_examples = "synthetic", 8, "none", 32
  if fields.get("source") == "idx":
    # _fmnist_dir labels example i with i: a label per example, not 10 classes.
    c.name, c.num_classes = "fashion_mnist", 256
  for k, v in fields.items():
    c[k] = v
  return c


def _loader(cfg, split="train", batch=8, train=True, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return data.make_loader(cfg, split, global_batch_size=batch, train=train, **kw)


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _fm_normalized(img28, size):
  """Fashion-MNIST record -> expected batch image: zero-pad to size, RGB, uint8."""
  p = (size - 28) // 2
  x = np.pad(img28, ((p, size - 28 - p), (p, size - 28 - p)))
  return np.repeat(x[:, :, None], 3, axis=2)


def _to_uint8(images, stats):
  """Batches carry uint8 pixels (normalized on device): checks the dtype, returns them."""
  assert np.asarray(images).dtype == np.uint8
  return np.asarray(images)


# ----------------------------------------------------------------------------- IDX reader

# Hand-written IDX files: magic (0, 0, type, ndim), big-endian uint32 sizes, big-endian data.
_HAND_WRITTEN = [
    (b"\x00\x00\x08\x01" b"\x00\x00\x00\x03" b"\x03\x01\xff",
     np.array([3, 1, 255], np.uint8)),
    (b"\x00\x00\x0b\x02" b"\x00\x00\x00\x02" b"\x00\x00\x00\x02"
     b"\x00\x01" b"\xff\xfe" b"\x01\x00" b"\x80\x00",
     np.array([[1, -2], [256, -32768]], np.int16)),
    (b"\x00\x00\x0d\x01" b"\x00\x00\x00\x02" b"\x3f\xc0\x00\x00" b"\xc0\x20\x00\x00",
     np.array([1.5, -2.5], np.float32)),
    (b"\x00\x00\x08\x03" b"\x00\x00\x00\x02" b"\x00\x00\x00\x01" b"\x00\x00\x00\x03"
     b"\x00\x01\x02" b"\x0a\x0b\x0c",
     np.array([[[0, 1, 2]], [[10, 11, 12]]], np.uint8)),
]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", range(len(_HAND_WRITTEN)))
def test_read_idx_round_trips_hand_written_files(tmp_path, case, gz):
  raw, expected = _HAND_WRITTEN[case]
  path = _write(tmp_path / ("x-idx.gz" if gz else "x-idx"), raw)
  got = data.read_idx(path)
  assert got.shape == expected.shape
  assert got.dtype == expected.dtype  # Native byte order, same kind and width.
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("raw", [
    b"\x00\x01\x08\x01\x00\x00\x00\x01\x07",   # second byte not zero
    b"\x00\x00\x07\x01\x00\x00\x00\x01\x07",   # unknown type byte
    b"\x1f\x8b\x08\x01\x00\x00\x00\x01\x07",   # gzip magic in a file not named .gz
    b"\x00\x00",                               # shorter than the magic number
], ids=["magic", "type", "gzip-as-raw", "tiny"])
def test_read_idx_wrong_magic_names_the_file(tmp_path, raw):
  path = _write(tmp_path / "bad-idx1-ubyte", raw)
  with pytest.raises(ValueError, match="bad-idx1-ubyte"):
    data.read_idx(path)


def test_read_idx_truncated_or_corrupt_names_the_file(tmp_path):
  good = _idx_u8(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
  cases = {
      "data-short-idx3-ubyte": good[:-1],                  # one data byte missing
      "data-long-idx3-ubyte": good + b"\x00",              # one byte too many
      "header-short-idx3-ubyte": good[:10],                # 3 dims announced, 1.5 sizes present
      "cut-idx3-ubyte.gz": gzip.compress(good)[:-12],      # gzip stream cut short
      "garbage-idx3-ubyte.gz": b"this is not gzip data at all",
  }
  for name, raw in cases.items():
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=name):
      data.read_idx(str(path))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_source_records_match_the_files(tmp_path, gz):
  d, arrays = _fmnist_dir(tmp_path, n_train=7, n_test=5, gz=gz)
  for split in ("train", "test"):
    src, stats = data.make_source(_cfg(source="idx", data_dir=d), split)
    images, labels = arrays[split]
    assert len(src) == len(labels)
    known = data.STATS["fashion_mnist"]
    assert (stats.mean, stats.std, stats.name) == (known.mean, known.std, "fashion_mnist")
    for i in range(len(src)):
      rec = src[i]
      assert rec["image"].shape == (28, 28, 1) and rec["image"].dtype == np.uint8
      np.testing.assert_array_equal(rec["image"][:, :, 0], images[i])
      assert rec["label"] == labels[i]


def test_idx_source_missing_dir_says_how_to_get_the_data(tmp_path):
  missing = str(tmp_path / "no-such-dir")
  with pytest.raises(FileNotFoundError) as e:
    data.make_source(_cfg(source="idx", data_dir=missing), "train")
  assert missing in str(e.value)
  assert "dataset-fashion-mnist" in str(e.value)


def test_idx_source_missing_file_says_how_to_get_the_data(tmp_path):
  d, _ = _fmnist_dir(tmp_path)
  os.remove(os.path.join(d, "t10k-labels-idx1-ubyte.gz"))
  with pytest.raises(FileNotFoundError) as e:
    data.make_source(_cfg(source="idx", data_dir=d), "test")
  assert "t10k-labels-idx1-ubyte" in str(e.value)
  assert "dataset-fashion-mnist" in str(e.value)


def test_idx_source_rejects_images_and_labels_of_different_lengths(tmp_path):
  d, _ = _fmnist_dir(tmp_path, n_train=6)
  _write(os.path.join(d, "train-labels-idx1-ubyte.gz"), _idx_u8(np.zeros(5, np.uint8)))
  with raises_naming(ValueError, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "(5,)"):
    data.make_source(_cfg(source="idx", data_dir=d), "train")


def test_real_fashion_mnist_files():
  if not os.path.isdir(FMNIST_DIR):
    pytest.skip(f"{FMNIST_DIR} missing (apt-get install dataset-fashion-mnist)")
  cfg = _cfg(source="idx", data_dir="", image_size=32)
  train, stats = data.make_source(cfg, "train")
  test, _ = data.make_source(cfg, "test")
  assert (len(train), len(test)) == (60000, 10000)
  for src, per_class in ((train, 6000), (test, 1000)):
    assert src.images.shape[1:] == (28, 28, 1) and src.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(src.labels), [per_class] * 10)
  # The normalization constants in STATS are those of these training pixels.
  hist = np.bincount(train.images.ravel(), minlength=256)
  v = np.arange(256) / 255
  mean = hist @ v / hist.sum()
  std = np.sqrt(hist @ (v - mean) ** 2 / hist.sum())
  assert abs(mean - stats.mean[0]) < 5e-4 and abs(std - stats.std[0]) < 5e-4
  batch = next(iter(_loader(cfg, "test", batch=16, train=False)))
  assert batch["image"].shape == (16, 32, 32, 3)
  np.testing.assert_array_equal(batch["image"][3], _fm_normalized(test.images[3, :, :, 0], 32))
  np.testing.assert_array_equal(batch["label"], test.labels[:16])


# ----------------------------------------------------------------------------- tfds (mocked)

@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_tfds_source_with_mock_data(name):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = _cfg(source="tfds", name=name, data_dir="", image_size=32)
  n = 11
  with tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE):
    src, stats = data.make_source(cfg, "test")
    known = data.STATS[name]
    assert len(src) == n and (stats.mean, stats.std, stats.num_classes, stats.name) == (
        known.mean, known.std, known.num_classes, name)
    records = [src[i] for i in range(n)]
    batches = list(_loader(cfg, "test", batch=4, train=False))
  assert len(batches) == 3
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(12) < n)
  for i, rec in enumerate(records):
    img = np.asarray(rec["image"])
    if name == "fashion_mnist":
      expected = _fm_normalized(img[:, :, 0], 32)
    else:  # CIFAR-10 is already 32x32x3: only normalized.
      expected = img
    np.testing.assert_array_equal(images[i], expected)
    assert labels[i] == int(rec["label"])


def test_tfds_imagenet_test_split_reads_validation():
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("tensorflow", reason="tfds mock_data encodes the mock images with "
                      "TensorFlow")
  cfg = _cfg(source="tfds", name="imagenet2012", data_dir="", image_size=16, augment="rrc_flip")
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    src, stats = data.make_source(cfg, "test")
    assert src.split == "validation" and stats.num_classes == 1000
    batches = list(_loader(cfg, "test", batch=4, train=False))
  # Mock images have random sizes; evaluation resizes and centre-crops them all.
  assert [b["image"].shape for b in batches] == [(4, 16, 16, 3)] * 2
  assert sum(int(b["mask"].sum()) for b in batches) == 5


def test_tfds_errors_name_the_dataset_and_directory(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  missing = str(tmp_path / "no-tfds-here")
  with pytest.raises(FileNotFoundError, match="no-tfds-here"):
    data.make_source(_cfg(source="tfds", name="cifar10", data_dir=missing), "train")
  # An existing directory without the prepared dataset: no download; the resolved
  # directory and the exact command that prepares it.
  with pytest.raises(FileNotFoundError) as e:
    data.make_source(_cfg(source="tfds", name="cifar10", data_dir=str(tmp_path)), "train")
  assert f"python -m repvgg_jax.data.prepare cifar10 --data_dir={tmp_path}" in str(e.value)


def test_tfds_default_data_dir_is_resolved_in_the_error(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow_datasets")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds-default"))
  with pytest.raises(FileNotFoundError) as e:
    data.make_source(_cfg(source="tfds", name="imagenet2012", data_dir=""), "train")
  msg = str(e.value)
  assert "data_dir None" not in msg and str(tmp_path / "tfds-default") in msg
  assert (f"python -m repvgg_jax.data.prepare imagenet2012 --manual_dir=ARCHIVE_DIR "
          f"--data_dir={tmp_path / 'tfds-default'}") in msg


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_batches_different_seed_different_order():
  cfg = _cfg(augment="pad_crop_flip", num_classes=32)  # synthetic label == example index
  a = _take(iter(_loader(cfg, seed=3)), 8)  # two epochs of 4 batches
  b = _take(iter(_loader(cfg, seed=3)), 8)
  _assert_batches_equal(a, b)
  c = _take(iter(_loader(cfg, seed=4)), 4)
  order = lambda bs: np.concatenate([x["label"] for x in bs])
  assert sorted(order(a[:4])) == sorted(order(c)) == list(range(32))
  assert not np.array_equal(order(a[:4]), order(c))
  # Every epoch is a permutation of the split, reshuffled.
  assert sorted(order(a[4:])) == list(range(32))
  assert not np.array_equal(order(a[:4]), order(a[4:]))


def test_eval_ignores_the_seed_and_repeats():
  cfg = _cfg(augment="rrc_flip", image_size=6, synthetic_examples=10)
  a = list(_loader(cfg, "test", batch=4, train=False, seed=0))
  b = list(_loader(cfg, "test", batch=4, train=False, seed=9))
  _assert_batches_equal(a, b)
  loader = _loader(cfg, "test", batch=4, train=False)
  _assert_batches_equal(list(loader), list(loader))


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("k", [1, 4])
def test_resume_continues_the_uninterrupted_stream(k):
  # 20 examples, batches of 6: batches straddle epochs, and k=4 resumes in epoch 2.
  cfg = _cfg(augment="pad_crop_flip", synthetic_examples=20)
  full = _take(iter(_loader(cfg, batch=6, seed=1)), k + 5)
  it = iter(_loader(cfg, batch=6, seed=1))
  _take(it, k)
  state = it.get_state()
  _take(it, 2)  # Moving on does not change the saved state.
  resumed = iter(_loader(cfg, batch=6, seed=1))
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 5), full[k:])


def test_worker_processes_give_the_same_stream_and_resume(tmp_path):
  from absl import flags
  was_parsed = flags.FLAGS.is_parsed()
  try:
    d, _ = _fmnist_dir(tmp_path)  # IdxSource pickles by path and reloads in the worker.
    base = dict(source="idx", data_dir=d, image_size=32, augment="pad_crop_flip")
    reference = _take(iter(_loader(_cfg(**base, worker_count=0), seed=2)), 5)
    cfg = _cfg(**base, worker_count=1)
    it = iter(_loader(cfg, seed=2))
    head = _take(it, 3)
    state = it.get_state()
    resumed = iter(_loader(cfg, seed=2))
    resumed.set_state(state)
    tail = _take(resumed, 2)
    _assert_batches_equal(head + tail, reference)
    del it, resumed
  finally:
    if not was_parsed:
      flags.FLAGS.unparse_flags()


# ----------------------------------------------------------------------------- sharding

def test_processes_read_disjoint_shards_covering_the_epoch():
  n = 25  # Uneven: shards of 13 and 12.
  cfg = _cfg(augment="pad_crop_flip", synthetic_examples=n, num_classes=n)
  seen = []
  for p in range(2):
    loader = _loader(cfg, batch=6, process_index=p, process_count=2)
    assert loader.local_batch_size == 3 and loader.global_batch_size == 6
    assert loader.num_examples == n
    batches = _take(iter(loader), 4)  # 12 records: a whole epoch of either shard's first 12
    assert all(b["image"].shape == (3, 8, 8, 3) and b["label"].shape == (3,) for b in batches)
    seen.append(np.concatenate([b["label"] for b in batches]))
  assert len(set(seen[0])) == len(set(seen[1])) == 12
  assert not set(seen[0]) & set(seen[1])
  # Contiguous shards: process 0 holds [0, 13), process 1 [13, 25).
  assert set(seen[0]) <= set(range(13)) and set(seen[1]) <= set(range(13, 25))
  # Over a full epoch of its shard, each process covers its shard exactly once.
  it = iter(_loader(cfg, batch=2, process_index=0, process_count=2))  # 1 per process
  first_epoch = np.concatenate([b["label"] for b in _take(it, 13)])
  assert sorted(first_epoch) == list(range(13))


def test_eval_shards_cover_the_split_once_with_equal_batch_counts():
  n = 11
  cfg = _cfg(synthetic_examples=n, num_classes=n)
  per_process = []
  for p in range(2):
    loader = _loader(cfg, "test", batch=4, train=False, process_index=p, process_count=2)
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch
    assert all(b["image"].shape[0] == 2 for b in batches)
    per_process.append(batches)
  assert len(per_process[0]) == len(per_process[1])  # Collectives need equal counts.
  real = [np.concatenate([b["label"][b["mask"]] for b in bs]) for bs in per_process]
  assert sorted(np.concatenate(real)) == list(range(n))
  assert not set(real[0]) & set(real[1])


# ----------------------------------------------------------------------------- eval padding

def test_eval_mask_counts_the_split_and_pads_with_false(tmp_path):
  d, arrays = _fmnist_dir(tmp_path, n_test=10)
  cfg = _cfg(source="idx", data_dir=d, image_size=32)
  loader = _loader(cfg, "test", batch=4, train=False)
  batches = list(loader)
  assert loader.steps_per_epoch == len(batches) == 3 and loader.num_examples == 10
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  assert mask.dtype == np.bool_ and mask.shape == (12,)
  assert int(mask.sum()) == 10
  np.testing.assert_array_equal(mask, np.arange(12) < 10)  # padding only at the end
  np.testing.assert_array_equal(labels[mask], arrays["test"][1])  # in order
  assert np.all(labels[~mask] == 0)
  for i in range(10):  # augment "none": exactly the source image, padded 28 -> 32
    np.testing.assert_array_equal(images[i], _fm_normalized(arrays["test"][0][i], 32))


def test_train_subset_uses_the_first_examples():
  cfg = _cfg(synthetic_examples=32, num_classes=32, train_subset=10)
  loader = _loader(cfg, batch=5)
  assert loader.num_examples == 10 and loader.steps_per_epoch == 2
  labels = np.concatenate([b["label"] for b in _take(iter(loader), 2)])
  assert sorted(labels) == list(range(10))
  # The test split ignores train_subset.
  assert _loader(cfg, "test", batch=8, train=False).num_examples == 32


# ----------------------------------------------------------------------------- augmentation

def _by_label(batches):
  out = {}
  for b in batches:
    for img, label in zip(b["image"], b["label"]):
      out[int(label)] = img
  return out


def test_augment_none_returns_the_source_images(tmp_path):
  d, arrays = _fmnist_dir(tmp_path)
  images, labels = arrays["train"]
  loader = _loader(_cfg(source="idx", data_dir=d, image_size=32), batch=8)
  batches = _take(iter(loader), 3)
  for b in batches:
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32 and b["mask"].dtype == np.bool_ and b["mask"].all()
  got = _by_label(batches)
  assert sorted(got) == list(range(len(labels)))
  for i in got:
    np.testing.assert_array_equal(got[i], _fm_normalized(images[i], 32))


def test_pad_crop_flip_is_a_shifted_and_maybe_flipped_copy(tmp_path):
  d, arrays = _fmnist_dir(tmp_path)
  images = arrays["train"][0]
  cfg = _cfg(source="idx", data_dir=d, image_size=32, augment="pad_crop_flip")
  batches = _take(iter(_loader(cfg, batch=8)), 6)  # two epochs
  assert all(b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
             for b in batches)
  stats = data.STATS["fashion_mnist"]
  shifts, flips = set(), set()
  for b in batches:
    pix = _to_uint8(b["image"], stats)
    assert np.all(pix == pix[..., :1])  # gray repeated to RGB
    for out, label in zip(pix[..., 0], b["label"]):
      base = np.pad(images[label], 2)  # 28 -> 32, as without augmentation
      padded = np.pad(base, 4)
      match = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
               if np.array_equal(out, (lambda c: c[:, ::-1] if f else c)(
                   padded[dy:dy + 32, dx:dx + 32]))]
      assert match, f"example {label}: not a 4-pixel pad/crop/flip of the source"
      shifts |= {(dy, dx) for dy, dx, _ in match}
      flips |= {f for _, _, f in match}
  assert flips == {False, True}
  assert len(shifts) > 5  # many different crops
  # The same example gets a different crop in the next epoch.
  e1, e2 = _by_label(batches[:3]), _by_label(batches[3:])
  assert sum(not np.array_equal(e1[i], e2[i]) for i in e1) > len(e1) // 2


def test_rrc_flip_crops_differently_and_evaluates_with_a_centre_crop(tmp_path):
  d, arrays = _fmnist_dir(tmp_path)
  images = arrays["train"][0]
  cfg = _cfg(source="idx", data_dir=d, image_size=16, augment="rrc_flip")
  batches = _take(iter(_loader(cfg, batch=8)), 6)
  assert all(b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.uint8
             for b in batches)
  stats = data.STATS["fashion_mnist"]
  whole = lambda img, size: np.asarray(Image.fromarray(img).resize((size, size),
                                                                  Image.BILINEAR))
  e1, e2 = _by_label(batches[:3]), _by_label(batches[3:])
  assert sorted(e1) == sorted(e2) == list(range(24))
  differs_from_whole = [not np.array_equal(_to_uint8(e1[i], stats)[..., 0], whole(images[i], 16))
                        for i in e1]
  assert sum(differs_from_whole) > 12
  assert sum(not np.array_equal(e1[i], e2[i]) for i in e1) > 12
  # Evaluation: shorter side to round(16 / 0.875) = 18, centre 16x16 crop, no randomness.
  ev = list(_loader(cfg, "test", batch=5, train=False))
  assert [b["image"].shape for b in ev] == [(5, 16, 16, 3)] * 2
  for i, img in enumerate(np.concatenate([b["image"] for b in ev])):
    expected = whole(arrays["test"][0][i], 18)[1:17, 1:17]
    np.testing.assert_array_equal(_to_uint8(img, stats)[..., 0], expected)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("fields, kwargs, exc, pattern", [
    (dict(source="imagenet_folder"), {}, ValueError, "imagenet_folder"),
    (dict(augment="mixup"), {}, ValueError, "mixup"),
    (dict(source="tfds", name="mnist"), {}, ValueError, "mnist"),
    (dict(image_size=0), {}, ValueError, "image_size"),
    (dict(train_subset=-1), {}, ValueError, "train_subset=-1"),
    (dict(worker_count=-2), {}, ValueError, "worker_count=-2"),
    (dict(synthetic_examples=8, train_subset=9), {}, ValueError, "train_subset=9"),
    ({}, dict(batch=6, process_count=4), ValueError, "global_batch_size=6"),
    ({}, dict(batch=0), ValueError, "global_batch_size=0"),
    ({}, dict(process_index=2, process_count=2), ValueError, "process_index=2"),
    ({}, dict(split="validation"), ValueError, "validation"),
], ids=["source", "augment", "tfds-name", "image-size", "subset-neg", "workers", "subset-big",
        "batch-divisible", "batch-zero", "process-index", "split"])
def test_bad_input_names_the_value(fields, kwargs, exc, pattern):
  split = kwargs.pop("split", "train")
  with pytest.raises(exc, match=pattern):
    _loader(_cfg(**fields), split, **kwargs)


# ----------------------------------------------------------------------------- on device, JPEG

def test_normalize_is_the_standardization_on_device():
  import jax
  from repvgg_jax.data import transforms
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  st = data.STATS["imagenet2012"]
  got = jax.jit(transforms.normalize)(images, np.asarray(st.mean), np.asarray(st.std))
  want = (images / 255 - np.asarray(st.mean)) / np.asarray(st.std)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_loader_exposes_its_pixel_stats(tmp_path):
  d, _ = _fmnist_dir(tmp_path)
  loader = _loader(_cfg(source="idx", data_dir=d, image_size=32), batch=8)
  st = data.STATS["fashion_mnist"]
  np.testing.assert_array_equal(loader.pixel_stats[0], np.asarray(st.mean, np.float32))
  np.testing.assert_array_equal(loader.pixel_stats[1], np.asarray(st.std, np.float32))


def _photo(w=500, h=375, seed=0):
  """A smooth RGB test picture (JPEG-friendly) as uint8 (h, w, 3)."""
  y, x = np.mgrid[0:h, 0:w]
  rng = np.random.default_rng(seed)
  img = np.stack([128 + 100 * np.sin(x / rng.uniform(20, 40) + c) * np.cos(y / 30)
                  for c in range(3)], -1)
  return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(img, quality=90):
  import io
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


@pytest.mark.parametrize("train", [True, False])
def test_jpeg_reduced_decode_matches_the_full_decode(train, monkeypatch):
  from repvgg_jax.data import transforms
  encoded = _jpeg(_photo(500, 375))  # 375 / 4 and / 8 round up: boxes must be clamped
  full = np.asarray(Image.open(__import__("io").BytesIO(encoded)).convert("RGB"))
  from PIL import JpegImagePlugin
  scales = []
  draft = JpegImagePlugin.JpegImageFile.draft

  def recording(self, mode, size):
    out = draft(self, mode, size)
    scales.append(self.size[0] / 500)
    return out
  monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording)
  diffs = []
  for seed in range(40):
    a = transforms.decode_augment(encoded, "rrc_flip", 64, train, np.random.default_rng(seed))
    b = transforms.augment_image(full, "rrc_flip", 64, train, np.random.default_rng(seed))
    assert a.shape == b.shape == (64, 64, 3) and a.dtype == np.uint8
    diffs.append(np.abs(a.astype(np.int16) - b).mean())
  # Same crops and flips (same draws); pixels differ by the DCT-domain downscale only.
  assert max(diffs) < 6, diffs
  assert min(scales) <= 0.25  # 64 px crops of a 500 px photo decode at 1/4 or 1/8
  for seed in range(300):  # every crop box fits the reduced image
    out = transforms.decode_augment(encoded, "rrc_flip", 32, True, np.random.default_rng(seed))
    assert out.shape == (32, 32, 3)


# ----------------------------------------------------------------------------- labels

def test_labels_beyond_num_classes_name_the_first_bad_label_and_its_file(tmp_path):
  # The bug: MNIST-style files with 12 labels trained under 10 classes without a word.
  d = tmp_path / "m"
  d.mkdir()
  labels = np.array([0, 3, 9, 11, 10, 2], np.uint8)
  for prefix in ("train", "t10k"):
    _write(d / f"{prefix}-images-idx3-ubyte.gz", _idx_u8(np.zeros((6, 28, 28), np.uint8)))
    _write(d / f"{prefix}-labels-idx1-ubyte.gz", _idx_u8(labels))
  cfg = _cfg(source="idx", data_dir=str(d))
  cfg.num_classes = 0  # Fashion-MNIST's own: 10.
  # The file, the first bad example and its label, the range, how many, and the field.
  with raises_naming(ValueError, str(d / "train-labels-idx1-ubyte.gz"), "example 3", "label 11",
                     "[0, 10)", "2 of 6", "data.num_classes"):
    _loader(cfg)
  cfg.num_classes = 12
  assert _loader(cfg).num_classes == 12


def test_every_record_is_checked_against_num_classes(monkeypatch):
  # Sources not checked up front (tfds reads records lazily) are checked per record.
  class Bad:
    def __len__(self):
      return 8

    def __getitem__(self, i):
      return {"image": np.zeros((8, 8, 3), np.uint8), "label": 7 if i == 5 else 0}

    def __repr__(self):
      return "BadSource"

  stats = data.Stats((0.5,) * 3, (0.25,) * 3, 4, "bad")
  monkeypatch.setattr(data.sources, "make_source", lambda cfg, split, cache_dir=None:
                      (Bad(), stats))
  it = iter(_loader(_cfg(), "test", batch=8, train=False))
  with raises_naming(ValueError, "BadSource", "record 5", "label 7", "[0, 4)"):
    next(it)


def test_idx_dataset_under_its_own_name_is_reported_by_name(tmp_path):
  d = tmp_path / "letters"
  d.mkdir()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
  labels = (np.arange(12) % 5).astype(np.uint8)
  for prefix in ("train", "test"):  # EMNIST's names: <name>-train-..., <name>-test-...
    _write(d / f"emnist-letters-{prefix}-images-idx3-ubyte.gz", _idx_u8(images))
    _write(d / f"emnist-letters-{prefix}-labels-idx1-ubyte.gz", _idx_u8(labels))
  cfg = _cfg(source="idx", data_dir=str(d))
  cfg.name, cfg.num_classes = "emnist-letters", 0
  with raises_naming(ValueError, "data.num_classes", "'emnist-letters'"):
    _loader(cfg)
  cfg.num_classes = 5
  loader = _loader(cfg, "test", batch=4, train=False)
  assert (loader.dataset, loader.num_classes) == ("emnist-letters", 5)
  # Not Fashion-MNIST's statistics: its own training pixels'.
  _, stats = data.make_source(cfg, "test")
  x = images / 255
  np.testing.assert_allclose(stats.mean, [x.mean()] * 3, atol=1e-4)
  np.testing.assert_allclose(stats.std, [x.std()] * 3, atol=1e-4)
  cfg.mean, cfg.std = (0.5,), (0.25,)
  assert data.make_source(cfg, "test")[1].mean == (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------- image folders

def _image_folder(root, classes=("fox", "cat", "dog"), per_class=4, val=2):
  """train/ and val/ of 20x24 images, PNG and JPEG; returns {path: uint8 array} of the PNGs."""
  rng = np.random.default_rng(0)
  pngs = {}
  for split, n in (("train", per_class), ("val", val)):
    for k, c in enumerate(classes):
      os.makedirs(root / split / c)
      for i in range(n):
        arr = (np.full((20, 24, 3), 40 + 60 * k) + rng.integers(0, 30, (20, 24, 3))).astype(
            np.uint8)
        path = root / split / c / (f"{i}.png" if i % 2 else f"{i}.JPEG")
        Image.fromarray(arr).save(path)
        if i % 2:
          pngs[str(path)] = arr
  return str(root), pngs


def test_folder_source_follows_the_image_folder_convention(tmp_path):
  d, pngs = _image_folder(tmp_path / "pets")
  gray = np.arange(20 * 24, dtype=np.uint8).reshape(20, 24)
  Image.fromarray(gray, "L").save(tmp_path / "pets" / "train" / "cat" / "z_gray.png")
  cfg = _cfg(source="folder", data_dir=d, name="")
  src, stats = data.make_source(cfg, "train")
  assert src.classes == ("cat", "dog", "fox") and stats.classes == src.classes
  assert (stats.name, stats.num_classes, len(src)) == ("pets", 3, 13)
  for i in range(len(src)):
    rec, path = src[i], src.paths[i]
    assert os.path.basename(os.path.dirname(path)) == src.classes[rec["label"]]
    if path in pngs:
      np.testing.assert_array_equal(rec["image"], pngs[path])
    elif path.endswith("z_gray.png"):
      np.testing.assert_array_equal(rec["image"][:, :, 0], gray)
  test, _ = data.make_source(cfg, "test")
  assert len(test) == 6 and sorted(set(test.labels)) == [0, 1, 2]
  loader = _loader(_cfg(source="folder", data_dir=d, name="", image_size=16,
                        augment="pad_crop_flip"), batch=4)
  assert (loader.dataset, loader.classes) == ("pets", ("cat", "dog", "fox"))
  assert next(iter(loader))["image"].shape == (4, 16, 16, 3)  # gray and RGB alike


def test_folder_statistics_are_computed_once_and_stored(tmp_path, monkeypatch):
  d, _ = _image_folder(tmp_path / "pets")
  cfg = _cfg(source="folder", data_dir=d)
  cache = str(tmp_path / "work")
  _, stats = data.make_source(cfg, "train", cache_dir=cache)
  pixels = np.concatenate([np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3) / 255
                           for p in data.make_source(cfg, "train")[0].paths])
  np.testing.assert_allclose(stats.mean, pixels.mean(0), atol=1e-4)
  np.testing.assert_allclose(stats.std, pixels.std(0), atol=1e-4)
  with open(os.path.join(cache, "data_stats.json")) as f:
    assert tuple(json.load(f)["mean"]) == stats.mean
  monkeypatch.setattr(data.sources, "_sample_stats", lambda src: pytest.fail("recomputed"))
  assert data.make_source(cfg, "test", cache_dir=cache)[1].mean == stats.mean


@pytest.mark.parametrize("problem, names", [
    ("num_classes", ["data.num_classes=5", "'cat', 'dog', 'fox'"]),
    ("val_class", ["'wolf'", "val", "train"]),
    ("empty_class", ["train/ant"]),
    ("no_val", ["pets", "val", "test"]),
    ("broken", ["broken.png"]),
])
def test_folder_errors_name_the_problem(tmp_path, problem, names):
  d, _ = _image_folder(tmp_path / "pets")
  cfg = _cfg(source="folder", data_dir=d)
  split = "train"
  if problem == "num_classes":
    cfg.num_classes = 5
  elif problem == "val_class":
    os.makedirs(os.path.join(d, "val", "wolf"))
    split = "test"
  elif problem == "empty_class":
    os.makedirs(os.path.join(d, "train", "ant"))
  elif problem == "no_val":
    shutil.rmtree(os.path.join(d, "val"))
    split = "test"
  else:
    with open(os.path.join(d, "train", "cat", "broken.png"), "wb") as f:
      f.write(b"not a png")
  with raises_naming((ValueError, FileNotFoundError), *names):
    src, _ = data.make_source(cfg, split)
    [src[i] for i in range(len(src))]
