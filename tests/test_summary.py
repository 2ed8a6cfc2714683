"""farmer_jax.summary: event files TensorBoard reads back, one complete file per flush, nothing on
disk without events, and the purge of a resumed run's re-written steps."""
import io
import os
import struct
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

from farmer_jax import rundir, summary


def _accumulator(directory) -> event_accumulator.EventAccumulator:
  acc = event_accumulator.EventAccumulator(
      str(directory), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
  acc.Reload()
  return acc


def _scalars(acc, tag: str) -> dict[int, float]:
  events = acc.Scalars(tag)
  steps = [e.step for e in events]
  assert steps == sorted(steps) and len(set(steps)) == len(steps), steps
  return {e.step: e.value for e in events}


def _event_files(directory) -> list[str]:
  return sorted(p.name for p in directory.iterdir())


def test_masked_crc32c_matches_reference():
  assert summary.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert summary.crc32c(b"") == 0
  for data in (b"", b"123456789", bytes(range(256)) * 3):
    assert summary.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)
  assert summary.masked_crc32c(b"123456789") == 0xC78AB0E5
  # The bytes TensorFlow's tf.io.TFRecordWriter writes for this record.
  assert summary.tf_record(b"123456789") == bytes.fromhex(
      "090000000000000037f97139313233343536373839e5b08ac7")


def test_scalars_and_images_read_back(tmp_path):
  directory = tmp_path / "logs"
  writer = summary.SummaryWriter(directory)
  for step in range(1, 6):
    writer.write_scalars(step, {"train/loss": 1.0 / step, "train/lr": np.float32(0.5)})
  image = np.random.default_rng(0).integers(0, 256, (1, 12, 20, 3), dtype=np.uint8)
  writer.write_images(5, {"samples": image})
  writer.write_images(5, {"gray": image[0, :, :, :1]})
  writer.flush()
  writer.flush()  # nothing buffered: no file
  assert len(_event_files(directory)) == 1
  writer.write_scalars(6, {"train/loss": 0.125})
  writer.close()

  names = _event_files(directory)
  assert len(names) == 2 and all(n.startswith("events.out.tfevents.") for n in names)
  # Names sort in write order (the sequence number, the last field, counts up).
  sequence = [int(n.rsplit(".", 1)[1]) for n in names]
  assert sequence[1] == sequence[0] + 1
  for name in names:
    raw = (directory / name).read_bytes()
    offset = 0
    while offset < len(raw):  # the TFRecord framing, CRCs included
      (length,) = struct.unpack("<Q", raw[offset:offset + 8])
      assert struct.unpack("<I", raw[offset + 8:offset + 12])[0] == (
          pywrap_tensorflow.masked_crc32c(raw[offset:offset + 8]))
      data = raw[offset + 12:offset + 12 + length]
      assert struct.unpack("<I", raw[offset + 12 + length:offset + 16 + length])[0] == (
          pywrap_tensorflow.masked_crc32c(data))
      offset += 16 + length
    assert offset == len(raw)
    events = list(event_file_loader.EventFileLoader(str(directory / name)).Load())
    assert events[0].file_version == "brain.Event:2"
    assert not any(e.HasField("session_log") for e in events)

  acc = _accumulator(directory)
  assert _scalars(acc, "train/loss") == {s: np.float32(1.0 / s) for s in range(1, 6)} | {6: 0.125}
  assert _scalars(acc, "train/lr") == {s: 0.5 for s in range(1, 6)}
  (img,) = acc.Images("samples")
  assert (img.step, img.height, img.width) == (5, 12, 20)
  (gray,) = acc.Images("gray")
  assert (gray.height, gray.width) == (12, 20)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(img.encoded_image_string))),
                                image[0])


def test_disabled_or_empty_writer_creates_nothing(tmp_path):
  disabled = summary.SummaryWriter(tmp_path / "disabled", enabled=False, start_step=3)
  disabled.write_scalars(1, {"a": 1.0})
  disabled.write_images(1, {"b": np.zeros((4, 4, 3), np.uint8)})
  disabled.flush()
  disabled.close()
  empty = summary.SummaryWriter(tmp_path / "empty", start_step=3)
  empty.flush()
  empty.close()
  assert list(tmp_path.iterdir()) == []


def test_automatic_flush_after_flush_secs(tmp_path):
  writer = summary.SummaryWriter(tmp_path, flush_secs=0.0, max_flush_secs=0.0)
  writer.write_scalars(1, {"a": 1.0})
  writer.write_scalars(2, {"a": 2.0})
  assert len(_event_files(tmp_path)) == 2
  writer.close()  # nothing left
  assert len(_event_files(tmp_path)) == 2


def test_flush_interval_grows_with_the_writers_age(tmp_path, monkeypatch):
  clock = [1000.0]
  monkeypatch.setattr(summary, "_monotonic", lambda: clock[0])
  writer = summary.SummaryWriter(tmp_path)   # 60 s, then age / 20, at most 600 s

  def write_at(t: float, step: int) -> int:
    clock[0] = 1000.0 + t
    writer.write_scalars(step, {"a": float(step)})
    return len(_event_files(tmp_path))

  assert writer.flush_interval(1000.0 + 600) == 60.0
  assert write_at(59, 1) == 0 and write_at(60, 2) == 1          # young: every 60 s
  assert writer.flush_interval(1000.0 + 7200) == 360.0           # 2 hours old
  assert write_at(7200, 3) == 2                                  # 7140 s since the last file
  assert write_at(7200 + 370, 4) == 2 and write_at(7200 + 380, 5) == 3   # age / 20 is 378.5 s
  assert writer.flush_interval(1000.0 + 7 * 86400) == 600.0      # a week: capped
  assert write_at(7 * 86400, 6) == 4 and write_at(7 * 86400 + 599, 7) == 4
  assert write_at(7 * 86400 + 600, 8) == 5
  writer.close()
  assert _scalars(_accumulator(tmp_path), "a") == {s: float(s) for s in range(1, 9)}
  # Over a week of writes every 10 s: about a thousand files, not the 10,080 of a fixed 60 s.
  flushes, last, t = 0, 0.0, 0.0
  while t < 7 * 86400:
    t += 10.0
    if t - last >= writer.flush_interval(1000.0 + t):
      flushes, last = flushes + 1, t
  assert 900 < flushes < 1200, flushes


def test_resumed_run_purges_the_earlier_sessions_later_steps(tmp_path):
  first = summary.SummaryWriter(tmp_path)
  for step in range(1, 6):
    first.write_scalars(step, {"loss": float(step)})
  first.close()
  # Resumed from the checkpoint at step 3: steps 4 and 5 are computed again.
  second = summary.SummaryWriter(tmp_path, start_step=3)
  for step in range(4, 7):
    second.write_scalars(step, {"loss": 10.0 * step})
  second.close()
  names = _event_files(tmp_path)
  assert len(names) == 2
  events = list(event_file_loader.EventFileLoader(str(tmp_path / names[1])).Load())
  assert events[0].file_version == "brain.Event:2"
  assert events[1].session_log.status == events[1].session_log.START and events[1].step == 4
  # TensorBoard keeps the steps below the START event's (1..3 of the first session).
  assert _scalars(_accumulator(tmp_path), "loss") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0,
                                                      6: 60.0}


def test_without_start_step_tensorboard_keeps_both_sessions(tmp_path):
  """Why `start_step` matters: with file_version 2 TensorBoard's Python loader purges only on a
  SessionLog START, not on a step going back."""
  for steps, scale in ((range(1, 6), 1.0), (range(4, 7), 10.0)):
    writer = summary.SummaryWriter(tmp_path)
    for step in steps:
      writer.write_scalars(step, {"loss": scale * step})
    writer.close()
  events = _accumulator(tmp_path).Scalars("loss")
  assert [e.step for e in events] == [1, 2, 3, 4, 5, 4, 5, 6]


def test_bad_image_and_io_errors_raise(tmp_path):
  writer = summary.SummaryWriter(tmp_path / "not_a_dir")
  with pytest.raises(ValueError):
    writer.write_images(1, {"x": np.zeros((2, 4, 4, 3), np.uint8)})
  with pytest.raises(ValueError):
    writer.write_images(1, {"x": np.zeros((4, 4, 3), np.float32)})
  (tmp_path / "not_a_dir").write_text("")
  writer.write_scalars(1, {"a": 1.0})
  with pytest.raises(rundir.WorkdirError, match="cannot write .*not_a_dir/events.out.tfevents"):
    writer.flush()
  (tmp_path / "not_a_dir").unlink()
  writer.flush()  # the failed flush's events were kept
  assert _scalars(_accumulator(tmp_path / "not_a_dir"), "a") == {1: 1.0}


def test_does_not_import_tensorflow():
  code = ("import sys; from farmer_jax import summary; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
