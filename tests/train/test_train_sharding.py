"""Sharding: 8 fake CPU devices vs 1 device; two processes (jax.distributed, gloo) vs one;
QAT on two processes (identical codebooks, one checkpoint, SIGTERM agreed); resume of a
checkpoint saved on 8 devices on 1 and on 4.

All run in subprocesses, since the device count and the distributed runtime are
fixed at JAX start-up. Running this file as a script is the worker of those tests.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from _util import ROOT, subprocess_env
STEPS = 3
GLOBAL_BATCH = 16


def _batch(step):
  """The global batch of ``step``: deterministic numpy, float32 NHWC 16 px (model input)."""
  rng = np.random.default_rng(step)
  return {"image": rng.normal(size=(GLOBAL_BATCH, 16, 16, 3)).astype(np.float32),
          "label": rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)}


def _train(devices, rows):
  """Trains the tiny model STEPS steps on ``devices``; this process feeds batch ``rows``."""
  import jax
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


def test_one_step_on_8_fake_devices_equals_1_device():
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
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
                             str(tmp_path / f"p{i}.npz")], env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  single = subprocess.run([sys.executable, __file__, "multihost", "0", "1", "0",
                           str(tmp_path / "single.npz")], env=subprocess_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  ref = _load(tmp_path / "single.npz")
  for i in range(2):
    _compare(ref, _load(tmp_path / f"p{i}.npz"), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- QAT, 2 processes

def _progress(loader, path, at):
  """Loader wrapper: writes ``path`` once the stage asks for batch ``at``."""
  from _util import WrappedLoader

  def change(n, batch):
    if n == at and path:
      with open(path, "w") as f:
        f.write(str(os.getpid()))
    return batch
  return WrappedLoader(loader, change)


def _qat_worker(pid, nproc, port, workdir, out, num_steps, progress):
  """QAT of the merged tiny model; records every codebook state it holds (init, refits)."""
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if nproc > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid)
  import repvgg_jax
  from configs import tiny
  from repvgg_jax import data
  from repvgg_jax.quant import Quantizer, make_quantizer
  from repvgg_jax.train import qat, sharding, steps
  from repvgg_jax.train.loop import Preempted, schedule, train_stage
  from repvgg_jax.train.state import build_model, create_train_state, init_variables
  from repvgg_jax.train.writers import MetricWriter
  if pid != 0:  # Only process 0 fits codebooks; the others receive them.
    def refuse(*_):
      raise AssertionError("Quantizer.init ran on a process other than 0")
    Quantizer.init = refuse
  cfg = tiny.tiny_config()
  cfg.qat.num_steps, cfg.qat.checkpoint_every = num_steps, 2
  mesh = sharding.make_mesh()
  loader = data.make_loader(cfg.data, "train", global_batch_size=16, train=True)
  model = build_model(cfg.model, 10, deploy=False)
  merged = jax.device_get(repvgg_jax.merge(init_variables(model, (16, 16, 3), 0)))
  q = make_quantizer("cluster", bits=2)
  quant = qat.init_codebooks(q, merged["params"])
  books = {0: jax.tree_util.tree_leaves(quant)}  # step -> codebooks held after it
  state = create_train_state(build_model(cfg.model, 10, deploy=True), merged, cfg.qat,
                             quant=quant)
  refit_fn = qat.make_refit(q, mesh)

  def refit(step, s):  # the trainer's refit, plus a host copy for the test (test-only sync)
    if step % 2:
      return s
    s = s.replace(quant=refit_fn(s.params, s.quant))
    books[step] = jax.tree_util.tree_leaves(sharding.to_host(s.quant))
    return s

  result = {"pid": pid, "preempted": None}
  try:
    state = train_stage(
        "qat", state, loader=_progress(loader, progress, 3), mesh=mesh,
        train_step=steps.make_train_step(mesh, 10, 0.0, q, pixel_stats=loader.pixel_stats),
        ckpt_dir=os.path.join(workdir, "qat"), **schedule(cfg.qat), log_every=2,
        writer=MetricWriter(workdir, enabled=False), hooks=[refit])
  except Preempted as e:
    import re
    result["preempted"] = int(re.search(r"saved step (\d+)", str(e)).group(1))
  result["refit_steps"] = sorted(books)
  np.savez(out, **{f"{step}_{i}": b for step, leaves in books.items()
                   for i, b in enumerate(leaves)})
  with open(out + ".json", "w") as f:
    json.dump(result, f)


def _start_qat(tmp_path, num_steps, progress=""):
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, __file__, "qat", str(i), "2", str(port), str(tmp_path / "run"),
       str(tmp_path / f"p{i}.npz"), str(num_steps), progress if i == 1 else ""],
      env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


def _finish(procs):
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]


def test_two_processes_share_codebooks_and_stop_together_on_sigterm(tmp_path):
  """Process 0 fits the codebooks (process 1 may not), both hold the same ones after every
  refit; a SIGTERM to process 1 stops both at the same step, saved once, readable alone."""
  import jax
  from repvgg_jax.train.checkpoint import StageCheckpoints
  progress = str(tmp_path / "progress")
  procs = _start_qat(tmp_path, num_steps=2000, progress=progress)
  deadline = time.time() + 240
  while not os.path.exists(progress):
    assert time.time() < deadline and all(p.poll() is None for p in procs), \
        [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  _finish(procs)
  results = [json.load(open(tmp_path / f"p{i}.npz.json")) for i in range(2)]
  stop = results[0]["preempted"]
  assert stop is not None and 3 <= stop == results[1]["preempted"] < 2000, results
  assert results[0]["refit_steps"] == results[1]["refit_steps"]
  books = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
  assert sorted(books[0].files) == sorted(books[1].files)
  for k in books[0].files:
    np.testing.assert_array_equal(books[0][k], books[1][k])  # bit for bit
  ckpt = StageCheckpoints(str(tmp_path / "run" / "qat"), keep=2)
  assert ckpt.latest_step() == stop
  saved = ckpt.restore_host()
  ckpt.close()
  assert int(saved["step"]) == stop
  last_refit = max(s for s in results[0]["refit_steps"] if s <= stop)
  leaves = jax.tree_util.tree_leaves(saved["quant"])
  for i, leaf in enumerate(leaves):
    np.testing.assert_array_equal(leaf, books[0][f"{last_refit}_{i}"])


def _leaves(path):
  z = np.load(path)
  return [z[f"arr_{i}"] for i in range(len(z.files))]


# ----------------------------------------------------------------------------- device counts

def _resume_worker(workdir, devices, kill_after, out):
  """FP stage of the tiny model on ``devices`` devices; with ``kill_after``, first an
  uninterrupted run in ``workdir/straight`` (written to ``out``), then one killed
  after that step in ``workdir/killed``."""
  import jax
  assert jax.device_count() == devices
  if kill_after:
    _resume_worker(os.path.join(workdir, "straight"), devices, 0, out)
    workdir = os.path.join(workdir, "killed")
  from configs import tiny
  from repvgg_jax import data
  from repvgg_jax.train import sharding, steps
  from repvgg_jax.train.loop import schedule, train_stage
  from repvgg_jax.train.state import build_model, create_train_state, init_variables
  from repvgg_jax.train.writers import MetricWriter
  cfg = tiny.tiny_config()
  cfg.fp.num_steps, cfg.fp.checkpoint_every = 6, 2
  mesh = sharding.make_mesh()
  loader = data.make_loader(cfg.data, "train", global_batch_size=16, train=True)
  model = build_model(cfg.model, 10, deploy=False)
  state = create_train_state(model, init_variables(model, (16, 16, 3), 0), cfg.fp)
  if kill_after:
    from _util import killed_after
    loader = killed_after(loader, kill_after)
  try:
    state = train_stage("fp", state, train_step=steps.make_train_step(
        mesh, 10, pixel_stats=loader.pixel_stats), loader=loader, mesh=mesh,
        ckpt_dir=os.path.join(workdir, "fp"), **schedule(cfg.fp), log_every=2,
        writer=MetricWriter(workdir, enabled=False))
  except KeyboardInterrupt:
    return
  host = sharding.to_host({"params": state.params, "batch_stats": state.batch_stats,
                           "opt_state": state.opt_state})
  np.savez(out, *jax.tree_util.tree_leaves(host))


def _run_resume(workdir, devices, kill_after, out):
  env = subprocess_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  r = subprocess.run([sys.executable, __file__, "resume", str(workdir), str(devices),
                      str(kill_after), str(out)], env=env, cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def saved_on_8(tmp_path_factory):
  """An uninterrupted 8-device run, and one killed after step 4 (checkpoint at 4)."""
  base = tmp_path_factory.mktemp("resume")
  _run_resume(base, 8, 4, base / "straight.npz")
  return base


@pytest.mark.parametrize("devices", [1, 4])
def test_checkpoint_saved_on_8_devices_resumes_on_fewer(saved_on_8, tmp_path, devices):
  import shutil
  work = tmp_path / "w"
  shutil.copytree(saved_on_8 / "killed", work)
  _run_resume(work, devices, 0, tmp_path / "resumed.npz")
  straight, resumed = _leaves(saved_on_8 / "straight.npz"), _leaves(tmp_path / "resumed.npz")
  assert len(straight) == len(resumed)
  for a, b in zip(straight, resumed):  # The global batch's reductions differ in order only.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
  if sys.argv[1] == "fake":
    _fake_devices_worker()
  elif sys.argv[1] == "qat":
    _qat_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
                sys.argv[6], int(sys.argv[7]), sys.argv[8])
  elif sys.argv[1] == "resume":
    _resume_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
  else:
    _multihost_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
