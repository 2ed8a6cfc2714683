"""The run directory: every file under --workdir is laid out, written and read here.

All I/O goes through `etils.epath`, so a `gs://` workdir (or any filesystem that epath reaches
through tf.io.gfile or fsspec) behaves like a local one. Layout (`RunDir`):

  checkpoints/<step>/          Orbax checkpoints (`Checkpointer`); damaged ones are moved aside to
  damaged_checkpoints/<step>   (never deleted)
  lock.json                    the live run's holder: host, pid, start, heartbeat (`hold`)
  config.json                  the config of the first run (`check_config`)
  train_log.jsonl              one line per log interval, no step twice after a resume
  events.out.tfevents.*        TensorBoard (farmer_jax/summary.py)
  plan.json                    --mode=plan
  eval/metrics.json            the latest evaluation; eval/history.jsonl one line per
                               (step, mode, params); eval/fid_<step>_<tag>.json
  samples/samples_<step>.npz   end-of-run samples (never replaced); --mode=sample writes
                               samples_<step>_<tag>.npz, the tag naming decoder, guidance, seed and
                               a hash of the full sample config, recorded inside the npz (`info`)
  distill/, afm/               the distillation and AFM-on-latents runs, the same layout inside

Writes are atomic (a temporary name, then a rename) and made by process 0 only. JSON is strict:
a non-finite number is written as null and named in a "status" field. A run that fails before its
first step removes what it created (`hold`), so a corrected config can start in the same workdir.
"""
import contextlib
import datetime
import errno
import hashlib
import io
import json
import math
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
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

DECODERS = ("auto", "exact", "student")


class WorkdirError(RuntimeError):
  """A problem with the workdir that the user fixes (locked, full, read-only, damaged): main prints
  its message as one line, without a traceback."""


# ---------------------------------------------------------------------------------------------
# Paths.
# ---------------------------------------------------------------------------------------------


def as_path(workdir) -> epath.Path:
  """An epath.Path; local paths are made absolute (Orbax needs absolute paths)."""
  if not isinstance(workdir, epath.Path):
    workdir = os.fspath(workdir)
    if "://" not in workdir:
      workdir = os.path.abspath(workdir)
  return epath.Path(workdir)


def is_remote(path) -> bool:
  return "://" in str(path)


class RunDir:
  """The layout of one run directory (a FARMER run, or its distill/ and afm/ sub-runs)."""

  def __init__(self, workdir):
    self.path = workdir.path if isinstance(workdir, RunDir) else as_path(workdir)

  def __str__(self) -> str:
    return str(self.path)

  def sub(self, name: str) -> "RunDir":
    return RunDir(self.path / name)

  @property
  def distill(self) -> "RunDir":
    return self.sub("distill")

  @property
  def afm(self) -> "RunDir":
    return self.sub("afm")

  checkpoints = property(lambda self: self.path / "checkpoints")
  damaged = property(lambda self: self.path / "damaged_checkpoints")
  lock = property(lambda self: self.path / "lock.json")
  config = property(lambda self: self.path / "config.json")
  train_log = property(lambda self: self.path / "train_log.jsonl")
  plan = property(lambda self: self.path / "plan.json")
  eval_dir = property(lambda self: self.path / "eval")
  metrics = property(lambda self: self.path / "eval" / "metrics.json")
  history = property(lambda self: self.path / "eval" / "history.jsonl")
  samples_dir = property(lambda self: self.path / "samples")
  teacher = property(lambda self: self.path / "teacher.json")       # distill/teacher.json
  farmer = property(lambda self: self.path / "farmer.json")         # afm/farmer.json
  latent_stats = property(lambda self: self.path / "latent_stats.json")

  def samples(self, step: int, tag: str = "", suffix: str = "npz") -> epath.Path:
    return self.samples_dir / f"samples_{step}{'_' + tag if tag else ''}.{suffix}"


# ---------------------------------------------------------------------------------------------
# Writing and reading files (process 0 writes; every write is atomic).
# ---------------------------------------------------------------------------------------------

# Paths this process created since the current `hold` began, removed if the run fails before its
# first step (None outside a hold, or once the run has started).
_created: list[epath.Path] | None = None


def _note_created(path: epath.Path) -> None:
  if _created is not None:
    _created.append(path)


def _mkdirs(directory: epath.Path) -> None:
  missing = []
  d = directory
  while not d.exists() and d != d.parent:
    missing.append(d)
    d = d.parent
  for m in reversed(missing):
    m.mkdir(exist_ok=True)
    _note_created(m)


def write_bytes(path, data: bytes, tmp_name: str | None = None) -> epath.Path:
  """Atomic write of `data` to `path` (process 0 only): written as `tmp_name` (default: a hidden
  name beside it), then renamed. A full or read-only disk raises WorkdirError naming the path,
  and no temporary file is left behind."""
  path = epath.Path(path)
  if jax.process_index() != 0:
    return path
  tmp = path.parent / (tmp_name or f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  existed = path.exists()
  try:
    _mkdirs(path.parent)
    tmp.write_bytes(data)
    tmp.replace(path)
  except OSError as e:
    with contextlib.suppress(Exception):
      if tmp.exists():
        tmp.unlink()
    raise write_error(path, e) from e
  if not existed:
    _note_created(path)
  return path


def write_error(path, e: BaseException) -> WorkdirError:
  """One line naming the path and what to do."""
  reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
  hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
          errno.EROFS: "make it writable", errno.EACCES: "fix its permissions",
          errno.EPERM: "fix its permissions"}.get(getattr(e, "errno", None),
                                                  "check the filesystem")
  return WorkdirError(f"cannot write {path}: {reason}; {hint} or use another --workdir, then "
                      f"rerun the same command (it resumes from the last complete checkpoint)")


def strict_json(payload):
  """`payload` with every non-finite float replaced by None -> (clean payload, [dotted keys])."""
  bad = []

  def clean(v, key):
    if isinstance(v, dict):
      return {k: clean(x, f"{key}.{k}" if key else str(k)) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [clean(x, f"{key}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, (float, np.floating)) and not math.isfinite(v):
      bad.append(key)
      return None
    if isinstance(v, np.generic):
      return v.item()
    return v

  return clean(payload, ""), bad


def dumps(payload: dict, indent: int | None = None) -> str:
  """Strict JSON: non-finite numbers become null and a "status" field names them."""
  clean, bad = strict_json(payload)
  if bad and isinstance(clean, dict):
    clean["status"] = "non-finite: " + ", ".join(bad)
  return json.dumps(clean, indent=indent, sort_keys=True, allow_nan=False)


def write_json(path, payload: dict) -> epath.Path:
  path = write_bytes(path, (dumps(payload, indent=2) + "\n").encode())
  if jax.process_index() == 0:
    logging.info("wrote %s", path)
  return path


def read_json(path) -> dict | None:
  path = epath.Path(path)
  if not path.exists():
    return None
  return json.loads(path.read_text())


def read_jsonl(path) -> list[dict]:
  """The lines of a JSONL file; a torn last line (a crash mid-write elsewhere) is skipped."""
  path = epath.Path(path)
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    with contextlib.suppress(json.JSONDecodeError):
      out.append(json.loads(line))
  return out


def _write_jsonl(path, records: list[dict]) -> None:
  write_bytes(path, "".join(dumps(r) + "\n" for r in records).encode())


def append_jsonl(path, record: dict, key: tuple[str, ...] | None = None) -> bool:
  """Appends one line (process 0). With `key` (field names), a record whose key fields equal an
  existing line's is not added again. A local file is appended to; on an object store, which
  cannot append, the file is rewritten whole, atomically. Returns whether the line was added."""
  if jax.process_index() != 0:
    return False
  path = epath.Path(path)
  if key is None and not is_remote(path):
    try:
      existed = path.exists()
      _mkdirs(path.parent)
      with open(os.fspath(path), "a") as f:   # noqa: PTH123 (a local append; remote is below)
        f.write(dumps(record) + "\n")
    except OSError as e:
      raise write_error(path, e) from e
    if not existed:
      _note_created(path)
    return True
  records = read_jsonl(path)
  if key is not None:
    ident = tuple(record.get(k) for k in key)
    if any(tuple(r.get(k) for k in key) == ident for r in records):
      logging.info("%s already has a line for %s = %s: not added again", path, key, ident)
      return False
  _write_jsonl(path, records + [record])
  return True


def truncate_log(path, last_step: int) -> None:
  """Drops the lines of a step log after `last_step`: a resumed run replays those steps."""
  if jax.process_index() != 0:
    return
  records = read_jsonl(path)
  kept = [r for r in records if r.get("step", 0) <= last_step]
  if len(kept) != len(records):
    _write_jsonl(path, kept)


def png_bytes(image_HxWxC: np.ndarray) -> bytes:
  buf = io.BytesIO()
  c = image_HxWxC.shape[-1]
  Image.fromarray(image_HxWxC[..., 0] if c == 1 else image_HxWxC).save(buf, format="PNG")
  return buf.getvalue()


def write_png(path, image_HxWxC: np.ndarray) -> epath.Path:
  return write_bytes(path, png_bytes(image_HxWxC))


def write_npz(path, **arrays) -> epath.Path:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return write_bytes(path, buf.getvalue())


def hashed(payload) -> str:
  """Six hex digits naming a set of settings."""
  return hashlib.sha1(dumps(payload).encode()).hexdigest()[:6]


def unique(path) -> epath.Path:
  """`path`, or `<stem>-2<suffix>`, `-3`, ... when it exists: outputs are never replaced."""
  path = epath.Path(path)
  n = 2
  candidate = path
  while candidate.exists():
    candidate = path.parent / f"{path.stem}-{n}{path.suffix}"
    n += 1
  return candidate


def sample_tag(sample_cfg: ml_collections.ConfigDict, decoder: str, extra: dict | None = None
               ) -> str:
  """A file-name tag saying what made a set of samples: `sample.name` if set, else decoder,
  guidance, seed and a hash of every sample setting (and `extra`), e.g. exact_resample_s0_1a2b3c."""
  settings = {**sample_cfg.to_dict(), "decoder": decoder, **(extra or {})}
  if sample_cfg.get("name"):
    return str(sample_cfg.name)
  return (f"{decoder}_{sample_cfg.get('guidance', 'none')}_s{sample_cfg.get('seed', 0)}_"
          f"{hashed(settings)}")


def exists(path) -> bool:
  return epath.Path(path).exists()


def read_npz(path) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(epath.Path(path).read_bytes())) as z:
    return {k: z[k] for k in z.files}


def keep_existing_samples(npz, info: dict, requested: bool) -> bool:
  """Whether samples `npz` exist already: then they are kept, never redrawn over. A requested
  name (--mode=sample's tag or `sample.name`) made with other settings than `info` (step,
  decoder, seed, sample config) is an error rather than old images returned as new; a run's own
  end-of-run samples stay as they are, with a warning."""
  if not exists(npz):
    return False
  saved = read_npz(npz).get("info")
  made_by = json.loads(str(saved)) if saved is not None else None
  if made_by == json.loads(dumps(info)):
    logging.info("%s exists (same step and sample settings): kept", npz)
  elif requested:
    raise ValueError(f"{npz} exists and was made with other settings ({made_by}); choose another "
                     f"--config.sample.name")
  else:
    logging.warning("%s exists, made with other sample settings: kept (--mode=sample writes "
                    "samples with these settings under their own name)", npz)
  return True


# ---------------------------------------------------------------------------------------------
# config.json: a workdir keeps its model and data.
# ---------------------------------------------------------------------------------------------

_DATA_IDENTITY = ("name", "image_size", "channels", "num_classes", "num_levels")
# Model fields that change how the step runs but not the parameters: free to change on resume.
_MODEL_NOT_IDENTITY = ("remat", "dtype")


def check_config(config: ml_collections.ConfigDict, run: RunDir, record: bool = True,
                 extra: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> None:
  """Records config.json on first use (unless not `record`); later runs must keep the model and
  data the same, so that a mismatch is a clear error rather than a shape failure deep inside a
  checkpoint restore. `extra`: (section, fields) pairs that must match too where the saved
  config has them (AFM's network sizes)."""
  current = json.loads(config.to_json_best_effort())
  saved = read_json(run.config)
  if saved is None:
    if record:
      write_json(run.config, current)
    return
  checks = [("model", None, False), ("data", _DATA_IDENTITY, False)]
  checks += [(section, keys, True) for section, keys in extra]
  for section, keys, only_saved in checks:
    for key in sorted(keys or set(saved.get(section, {})) | set(current[section])):
      if section == "model" and key in _MODEL_NOT_IDENTITY:
        continue
      if only_saved and key not in saved.get(section, {}):
        continue   # a field older workdirs did not record
      old, new = saved.get(section, {}).get(key), current[section].get(key)
      if old != new:
        raise ValueError(
            f"config.{section}.{key} = {new!r} but {run} was trained with {old!r}; use "
            f"the same config or a new --workdir")


# ---------------------------------------------------------------------------------------------
# The lock: one live run per workdir.
# ---------------------------------------------------------------------------------------------

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
    return dumps({**self.record, "heartbeat": time.time()}).encode()

  def _holder(self) -> dict | None:
    try:
      return read_json(self.run.lock)
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
    if is_remote(path):
      write_bytes(path, self._payload())
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
    _mkdirs(path.parent)
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
    _note_created(path)

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
        write_bytes(self.run.lock, self._payload())
      except Exception as e:  # noqa: BLE001 (a failed beat must not kill the run; the next retries)
        logging.warning("lock heartbeat of %s failed: %s", self.run, e)

  def stop_heartbeat(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)

  def release(self) -> None:
    self.stop_heartbeat()
    with contextlib.suppress(Exception):
      holder = read_json(self.run.lock)
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
  global _created
  run = RunDir(workdir)
  lock = lock and str(run) not in _held     # already held by this process: re-entrant
  the_lock = Lock(run) if lock and jax.process_index() == 0 else None
  outer = _created
  if outer is None:
    _created = []
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
    if outer is None:
      _created = None
    raise
  if lock:
    _held.add(str(run))
  try:
    yield run
  except BaseException:
    if the_lock is not None:
      the_lock.stop_heartbeat()
    if _created and outer is None:
      _roll_back(_created)
    raise
  finally:
    if outer is None:
      _created = None
    if lock:
      _held.discard(str(run))
    if the_lock is not None:
      the_lock.release()


def held(path) -> bool:
  """Whether `path` lies in a workdir this process holds."""
  p = str(as_path(path))
  return any(p == h or p.startswith(h.rstrip("/") + "/") for h in _held)


def started() -> None:
  """The run has made its first step: what it wrote now stays, whatever happens."""
  global _created
  if _created is not None:
    _created.clear()
    _created = None


def _roll_back(created: list[epath.Path]) -> None:
  if jax.process_index() != 0:
    return
  for path in reversed(created):
    with contextlib.suppress(Exception):
      if path.is_dir():
        if not any(path.iterdir()):
          path.rmdir()
      elif path.exists():
        path.unlink()
  logging.info("the run failed before its first step: removed what it had written (%d paths)",
               len(created))


# ---------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------


class Checkpointer:
  """Orbax CheckpointManager for one pytree (a train state) in `<run>/checkpoints`.

  Orbax writes each step under a temporary name and commits it when complete, so a run killed at
  any moment (SIGKILL included) leaves the last complete checkpoint as `latest_step()`. A newer
  checkpoint that cannot be read while an older one can, onto the same target, is damaged (a
  truncated or missing file): it is moved aside to damaged_checkpoints/ with a warning (in a
  workdir this process holds; elsewhere it is only skipped) and the older one is restored. When
  none restores, nothing is moved: the target (a changed config) is the likelier cause.
  """

  def __init__(self, run, *, max_to_keep: int | None = 3, read_only: bool = False):
    self.run = run if isinstance(run, RunDir) else RunDir(run)
    self.directory = self.run.checkpoints
    self.read_only = read_only
    if not read_only:
      if jax.process_index() == 0 and not self.directory.exists():
        _mkdirs(self.directory)
      _sync(f"farmer_jax checkpoints dir {self.directory}")
    self.manager = self._manager(max_to_keep)

  def _manager(self, max_to_keep=3) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=False, read_only=self.read_only,
            cleanup_tmp_directories=not self.read_only,
            enable_async_checkpointing=not self.read_only))

  def latest_step(self) -> int | None:
    if not self.directory.exists():
      return None
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    if not self.directory.exists():
      return []
    return sorted(self.manager.all_steps())

  def save(self, step: int, state) -> None:
    """Starts an async save of `step` (failures surface here or in `wait`, as WorkdirError)."""
    try:
      self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    except Exception as e:
      raise self._save_error(e) from e

  def _save_error(self, e: Exception) -> Exception:
    text = str(e)
    for code, needle in ((errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only file system"),
                         (errno.EACCES, "Permission denied"), (errno.EDQUOT, "quota")):
      if needle in text:
        return write_error(self.directory, OSError(code, needle))
    return e

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(e) from e

  def close(self) -> None:
    self.wait()
    self.manager.close()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def restore(self, abstract_state, step: int | None = None, fields: tuple[str, ...] | None = None):
    """Step `step` (default: the newest intact one) onto the shardings and dtypes of
    `abstract_state` (a pytree of `jax.ShapeDtypeStruct` with `.sharding`, so every host reads
    only its own shards). `fields` (e.g. ("step", "ema_params")) reads only those fields of the
    state, never the rest (the optimiser moments of a frozen teacher) -> {field: value}."""
    if step is not None:
      return self._restore(abstract_state, step, fields)
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    failed = []
    for candidate in steps:
      try:
        restored = self._restore(abstract_state, candidate, fields)
        ok = True
      except Exception as e:  # noqa: BLE001 (judged below, against the older checkpoints)
        restored, ok = None, False
        failed.append((candidate, e))
        logging.warning("checkpoint step %d in %s could not be restored (%s: %s); trying the "
                        "previous one", candidate, self.directory, type(e).__name__,
                        _first_line(e))
      if _all_ok(ok):   # every process read its shards: the newer failures were damage
        for bad, error in failed:
          self._move_aside(bad, error)
        return restored
    step0, error0 = failed[0]
    raise WorkdirError(
        f"no checkpoint in {self.directory} restores onto this run's state (steps "
        f"{[f for f, _ in failed]}; step {step0}: {type(error0).__name__}: {_first_line(error0)}). "
        f"If the config changed, rerun with the one the workdir was trained with (config.json) "
        f"or use a new --workdir; nothing was moved") from error0

  def _restore(self, abstract_state, step: int, fields):
    logging.info("restoring %scheckpoint step %d from %s",
                 f"{', '.join(fields)} of " if fields else "", step, self.directory)
    if fields is None:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    subset = {f: getattr(abstract_state, f) for f in fields}
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        subset)
    # A manager of its own: one that has restored with StandardRestore refuses PyTreeRestore.
    manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False))
    try:
      return manager.restore(step, args=ocp.args.PyTreeRestore(
          item=subset, restore_args=restore_args, partial_restore=True))
    finally:
      manager.close()

  def _move_aside(self, step: int, error: Exception) -> None:
    """A damaged step goes to damaged_checkpoints/<step>-<time> (never deleted), so that the run
    can save that step number again; outside a held workdir it is left in place."""
    if self.read_only and not held(self.run.path):
      logging.warning("checkpoint step %d of %s is damaged (%s); left in place (not this run's "
                      "workdir)", step, self.directory, _first_line(error))
      return
    target = self.run.damaged / f"{step}-{int(time.time())}"
    logging.warning("checkpoint step %d in %s is damaged (%s: %s); moved to %s", step,
                    self.directory, type(error).__name__, _first_line(error), target)
    if jax.process_index() == 0:
      _mkdirs(self.run.damaged)
      (self.directory / str(step)).rename(target)
    _sync(f"farmer_jax damaged checkpoint {step}")
    self.manager.reload()


def _first_line(e: BaseException) -> str:
  return (str(e).splitlines() or [""])[0][:300]


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)


def _all_ok(ok: bool) -> bool:
  """Whether `ok` holds on every process (each reads only its own shards of a checkpoint)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def latest_checkpointer(run: RunDir, what: str, how: str) -> Checkpointer:
  """A read-only Checkpointer of `run` that holds at least one checkpoint; else a clear error
  (`how`: the command that makes one)."""
  ckpt = Checkpointer(run, read_only=True)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"no {what}checkpoint in {ckpt.directory}: {how}")
  return ckpt


# ---------------------------------------------------------------------------------------------
# Which decoder samples: the distilled student or the exact inverse.
# ---------------------------------------------------------------------------------------------


def has_student(workdir) -> bool:
  """Whether <workdir>/distill holds a complete student checkpoint."""
  run = RunDir(workdir).distill
  return run.checkpoints.exists() and Checkpointer(run, read_only=True).latest_step() is not None


def require_student(workdir) -> None:
  if not has_student(workdir):
    raise FileNotFoundError(
        f"no distilled student in {RunDir(workdir).distill}: run the distillation phase first "
        f"(python -m farmer_jax.main --config=...,distill --workdir={workdir}, or "
        f"--config.phase=distill), or set --config.sample.decoder=exact")


def decoder(config: ml_collections.ConfigDict, workdir) -> str:
  """`sample.decoder` resolved for the FARMER run in `workdir`: "student" or "exact"."""
  choice = config.sample.get("decoder", "auto")
  if choice not in DECODERS:
    raise ValueError(f"config.sample.decoder = {choice!r}: must be one of {DECODERS}")
  if choice == "student":
    require_student(workdir)
  if choice == "auto":
    return "student" if has_student(workdir) else "exact"
  return choice
