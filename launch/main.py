"""Runs the RepVGG pipeline: FP training -> merge -> QAT -> packed export -> report.

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
finished run it prints the run's report and stops.
A workdir holding checkpoints of another config is refused, naming the changed
fields; --discard_stale moves those stages aside (to WORKDIR/stale/) and trains
them again. Errors are printed as one message; --verbose prints tracebacks,
--library_logs the INFO lines of libraries (orbax logs every save).
"""

import ast
import glob
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Configs import each other as ``configs.*``; make the repository root importable.
sys.path.insert(0, ROOT)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and the report.")
_LIBRARY_LOGS = flags.DEFINE_bool("library_logs", False,
                                   "Keep the INFO lines of libraries (orbax logs every save).")
_DISCARD = flags.DEFINE_bool("discard_stale", False, "Move checkpoints of stages trained with "
                             "another config aside (WORKDIR/stale/) and train them again.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Full tracebacks instead of one-line errors.")
flags.mark_flags_as_required(["config", "workdir"])


def _config_list() -> str:
  lines = []
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
    lines.append(f"  configs/{os.path.basename(path):18s} {doc.splitlines()[0] if doc else ''}")
  return "\n".join(lines)


__doc__ = __doc__.format(configs=_config_list())


def _fail(message: str, traceback_hint: bool = True) -> None:
  sys.exit(f"error: {message}" + ("\n(--verbose shows the traceback)" if traceback_hint else ""))


def _config_path(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location("_config_for_message", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _unknown_field(argv: list[str], config_path: str) -> str | None:
  """'--config.fp.num_stpes=3: fp has no field num_stpes; did you mean fp.num_steps?'"""
  from repvgg_jax.train.config import closest_field
  try:
    cfg = _load_config(config_path)
  except Exception:  # The config file itself is broken: the caller reports the original error.
    return None
  for a in argv:
    if not a.startswith("--config."):
      continue
    keys, node = a[len("--config."):].split("=", 1)[0].split("."), cfg
    for depth, key in enumerate(keys):
      if not hasattr(node, "keys") or key not in node:
        group = ".".join(keys[:depth])
        options = list(node.keys()) if hasattr(node, "keys") else []
        near = closest_field(key, options, group + "." if group else "")
        where = f"{group} has no field {key}" if group else f"no config group or field {key}"
        hint = f"; did you mean {near}?" if near else \
            (f"; its fields: {', '.join(options)}" if options else "")
        return f"{a}: {where}{hint}"
      node = node[key]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config mistakes reported in one or two lines."""
  verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv)
  config_path = _config_path(argv)
  if config_path and not os.path.isfile(config_path) and ":" in config_path:
    config_path = config_path.rsplit(":", 1)[0]  # "configs/x.py:arg": get_config("arg")
  if config_path is not None and not os.path.isfile(config_path):
    available = ", ".join(os.path.relpath(p) for p in sorted(glob.glob(
        os.path.join(ROOT, "configs", "*.py"))))
    _fail(f"config file {config_path} not found; the configs are: {available}",
          traceback_hint=False)
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:
    # absl prints the help of --help/-h/--helpfull and exits 1; asking for help is no error.
    if e.code == 1 and any(a.split("=")[0] in ("--help", "-h", "-?", "--helpshort", "--helpfull",
                                                "--helpxml") for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:  # Unknown flag, a value of the wrong type, a missing flag.
    if verbose:
      raise
    _fail(f"{e}; see --help")
  except Exception as e:  # ml_collections raises KeyError/AttributeError for unknown fields.
    if verbose:
      raise
    _fail(_unknown_field(argv, config_path) or f"{type(e).__name__}: {e}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  from repvgg_jax.train import config as config_lib, pipeline, workdir
  from repvgg_jax.train.loop import quiet_library_logs
  if not _LIBRARY_LOGS.value:
    quiet_library_logs()
  try:
    cfg = _CONFIG.value
    config_lib.validate(cfg)  # Overrides from the command line are checked here too.
    pipeline.initialize_distributed(cfg)
    import jax
    logging.info("JAX: %d process(es), %d device(s): %s", jax.process_count(),
                 jax.device_count(), jax.devices()[:4])
    pipeline.run(cfg, _WORKDIR.value, discard_stale=_DISCARD.value)
  except (ValueError, FileNotFoundError, workdir.StaleWorkdir) as e:
    # Bad input (config, data, workdir); the messages name the bad value.
    if _VERBOSE.value:
      raise
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
