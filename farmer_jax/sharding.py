"""Device mesh from the config, logical-axis rules -> NamedShardings, batch placement.

The model names the axes of its parameters and activations logically (`models/layers.py`:
`embed`, `mlp`, `heads`, ..., `act_batch`, ...). The config holds the only mesh-axis names:

    config.sharding.mesh  = {"data": -1, "fsdp": 1, "tensor": 1}   # axis -> size, -1: the rest
    config.sharding.rules = (("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ...)

Mesh axes are laid out in the order given (the last varies fastest over the device list, so put the
axis with the most communication, `tensor`, last). The batch is split over the mesh axes that the
`act_batch` rule names. A parameter dimension that a mesh axis does not divide stays whole on that
dimension (it is small: the big ones are multiples of 64).
"""
from collections.abc import Callable, Mapping, Sequence
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

from farmer_jax.config_base import ConfigError
from farmer_jax.models import layers

Rules = tuple[tuple[str, Any], ...]


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves the one -1 size; raises naming config.sharding.mesh when sizes do not fit."""
  sizes = dict(mesh_config)
  if not sizes:
    raise ConfigError("config.sharding.mesh is empty: give at least one axis, e.g. {'data': -1}")
  bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or (v < 1 and v != -1)}
  if bad:
    raise ConfigError(f"config.sharding.mesh sizes must be positive integers or -1, got {bad}")
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ConfigError(f"config.sharding.mesh: at most one size may be -1, got {free}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"config.sharding.mesh = {sizes}: the fixed sizes (product {fixed}) do not "
                       f"divide the {num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f"config.sharding.mesh = {sizes} has {fixed} devices but there are "
                     f"{num_devices}; set one size to -1 to take the rest")
  return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A mesh with Auto axis types over `devices` (default: all, every process's)."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(mesh_config, len(devices))
  names = tuple(sizes)
  return jax.make_mesh(tuple(sizes.values()), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def rules_from_config(rules_config) -> Rules:
  """The config's rule table as a tuple of (logical name, mesh axis | tuple of axes | None)."""
  rules = []
  for i, rule in enumerate(rules_config):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"config.sharding.rules[{i}] = {rule!r}: must be (logical_name, mesh_axes)")
    axes = rule[1]
    rules.append((rule[0], tuple(axes) if isinstance(axes, (list, tuple)) else axes))
  return tuple(rules)


def check_rules(rules: Rules, mesh: jax.sharding.Mesh) -> None:
  for name, axes in rules:
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in mesh.axis_names:
        raise ConfigError(f"config.sharding.rules maps {name!r} to mesh axis {axis!r}, which is not "
                         f"in config.sharding.mesh {tuple(mesh.axis_names)}")


def logical_sharding(mesh, rules: Rules, names: Sequence[str | None],
                     shape: Sequence[int] | None = None) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  return NamedSharding(mesh, spec if shape is None else layers.fit_spec(spec, shape, mesh))


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def unbox(tree):
  """Strips flax's logical-partitioning boxes (no sharding constraint applied)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree,
                      is_leaf=_is_box)


def tree_shardings(boxed_tree, mesh, rules: Rules):
  """NamedShardings for an (abstract) pytree whose leaves may be flax logical boxes.

  -> a pytree shaped like `unbox(boxed_tree)`; unboxed leaves (steps, counters) are replicated.
  """
  def one(x):
    if _is_box(x):
      value = x.unbox(apply_constraint=False)
      return logical_sharding(mesh, rules, x.names, value.shape)
    return NamedSharding(mesh, P())
  return jax.tree.map(one, boxed_tree, is_leaf=_is_box)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh, rules: Rules) -> NamedSharding:
  """Leading (batch) axis split over the mesh axes of the `act_batch` rule, the rest whole."""
  return logical_sharding(mesh, rules, (layers.ACT_BATCH,))


def batch_shards(mesh, rules: Rules) -> int:
  """Into how many pieces the batch is split."""
  return layers.mesh_axes_size(mesh, batch_sharding(mesh, rules).spec[0])


def check_batch_size(global_batch: int, mesh, rules: Rules, field: str) -> None:
  n = batch_shards(mesh, rules)
  if global_batch % n:
    raise ConfigError(f"{field} = {global_batch} must be divisible by the {n} batch shards (mesh "
                     f"axes {batch_sharding(mesh, rules).spec[0]} of {dict(mesh.shape)})")


def to_global(local_batch: dict, mesh, rules: Rules) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded along the batch axis.

  Each process passes its own contiguous share of the global batch, process 0 first."""
  sharding = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def mesh_and_rules(sharding_config, devices: Sequence[Any] | None = None
                   ) -> tuple[jax.sharding.Mesh, Rules]:
  """`config.sharding` -> (mesh over `devices` or all devices, its checked logical-axis rules)."""
  mesh = make_mesh(sharding_config.mesh, devices)
  rules = rules_from_config(sharding_config.rules)
  check_rules(rules, mesh)
  return mesh, rules


def with_rules(rules: Rules, fn):
  """fn traced under the logical-axis rules `rules`."""
  def wrapped(*args):
    with nn.logical_axis_rules(rules):
      return fn(*args)
  return wrapped


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings`: a restore target for checkpoints."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


class ShardedState(NamedTuple):
  """A training state's placement, for every phase: `shardings` (a NamedSharding per leaf, from
  the logical axes its parameters name), `abstract` (ShapeDtypeStructs carrying them: what a
  checkpoint restores onto) and `init` (jitted: each device materialises only its own shards)."""
  shardings: Any
  abstract: Any
  init: Callable


def sharded_state(boxed_state: Callable[[], Any], make_state: Callable, mesh, rules: Rules,
                  in_shardings: tuple = ()) -> ShardedState:
  """`boxed_state()` builds the state with flax's logical-axis boxes kept (it only runs under
  `jax.eval_shape`: shapes and axes, nothing allocated); `make_state(*args)` builds it for real,
  from arguments placed as `in_shardings`."""
  boxed = jax.eval_shape(with_rules(rules, boxed_state))
  shardings = tree_shardings(boxed, mesh, rules)
  init = jax.jit(with_rules(rules, make_state), in_shardings=in_shardings,
                 out_shardings=shardings)
  return ShardedState(shardings, abstract_like(unbox(boxed), shardings), init)
