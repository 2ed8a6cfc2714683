"""A gs:// workdir end to end, on an in-memory GCS (tests/fake_gcs.py) that both etils.epath and
Orbax's TensorStore driver write to: training with a resume, --mode=evaluate, --mode=sample, a
distillation, an AFM on the run's latents and --mode=fid from a samples file. Every output lands
in the bucket, none on local disk, and a rerun resumes from what the bucket holds.

The fake puts epath on its fsspec backend; with TensorFlow installed, production gs:// paths go
through tf.io.gfile instead, whose directory and rename behaviour this does not exercise."""
import fnmatch
import json
import os

import numpy as np

from configs import afm_farmer_latent, digits
from fake_gcs import fake_gcs
from farmer_jax import modes, rundir, train

W = "gs://bucket/runs/digits"


def _config(arg="tiny"):
  c = digits.get_config(arg)
  c.sample.update(per_class=1, batch_size=16, guidance="none")   # one small sampler compile
  c.eval.batch_size = 120
  if c.phase == "distill":
    c.distill.update(num_steps=10, log_every=5, checkpoint_every=5, eval_every=10,
                     eval_samples=16)
  return c


# README's Outputs table: what each of the modes run here leaves in the workdir.
EXPECTED = [
    "checkpoints/20/_CHECKPOINT_METADATA", "config.json", "train_log.jsonl",
    "eval/metrics.json", "eval/history.jsonl", "samples/samples_20.npz", "samples/samples_20.png",
    "events.out.tfevents.*", "samples/samples_20_exact_none_s0_*.npz",
    "samples/samples_20_exact_none_s0_*.png", "eval/fid_20_file_*.json",
    "distill/checkpoints/10/_CHECKPOINT_METADATA", "distill/config.json",
    "distill/train_log.jsonl", "distill/events.out.tfevents.*", "distill/teacher.json",
    "distill/eval/metrics.json", "distill/eval/history.jsonl",
    "distill/eval/decode_10_exact.png", "distill/eval/decode_10_student.png",
    "distill/samples/samples_10.npz", "distill/samples/samples_10.png",
    "afm/checkpoints/4/_CHECKPOINT_METADATA", "afm/config.json", "afm/train_log.jsonl",
    "afm/events.out.tfevents.*", "afm/latent_stats.json", "afm/farmer.json",
    "afm/samples/samples_4_student.npz", "afm/samples/samples_4_student.png",
]


def test_gs_workdir_end_to_end(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with fake_gcs() as gcs:
    c = _config()
    half = train.train_and_evaluate(c, W, stop_after_steps=10)
    assert int(half.step) == 10
    state = modes.run("train", c, W)            # resumes from the bucket's checkpoint 10
    assert int(state.step) == 20
    log = [json.loads(line) for line in gcs.read_bytes(f"{W}/train_log.jsonl").splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20]
    assert json.loads(gcs.read_bytes(f"{W}/config.json"))["train"]["num_steps"] == 20

    evaluated = modes.run("evaluate", c, W)
    exact = _config()
    exact.sample.decoder = "exact"
    npz = modes.run("sample", exact, W)
    assert npz.startswith(f"{W}/samples/samples_20_exact_none_s0_")

    distill_config = _config("tiny,distill")
    modes.run("train", distill_config, W)
    teacher = json.loads(gcs.read_bytes(f"{W}/distill/teacher.json"))
    assert teacher == {"workdir": W, "step": 20}

    latent = afm_farmer_latent.get_config("tiny")     # the AFM on this run's z^I, student-decoded
    latent.sample.update(batch_size=16, per_class=1)
    modes.run("train", latent, W)
    assert json.loads(gcs.read_bytes(f"{W}/afm/farmer.json"))["workdir"] == W

    fid = _config()
    fid.fid.update(inception_weights="random", reference="tfds:test", num_reference=24,
                   num_samples=10, batch_size=24, resize=75, is_splits=2, samples=npz)
    result = modes.run("fid", fid, W)
    assert result["step"] == 20 and result["num_samples"] == 10

    objects = [o[len(W) + 1:] for o in gcs.list_objects(W)]
    missing = [p for p in EXPECTED if not fnmatch.filter(objects, p)]
    assert not missing, (missing, objects)
    assert "lock.json" not in objects and not any(".tmp" in o for o in objects)

    history = [json.loads(line) for line in gcs.read_bytes(f"{W}/eval/history.jsonl").splitlines()]
    assert [(r["step"], r["mode"]) for r in history] == [(20, "train"), (20, "evaluate")]
    np.testing.assert_allclose(history[1]["bpd"], evaluated["bpd"])

    # A rerun of the finished command resumes at step 20: no step replayed, nothing added twice.
    rerun = modes.run("train", c, W)
    assert int(rerun.step) == 20
    assert len(gcs.read_bytes(f"{W}/eval/history.jsonl").splitlines()) == 2
    assert len(gcs.read_bytes(f"{W}/train_log.jsonl").splitlines()) == 4
  assert os.listdir(tmp_path) == []   # nothing was written to local disk
  assert not rundir.is_remote(tmp_path)
