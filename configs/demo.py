"""Laptop demo, ~10-15 minutes on 2 CPU cores: Fashion-MNIST, shallow RepVGG-A0, OABN, W2A8 ClusterQAT.

Data: the IDX files of Fashion-MNIST (Debian/Ubuntu: ``apt-get install
dataset-fashion-mnist``; elsewhere set ``--config.data.data_dir``). Images are
padded to 32 px and the standard strides are kept (stem stride 2).

Model: RepVGG-A0's widths with 1, 2, 4, 1 blocks per stage instead of 2, 4,
14, 1 (9 layers instead of 22). On 2 CPU cores it trains ~2.3x more images per
second than A0, and accuracy within a CPU budget is bought by epochs: 2400 FP
steps at batch 64 reached 90.5% where full A0 reached 87.8% in 1200 steps of
about the same wall time. Full A0 is ``--config.model.blocks='()'``.
3000 FP steps at batch 64 (3.2 epochs), then 200 ClusterQAT steps: 2-bit
k-means weights (stem and head at 8 bits) and 8-bit activations, their steps
calibrated (MSE) on 16 training batches and then learned (LSQ), distilled from
the merged float network. 2 bits because that is where the method shows: at 4
bits a stock per-channel PTQ is already within a few tenths of float on this
outlier-free network, at 2 bits it collapses while ClusterQAT holds
(experiments/results/demo_seeds.md, 3 seeds). ``--config.quant.bits=4`` for
4 bits; float activations: ``--config.quant.act_bits=0``.
"""

from repvgg_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.name = "RepVGG-A0"
  c.model.norm = "oabn"          # the branch form (by depth: 4 blocks at most) at tau 3
  c.model.blocks = (1, 2, 4, 1)
  c.model.cifar_stem = False
  c.model.conv_impl = "auto"     # matmuls for the 2x2 and 1x1 maps: several times faster on CPU
  c.data.source = "idx"
  c.data.name = "fashion_mnist"
  c.data.data_dir = ""          # "" = /usr/share/datasets/fashion-mnist
  c.data.image_size = 32
  c.data.augment = "none"       # Too few epochs for augmentation to pay off.
  c.data.worker_count = 0
  c.eval_batch_size = 500
  c.log_every = 50
  c.fp.batch_size = 64
  c.fp.base_lr = 0.2            # lr 0.05 at batch 64
  c.fp.warmup_steps = 100
  c.fp.num_steps = 3000
  c.fp.weight_decay = 5e-5
  c.fp.checkpoint_every = 500
  c.qat.batch_size = 64
  c.qat.base_lr = 0.02
  c.qat.num_steps = 200
  c.qat.weight_decay = 0.0
  c.qat.checkpoint_every = 100
  c.qat.distill = "logits"      # KL to the merged float network (docs/quantization.md)
  c.quant.method = "cluster"
  c.quant.bits = 2
  c.quant.refit_every = 50
  c.quant.act_bits = 8
  c.quant.act_calibration = "mse"
  # model.stablehlo for one image per call: static shapes, what IREE compiles
  # (docs/deploy.md); 0 = any batch, for JAX only.
  c.export.stablehlo_batch = 1
  return c.lock()
