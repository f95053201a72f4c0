"""Runs the RepVGG trainer: FP training -> merge -> QAT -> export and evaluate -> report.

  python launch/main.py --config configs/demo.py --workdir /tmp/demo
  python launch/main.py --config configs/folder.py --config.data.data_dir=DIR --workdir runs/mine
  python launch/main.py --config configs/imagenet_w4.py --config.quant.bits=3 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --workdir runs/a0_w3

Configs (configs/*.py):
{configs}

Any config field can be set on the command line, --config.<group>.<field>=VALUE
(e.g. --config.fp.num_steps=100 --config.quant.bits=3 --config.model.blocks='(1,2,4,1)');
every field and its default: repvgg_jax/train/config.py (base_config), docs/training.md.

Running the same command again resumes every stage from its latest checkpoint; on a
finished run it prints the run's report and stops. Ctrl-C saves the stage's current step
and exits with status 130 (a second Ctrl-C stops at once).
A workdir holding checkpoints of another config is refused, naming the changed
fields; --discard_stale moves those stages aside (to WORKDIR/stale/) and trains
them again. Errors are printed as one message; --verbose prints tracebacks,
--library_logs the INFO lines of libraries (orbax logs every save).
"""

import os
import sys

# Configs import each other as ``configs.*``; make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Trainer config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and the report.")
_LIBRARY_LOGS = flags.DEFINE_bool("library_logs", False,
                                   "Keep the INFO lines of libraries (orbax logs every save).")
_DISCARD = flags.DEFINE_bool("discard_stale", False, "Move checkpoints of stages trained with "
                             "another config aside (WORKDIR/stale/) and train them again.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Full tracebacks instead of one-line errors.")
flags.mark_flags_as_required(["config", "workdir"])
__doc__ = __doc__.format(configs=cli.config_list())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  from repvgg_jax.train import loop, train
  if not _LIBRARY_LOGS.value:
    loop.quiet_library_logs()
  with cli.one_line_errors(_VERBOSE.value):
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, discard_stale=_DISCARD.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
