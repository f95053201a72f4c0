"""The training loop of one stage: resume, steps, periodic/forced checkpoints, NaN guard, SIGTERM."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from repvgg_jax.train import sharding
from repvgg_jax.train.checkpoint import StageCheckpoints


class NonFiniteLoss(FloatingPointError):
  """The loss or gradient became NaN or inf; the message names the stage and step."""


class Preempted(SystemExit):
  """SIGTERM arrived; a checkpoint of the current step was written first."""


class _SigtermFlag:
  """Sets ``self.raised`` on SIGTERM, so the loop can save before exiting (TPU preemption)."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: no handler, no preemption save.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _progress(total: int, initial: int, name: str):
  """A tqdm bar on an interactive terminal of process 0, else None (plain log lines)."""
  if jax.process_index() != 0 or not sys.stderr.isatty():
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True)


def train_stage(name: str, state: Any, *, train_step: Callable, loader: Any, mesh: Any,
                ckpt_dir: str, stage_cfg: Any, writer: Any, log_every: int,
                after_step: Callable[[int, Any], Any] | None = None,
                interrupt_at: int | None = None) -> Any:
  """Trains ``state`` to ``stage_cfg.num_steps``, resuming from ``ckpt_dir`` if it has a checkpoint.

  Args:
    state: a fresh host ``TrainState`` (its structure is the restore target).
    after_step: ``f(step, state) -> state`` run after each step (QAT codebook refits).
    interrupt_at: testing aid: raise ``KeyboardInterrupt`` right after this step,
      as a kill would, without a final save.
  Returns:
    The final state (replicated on ``mesh``).
  Raises:
    NonFiniteLoss: naming the step; the checkpoints keep the last finite state.
    Preempted: after SIGTERM, once the current step is saved.
  """
  ckpt = StageCheckpoints(ckpt_dir, every=stage_cfg.checkpoint_every, keep=stage_cfg.keep)
  it = iter(loader)
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(state)
    it.set_state(data_state)
    logging.info("%s: resumed from step %d in %s", name, latest, ckpt_dir)
  state = sharding.replicate(state, mesh)
  step = int(sharding.to_host(state.step))
  total = stage_cfg.num_steps
  bar = _progress(total, step, name)
  t0, seen = time.time(), 0
  try:
    with _SigtermFlag() as sigterm:
      while step < total:
        batch = next(it)
        state, metrics = train_step(state, sharding.shard_batch(batch, mesh))
        step += 1
        seen += batch["image"].shape[0] * jax.process_count()
        loss = float(sharding.to_host(metrics["loss"]))
        grad_norm = float(sharding.to_host(metrics["grad_norm"]))
        # A NaN gradient poisons the params even while this step's loss is finite.
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
          ckpt.wait()
          raise NonFiniteLoss(
              f"{name}: non-finite loss ({loss}) or gradient norm ({grad_norm}) at step "
              f"{step}; stopping without saving it. The last good checkpoint "
              f"(step {ckpt.latest_step()}) is kept in {ckpt_dir}")
        if after_step is not None:
          state = after_step(step, state)
        ckpt.save(step, state, it.get_state(), force=step == total or sigterm.raised)
        if step % log_every == 0 or step == total:
          m = {f"{name}/{k}": float(v) for k, v in sharding.to_host(metrics).items()}
          m[f"{name}/images_per_s"] = seen / max(time.time() - t0, 1e-9)
          writer.write_scalars(step, m)
          t0, seen = time.time(), 0
        if bar is not None:
          bar.update(1)
          bar.set_postfix(loss=f"{loss:.3f}",
                          acc=f"{float(sharding.to_host(metrics['accuracy'])):.3f}")
        if interrupt_at is not None and step == interrupt_at:
          raise KeyboardInterrupt(f"{name}: simulated kill after step {step}")
        if sigterm.raised:
          ckpt.wait()
          raise Preempted(f"{name}: SIGTERM; saved step {step} in {ckpt_dir}")
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
  return state
