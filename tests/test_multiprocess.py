"""Two local processes of 4 CPU devices each, joined with jax.distributed on a loopback coordinator,
train the digits config exactly as one process of 8 devices does, across a preemption: one host
gets SIGTERM, both save the same step and exit 0, and the rerun finishes the run."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

import signals
from configs import digits
from farmer_jax import input_pipeline, rundir, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# Batch sizes stay those of configs/digits.py:tiny, so the reference run's compilations can come
# from the session's compile cache when another test trained that config first.
OVERRIDES = {"train.num_steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 2}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def read_log(workdir) -> list[dict]:
  with open(os.path.join(workdir, "train_log.jsonl")) as f:
    return [json.loads(line) for line in f]


def start_two_processes(multi, preempt_process=None):
  port = free_port()
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             CUDA_VISIBLE_DEVICES="")
  cmd = [sys.executable, "-c", signals.DRIVER, "SIGTERM", "PREEMPT_AT",
         "--config=configs/digits.py:tiny",
         f"--workdir={multi}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
  # One host (preempt_process) gets SIGTERM while it draws batch 1; the other gets none.
  return [subprocess.Popen([a if a != "PREEMPT_AT" else ("1" if i == preempt_process else "-1")
                            for a in cmd] + [f"--process_id={i}"], cwd=REPO, text=True, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]


def finish(procs) -> list[str]:
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
  return outputs


def test_two_processes_train_like_one_process_of_eight_devices(tmp_path):
  multi = tmp_path / "two_processes"
  procs = start_two_processes(multi, preempt_process=1)

  # Meanwhile, the reference: this process, 8 devices, the same config and data, the same steps
  # (without the final sampling, which needs no comparison).
  c = digits.get_config("tiny")
  for k, v in OVERRIDES.items():
    section, name = k.split(".")
    c[section][name] = v
  single = tmp_path / "one_process"
  trainer = train.Trainer(c)
  # The global batch of two hosts: each reads its own half of the split (tfds's per-process
  # shares), host 0's rows on the first four devices.
  hosts = [input_pipeline.train_iterator(c.data, global_batch_size=c.train.batch_size,
                                         seed=c.seed, process_index=p, process_count=2)
           for p in range(2)]
  data = ({k: np.concatenate([b0[k], b1[k]]) for k in b0} for b0, b1 in zip(*hosts))
  ref_losses = []
  with jax.set_mesh(trainer.mesh):
    ref_state = trainer.init()
    for _ in range(STEPS):
      ref_state, scalars = trainer.train_step(ref_state, trainer.batch_to_global(next(data)),
                                              jax.random.key(c.seed + 1))
      ref_losses.append(float(scalars["loss"]))
    bpd_single = trainer.evaluate(ref_state, str(single))["bpd"]

  outputs = finish(procs)
  assert "process 1/2, 8 devices (4 local)" in outputs[1]
  # Both hosts stopped at the same step, saved it, and exited 0 before the end.
  stopped = rundir.Checkpointer(str(multi), read_only=True).latest_step()
  assert 2 <= stopped < STEPS, outputs[1][-3000:]
  for out in outputs:
    assert f"preemption: checkpoint of step {stopped} saved" in out, out[-3000:]
  assert not (multi / "eval").exists() and not (multi / "lock.json").exists()
  outputs = finish(start_two_processes(multi))
  assert f"resumed from checkpoint at step {stopped}" in outputs[0]

  got = read_log(multi)
  assert [r["step"] for r in got] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in got], ref_losses, rtol=1e-5)

  # The checkpoint both processes wrote is complete: it restores, at the last step, onto a
  # different device layout (this process's 8 devices), with the reference's parameters.
  ckpt = rundir.Checkpointer(str(multi), read_only=True)
  assert ckpt.latest_step() == STEPS
  restored = ckpt.restore(trainer.abstract_state)
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
           zip(jax.tree.leaves(jax.device_get(restored.params)),
               jax.tree.leaves(jax.device_get(ref_state.params)))]
  assert max(diffs) < 0.1 * c.train.learning_rate   # Adam: see test_sharding's tolerance note

  with open(multi / "eval" / "metrics.json") as f:
    metrics = json.load(f)
  assert metrics["num_examples"] == 360
  # Each host evaluates its tfds share of the test split, so the global eval batches hold other
  # images than one process's and the dequantisation draws fall on other pixels: the same
  # parameters give the same bpd up to that noise (0.0016 measured at this step).
  assert abs(metrics["bpd"] - bpd_single) < 5e-3
  assert (multi / "samples" / f"samples_{STEPS}.npz").exists()
