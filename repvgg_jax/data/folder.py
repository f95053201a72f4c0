"""Images in class directories, torchvision's ``ImageFolder`` layout (docs/data.md).

``<data_dir>/train/<class>/**/<image>`` and ``<data_dir>/val/<class>/...`` (or
``test/``); records are ``{"image": uint8 (H, W, 1 or 3), "label": int}``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

# The torchvision ImageFolder convention: <data_dir>/<split dir>/<class>/**/<image>.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp")
FOLDER_SPLITS = {"train": ("train",), "test": ("val", "test")}


def folder_split_dir(data_dir: str, split: str) -> str:
  for sub in FOLDER_SPLITS[split]:
    if os.path.isdir(os.path.join(data_dir, sub)):
      return os.path.join(data_dir, sub)
  raise FileNotFoundError(f"folder: {data_dir!r} has no {' or '.join(FOLDER_SPLITS[split])} "
                          f"directory; expected {data_dir}/{FOLDER_SPLITS[split][0]}/<class>/"
                          f"<image> (one directory per class)")


@functools.lru_cache(maxsize=8)
def _scan_folder(data_dir: str, split: str) -> tuple[tuple[str, ...], tuple[str, ...],
                                                     np.ndarray]:
  """(classes of the train split, sorted; image paths of ``split``; their labels)."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"folder: data_dir {data_dir!r} is not a directory")
  train_dir = folder_split_dir(data_dir, "train")
  classes = tuple(sorted(e.name for e in os.scandir(train_dir) if e.is_dir()))
  if not classes:
    raise ValueError(f"folder: {train_dir} has no class directories")
  root = train_dir if split == "train" else folder_split_dir(data_dir, split)
  found = sorted(e.name for e in os.scandir(root) if e.is_dir())
  unknown = [c for c in found if c not in classes]
  if unknown:
    raise ValueError(f"folder: {root} has class directories that {train_dir} lacks: "
                     f"{unknown[:5]}; the classes are the train split's")
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(root, name)
    if not os.path.isdir(class_dir):
      continue
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(class_dir, followlinks=True)
                   for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files and split == "train":
      raise ValueError(f"folder: class directory {class_dir} has no images "
                       f"({', '.join(IMAGE_EXTENSIONS)})")
    paths += files
    labels += [label] * len(files)
  if not paths:
    raise ValueError(f"folder: {root} holds no images")
  return classes, tuple(paths), np.asarray(labels, np.int64)


def read_image(path: str) -> np.ndarray:
  """uint8 (H, W, 1) for grayscale files, (H, W, 3) for everything else (RGB)."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      im = im.convert("L") if im.mode in ("1", "L", "LA", "I", "I;16") else im.convert("RGB")
      image = np.asarray(im)
  except (OSError, UnidentifiedImageError, ValueError) as e:
    raise ValueError(f"folder: cannot read image {path}: {e}") from e
  return image[:, :, None] if image.ndim == 2 else image


class FolderSource:
  """Images in class directories, as torchvision's ``ImageFolder``: classes sorted by name.

  ``<data_dir>/train/<class>/...`` and ``<data_dir>/val/<class>/...`` (or
  ``test/``); files are found recursively by extension and read with PIL on
  access. Records are ``{"image": uint8 (H, W, 1 or 3), "label": int}`` where the
  label is the index of the class in the sorted train class names.
  """

  def __init__(self, data_dir: str, split: str):
    if split not in FOLDER_SPLITS:
      raise ValueError(f"folder: unknown split {split!r}, expected one of {tuple(FOLDER_SPLITS)}")
    if not data_dir:
      raise ValueError("folder: data.data_dir must be set to the directory holding train/ "
                       "and val/")
    self.data_dir, self.split = os.path.abspath(data_dir), split
    self.classes, self.paths, self.labels = _scan_folder(self.data_dir, split)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": read_image(self.paths[index]), "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"FolderSource({self.data_dir!r}, {self.split!r}, n={len(self)})"
