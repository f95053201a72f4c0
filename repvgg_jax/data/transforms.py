"""Per-record image transforms in numpy (and PIL for decoding and resizing), and ``normalize``.

Records are uint8 HWC (channels last, C = 1 or 3); the loader's batches stay
uint8 with 3 channels (``to_rgb``), a quarter of float32's bytes to the
device, where ``normalize`` (jnp, inside the jitted step) makes the model's
float input. Random transforms take a
``np.random.Generator``; grain seeds it from (seed, record index), which is what
makes augmentation deterministic and exactly resumable.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

AUGMENTS = ("none", "pad_crop_flip", "rrc_flip")
CIFAR_PAD = 4
# ImageNet evaluation: resize the shorter side to size / 0.875 (256 for 224), centre crop.
EVAL_CROP_FRACTION = 224 / 256
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def _resize(image: np.ndarray, height: int, width: int,
            box: tuple[float, float, float, float] | None = None) -> np.ndarray:
  """Bilinear (antialiased when shrinking, as PIL does) resize of ``box`` = (x0, y0, x1, y1)."""
  gray = image.shape[2] == 1
  pil = Image.fromarray(image[:, :, 0] if gray else image)
  out = np.asarray(pil.resize((width, height), Image.BILINEAR, box=box))
  return out[:, :, None] if gray else out


def center_pad(image: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads (H, W, C) with H, W <= size to (size, size, C), image centred."""
  h, w, c = image.shape
  out = np.zeros((size, size, c), image.dtype)
  top, left = (size - h) // 2, (size - w) // 2
  out[top:top + h, left:left + w] = image
  return out


def resize_center_crop(image: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
  """Resizes the shorter side to ``round(size / crop_fraction)``, then centre-crops size x size."""
  h, w, _ = image.shape
  short = max(size, int(round(size / crop_fraction)))
  if h <= w:
    nh, nw = short, max(short, int(round(w * short / h)))
  else:
    nh, nw = max(short, int(round(h * short / w))), short
  if (nh, nw) != (h, w):
    image = _resize(image, nh, nw)
  top, left = (nh - size) // 2, (nw - size) // 2
  return image[top:top + size, left:left + size]


def fit(image: np.ndarray, size: int) -> np.ndarray:
  """(H, W, C) -> (size, size, C) without augmentation.

  Images no larger than ``size`` are zero-padded around the centre (28 -> 32 for
  Fashion-MNIST adds 2 black pixels per side, its background colour); larger ones
  get their shorter side resized to ``size`` and are centre-cropped.
  """
  h, w, _ = image.shape
  if h <= size and w <= size:
    return image if h == w == size else center_pad(image, size)
  return resize_center_crop(image, size)


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int = CIFAR_PAD) -> np.ndarray:
  """CIFAR augmentation on (S, S, C): zero-pad by ``pad``, random S x S crop, flip with p = 1/2.

  Implemented as a shifted copy into a zero image, which equals pad-then-crop
  without building the padded array.
  """
  h, w, _ = image.shape
  dy, dx = rng.integers(-pad, pad + 1, size=2)
  out = np.zeros_like(image)
  # out[y, x] = image[y + dy, x + dx] where that lies inside the image, else 0.
  ys, yd = max(0, dy), max(0, -dy)
  xs, xd = max(0, dx), max(0, -dx)
  out[yd:h - ys, xd:w - xs] = image[ys:h - yd, xs:w - xd]
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def rrc_box(height: int, width: int, rng: np.random.Generator,
            scale: Sequence[float] = RRC_SCALE,
            ratio: Sequence[float] = RRC_RATIO) -> tuple[int, int, int, int]:
  """Random-resized-crop box (top, left, h, w), as torchvision's RandomResizedCrop.

  Ten tries at an area fraction in ``scale`` and a log-uniform aspect ratio in
  ``ratio``; if none fits, the largest centred crop with a ratio in range.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def rrc_flip(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """ImageNet training augmentation: random-resized-crop to (size, size, C), flip with p = 1/2."""
  top, left, h, w = rrc_box(image.shape[0], image.shape[1], rng)
  out = _resize(image, size, size, box=(left, top, left + w, top + h))
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def _open_encoded(encoded: bytes) -> Image.Image:
  import io
  return Image.open(io.BytesIO(encoded))


def _draft(pil: Image.Image, need_w: float, need_h: float) -> tuple[float, float]:
  """Asks the JPEG decoder for a 1/2, 1/4 or 1/8 scale whose image is still at least
  ``need_w x need_h``; returns the (x, y) scales it gave (1.0 for other formats)."""
  w, h = pil.size
  if pil.format == "JPEG":
    pil.draft("RGB", (max(1, math.ceil(need_w)), max(1, math.ceil(need_h))))
  return pil.size[0] / w, pil.size[1] / h


def _rgb_array(pil: Image.Image) -> np.ndarray:
  if pil.mode not in ("RGB", "L"):
    pil = pil.convert("RGB")
  out = np.asarray(pil)
  return out[:, :, None] if out.ndim == 2 else out


def decode_augment(encoded: bytes, augment: str, size: int, train: bool,
                   rng: np.random.Generator | None) -> np.ndarray:
  """Encoded image (JPEG, PNG) -> uint8 (size, size, C) as :func:`augment_image` of its pixels.

  For "rrc_flip" the crop is drawn from the header's size first, then the JPEG is
  decoded at the smallest DCT scale (1/2, 1/4, 1/8: PIL's ``draft``) that keeps the
  crop at least ``size`` pixels on each side, so a small crop of a large photo
  decodes a fraction of its pixels. The random draws are the same as for the full
  decode; pixels differ by the reduced decode's rounding.
  """
  pil = _open_encoded(encoded)
  if augment != "rrc_flip":
    return augment_image(_rgb_array(pil), augment, size, train, rng)
  w, h = pil.size
  if train:
    top, left, ch, cw = rrc_box(h, w, rng)
    sx, sy = _draft(pil, w * size / cw, h * size / ch)
    # Per-axis scales: a reduced size is rounded up (375 / 4 -> 94); clamp float rounding.
    box = (left * sx, top * sy, min((left + cw) * sx, pil.size[0]),
           min((top + ch) * sy, pil.size[1]))
    pil = pil if pil.mode in ("RGB", "L") else pil.convert("RGB")
    out = np.asarray(pil.resize((size, size), Image.BILINEAR, box=box))
    out = out[:, :, None] if out.ndim == 2 else out
    if rng.random() < 0.5:
      out = out[:, ::-1]
    return out
  short = max(size, int(round(size / EVAL_CROP_FRACTION)))
  _draft(pil, w * short / min(w, h), h * short / min(w, h))
  return resize_center_crop(_rgb_array(pil), size, EVAL_CROP_FRACTION)


def check_augment(augment: str) -> None:
  """ValueError naming ``data.augment`` unless it is one of :data:`AUGMENTS`."""
  if augment not in AUGMENTS:
    raise ValueError(f"data.augment={augment!r}: expected one of {AUGMENTS}")


def augment_image(image: np.ndarray, augment: str, size: int, train: bool,
                  rng: np.random.Generator | None) -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (size, size, C) by ``augment`` ("none", "pad_crop_flip", "rrc_flip").

  Evaluation (``train=False``) never draws random numbers: "rrc_flip" becomes the
  ImageNet resize (shorter side size/0.875) + centre crop, the others ``fit``.
  """
  check_augment(augment)
  if augment == "rrc_flip":
    if train:
      return rrc_flip(image, size, rng)
    return resize_center_crop(image, size, EVAL_CROP_FRACTION)
  image = fit(image, size)
  if augment == "pad_crop_flip" and train:
    image = pad_crop_flip(image, rng)
  return image


def to_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 1 or 3) -> (H, W, 3): grayscale repeated, so every source feeds the same stem."""
  return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def normalize(images: Any, mean: Any, std: Any, dtype: Any = None) -> Any:
  """uint8 (..., 3) -> float (..., 3): ``(x / 255 - mean) / std`` per channel (jnp, jit-able).

  The one place of the formula: the train and eval steps apply it on device to the
  loader's uint8 batches with the loader's ``mean``/``std`` (``Loader.pixel_stats``).
  ``dtype``: the result's dtype (default float32).
  """
  import jax.numpy as jnp
  x = jnp.asarray(images, jnp.float32) * jnp.float32(1 / 255)
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x if dtype is None else x.astype(dtype)
