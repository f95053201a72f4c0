"""A tiny synthetic ``imagenet2012`` in tfds ArrayRecord form, for the real configs' local mode.

``configs/imagenet_*.py:local`` reads ImageNet the way a real run does
(``tfds.data_source``, JPEG records, ``rrc_flip``, the ImageNet pixel
statistics), only from a few hundred synthetic photos written here with tfds'
own writer: no TensorFlow, no download. The records have ImageNet's features
(``image`` JPEG, ``label`` of 1000 classes, ``file_name``) and ImageNet-like
sizes (about 500 x 375 px, ~100 KB); labels are ``i % num_classes`` over the first
``num_classes`` classes and each class has its own colour cast, so a model
can learn a little.
"""

from __future__ import annotations

import os

import numpy as np

NAME = "imagenet2012"


def photo_jpeg(rng: np.random.Generator, label: int = 0, num_classes: int = 10,
               quality: int = 90) -> bytes:
  """A random ImageNet-like JPEG: 500 x 333-500 px (or 333-375 x 500), ~100 KB.

  Smooth random colour fields plus noise (so the file size and decode cost are
  photo-like), with a per-class colour cast. Encoded by PIL, not TensorFlow.
  """
  import io
  from PIL import Image
  h = int(rng.choice([333, 375, 375, 400, 500]))
  w = 500 if h != 500 else int(rng.choice([333, 375]))
  small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
  img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
  img += rng.normal(0, 12, img.shape)
  img[..., label % 3] += 120 * (label + 1) / num_classes - 60
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG",
                                                               quality=quality)
  return buf.getvalue()


def _builder_class(num_classes: int, sizes: dict[str, int]):
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import registered

  version = tfds.builder_cls(NAME).VERSION  # What tfds.data_source(NAME) will look for.
  with registered.skip_registration():
    class LocalImagenet(tfds.core.GeneratorBasedBuilder):
      name = NAME
      VERSION = version

      def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=1000),
                "file_name": tfds.features.Text()}),
            supervised_keys=("image", "label"))

      def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

      def _generate_examples(self, split, n):
        rng = np.random.default_rng(0 if split == "train" else 1)
        for i in range(n):
          label = i % num_classes
          yield f"{split}_{i}", {"image": photo_jpeg(rng, label, num_classes), "label": label,
                                 "file_name": f"{split}_{i:05d}.JPEG"}
  return LocalImagenet


def ensure_local_imagenet(data_dir: str, *, train: int, validation: int,
                          num_classes: int = 10) -> str:
  """Writes the dataset into ``data_dir`` unless it is there; returns ``data_dir``.

  tfds writes into a temporary directory and renames it when complete, so an
  interrupted write is redone on the next call.
  """
  import tensorflow_datasets as tfds
  if not (isinstance(train, int) and train > 0 and isinstance(validation, int)
          and validation > 0):
    raise ValueError(f"local imagenet: train={train!r} and validation={validation!r} "
                     "must be positive ints")
  os.makedirs(data_dir, exist_ok=True)
  builder = _builder_class(num_classes, {"train": train, "validation": validation})(
      data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return data_dir


def local_data_config(data_cfg, workdir: str):
  """``data_cfg`` with ``data_dir`` pointing at the written local dataset (an attribute copy).

  ``data_cfg.local_examples`` training examples (a quarter as many, at least 16, for
  validation) go to ``data_cfg.data_dir``, or ``<workdir>/local_tfds`` when it is empty.
  """
  import types
  fields = {k: getattr(data_cfg, k) for k in data_cfg.keys()} if hasattr(data_cfg, "keys") \
      else dict(vars(data_cfg))
  n = int(fields["local_examples"])
  data_dir = fields.get("data_dir") or os.path.join(os.path.abspath(workdir), "local_tfds")
  ensure_local_imagenet(data_dir, train=n, validation=max(16, n // 4))
  fields["data_dir"] = data_dir
  return types.SimpleNamespace(**fields)
