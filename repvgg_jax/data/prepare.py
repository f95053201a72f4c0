"""Builds a tfds dataset as ArrayRecord files, once, before training (docs/data.md).

  python -m repvgg_jax.data.prepare imagenet2012 --manual_dir=ARCHIVES --data_dir=DATA_DIR
  python -m repvgg_jax.data.prepare cifar10 --data_dir=DATA_DIR

Building needs TensorFlow (``pip install -e ".[prepare]"``); reading the result
for training does not. This calls the tfds builder directly rather than the
``tfds build`` command, which in tensorflow-datasets 4.9 imports apache_beam at
start even for datasets that do not use it.
"""

from __future__ import annotations

import argparse
import os
import sys

from repvgg_jax.data.sources import TFDS_NAMES


def prepare(name: str, data_dir: str, manual_dir: str | None = None) -> str:
  """Builds tfds ``name`` into ``data_dir`` as ArrayRecord; returns the dataset's directory.

  Args:
    name: one of ``TFDS_NAMES``.
    data_dir: where the dataset is written; the same value is ``data.data_dir``.
    manual_dir: the directory holding the downloaded archives: required for
      imagenet2012 (``ILSVRC2012_img_train.tar``, ``ILSVRC2012_img_val.tar``);
      for the others, an archive found there under its download name is used
      instead of downloading it.
  """
  if name not in TFDS_NAMES:
    raise ValueError(f"prepare: unknown dataset {name!r}, expected one of {TFDS_NAMES}")
  if name == "imagenet2012":
    missing = [f for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
               if not manual_dir or not os.path.isfile(os.path.join(manual_dir, f))]
    if missing:
      raise FileNotFoundError(f"prepare: imagenet2012 needs {' and '.join(missing)} in "
                              f"--manual_dir (given: {manual_dir!r}); download them from "
                              f"https://image-net.org/download-images")
  try:
    import tensorflow  # noqa: F401  (tfds builds datasets with TensorFlow)
  except ImportError as e:
    raise ImportError("prepare: building a tfds dataset needs TensorFlow: "
                      "pip install -e '.[prepare]'") from e
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return str(builder.data_dir)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("name", choices=TFDS_NAMES)
  parser.add_argument("--data_dir", required=True, help="output; use it as data.data_dir")
  parser.add_argument("--manual_dir", default=None, help="the downloaded archives")
  args = parser.parse_args(argv)
  try:
    path = prepare(args.name, args.data_dir, args.manual_dir)
  except (ValueError, FileNotFoundError, ImportError) as e:
    sys.exit(f"error: {e}")
  print(f"{args.name} prepared in {path}; train with --config.data.data_dir={args.data_dir}")


if __name__ == "__main__":
  main()
