"""Orbax checkpointing of the train state: periodic async saves, resume from the latest complete one.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed at
any moment (SIGKILL included) leaves the last complete checkpoint as `latest_step()`; the temporary
leftovers are ignored and cleaned up on the next start.
"""
import os

from absl import logging
import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  # Orbax needs absolute paths; remote ones (gs://...) already are.
  root = workdir if "://" in workdir else os.path.abspath(workdir)
  return os.path.join(root, "checkpoints")


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for one pytree (the train state)."""

  def __init__(self, workdir: str, *, max_to_keep: int | None = 3, read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only, enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Starts an async save; returns whether one was started."""
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, abstract_state, step: int | None = None):
    """Restores `step` (default: latest) onto the shardings and dtypes of `abstract_state`.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set, so every host reads
    only its own shards and no full copy sits on one device.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    logging.info("restoring checkpoint step %d from %s", step, self.directory)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_fields(self, abstract_state, fields: tuple[str, ...], step: int | None = None) -> dict:
    """Only `fields` of a saved state (e.g. ("step", "ema_params")), each onto the shardings of
    `abstract_state`'s field: the rest (the optimiser's moments, the raw weights) is never read,
    so a frozen teacher costs its weights once, not four times. -> {field: value}."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    subset = {f: getattr(abstract_state, f) for f in fields}
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        subset)
    logging.info("restoring %s of checkpoint step %d from %s", ", ".join(fields), step,
                 self.directory)
    # A manager of its own: one that has restored with StandardRestore refuses PyTreeRestore.
    manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False))
    try:
      return manager.restore(step, args=ocp.args.PyTreeRestore(
          item=subset, restore_args=restore_args, partial_restore=True))
    finally:
      manager.close()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying `shardings`, the restore target for `Checkpointer.restore`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
