"""RepVGG-A0 on ImageNet: the official FP recipe, then 4-bit ClusterQAT of the merged network.

``--config.quant.bits=3`` changes the bit width; ``--config.init_from=<dir>``
starts QAT from an existing FP-stage checkpoint directory (and skips FP).
``--config configs/imagenet_w4.py:local``: the local smoke mode (see imagenet_fp.py).
"""

from configs.imagenet_fp import TRAIN_EXAMPLES, imagenet_base, local


def get_config(arg=None):
  c = imagenet_base()
  c.model.norm = "oabn"
  c.quant.method = "cluster"
  c.quant.bits = 4
  c.quant.refit_every = 500
  c.qat.num_steps = 10 * TRAIN_EXAMPLES // c.qat.batch_size
  c.qat.base_lr = 0.01
  c.qat.weight_decay = 0.0
  c.qat.distill = "logits"  # KL to the merged float network: docs/quantization.md says why
  if arg == "local":
    c = local(c)
  elif arg:
    raise ValueError(f"configs/imagenet_w4.py:{arg}: unknown mode, expected 'local' or none")
  return c.lock()
