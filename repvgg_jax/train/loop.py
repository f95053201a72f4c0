"""The training loop of one stage: resume, steps, periodic eval and checkpoints, NaN guard,
preemption and Ctrl-C.

Nothing leaves the device between sync points. The step's metrics stay device
arrays, queued; at a *sync step* (a log step, an eval step, a save step, the
last step or a preemption) the queue is fetched in one transfer and checked: a
non-finite loss or gradient norm anywhere in it stops the stage before anything
is saved, so a checkpoint never holds a state that went bad. Saves happen only
at sync steps, so the latest checkpoint is always the last good one.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging as py_logging
import os
import signal
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from repvgg_jax.train import sharding
from repvgg_jax.train.checkpoint import StageCheckpoints
from repvgg_jax.train.workdir import checkpoint_dir
from repvgg_jax.train.writers import tensorboard_dir


class NonFiniteLoss(FloatingPointError):
  """The loss or gradient became NaN or inf; the message names the stage and step."""


class Preempted(SystemExit):
  """Preemption (SIGTERM) arrived; every process saved the same step first."""


class Interrupted(Preempted):
  """Ctrl-C (SIGINT) on one process: the step was saved as on a preemption. The message is
  one line; ``launch/main.py`` prints it and exits with status 130."""


class _Preemption:
  """Whether to stop at a step, agreed by all processes.

  One process: a SIGTERM or SIGINT (Ctrl-C) handler sets a flag (a second Ctrl-C stops at
  once, saving nothing). Several: JAX's preemption sync manager (started by
  ``jax.distributed.initialize``) sees the SIGTERM of any process and
  ``reached_preemption_sync_point`` returns True on every process at the same step, so all
  save that step together (orbax saves are collective).
  """

  def __init__(self):
    self.signum = None
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi:  # A Python handler would replace JAX's notifier on several hosts.
      for signum in (signal.SIGTERM, signal.SIGINT):
        try:
          self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # Not the main thread: no handler, no preemption save.
          pass
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt  # Ctrl-C twice: do not wait for the step to end
    self.signum = signum

  @property
  def raised(self) -> bool:
    return self.signum is not None

  def reached(self, step: int) -> bool:
    if not self._multi:
      return self.raised
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # The preemption service is disabled.
      return False

  def stop(self, name: str, step: int, ckpt_dir: str) -> Preempted:
    """The exception that ends the stage once ``step`` is saved."""
    if self.signum == signal.SIGINT:
      return Interrupted(f"{name}: interrupted at step {step}; saved in {ckpt_dir}, rerun the "
                         f"same command to resume")
    return Preempted(f"{name}: preempted (SIGTERM); saved step {step} in {ckpt_dir}")

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


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


def run_eta(steps_left: int, steps_per_s: float, images_per_s: float,
            later_images: int) -> tuple[float, float]:
  """``(stage seconds, run seconds)`` left: the stage's ``steps_left`` at its step rate, and
  the run's adds the ``later_images`` of the training stages after it (steps x global
  batch) at this stage's image rate. A QAT step is usually slower than an FP step, so the
  run's figure is an estimate, most likely low."""
  stage = steps_left / max(steps_per_s, 1e-9)
  return stage, stage + later_images / max(images_per_s, 1e-9)


def eta_text(steps_left: int, steps_per_s: float, images_per_s: float,
             later_stages: Sequence[tuple[str, int, int]] = ()) -> str:
  """The log line's ETA: ``ETA 0:01:40`` for the last training stage; before later stages
  (``(name, num_steps, global batch)`` each) ``stage ETA 0:01:40, run ETA ~0:03:20 (qat's 500
  steps at this stage's images/s)``."""
  later_images = sum(n * b for _, n, b in later_stages)
  stage, run = run_eta(steps_left, steps_per_s, images_per_s, later_images)
  if not later_stages:
    return f"ETA {_eta(stage)}"
  later = ", ".join(f"{name}'s {n} steps" for name, n, _ in later_stages)
  return f"stage ETA {_eta(stage)}, run ETA ~{_eta(run)} ({later} at this stage's images/s)"


@dataclasses.dataclass(frozen=True)
class Periodic:
  """A sync action: ``run(step, state)`` at every ``every``-th step (0: never) and,
  with ``last``, at the stage's last step. It runs after the metrics queued since
  the last sync step were fetched and checked, so it may read the host."""
  every: int
  run: Callable[[int, Any], None]
  last: bool = False

  def due(self, step: int, total: int) -> bool:
    return (bool(self.every) and step % self.every == 0) or (self.last and step == total)


class _Throughput:
  """Images and steps since the last log line, timed from the end of the first step
  (it compiles) and without eval and save time."""

  def __init__(self):
    self.t0, self.images, self.steps = time.time(), 0, 0

  def count(self, images: int) -> None:
    self.images += images
    self.steps += 1

  def restart(self) -> None:
    self.t0, self.images, self.steps = time.time(), 0, 0

  def pause(self, since: float) -> None:
    self.t0 += time.time() - since

  def rates(self) -> tuple[float, float]:
    dt = max(time.time() - self.t0, 1e-9)
    return self.images / dt, self.steps / dt


class Profile:
  """A hook that traces ``num_steps`` steps with ``jax.profiler`` into ``logdir``
  (``<logdir>/plugins/profile/<date>``: TensorBoard's profile plugin reads it): the
  steps after the first one an invocation runs, which compiles. clu's
  ``periodic_actions.Profile`` does this too but imports TensorFlow."""

  def __init__(self, logdir: str, num_steps: int):
    self.logdir, self.num_steps, self.calls, self.tracing = logdir, num_steps, 0, False

  def __call__(self, step: int, state: Any) -> Any:
    self.calls += 1
    if self.calls == 1 or self.calls == self.num_steps + 1:
      jax.block_until_ready(state)  # the traced steps only; reads nothing
      if self.tracing:
        self.close()
      else:
        self._start(step)
    return state

  def _start(self, step: int) -> None:
    if jax.process_index() == 0:
      logging.info("profiling steps %d-%d into %s", step + 1, step + self.num_steps,
                   self.logdir)
      jax.profiler.start_trace(self.logdir)
      self.tracing = True

  def close(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


def schedule(stage_cfg: Any) -> dict[str, int]:
  """The :func:`train_stage` arguments a stage config (``cfg.fp``, ``cfg.qat``) sets."""
  return {k: stage_cfg[k] for k in ("num_steps", "checkpoint_every", "keep", "eval_every")}


def stage_args(cfg: Any, stage: str, workdir: str, writer: Any,
               hooks: Sequence[Callable[[int, Any], Any]] = ()) -> dict[str, Any]:
  """The :func:`train_stage` arguments of ``stage`` that the config and the workdir set: its
  schedule, checkpoints (``<workdir>/checkpoints/<stage>``), log, and ``hooks`` followed by
  the :class:`Profile` that ``<stage>.profile_steps`` asks for."""
  s = cfg[stage]
  profile = [Profile(tensorboard_dir(workdir, stage), s.profile_steps)] if s.profile_steps else []
  return {"ckpt_dir": checkpoint_dir(workdir, stage), **schedule(s),
          "writer": writer, "log_every": cfg.log_every, "hooks": [*hooks, *profile]}


def train_stage(name: str, state: Any, *, train_step: Callable, loader: Any, mesh: Any,
                ckpt_dir: str, num_steps: int, checkpoint_every: int, keep: int = 2,
                eval_every: int = 0, writer: Any, log_every: int,
                hooks: Sequence[Callable[[int, Any], Any]] = (),
                evaluate: Callable[[Any], float] | None = None,
                later_stages: Sequence[tuple[str, int, int]] = ()) -> Any:
  """Trains ``state`` to ``num_steps``, resuming from ``ckpt_dir`` if it has a checkpoint.

  Each step runs ``train_step`` and then the ``hooks`` on device; at sync steps the
  queued metrics are fetched and checked and the periodic actions run, in order:
  log (every ``log_every`` steps and the last), eval (every ``eval_every``, 0: never),
  save (every ``checkpoint_every``, the last step and on preemption; the latest ``keep``
  checkpoints are kept).

  Args:
    state: a fresh host ``TrainState`` (its structure is the restore target).
    hooks: ``f(step, state) -> state`` run after each step on device (QAT codebook
      refits, :class:`Profile`); none may fetch anything to the host.
    evaluate: ``f(state) -> accuracy``, run every ``eval_every`` steps;
      ``<name>/eval_accuracy`` and ``<name>/best_eval_accuracy`` are logged.
    later_stages: ``(name, num_steps, global batch)`` of the training stages the run has
      after this one: the log line's run ETA (:func:`eta_text`).
  Returns:
    The final state (replicated on ``mesh``).
  Raises:
    NonFiniteLoss: naming the first bad step; the checkpoints keep the last finite state.
    Preempted: after SIGTERM (on any process), once every process saved the same step;
      :class:`Interrupted` after Ctrl-C (SIGINT, one process), once the step is saved.
  """
  ckpt = StageCheckpoints(ckpt_dir, keep=keep)
  # From here on a Ctrl-C or SIGTERM (a restore included) is answered at the next step by a
  # save and an exit; before the loop, the checkpoint manager is closed however we leave.
  preemption = _Preemption()
  preemption.__enter__()
  try:
    it = iter(loader)
    state = sharding.replicate(state, mesh)
    meta: dict = {}
    if ckpt.latest_step() is not None:
      state, data_state, meta = ckpt.restore(state)
      it.set_state(data_state)
      logging.info("%s: resumed from step %d in %s", name, int(sharding.to_host(state.step)),
                   ckpt_dir)
  except BaseException:
    preemption.__exit__()
    ckpt.close()
    raise
  best = meta.get("best_eval_accuracy")
  step = int(sharding.to_host(state.step))
  writer.start_stage(name, step)  # Steps logged after the checkpoint are logged again.
  total = num_steps
  bar = _progress(total, step, name)
  pending: list = []       # (step, device metrics) since the last sync step
  logged: list = []        # host metrics since the last log step
  speed = _Throughput()

  def log(step: int, state: Any) -> None:
    nonlocal logged
    images_per_s, steps_per_s = speed.rates()
    m = {f"{name}/{k}": float(np.mean([v[k] for v in logged])) for k in logged[0]}
    m[f"{name}/images_per_s"] = images_per_s
    writer.write_scalars(step, m)
    if jax.process_index() == 0:
      logging.info("%s: step %d/%d, %.1f images/s, %.2f steps/s, %s", name, step, total,
                   images_per_s, steps_per_s,
                   eta_text(total - step, steps_per_s, images_per_s, later_stages))
    if bar is not None:
      bar.set_postfix(loss=f"{m[f'{name}/loss']:.3f}", acc=f"{m[f'{name}/accuracy']:.3f}")
    logged = []
    speed.restart()

  def run_eval(step: int, state: Any) -> None:
    nonlocal best
    accuracy = float(evaluate(state))
    best = accuracy if best is None else max(best, accuracy)
    writer.write_scalars(step, {f"{name}/eval_accuracy": accuracy,
                                f"{name}/best_eval_accuracy": best})

  def save(step: int, state: Any) -> None:
    ckpt.save(step, state, it.get_state(),
              meta={} if best is None else {"best_eval_accuracy": best})

  actions = [Periodic(log_every, log, last=True),
             Periodic(eval_every if evaluate else 0, run_eval),
             Periodic(checkpoint_every, save, last=True)]  # after eval: saves its best
  first = step + 1
  try:
    while step < total:
      batch = next(it)
      state, metrics = train_step(state, sharding.shard_batch(batch, mesh))
      step += 1
      speed.count(batch["image"].shape[0] * jax.process_count())
      if step == first and step < total and step % log_every:
        jax.block_until_ready(metrics)  # waits for the compiled step; reads nothing
        speed.restart()
      pending.append((step, metrics))
      for hook in hooks:
        state = hook(step, state)
      if bar is not None:
        bar.update(1)
      preempted = preemption.reached(step)
      due = [a for a in actions if a.due(step, total) or (preempted and a.run is save)]
      if not due:
        continue
      logged += _fetch_checked(name, pending, ckpt)
      pending = []
      for action in due:
        t_sync = time.time()
        action.run(step, state)
        if action.run is not log:  # Eval and save time is not training time.
          speed.pause(t_sync)
      if preempted:
        ckpt.wait()
        raise preemption.stop(name, step, ckpt_dir)
  finally:
    preemption.__exit__()
    if bar is not None:
      bar.close()
    for hook in hooks:  # a trace still open when the stage ends or fails
      getattr(hook, "close", lambda: None)()
    ckpt.close()
  return state
