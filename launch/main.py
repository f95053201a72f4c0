"""Runs the RepVGG pipeline: FP training -> merge -> QAT -> packed export -> report.

  python launch/main.py --config configs/demo.py --workdir /tmp/demo
  python launch/main.py --config configs/imagenet_w4.py --config.quant.bits=3 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --workdir runs/a0_w3

Running the same command again resumes every stage from its latest checkpoint.
"""

import os
import sys

# Configs import each other as ``configs.*``; make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and the report.")
_LIBRARY_LOGS = flags.DEFINE_bool("library_logs", False,
                                   "Keep the INFO lines of libraries (orbax logs every save).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  from repvgg_jax.train import config as config_lib, pipeline
  from repvgg_jax.train.loop import quiet_library_logs
  if not _LIBRARY_LOGS.value:
    quiet_library_logs()
  cfg = _CONFIG.value
  config_lib.validate(cfg)  # Overrides from the command line are checked here too.
  pipeline.initialize_distributed(cfg)
  import jax
  logging.info("JAX: %d process(es), %d device(s): %s", jax.process_count(),
               jax.device_count(), jax.devices()[:4])
  pipeline.run(cfg, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
