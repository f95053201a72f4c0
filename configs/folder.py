"""Your own images in class folders: RepVGG-A0 (CIFAR stem) at 32 px, OABN, 4-bit ClusterQAT.

  python launch/main.py --config configs/folder.py --config.data.data_dir=DIR --workdir runs/mine

``DIR/train/<class>/*.jpg|png`` and ``DIR/val/<class>/...`` (torchvision's
ImageFolder layout; classes sorted by name, RGB or grayscale). The class count
comes from the folders; normalization statistics are computed once from the
training images and stored in the workdir (or set ``--config.data.mean`` and
``--config.data.std``). Larger images: ``--config.data.image_size=224
--config.data.augment=rrc_flip --config.model.cifar_stem=False``.
"""

from repvgg_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.name = "RepVGG-A0"
  c.model.norm = "oabn"
  c.model.cifar_stem = True
  c.data.source = "folder"
  c.data.name = ""              # "" = the data directory's name
  c.data.image_size = 32
  c.data.augment = "pad_crop_flip"
  c.eval_batch_size = 256
  # Full A0 with the CIFAR stem is ~45x the demo network's compute per image (a few
  # images/s a core; benchmarks/folder_run.py): log often enough to see it start.
  c.log_every = 10
  c.fp.batch_size = 64
  c.fp.base_lr = 0.2            # lr 0.05 at batch 64
  c.fp.num_steps = 2000
  c.fp.warmup_steps = 100
  c.fp.weight_decay = 5e-5
  c.qat.batch_size = 64
  c.qat.base_lr = 0.02
  c.qat.num_steps = 200
  c.qat.weight_decay = 0.0
  c.quant.method = "cluster"
  c.quant.bits = 4
  c.quant.refit_every = 50
  return c.lock()
