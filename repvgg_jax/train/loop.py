"""The training loop of one stage: resume, steps, periodic eval and checkpoints, NaN guard, preemption.

Nothing leaves the device between sync points. The step's metrics stay device
arrays, queued; at a *sync step* (a log step, an eval step, a save step, the
last step or a preemption) the queue is fetched in one transfer and checked: a
non-finite loss or gradient norm anywhere in it stops the stage before anything
is saved, so a checkpoint never holds a state that went bad. Saves happen only
at sync steps, so the latest checkpoint is always the last good one.
"""

from __future__ import annotations

import datetime
import logging as py_logging
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from repvgg_jax.train import sharding
from repvgg_jax.train.checkpoint import StageCheckpoints


class NonFiniteLoss(FloatingPointError):
  """The loss or gradient became NaN or inf; the message names the stage and step."""


class Preempted(SystemExit):
  """Preemption (SIGTERM) arrived; every process saved the same step first."""


class _Preemption:
  """Whether to stop at a step, agreed by all processes.

  One process: a SIGTERM handler sets a flag. Several: JAX's preemption sync
  manager (started by ``jax.distributed.initialize``) sees the SIGTERM of any
  process and ``reached_preemption_sync_point`` returns True on every process at
  the same step, so all save that step together (orbax saves are collective).
  """

  def __init__(self):
    self.raised = False
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi:  # A Python handler would replace JAX's notifier on several hosts.
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread: no handler, no preemption save.
        self._previous = None
    return self

  def _handle(self, signum, frame):
    self.raised = True

  def reached(self, step: int) -> bool:
    if not self._multi:
      return self.raised
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # The preemption service is disabled.
      return False

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _progress(total: int, initial: int, name: str):
  """A tqdm bar on an interactive terminal of process 0, else None (plain log lines)."""
  if jax.process_index() != 0 or not sys.stderr.isatty():
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True)


class _LibraryInfoFilter(py_logging.Filter):
  """Drops INFO (and below) records logged from outside this package and launch/."""

  _ours = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),)

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    path = os.path.abspath(record.pathname)
    return path.startswith(self._ours) or os.sep + "launch" + os.sep in path


def quiet_library_logs() -> None:
  """Keeps absl's handler to our INFO lines and everyone's warnings (orbax logs each save)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


def _fetch_checked(name: str, pending: list, ckpt: StageCheckpoints) -> list[dict]:
  """Host values of the queued ``(step, metrics)``, in one transfer; raises on non-finite."""
  values = sharding.to_host([m for _, m in pending])
  for (step, _), m in zip(pending, values):
    loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
    # A NaN gradient poisons the params even while this step's loss is finite.
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
      ckpt.wait()
      raise NonFiniteLoss(
          f"{name}: non-finite loss ({loss}) or gradient norm ({grad_norm}) at step "
          f"{step}; stopping without saving it. The last good checkpoint "
          f"(step {ckpt.latest_step()}) is kept in {ckpt.directory}")
  return values


def _eta(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def train_stage(name: str, state: Any, *, train_step: Callable, loader: Any, mesh: Any,
                ckpt_dir: str, stage_cfg: Any, writer: Any, log_every: int,
                after_step: Callable[[int, Any], Any] | None = None,
                evaluate: Callable[[Any], float] | None = None) -> Any:
  """Trains ``state`` to ``stage_cfg.num_steps``, resuming from ``ckpt_dir`` if it has a checkpoint.

  Args:
    state: a fresh host ``TrainState`` (its structure is the restore target).
    after_step: ``f(step, state) -> state`` run after each step on device (QAT codebook
      refits); it must not fetch anything to the host.
    evaluate: ``f(state) -> accuracy``, run every ``stage_cfg.eval_every`` steps
      (0: never); ``<name>/eval_accuracy`` and ``<name>/best_eval_accuracy`` are logged.
  Returns:
    The final state (replicated on ``mesh``).
  Raises:
    NonFiniteLoss: naming the first bad step; the checkpoints keep the last finite state.
    Preempted: after SIGTERM (on any process), once every process saved the same step.
  """
  ckpt = StageCheckpoints(ckpt_dir, every=stage_cfg.checkpoint_every, keep=stage_cfg.keep)
  it = iter(loader)
  state = sharding.replicate(state, mesh)
  meta: dict = {}
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state, meta = ckpt.restore(state)
    it.set_state(data_state)
    logging.info("%s: resumed from step %d in %s", name, int(sharding.to_host(state.step)),
                 ckpt_dir)
  best = meta.get("best_eval_accuracy")
  step = int(sharding.to_host(state.step))
  writer.start_stage(name, step)  # Steps logged after the checkpoint are logged again.
  total = stage_cfg.num_steps
  eval_every = getattr(stage_cfg, "eval_every", 0) if evaluate is not None else 0
  bar = _progress(total, step, name)
  pending: list = []       # (step, device metrics) since the last sync step
  logged: list = []        # host metrics since the last log step
  # Throughput and ETA count from the end of the first step (it compiles; unless it is
  # logged itself): ``seen`` images and ``timed`` steps since ``t0``.
  first, t0, seen, timed = step + 1, time.time(), 0, 0
  try:
    with _Preemption() as preemption:
      while step < total:
        batch = next(it)
        state, metrics = train_step(state, sharding.shard_batch(batch, mesh))
        step += 1
        seen += batch["image"].shape[0] * jax.process_count()
        timed += 1
        if step == first and step < total and step % log_every:
          jax.block_until_ready(metrics)  # waits for the compiled step; reads nothing
          t0, seen, timed = time.time(), 0, 0
        pending.append((step, metrics))
        if after_step is not None:
          state = after_step(step, state)
        if bar is not None:
          bar.update(1)
        preempted = preemption.reached(step)
        log = step % log_every == 0 or step == total
        run_eval = bool(eval_every) and step % eval_every == 0
        save = preempted or step == total or ckpt.due(step)
        if not (log or run_eval or save):
          continue
        logged += _fetch_checked(name, pending, ckpt)
        pending = []
        if log:
          dt = max(time.time() - t0, 1e-9)
          m = {f"{name}/{k}": float(np.mean([v[k] for v in logged])) for k in logged[0]}
          m[f"{name}/images_per_s"] = seen / dt
          writer.write_scalars(step, m)
          if jax.process_index() == 0:
            logging.info("%s: step %d/%d, %.1f images/s, %.2f steps/s, ETA %s", name, step,
                         total, seen / dt, timed / dt, _eta((total - step) * dt / timed))
          if bar is not None:
            bar.set_postfix(loss=f"{m[f'{name}/loss']:.3f}",
                            acc=f"{m[f'{name}/accuracy']:.3f}")
          logged, seen, timed = [], 0, 0
        t_sync = time.time()
        if run_eval:
          accuracy = float(evaluate(state))
          best = accuracy if best is None else max(best, accuracy)
          writer.write_scalars(step, {f"{name}/eval_accuracy": accuracy,
                                      f"{name}/best_eval_accuracy": best})
        if save:
          ckpt.save(step, state, it.get_state(),
                    meta={} if best is None else {"best_eval_accuracy": best})
        if preempted:
          ckpt.wait()
          raise Preempted(f"{name}: preempted (SIGTERM); saved step {step} in {ckpt_dir}")
        # Eval and save time does not count against the training throughput.
        t0 = time.time() if log else t0 + (time.time() - t_sync)
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
  return state
