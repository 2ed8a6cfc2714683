"""One live run per workdir: lock.json with its holder and a heartbeat, and the run's hold on the
workdir (`hold`), which takes the lock and removes what a run failing before its first step
wrote."""
import contextlib
import datetime
import json
import os
import pathlib
import socket
import sys
import threading
import time
import uuid

from absl import logging
from etils import epath
import jax
import numpy as np

from farmer_jax.rundir import files
from farmer_jax.rundir.files import RunDir, WorkdirError



LEASE_S = 120.0       # a holder on another machine whose heartbeat is older than this is gone
HEARTBEAT_S = 30.0


def _read_text(path: str) -> str | None:
  with contextlib.suppress(OSError):
    return pathlib.Path(path).read_text().strip()
  return None


def _proc_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (Linux), to tell a live holder from a reused pid."""
  with contextlib.suppress(AttributeError, IndexError):
    return _read_text(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[19]
  return None


def _machine() -> dict:
  """Where a pid means the same process: this host, boot and pid namespace (containers that
  share a host name do not share pids)."""
  pidns = None
  with contextlib.suppress(OSError):
    pidns = os.readlink("/proc/self/ns/pid")
  return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
          "pidns": pidns}


def _pid_alive(pid: int, proc_start: str | None) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return proc_start is None or _proc_start(pid) in (None, proc_start)


def stale_reason(holder: dict, now: float | None = None, lease_s: float = LEASE_S) -> str | None:
  """Why the lock of `holder` no longer holds (None: it does). Where its pid means the same
  process (same host, boot and pid namespace), the pid decides; elsewhere (another host of a
  bucket or shared filesystem) the heartbeat's age does. A requeued scheduler job (the same
  SLURM job id) takes over its own earlier lock."""
  now = time.time() if now is None else now
  job = os.environ.get("SLURM_JOB_ID")
  if job and holder.get("slurm_job_id") == job:
    return f"the same SLURM job {job}, requeued"
  here = _machine()
  if all(holder.get(k) == v for k, v in here.items()):
    pid = holder.get("pid")
    if pid == os.getpid():
      return "taken by this process earlier"
    if not isinstance(pid, int) or not _pid_alive(pid, holder.get("proc_start")):
      return f"pid {pid} is not running"
    return None
  age = now - float(holder.get("heartbeat") or 0)
  return f"no heartbeat for {age:.0f} s" if age > lease_s else None


def describe(holder: dict) -> str:
  beat = holder.get("heartbeat")
  ago = f"heartbeat {time.time() - float(beat):.0f} s ago, " if beat else ""
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
          f"{holder.get('started', '?')} ({ago}command: {holder.get('command', '?')})")


# Set by a lock's heartbeat when another run has taken the workdir: the step loop stops on it.
_lost: list[str] = []


def check_held() -> None:
  """Raises WorkdirError if another run took over a workdir this process holds."""
  if _lost:
    raise WorkdirError(_lost[0])


class Lock:
  """lock.json of a workdir, held by process 0 of a run, with a heartbeat thread.

  Taking it is exclusive on a local or shared POSIX filesystem (the file is linked into place,
  which fails if it exists). On an object store, which has no such primitive here, the record is
  written and read back after a second: two starts within that second can both pass.
  """

  def __init__(self, run: RunDir, lease_s: float = LEASE_S, heartbeat_s: float = HEARTBEAT_S):
    self.run, self.lease_s, self.heartbeat_s = run, lease_s, heartbeat_s
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread = None
    pid = os.getpid()
    self.record = {**_machine(), "pid": pid, "proc_start": _proc_start(pid),
                   "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "command": " ".join(sys.argv)[:300], "token": self.token,
                   "slurm_job_id": os.environ.get("SLURM_JOB_ID")}

  def _payload(self) -> bytes:
    return files.dumps({**self.record, "heartbeat": time.time()}).encode()

  def _holder(self) -> dict | None:
    try:
      return files.read_json(self.run.lock)
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise WorkdirError(f"{self.run.lock} is not a lock record (damaged?): if no run uses "
                         f"{self.run}, delete it and rerun") from None

  def acquire(self) -> None:
    path = self.run.lock
    holder = self._holder()
    if holder is not None:
      reason = stale_reason(holder, lease_s=self.lease_s)
      if reason is None:
        raise WorkdirError(f"{self.run} is in use by another run: {describe(holder)}. Wait for it "
                           f"to end or stop it, or use another --workdir")
      logging.warning("taking over the lock of %s: %s (%s)", self.run, describe(holder), reason)
    if files.is_remote(path):
      files.write_bytes(path, self._payload())
      time.sleep(1.0)   # let a concurrent writer's record settle, then see who won
    else:
      self._create_local(path, stale=holder)
    holder = self._holder()
    if holder is None or holder.get("token") != self.token:
      raise WorkdirError(f"{self.run} was locked at the same moment by another run: "
                         f"{describe(holder or {})}; use another --workdir")
    self._thread = threading.Thread(target=self._beat, daemon=True, name="farmer_jax-lock")
    self._thread.start()

  def _create_local(self, path: epath.Path, stale: dict | None) -> None:
    """Links a complete record into place: of two runs starting together, one link fails. A stale
    record is moved aside first; if what was moved is not that record (another run took the lock
    in between), it is linked back."""
    files.mkdirs(path.parent)
    lock, tmp = os.fspath(path), os.fspath(path.parent / f".lock.json.{self.token}")
    pathlib.Path(tmp).write_bytes(self._payload())
    try:
      if stale is not None:
        aside = tmp + ".stale"
        with contextlib.suppress(FileNotFoundError):
          os.rename(lock, aside)
          moved = json.loads(pathlib.Path(aside).read_text() or "{}")
          if moved.get("token") != stale.get("token"):
            with contextlib.suppress(FileExistsError):
              os.link(aside, lock)
          os.unlink(aside)
      with contextlib.suppress(FileExistsError):   # another run linked first: `acquire` says so
        os.link(tmp, lock)
    finally:
      os.unlink(tmp)
    files.note_created(path)

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = self._holder()
        if holder is None or holder.get("token") != self.token:
          message = (f"another run took over {self.run}: {describe(holder or {})}; this run "
                     f"stops (its last checkpoint stays)")
          logging.error(message)
          _lost.append(message)
          return
        files.write_bytes(self.run.lock, self._payload())
      except Exception as e:  # noqa: BLE001 (a failed beat must not kill the run; the next retries)
        logging.warning("lock heartbeat of %s failed: %s", self.run, e)

  def stop_heartbeat(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)

  def release(self) -> None:
    self.stop_heartbeat()
    with contextlib.suppress(Exception):
      holder = files.read_json(self.run.lock)
      if holder is not None and holder.get("token") == self.token:
        self.run.lock.unlink()


_held: set[str] = set()   # the workdirs this process holds now


def _agree(ok: bool, what: str) -> None:
  """Every process learns whether process 0 succeeded at `what`, so that all stop together."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # noqa: PLC0415
  flag = multihost_utils.broadcast_one_to_all(np.int32(ok))
  if not int(flag) and jax.process_index() != 0:
    raise WorkdirError(f"process 0 could not {what} (its log says why)")


@contextlib.contextmanager
def hold(workdir, *, lock: bool = True):
  """The run's hold on its workdir: takes the lock (process 0; a live holder is an error naming
  it, a stale one is taken over with a warning) and, if the run fails before `started()`, removes
  the files and directories it created, so the workdir is left as it was found."""
  run = RunDir(workdir)
  lock = lock and str(run) not in _held     # already held by this process: re-entrant
  the_lock = Lock(run) if lock and jax.process_index() == 0 else None
  owner = files.begin_tracking()
  if owner:
    _lost.clear()
  ok = False
  try:
    try:
      if the_lock is not None:
        the_lock.acquire()
      ok = True
    finally:
      if lock:
        _agree(ok, f"lock {run}")
  except BaseException:
    if owner:
      files.end_tracking(roll_back=False)
    raise
  if lock:
    _held.add(str(run))
  try:
    yield run
  except BaseException:
    if the_lock is not None:
      the_lock.stop_heartbeat()
    if owner:
      files.end_tracking(roll_back=True)
    raise
  finally:
    if owner:
      files.end_tracking(roll_back=False)
    if lock:
      _held.discard(str(run))
    if the_lock is not None:
      the_lock.release()


def held(path) -> bool:
  """Whether `path` lies in a workdir this process holds."""
  p = str(files.as_path(path))
  return any(p == h or p.startswith(h.rstrip("/") + "/") for h in _held)


def started() -> None:
  """The run has made its first step: what it wrote now stays, whatever happens."""
  files.end_tracking(roll_back=False)
