"""Files under a workdir: paths, atomic process-0 writes through etils.epath, strict JSON, logs,
npz and PNG, sample tags, and the config.json check. Also the record of what a run created, so
that a run failing before its first step can remove it (`begin_tracking` / `end_tracking`)."""
import contextlib
import errno
import hashlib
import io
import json
import math
import os
import uuid

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
from PIL import Image

from farmer_jax.config_base import ConfigError


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

# Paths this process created since the current run's hold began, removed if the run fails before
# its first step (None outside a hold, or once the run has started).
_created: list[epath.Path] | None = None


def note_created(path: epath.Path) -> None:
  if _created is not None:
    _created.append(path)


def begin_tracking() -> bool:
  """Starts recording what this process creates; False if a record is running already (a
  nested hold), whose owner ends it."""
  global _created
  if _created is not None:
    return False
  _created = []
  return True


def end_tracking(roll_back: bool) -> None:
  """Stops recording; with `roll_back`, first removes what was created (process 0), newest first,
  directories only when empty."""
  global _created
  created, _created = _created, None
  if not roll_back or not created or jax.process_index() != 0:
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


def mkdirs(directory: epath.Path) -> None:
  missing = []
  d = directory
  while not d.exists() and d != d.parent:
    missing.append(d)
    d = d.parent
  for m in reversed(missing):
    m.mkdir(exist_ok=True)
    note_created(m)


def write_bytes(path, data: bytes, tmp_name: str | None = None) -> epath.Path:
  """Atomic write of `data` to `path` (process 0 only): written as `tmp_name` (default: a hidden
  name beside it), then renamed. A full or read-only disk raises WorkdirError naming the path,
  and no temporary file is left behind."""
  path = epath.Path(path)
  if jax.process_index() != 0:
    return path
  tmp = path.parent / (tmp_name or f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  existed = _created is None or path.exists()   # the extra stat only while a run is tracked
  try:
    mkdirs(path.parent)
    tmp.write_bytes(data)
    tmp.replace(path)
  except OSError as e:
    with contextlib.suppress(Exception):
      if tmp.exists():
        tmp.unlink()
    raise write_error(path, e) from e
  if not existed:
    note_created(path)
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
      existed = _created is None or path.exists()
      mkdirs(path.parent)
      with path.open("a") as f:   # a local file appends; an object store is rewritten below
        f.write(dumps(record) + "\n")
    except OSError as e:
      raise write_error(path, e) from e
    if not existed:
      note_created(path)
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
_MODEL_NOT_IDENTITY = ("remat", "dtype", "attention")


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
        raise ConfigError(
            f"config.{section}.{key} = {new!r} but {run} was trained with {old!r}; use "
            f"the same config or a new --workdir")
