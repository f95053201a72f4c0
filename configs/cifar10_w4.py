"""CIFAR-10: FP training with OABN, then 4-bit ClusterQAT (20 epochs) and packed export."""

from configs.cifar10_fp import TRAIN_EXAMPLES, cifar_base


def get_config():
  c = cifar_base()
  c.model.norm = "oabn"
  c.quant.method = "cluster"
  c.quant.bits = 4
  c.quant.refit_every = 200
  c.qat.num_steps = 20 * TRAIN_EXAMPLES // c.qat.batch_size
  c.qat.base_lr = 0.02
  c.qat.weight_decay = 0.0
  return c.lock()
