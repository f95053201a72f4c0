"""RepVGG-A0 (CIFAR stem) on CIFAR-10 from tfds ArrayRecord: 200 epochs, batch 128."""

from repvgg_jax.train.config import base_config

TRAIN_EXAMPLES = 50_000


def cifar_base():
  c = base_config()
  c.model.name = "RepVGG-A0"
  c.model.cifar_stem = True
  c.data.source = "tfds"
  c.data.name = "cifar10"
  c.data.image_size = 32
  c.data.augment = "pad_crop_flip"
  c.eval_batch_size = 500
  c.fp.batch_size = 128
  c.fp.base_lr = 0.2          # 0.1 at batch 128
  c.fp.weight_decay = 5e-4
  c.fp.num_steps = 200 * TRAIN_EXAMPLES // c.fp.batch_size
  c.fp.warmup_steps = 2 * TRAIN_EXAMPLES // c.fp.batch_size
  c.fp.checkpoint_every = 2000
  c.qat.batch_size = 128
  c.qat.checkpoint_every = 2000
  return c


def get_config():
  c = cifar_base()
  c.quant.method = "none"
  return c.lock()
