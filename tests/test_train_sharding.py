"""Sharding: 8 fake CPU devices vs 1 device; two processes (jax.distributed, gloo) vs one.

Both run in subprocesses, since the device count and the distributed runtime are
fixed at JAX start-up. Running this file as a script is the worker of those tests.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
GLOBAL_BATCH = 16


def _batch(step):
  """The global batch of ``step``: deterministic numpy, float32 NHWC 16 px."""
  rng = np.random.default_rng(step)
  return {"image": rng.normal(size=(GLOBAL_BATCH, 16, 16, 3)).astype(np.float32),
          "label": rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)}


def _train(devices, rows):
  """Trains the tiny model STEPS steps on ``devices``; this process feeds batch ``rows``."""
  import jax
  sys.path.insert(0, ROOT)
  from configs import tiny
  from repvgg_jax.train import sharding, steps
  from repvgg_jax.train.state import build_model, create_train_state, init_variables
  cfg = tiny.tiny_config()
  mesh = sharding.make_mesh(devices)
  model = build_model(cfg.model, 10, deploy=False)
  state = create_train_state(model, init_variables(model, (16, 16, 3), 0), cfg.fp)
  state = sharding.replicate(state, mesh)
  step_fn = steps.make_train_step(mesh, 10)
  losses = []
  for i in range(STEPS):
    batch = {k: v[rows] for k, v in _batch(i).items()}
    state, metrics = step_fn(state, sharding.shard_batch(batch, mesh))
    losses.append(float(sharding.to_host(metrics["loss"])))
  host = sharding.to_host({"params": state.params, "batch_stats": state.batch_stats})
  return losses, [np.asarray(x) for x in jax.tree_util.tree_leaves(host)]


def _compare(a, b, rtol, atol):
  np.testing.assert_allclose(a[0], b[0], rtol=rtol, atol=atol)
  assert len(a[1]) == len(b[1])
  for x, y in zip(a[1], b[1]):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _fake_devices_worker():
  import jax
  assert jax.device_count() == 8
  one = _train(jax.devices()[:1], slice(None))
  eight = _train(jax.devices(), slice(None))
  _compare(one, eight, rtol=1e-4, atol=1e-5)
  print("OK", one[0], eight[0])


def _multihost_worker(pid, nproc, port, out):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if nproc > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid)
  per = GLOBAL_BATCH // nproc
  losses, leaves = _train(jax.devices(), slice(pid * per, (pid + 1) * per))
  np.savez(out, losses=np.asarray(losses), *leaves)


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  # The same persistent compilation cache as tests/conftest.py.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  env.pop("XLA_FLAGS", None)
  return env


def test_one_step_on_8_fake_devices_equals_1_device():
  env = _env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  out = subprocess.run([sys.executable, __file__, "fake"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _load(path):
  z = np.load(path)
  return list(z["losses"]), [z[f"arr_{i}"] for i in range(len(z.files) - 1)]


def test_two_processes_agree_with_one(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, __file__, "multihost", str(i), "2", str(port),
                             str(tmp_path / f"p{i}.npz")], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  single = subprocess.run([sys.executable, __file__, "multihost", "0", "1", "0",
                           str(tmp_path / "single.npz")], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  ref = _load(tmp_path / "single.npz")
  for i in range(2):
    _compare(ref, _load(tmp_path / f"p{i}.npz"), rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
  if sys.argv[1] == "fake":
    _fake_devices_worker()
  else:
    _multihost_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
