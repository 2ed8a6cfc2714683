"""Trainer end to end on the tiny digits config: outputs, resume, failures, config errors."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import signals

from configs import digits
from farmer_jax import config_check, input_pipeline, metrics, modes, rundir, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny():
  return digits.get_config("tiny")


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("digits_tiny"))
  state = train.train_and_evaluate(tiny(), workdir)
  return workdir, state


def test_train_writes_checkpoint_eval_and_samples(trained_workdir):
  workdir, state = trained_workdir
  c = tiny()
  assert int(state.step) == c.train.num_steps
  assert rundir.Checkpointer(workdir, read_only=True).latest_step() == c.train.num_steps
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    m = json.load(f)
  assert m["step"] == c.train.num_steps and m["split"] == "test" and m["num_examples"] == 360
  assert 0.5 < m["bpd"] < 10.0
  s = np.load(os.path.join(workdir, "samples", f"samples_{c.train.num_steps}.npz"))
  assert s["images"].dtype == np.uint8 and s["images"].shape == (20, 8, 8, 1)
  assert s["images"].max() <= 16 and int(s["num_levels"]) == 17
  np.testing.assert_array_equal(s["labels"], np.repeat(np.arange(10), 2))
  png = Image.open(os.path.join(workdir, "samples", f"samples_{c.train.num_steps}.png"))
  assert png.size[1] > png.size[0]   # 10 rows (classes) x 2 columns
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def read_history(workdir):
  with open(os.path.join(workdir, "eval", "history.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_evaluate_and_sample_modes_use_latest_checkpoint(trained_workdir):
  workdir, _ = trained_workdir
  step = tiny().train.num_steps
  end_of_run = open(os.path.join(workdir, "samples", f"samples_{step}.npz"), "rb").read()
  result = modes.evaluate(tiny(), workdir)
  modes.evaluate(tiny(), workdir)
  history = read_history(workdir)
  assert [(r["step"], r["mode"]) for r in history] == [(step, "train"), (step, "evaluate")]
  assert result["step"] == step
  np.testing.assert_allclose(result["bpd"], history[0]["bpd"], rtol=1e-5)  # same params and keys
  npz = modes.sample(tiny(), workdir)
  assert os.path.basename(npz).startswith(f"samples_{step}_exact_resample_s0_")
  info = json.loads(str(np.load(npz)["info"]))
  assert info == {"step": step, "decoder": "exact", "seed": 0, "sample": tiny().sample.to_dict()}
  written = os.stat(npz).st_mtime_ns
  assert modes.sample(tiny(), workdir) == npz and os.stat(npz).st_mtime_ns == written   # kept
  # The end-of-run samples are never replaced.
  assert open(os.path.join(workdir, "samples", f"samples_{step}.npz"), "rb").read() == end_of_run


def test_sample_mode_chosen_classes_with_guidance(trained_workdir):
  workdir, _ = trained_workdir
  c = tiny()
  c.sample.update(classes="3,5", per_class=3, batch_size=4, guidance="naive", w=2.0, name="n2")
  npz = modes.sample(c, workdir)
  assert os.path.basename(npz) == f"samples_{c.train.num_steps}_n2.npz"
  s = np.load(npz)
  np.testing.assert_array_equal(s["labels"], [3, 3, 3, 5, 5, 5])
  assert s["images"].shape == (6, 8, 8, 1) and s["images"].max() <= 16


@pytest.mark.parametrize("field,value,needle", [
    ("classes", "3,10", r"config\.sample\.classes.*out of range: \[10\]"),
    ("classes", "three", r"config\.sample\.classes"),
    ("per_class", 0, r"config\.sample\.per_class"),
    ("guidance", "cfg", r"config\.sample\.guidance"),
    ("num_cond", -1, r"config\.sample\.num_cond"),
])
def test_invalid_sample_request_fails_before_compute(trained_workdir, field, value, needle):
  workdir, _ = trained_workdir
  c = tiny()
  c.sample[field] = value
  before = sorted(os.listdir(os.path.join(workdir, "samples")))
  with pytest.raises(ValueError, match=needle):
    modes.sample(c, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == before


def test_workdir_rejects_a_different_model(trained_workdir):
  workdir, _ = trained_workdir
  c = tiny()
  c.model.af_blocks = 3
  with pytest.raises(ValueError, match=r"config\.model\.af_blocks = 3 but .* was trained with 2"):
    modes.evaluate(c, workdir)


def test_resumed_run_reproduces_uninterrupted_run(trained_workdir, tmp_path):
  _, uninterrupted = trained_workdir
  workdir = str(tmp_path)
  half = train.train_and_evaluate(tiny(), workdir, stop_after_steps=10)
  assert int(half.step) == 10
  assert not os.path.exists(os.path.join(workdir, "eval", "metrics.json"))
  resumed = train.train_and_evaluate(tiny(), workdir)
  assert int(resumed.step) == tiny().train.num_steps
  diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                      resumed.params, uninterrupted.params)
  assert max(jax.tree.leaves(diff)) < 1e-6
  # And it really trained: parameters moved from their initial values.
  init = train.Trainer(tiny()).init()
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       resumed.params, init.params)
  assert max(jax.tree.leaves(moved)) > 1e-3


def test_golden_two_steps(tmp_path):
  """Two steps of the tiny config from its fixed seed against stored values: a silent change of
  the numerics (model, loss, optimiser, data order, keys) fails here. The first step's learning
  rate is 0 (warm-up), so the second is where the parameters move."""
  c = tiny()
  trainer = train.Trainer(c)
  data = input_pipeline.train_iterator(c.data, global_batch_size=c.train.batch_size, seed=c.seed)
  losses = []
  with jax.set_mesh(trainer.mesh):
    state = trainer.init()
    init = jax.device_get(state.params)
    for _ in range(2):
      state, scalars = trainer.train_step(state, trainer.batch_to_global(next(data)),
                                          jax.random.key(c.seed + 1))
      losses.append(float(scalars["loss"]))
  params = [np.asarray(a, np.float64) for a in jax.tree.leaves(jax.device_get(state.params))]
  moved = sum(float(np.abs(a - np.asarray(b, np.float64)).sum())
              for a, b in zip(params, jax.tree.leaves(init)))
  np.testing.assert_allclose(losses, [1.5234072, 1.4554347], rtol=1e-5)
  np.testing.assert_allclose(sum(float(a.sum()) for a in params), 309.11309, atol=1e-3)
  np.testing.assert_allclose(moved, 2.5702211, rtol=1e-4)


def test_the_training_loop_makes_no_implicit_host_transfer(tmp_path):
  """The step loop (steps, logging, checkpoints) under jax.transfer_guard("disallow"): every
  host-to-device copy in it is an explicit one (the batch), none hides in the step's arguments.
  (On CPU the guard does not see device-to-host reads, which share host memory.)"""
  c = tiny()
  trainer = train.Trainer(c)
  run = rundir.RunDir(tmp_path)
  data = input_pipeline.train_iterator(c.data, global_batch_size=c.train.batch_size, seed=c.seed)
  ckpt, writer = rundir.Checkpointer(run), metrics.create_writer(run)
  with jax.set_mesh(trainer.mesh):
    state = trainer.init()
    key = jax.random.key(c.seed + 1)
    with jax.transfer_guard("disallow"):
      state, preempted = train.run_steps(
          state, lambda s: trainer.train_step(s, trainer.batch_to_global(next(data)), key),
          start=0, end=10, t=c.train, ckpt=ckpt, run=run, writer=writer,
          flops_per_step=trainer.flops_per_step, num_devices=trainer.mesh.size,
          device_kind=trainer.device_kind)
  ckpt.close()
  assert not preempted and int(state.step) == 10 and ckpt.all_steps() == [10]
  assert [r["step"] for r in rundir.read_jsonl(run.train_log)] == [5, 10]


def exploding():
  """A config whose parameters overflow within a few steps: huge constant lr, no clipping."""
  c = tiny()
  c.train.update(learning_rate=1e30, min_learning_rate=1e30, warmup_steps=0, grad_clip=0.0)
  c.model.logscale_clip = 0.0
  return c


def test_nonfinite_loss_stops_keeps_checkpoints_finite_and_skip_continues(tmp_path):
  c = exploding()
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss or gradients at step \d+"):
    train.train_and_evaluate(c, str(tmp_path))
  ckpt = rundir.Checkpointer(str(tmp_path), read_only=True)
  for step in ckpt.manager.all_steps():
    state = ckpt.restore(train.Trainer(c).abstract_state, step)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
  start = ckpt.latest_step() or 0
  ckpt.close()
  # Rerun with skip_nonfinite: it resumes from the last finite checkpoint and skips the bad steps.
  c.train.skip_nonfinite = True
  state = train.train_and_evaluate(c, str(tmp_path), stop_after_steps=6)
  assert int(state.step) == start + 6 and start <= int(state.nonfinite_step) < start + 6
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize("section,field,value,needle", [
    ("model", "af_width", -64, "config.model.af_width"),
    ("model", "d_informative", 5, "config.model.d_informative"),
    ("model", "patch_size", 3, "config.model.patch_size"),
    ("model", "redundant_model", "laplace", "config.model.redundant_model"),
    ("model", "af_width", 48, "config.model.af_width"),       # not a multiple of head_dim 32
    ("train", "batch_size", 0, "config.train.batch_size"),
    ("train", "batch_size", 12, "config.train.batch_size"),   # not divisible by 8 devices
    ("train", "num_steps", -1, "config.train.num_steps"),
    ("data", "num_levels", 1, "config.data.num_levels"),
])
def test_bad_config_fails_before_compute_naming_the_field(tmp_path, section, field, value, needle):
  c = tiny()
  c[section][field] = value
  with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.parametrize("section", ["model", "train", "data"])
def test_unknown_config_field_is_rejected(tmp_path, section):
  c = tiny()
  c[section].unlock()
  c[section]["not_a_field"] = 1
  with pytest.raises(ValueError, match=f"config.{section}.*not_a_field"):
    config_check.validate(c)


def test_sigterm_saves_the_current_step_exits_0_and_the_rerun_matches(trained_workdir, tmp_path):
  """SIGTERM (a preemption) mid-run: a checkpoint of that step, exit 0 with a line saying so; the
  rerun resumes there and ends with the uninterrupted run's parameters."""
  _, uninterrupted = trained_workdir
  workdir = tmp_path / "w"
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             " --xla_force_host_platform_device_count=8", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", signals.DRIVER, "SIGTERM", "6",
                        f"--config={REPO}/configs/digits.py:tiny", f"--workdir={workdir}"],
                       env=env, capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (f"SIGTERM: checkpoint of step 7 saved in {workdir}/checkpoints; exiting. Rerun the "
          f"same command to resume from step 7.") in out.stderr
  assert rundir.Checkpointer(str(workdir), read_only=True).all_steps() == [7]
  assert not (workdir / "eval").exists() and not (workdir / "lock.json").exists()
  resumed = train.train_and_evaluate(tiny(), str(workdir))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), resumed.params,
               uninterrupted.params)
  log = [json.loads(line) for line in open(workdir / "train_log.jsonl")]
  assert [r["step"] for r in log] == [5, 10, 15, 20]


def test_sigkill_mid_run_then_rerun_resumes(tmp_path):
  """The README's promise: kill -9 the training command at any time, rerun it, it resumes."""
  workdir = str(tmp_path / "w")
  # A relative --workdir, as in the README (Orbax itself needs absolute paths).
  cmd = [sys.executable, "-m", "farmer_jax.main", f"--config={REPO}/configs/digits.py:tiny",
         "--workdir=w", "--config.train.num_steps=60", "--config.train.checkpoint_every=10",
         "--config.eval.every=1000"]
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
             TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckdir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline:
    steps = [d for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []
    if any(int(s) >= 20 for s in steps):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = rundir.Checkpointer(workdir, read_only=True).latest_step()
  assert killed_at is not None and 20 <= killed_at < 60
  out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from checkpoint at step {killed_at}" in out.stderr
  assert rundir.Checkpointer(workdir, read_only=True).latest_step() == 60
  assert os.path.exists(os.path.join(workdir, "eval", "metrics.json"))
