"""The run directory (farmer_jax/rundir/): strict JSON and logs, the one-writer lock, damaged
checkpoints, and failures that leave the workdir as it was or say what to do in one line."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from farmer_jax import input_pipeline, rundir, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO, JAX_PLATFORMS="cpu")


# ------------------------------------------------------------------ files


def test_json_is_strict_and_names_non_finite_values(tmp_path):
  path = rundir.write_json(tmp_path / "m.json", {"bpd": float("inf"), "parts": [1.0, np.nan],
                                                 "step": np.int64(3), "ok": np.float32(0.5)})
  text = path.read_text()
  m = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
  assert m == {"bpd": None, "parts": [1.0, None], "step": 3, "ok": 0.5,
               "status": "non-finite: bpd, parts[1]"}
  assert "status" not in json.loads(rundir.dumps({"bpd": 1.0}))
  assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def test_history_keeps_one_line_per_key_and_a_resumed_log_drops_replayed_steps(tmp_path):
  history = tmp_path / "eval" / "history.jsonl"
  key = ("step", "mode", "params")
  assert rundir.append_jsonl(history, {"step": 5, "mode": "train", "params": "ema", "bpd": 2.0},
                             key)
  assert not rundir.append_jsonl(history, {"step": 5, "mode": "train", "params": "ema",
                                           "bpd": 2.0}, key)
  assert rundir.append_jsonl(history, {"step": 5, "mode": "evaluate", "params": "ema"}, key)
  assert [(r["step"], r["mode"]) for r in rundir.read_jsonl(history)] == [(5, "train"),
                                                                          (5, "evaluate")]
  log = tmp_path / "train_log.jsonl"
  for step in (5, 10, 15, 20):
    rundir.append_jsonl(log, {"step": step, "loss": 1.0 / step})
  with open(log, "a") as f:
    f.write('{"step": 25, "lo')                  # a torn last line is skipped, not an error
  rundir.truncate_log(log, 10)                   # resumed from checkpoint 10: 15, 20 replayed
  assert [r["step"] for r in rundir.read_jsonl(log)] == [5, 10]


def test_unique_names_and_sample_tags(tmp_path):
  first = rundir.write_json(rundir.unique(tmp_path / "fid_3_x.json"), {"a": 1})
  second = rundir.write_json(rundir.unique(tmp_path / "fid_3_x.json"), {"a": 2})
  assert (first.name, second.name) == ("fid_3_x.json", "fid_3_x-2.json")
  assert json.loads(first.read_text()) == {"a": 1}
  s = digits.get_config("tiny").sample
  tag = rundir.sample_tag(s, "exact")
  assert tag.startswith("exact_resample_s0_") and tag == rundir.sample_tag(s, "exact")
  s.w = 1.0
  assert rundir.sample_tag(s, "exact") != tag                # any setting changes the name
  s.name = "w1"
  assert rundir.sample_tag(s, "exact") == "w1"


# ------------------------------------------------------------------ the lock


def test_a_live_run_holds_the_workdir_and_a_killed_one_does_not(tmp_path):
  workdir = tmp_path / "w"
  holder = subprocess.Popen(
      [sys.executable, "-c", "import time; from farmer_jax import rundir\n"
       f"with rundir.hold({str(workdir)!r}):\n  print('held', flush=True); time.sleep(120)"],
      env=ENV, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "farmer_jax.main", f"--config={REPO}/configs/digits.py:tiny",
         f"--workdir={workdir}"], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"farmer_jax: {workdir} is in use by another run: host "
                           f"{socket.gethostname()}, pid {holder.pid}, started "), last
    assert "Traceback" not in out.stderr
    assert time.time() - started < 120                   # at once: before any compilation
    assert sorted(os.listdir(workdir)) == ["lock.json"]  # the refused run wrote nothing
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert (workdir / "lock.json").exists()                # left behind by the killed holder
  with rundir.hold(workdir):                             # stale: its pid is gone
    assert json.loads((workdir / "lock.json").read_text())["pid"] == os.getpid()
  assert not (workdir / "lock.json").exists()


def test_two_runs_starting_together_get_one_lock(tmp_path):
  """Pairs of processes released at the same instant on one workdir: in each pair exactly one
  takes the lock (the record is linked into place), the other is refused."""
  script = ("import sys, time\nfrom farmer_jax import rundir\n"
            "start = float(sys.argv[2])\n"
            "while time.time() < start: pass\n"
            "try:\n  rundir.Lock(rundir.RunDir(sys.argv[1])).acquire()\n  print('got', flush=True)\n"
            "  time.sleep(2)\nexcept rundir.WorkdirError as e:\n  print('refused', e, flush=True)\n")
  start = time.time() + 8          # after every process has imported
  procs = {trial: [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / str(trial)),
                                     str(start)], env=ENV, stdout=subprocess.PIPE, text=True)
                   for _ in range(2)] for trial in range(3)}
  for trial, pair in procs.items():
    outs = sorted(p.communicate(timeout=60)[0].split()[0] for p in pair)
    assert outs == ["got", "refused"], (trial, outs)


def test_remote_holders_are_judged_by_their_heartbeat(tmp_path):
  run = rundir.RunDir(tmp_path)
  other = {"host": "tpu-worker-7", "pid": 4242, "started": "2026-12-01T00:00:00+00:00"}
  rundir.write_json(run.lock, {**other, "heartbeat": time.time() - 5})
  with pytest.raises(rundir.WorkdirError, match="in use by another run: host tpu-worker-7, pid "
                                                "4242"):
    with rundir.hold(tmp_path):
      pass
  rundir.write_json(run.lock, {**other, "heartbeat": time.time() - 2 * rundir.LEASE_S})
  with rundir.hold(tmp_path):                            # its lease ran out: taken over
    assert json.loads(run.lock.read_text())["host"] == socket.gethostname()
  # A live holder's heartbeat moves.
  lock = rundir.Lock(run, heartbeat_s=0.05)
  lock.acquire()
  first = json.loads(run.lock.read_text())["heartbeat"]
  time.sleep(0.5)
  assert json.loads(run.lock.read_text())["heartbeat"] > first
  lock.release()
  assert not run.lock.exists()


# ------------------------------------------------------------------ damaged checkpoints


def truncate_array_data(directory):
  """Cuts every array data file of a checkpoint (OCDBT's d/ files) to 16 bytes, as a full disk or
  a killed copy would: whichever arrays a restore reads, it meets a damaged file."""
  data = [p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data
  for p in data:
    p.write_bytes(p.read_bytes()[:16])


def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_restored(tmp_path):
  c = digits.get_config("tiny")
  trainer = train.Trainer(c)
  fresh = trainer.init()
  bump = lambda t, d: jax.tree.map(lambda a: a + d, t)
  ckpt = rundir.Checkpointer(tmp_path)
  for step in (1, 2):
    ckpt.save(step, fresh.replace(step=jnp.int32(step), params=bump(fresh.params, step)))
  ckpt.close()
  truncate_array_data(tmp_path / "checkpoints" / "2")

  ckpt = rundir.Checkpointer(tmp_path)
  restored = ckpt.restore(trainer.abstract_state)
  assert int(restored.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.asarray(b) + 1.0), restored.params,
               fresh.params)
  assert ckpt.all_steps() == [1]
  [moved] = os.listdir(tmp_path / "damaged_checkpoints")
  assert moved.startswith("2-") and os.listdir(tmp_path / "damaged_checkpoints" / moved)
  # The eval-weights-only restore goes the same way; with none intact, one clear error, and the
  # last checkpoint stays where it is.
  truncate_array_data(tmp_path / "checkpoints" / "1")
  with pytest.raises(rundir.WorkdirError, match=r"no checkpoint in .* restores onto this run's "
                                                r"state \(steps \[1\]; step 1: "):
    trainer.restore_eval_state(rundir.Checkpointer(tmp_path), None)
  assert rundir.Checkpointer(tmp_path).all_steps() == [1]
  assert len(os.listdir(tmp_path / "damaged_checkpoints")) == 1


def test_a_config_that_does_not_fit_the_checkpoints_moves_none_of_them(tmp_path):
  """A changed optimiser (no clipping: another state tree) fails on every checkpoint alike: that
  is the config, not damage, and every checkpoint stays."""
  c = digits.get_config("tiny")
  trainer = train.Trainer(c)
  ckpt = rundir.Checkpointer(tmp_path)
  for step in (1, 2):
    ckpt.save(step, trainer.init().replace(step=jnp.int32(step)))
  ckpt.close()
  c.train.grad_clip = 0.0
  other = train.Trainer(c)
  with pytest.raises(rundir.WorkdirError, match=r"steps \[2, 1\].*If the config changed"):
    rundir.Checkpointer(tmp_path).restore(other.abstract_state)
  assert rundir.Checkpointer(tmp_path).all_steps() == [1, 2]
  assert not (tmp_path / "damaged_checkpoints").exists()


# ------------------------------------------------------------------ failures


def test_a_run_failing_before_its_first_step_leaves_the_workdir_as_found(tmp_path, monkeypatch):
  def not_prepared(*args, **kwargs):
    raise FileNotFoundError("dataset digits is not prepared")
  monkeypatch.setattr(input_pipeline, "train_iterator", not_prepared)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    train.train_and_evaluate(digits.get_config("tiny"), str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "notes.txt").write_text("mine")
  with pytest.raises(FileNotFoundError, match="not prepared"):
    train.train_and_evaluate(digits.get_config("tiny"), str(tmp_path / "old"))
  assert os.listdir(tmp_path / "old") == ["notes.txt"]


def test_a_full_disk_is_one_line_naming_the_path_and_leaves_no_temporary_file(tmp_path,
                                                                               monkeypatch):
  path_cls = type(epath.Path(tmp_path))
  replace = path_cls.replace

  def full(self, target):   # the temporary file is written; moving it into place fails
    if epath.Path(target).name == "metrics.json":
      raise OSError(errno.ENOSPC, "No space left on device", str(target))
    return replace(self, target)
  monkeypatch.setattr(path_cls, "replace", full)
  with pytest.raises(rundir.WorkdirError) as e:
    train.train_and_evaluate(digits.get_config("tiny"), str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"cannot write {tmp_path}/eval/metrics.json: No space left on device; "
                            "free some space or use another --workdir, then rerun")
  assert os.listdir(tmp_path / "eval") == []          # the temporary file was removed
  assert not (tmp_path / "lock.json").exists()
  assert rundir.Checkpointer(tmp_path, read_only=True).latest_step() == 20   # resumable
  # Orbax's own write errors map to the same message.
  err = rundir.Checkpointer(tmp_path, read_only=True)._save_error(
      ValueError("OUT_OF_RANGE: Error writing file: No space left on device"))
  assert isinstance(err, rundir.WorkdirError) and "No space left" in str(err)
