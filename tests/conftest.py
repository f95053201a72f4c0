import sys

import jax
import pytest

from _util import CACHE_DIR, MIN_COMPILE_SECONDS, ROOT

sys.path.insert(0, ROOT)  # configs/
# Re-used compilations across tests (and runs) keep the suite fast on 2 cores. Every
# compilation is kept, however quick: the op-by-op calls of a trainer run (decode, k-means
# on host arrays, ...) are a few hundred compilations of ~0.1 s each, made again by every
# subprocess and xdist worker unless cached (about a third of a tiny run's time, warm).
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A finished run of ``configs/tiny.py`` (FP 4 steps, merge, ClusterQAT 4 steps, export,
  report), once per test process: ``(workdir, report)``. Tests that change the workdir
  copy it first."""
  from configs import tiny
  from repvgg_jax.train.train import train_and_evaluate
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  return workdir, train_and_evaluate(tiny.tiny_config(), workdir)
