"""Input pipelines: grain over IDX files, image folders, tfds ArrayRecord, or synthetic data.

``make_loader(cfg, split, global_batch_size=..., train=...)`` is the one entry
point; batches are ``{"image": float32 (B, H, W, 3) NHWC, "label": int32 (B,),
"mask": bool (B,)}``. See docs/data.md.
"""

from repvgg_jax.data.folder import FolderSource
from repvgg_jax.data.pipeline import Loader, make_loader
from repvgg_jax.data.sources import (
    DEFAULT_IDX_DIR, SOURCES, STATS, IdxSource, Stats, SyntheticSource, check_labels,
    make_source, read_idx)
from repvgg_jax.data.transforms import AUGMENTS

__all__ = [
    "AUGMENTS", "DEFAULT_IDX_DIR", "FolderSource", "IdxSource", "Loader", "SOURCES", "STATS",
    "Stats", "SyntheticSource", "check_labels", "make_loader", "make_source", "read_idx",
]
