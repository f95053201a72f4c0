"""launch/main.py's command line as a user meets it: the configs listed in --help, and
mistakes (a config file or field that does not exist, a bad value, a bad data_dir) in one or
two lines instead of a traceback; Ctrl-C in one line and exit status 130."""

import ast
import contextlib
import glob
import importlib.util
import os
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_list() -> str:
  """One line per ``configs/*.py``: its name and the first line of its docstring."""
  lines = []
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
    lines.append(f"  configs/{os.path.basename(path):18s} {doc.splitlines()[0] if doc else ''}")
  return "\n".join(lines)


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


def parse_flags(argv: list[str]) -> list[str]:
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


@contextlib.contextmanager
def one_line_errors(verbose: bool):
  """Bad input (config, data, workdir) as ``error: <message>`` (the messages name the bad
  value; ``verbose`` re-raises for the traceback), and Ctrl-C as one line with exit status 130:
  inside a training stage the stage saved its step first (``loop.Interrupted``)."""
  from repvgg_jax.train import loop, workdir
  try:
    yield
  except loop.Interrupted as e:
    print(e.code, file=sys.stderr)
    sys.exit(130)
  except KeyboardInterrupt:
    print("interrupted; rerun the same command to resume from the last checkpoint",
          file=sys.stderr)
    sys.exit(130)
  except (ValueError, FileNotFoundError, workdir.StaleWorkdir) as e:
    if verbose:
      raise
    _fail(str(e))
