"""Device mesh and shardings.

The single-host data-parallel layout: one `data` axis over every device, the batch split along it,
parameters replicated. Mesh axis names appear only here and in configs.
"""
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def make_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh, field: str) -> None:
  n = mesh.shape[DATA_AXIS]
  if global_batch % n:
    raise ValueError(f"{field} = {global_batch} must be divisible by the {n} devices of the "
                     f"'{DATA_AXIS}' mesh axis")


def to_global(local_batch: dict, mesh) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded along the batch axis."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
