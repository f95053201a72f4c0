"""RepVGG-A0 on ImageNet, official recipe: 120 epochs, batch 256, lr 0.1 cosine, wd 1e-4.

FP training, merge and report; no quantization (see imagenet_w4.py).
Data: tfds ``imagenet2012`` prepared as ArrayRecord in ``data.data_dir`` (local or gs://).
Compute in bf16 (float32 params, statistics and logits).

``--config configs/imagenet_fp.py:local``: the local smoke mode (as big_vision's
``runlocal``): the same pipeline, input path (tfds ArrayRecord JPEGs, random-resized
crop, ImageNet statistics) and model family on a synthetic imagenet2012 of 256
images written into ``<workdir>/local_tfds``, shrunk to a few minutes on a laptop.
"""

from repvgg_jax.train.config import base_config

TRAIN_EXAMPLES = 1_281_167


def imagenet_base():
  c = base_config()
  c.model.name = "RepVGG-A0"
  c.model.norm = "bn"
  c.model.dtype = "bfloat16"
  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.augment = "rrc_flip"
  c.data.worker_count = 8
  c.eval_batch_size = 1000
  c.log_every = 100
  c.fp.batch_size = 256
  c.fp.base_lr = 0.1
  c.fp.weight_decay = 1e-4
  c.fp.momentum = 0.9
  c.fp.label_smoothing = 0.0  # The paper's 120-epoch models used none.
  c.fp.num_steps = 120 * TRAIN_EXAMPLES // c.fp.batch_size
  c.fp.warmup_steps = 0
  c.fp.checkpoint_every = 2000
  c.fp.keep = 3
  c.qat.batch_size = 256
  c.qat.checkpoint_every = 2000
  c.qat.keep = 3
  return c


def local(c):
  """Shrinks an ImageNet config to the local smoke mode (see the module docstring)."""
  c.model.blocks = (1, 1, 1, 1)
  c.data.local_examples = 256
  c.data.image_size = 64
  c.data.worker_count = 0
  c.eval_batch_size = 32
  c.log_every = 5
  for s in (c.fp, c.qat):
    s.batch_size = 16
    s.checkpoint_every = 10
    s.eval_every = 10
    s.keep = 2
  c.fp.num_steps = 20
  c.qat.num_steps = 10
  c.quant.refit_every = 5
  return c


def get_config(arg=None):
  c = imagenet_base()
  c.quant.method = "none"
  if arg == "local":
    c = local(c)
  elif arg:
    raise ValueError(f"configs/imagenet_fp.py:{arg}: unknown mode, expected 'local' or none")
  return c.lock()
