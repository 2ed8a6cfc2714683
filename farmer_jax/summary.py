"""TensorBoard event files written through `etils.epath`, without TensorFlow.

Object stores such as GCS cannot append to an object, so events are buffered in memory and each
`flush()` writes a new, complete event file: a temporary object renamed into place, so that a
reader never sees half a file. A file's name sorts after every earlier one of the same writer:

    events.out.tfevents.<10-digit unix time>.<hostname>.<pid>.<6-digit sequence number>

(the sequence counts the files of all writers of the process). A run resumed from a checkpoint
at step s (`start_step=s`) starts its first file with SessionLog(START) at step s + 1: TensorBoard's
Python loader then drops the earlier session's events at steps > s, which the resumed run writes
again (it keeps those below the START event's step, so START at s would drop step s too); its Rust
data server drops them anyway, per tag, when a step arrives that is not above the last one.
"""
import io
import os
import socket
import struct
import threading
import time

from etils import epath
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2

from farmer_jax import rundir

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected
_CRC32C_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ (_CRC32C_POLY if _c & 1 else 0)
  _CRC32C_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (pure Python: event files are small, and no CRC package is required)."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The masked CRC-32C that TFRecord framing stores (TensorFlow's crc32c::Mask)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tf_record(data: bytes) -> bytes:
  """One TFRecord: length (uint64 LE), its masked CRC, the data, the data's masked CRC."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


_name_lock = threading.Lock()
_last_name = (0, 0)  # (unix time, sequence number) of this process's last event file


def _next_name(host: str) -> str:
  """A new event file name. The sequence number is shared by all writers of the process, so that
  two writers of one directory never collide in the same second, and the time never steps back,
  so that names sort in write order."""
  global _last_name
  with _name_lock:
    _last_name = (max(_last_name[0], int(time.time())), _last_name[1] + 1)
    now, sequence = _last_name
  return f"events.out.tfevents.{now:010d}.{host}.{os.getpid()}.{sequence:06d}"


def _png(image: np.ndarray) -> summary_pb2.Summary.Image:
  """uint8 [1, H, W, C] or [H, W, C], C in (1, 3) -> a PNG-encoded Summary.Image."""
  image = np.asarray(image)
  if image.ndim == 4 and image.shape[0] == 1:
    image = image[0]
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected uint8 [1, H, W, C] or [H, W, C] with C in (1, 3), got "
                     f"{image.dtype} {image.shape}")
  height, width, channels = image.shape
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if channels == 1 else image).save(buf, format="PNG")
  return summary_pb2.Summary.Image(height=height, width=width, colorspace=channels,
                                   encoded_image_string=buf.getvalue())


_monotonic = time.monotonic   # the writer's clock (tests replace it)


class SummaryWriter:
  """Scalars and images for TensorBoard in `directory` (a local path, gs://, ... via epath).

  `enabled=False` (processes other than 0) makes every method a no-op. Events reach the disk on
  `flush()`, `close()`, and at a write call once the interval has passed since the last file:
  `flush_secs`, or a twentieth of the writer's age once that is longer, up to `max_flush_secs`.
  Every file stays a complete file, so the interval bounds their number: a week-long run leaves
  about a thousand event files (not ten thousand at 60 s), and TensorBoard trails a long run by
  at most `max_flush_secs`. Nothing is created (not even `directory`) until there is an event
  to write. I/O errors propagate, and the events of a failed flush stay buffered for the next one.
  """

  def __init__(self, directory: epath.PathLike, *, enabled: bool = True,
               start_step: int | None = None, flush_secs: float = 60.0,
               max_flush_secs: float = 600.0):
    self._directory = epath.Path(directory)
    self._enabled = enabled
    self._flush_secs, self._max_flush_secs = flush_secs, max(flush_secs, max_flush_secs)
    self._events: list[event_pb2.Event] = []
    self._born = self._last_flush = _monotonic()
    # The START event goes into the first file only: the step from which this run's events
    # replace those a resumed-from run logged after its checkpoint.
    self._start_step = start_step + 1 if start_step and start_step > 0 else None
    self._host = socket.gethostname().replace("/", "_")

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    self._add(step, [summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
                     for tag, v in scalars.items()])

  def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
    self._add(step, [summary_pb2.Summary.Value(tag=tag, image=_png(image))
                     for tag, image in images.items()])

  def _add(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if not self._enabled or not values:
      return
    self._events.append(event_pb2.Event(wall_time=time.time(), step=int(step),
                                        summary=summary_pb2.Summary(value=values)))
    now = _monotonic()
    if now - self._last_flush >= self.flush_interval(now):
      self.flush()

  def flush_interval(self, now: float | None = None) -> float:
    """Seconds between automatic flushes at time `now` (the writer's clock; default: now)."""
    age = (_monotonic() if now is None else now) - self._born
    return min(max(self._flush_secs, age / 20.0), self._max_flush_secs)

  def flush(self) -> None:
    """Writes the buffered events as one new event file; nothing when there are none."""
    if not self._enabled or not self._events:
      return
    now = time.time()
    header = [event_pb2.Event(wall_time=now, file_version="brain.Event:2")]
    if self._start_step is not None:
      header.append(event_pb2.Event(wall_time=now, step=self._start_step,
                                    session_log=event_pb2.SessionLog(
                                        status=event_pb2.SessionLog.START)))
    data = b"".join(tf_record(e.SerializeToString()) for e in header + self._events)
    # A new name for every try; through the run directory's writer (atomic, process 0, a full
    # disk as one line), with a temporary name that TensorBoard, which reads every name
    # containing "tfevents", skips.
    name = _next_name(self._host)
    rundir.write_bytes(self._directory / name, data, tmp_name="." + name.replace("tfevents", "tmp"))
    self._events = []
    self._start_step = None
    self._last_flush = _monotonic()

  def close(self) -> None:
    """Flushes; the writer holds no open file, so there is nothing else to release."""
    self.flush()
