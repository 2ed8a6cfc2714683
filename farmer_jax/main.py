"""Command-line entry.

    python -m farmer_jax.main --config=configs/digits.py --workdir=runs/digits [--mode=train]

Modes: train (resumes from the latest checkpoint in --workdir), evaluate (test-split bpd of the
latest checkpoint -> <workdir>/eval/metrics.json), sample (-> <workdir>/samples/samples_<step>.npz
and .png). Any config field can be overridden, e.g. --config.train.num_steps=100.
"""
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from farmer_jax import metrics, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "sample"], "What to do.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics.quiet_library_logs()
  # Several processes (TPU pod hosts, SLURM tasks): the environment says so, jax finds the rest.
  if any(v in os.environ for v in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS")):
    if int(os.environ.get("SLURM_NTASKS", "2")) > 1:
      jax.distributed.initialize()
  logging.info("JAX %s: process %d/%d, %d devices (%d local)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.local_device_count())
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _MODE.value == "train":
    train.train_and_evaluate(config, workdir)
  elif _MODE.value == "evaluate":
    train.evaluate(config, workdir)
  else:
    train.sample_latest(config, workdir)


if __name__ == "__main__":
  app.run(main)
