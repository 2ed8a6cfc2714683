"""SIGTERM and SIGINT end a run with a checkpoint of the current step, in every phase.

A preemption (a spot TPU VM or GPU node reclaimed, SLURM's time limit, Ctrl-C) sends SIGTERM or
SIGINT. `run_steps` asks `reached(step)` after every step; when it answers True every process saves
the same step and the run exits 0, so rerunning the command resumes from there.

- One process: our handler records the signal; the next step boundary is the save point. A second
  signal ends the process at once (the default action).
- Several processes (jax.distributed): JAX's preemption sync manager, which Orbax's
  `reached_preemption` asks, already listens for SIGTERM on every process and agrees on one step
  for all. We leave its SIGTERM handler in place and turn SIGINT into a SIGTERM to this process.
"""
import contextlib
import os
import signal
import threading

from absl import logging
import jax

_received: list[int] = []
_depth = [0]   # nested handle_signals() contexts: the outermost installs and restores


def _single_process_handler(signum, frame):
  del frame
  if _received:   # a second signal: stop now
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return
  _received.append(signum)
  logging.warning("%s received: saving a checkpoint after this step, then exiting "
                  "(send it again to stop at once)", signal.Signals(signum).name)


def _forward_to_sigterm(signum, frame):
  del signum, frame
  logging.warning("SIGINT received: treated as SIGTERM (preemption) on every process")
  os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def handle_signals():
  """Installs the handlers for the duration of a run, from its set-up (restore, compilation) to
  its end-of-run evaluation (main thread only; elsewhere, and nested, a no-op)."""
  if threading.current_thread() is not threading.main_thread() or _depth[0]:
    _depth[0] += 1
    try:
      yield
    finally:
      _depth[0] -= 1
    return
  multi = jax.process_count() > 1
  handlers = ({signal.SIGINT: _forward_to_sigterm} if multi else
              {signal.SIGTERM: _single_process_handler, signal.SIGINT: _single_process_handler})
  previous = {s: signal.signal(s, h) for s, h in handlers.items()}
  _received.clear()
  _depth[0] += 1
  try:
    yield
  finally:
    _depth[0] -= 1
    for s, h in previous.items():
      signal.signal(s, h)
    _received.clear()


def received() -> bool:
  """Whether this process got SIGTERM / SIGINT during the current run (single-process runs)."""
  return bool(_received)


def signal_name() -> str | None:
  """The signal this process received, if any (single-process runs)."""
  return signal.Signals(_received[0]).name if _received else None


def reached(step: int, ckpt) -> bool:
  """Whether to save `step` and stop: a signal here (one process) or JAX's agreed preemption step
  (several processes, through Orbax)."""
  if jax.process_count() == 1:
    return bool(_received)
  return ckpt.reached_preemption(step)
