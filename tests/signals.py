"""Sends a real signal to this process while a training loop draws a given batch, so that tests
can stop a run in-process at a known step, as a preemption (SIGTERM) or Ctrl-C (SIGINT) would."""
import os

from farmer_jax import input_pipeline


def signal_at_batch(monkeypatch, signum: int, at: int) -> None:
  """The next training iterators send `signum` to this process when batch `at` (0-based) is drawn:
  the step that uses it completes, is checkpointed, and the run returns."""
  real = input_pipeline.train_iterator

  def signalling(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == at:
        os.kill(os.getpid(), signum)
      yield batch

  monkeypatch.setattr(input_pipeline, "train_iterator", signalling)
