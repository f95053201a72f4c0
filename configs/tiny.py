"""A seconds-long smoke run for tests: RepVGG-A0 at 1 block a stage and a quarter width, synthetic 16 px data, a few steps each stage."""

from repvgg_jax.train.config import base_config


def tiny_config():
  c = base_config()
  c.model.name = "RepVGG-A0"  # with 1 block a stage, a quarter of its widths:
  c.model.blocks = (1, 1, 1, 1)
  c.model.widths = (0.25, 0.25, 0.25, 0.25)
  c.model.norm = "oabn"
  c.model.cifar_stem = True
  c.model.conv_impl = "auto"  # matmuls for the tiny maps (CPU), as configs/demo.py
  c.data.source = "synthetic"
  c.data.image_size = 16
  c.data.augment = "none"
  c.data.synthetic_examples = 64
  c.eval_batch_size = 32
  c.log_every = 2
  for s in (c.fp, c.qat):
    s.batch_size = 16
    s.num_steps = 4
    s.checkpoint_every = 2
    s.keep = 2
  c.quant.method = "cluster"
  c.quant.refit_every = 2
  c.export.coreml = "off"  # seconds per run; tests/train/test_pipeline.py turns it on once
  return c


def get_config():
  return tiny_config().lock()
