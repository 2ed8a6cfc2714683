"""Checkpoints of a workdir (Orbax), restored past damaged ones, and which decoder samples: the
distilled student or the exact inverse."""
import errno
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from farmer_jax.rundir import files, lock
from farmer_jax.rundir.files import RunDir, WorkdirError

DECODERS = ("auto", "exact", "student")




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
        files.mkdirs(self.directory)
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
        return files.write_error(self.directory, OSError(code, needle))
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
    if self.read_only and not lock.held(self.run.path):
      logging.warning("checkpoint step %d of %s is damaged (%s); left in place (not this run's "
                      "workdir)", step, self.directory, _first_line(error))
      return
    target = self.run.damaged / f"{step}-{int(time.time())}"
    logging.warning("checkpoint step %d in %s is damaged (%s: %s); moved to %s", step,
                    self.directory, type(error).__name__, _first_line(error), target)
    if jax.process_index() == 0:
      files.mkdirs(self.run.damaged)
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


def require_student(workdir, fix: str = "set --config.sample.decoder=exact") -> None:
  if not has_student(workdir):
    raise FileNotFoundError(
        f"no distilled student in {RunDir(workdir).distill}: run the distillation phase first "
        f"(python -m farmer_jax.main --config=...,distill --workdir={workdir}, or "
        f"--config.phase=distill), or {fix}")


def decoder(config: ml_collections.ConfigDict, workdir) -> str:
  """`sample.decoder` resolved for the FARMER run in `workdir`: "student" or "exact". "auto"
  takes the student where there is one, unless `sample.inverse` asks for the parallel exact
  inverse; a Jacobi start from the student (`sample.jacobi_init`) needs one too."""
  s = config.sample
  choice = s.get("decoder", "auto")
  if choice not in DECODERS:
    raise ValueError(f"config.sample.decoder = {choice!r}: must be one of {DECODERS}")
  parallel = s.get("inverse", "sequential") != "sequential"
  if choice == "student":
    require_student(workdir)
  if parallel and s.get("jacobi_init", "previous") == "student":
    require_student(workdir, "set --config.sample.jacobi_init=previous")
  if choice == "auto":
    return "student" if has_student(workdir) and not parallel else "exact"
  return choice
