"""Sends a real signal to this process while a training loop draws a given batch, so that tests
can stop a run at a known step, as a preemption (SIGTERM) or Ctrl-C (SIGINT) would: in-process
(`signal_at_batch`, through pytest's monkeypatch) or in a command-line subprocess (`DRIVER`)."""
import os

from farmer_jax import input_pipeline


def signalling(train_iterator, signum: int, at: int):
  """`train_iterator` whose iterators send `signum` to this process when batch `at` (0-based) is
  drawn: the step that uses it completes, is checkpointed, and the run returns."""
  def wrapped(*args, **kwargs):
    for i, batch in enumerate(train_iterator(*args, **kwargs)):
      if i == at:
        os.kill(os.getpid(), signum)
      yield batch
  return wrapped


def signal_at_batch(monkeypatch, signum: int, at: int) -> None:
  monkeypatch.setattr(input_pipeline, "train_iterator",
                      signalling(input_pipeline.train_iterator, signum, at))


# `python -c DRIVER SIGNAL AT --flags...`: the command line (farmer_jax.main) with SIGNAL sent at
# batch AT (AT < 0: no signal).
DRIVER = f"""
import signal, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from absl import app
import signals
from farmer_jax import input_pipeline, main
name, at = sys.argv[1], int(sys.argv[2])
if at >= 0:
  input_pipeline.train_iterator = signals.signalling(input_pipeline.train_iterator,
                                                     getattr(signal, name), at)
sys.argv = ["farmer_jax.main"] + sys.argv[3:]
app.run(main.main)
"""
