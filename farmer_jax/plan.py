"""`--mode=plan`: will this config fit, and how much compute is it? Decided before renting a pod.

    python -m farmer_jax.main --mode=plan --config=configs/imagenet256_1p9b.py:16 --workdir=/tmp/plan \
        --plan_devices=64 --plan_device_memory_gib=80            # fake CPU devices (approximate)
    python -m farmer_jax.main --mode=plan --config=... --workdir=/tmp/plan --plan_topology=v5p:4x8x8
                                                                 # TPU ahead-of-time (needs libtpu)

Prints one JSON object (also written to <workdir>/plan.json): parameter counts from shapes only
(`jax.eval_shape`, nothing allocated), matmul FLOPs per training example, and the per-device memory
of the compiled train step (`jit(...).lower(...).compile().memory_analysis()`) under the config's
mesh, rules, batch size, remat policy and gradient accumulation. On fake CPU devices XLA's CPU
compiler sizes the buffers: a close guide for GPUs; TPU topologies give the TPU compiler's own figures.
"""
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from farmer_jax import config_check, metrics, sharding, train
from farmer_jax.models import farmer, layers

GIB = 1024 ** 3


def count_params(model_config: farmer.ModelConfig) -> dict[str, int]:
  """{"params_af", "params_prior", "params_total"} from shapes alone."""
  c = model_config
  model = farmer.Farmer(c)
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)},
      jnp.zeros((1, c.image_size, c.image_size, c.channels)), jnp.zeros((1,), jnp.int32)))
  count = lambda tree: int(sum(math.prod(a.shape) for a in jax.tree.leaves(tree)))
  params = shapes["params"]
  af, prior = count(params.get("flow", {})), count(params["prior"])
  return {"params_af": af, "params_prior": prior, "params_total": af + prior}


def tpu_devices(topology: str):
  """Devices of a TPU slice for ahead-of-time compilation on this machine (libtpu, no TPU needed).

  topology: "v5p:4x8x8", "v5e:16x16", "v6e:16x16", "v4:4x4x8", ...
  """
  try:
    from jax.experimental import topologies
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except Exception as e:  # libtpu missing or an unknown topology name
    raise RuntimeError(
        f"--plan_topology={topology}: TPU ahead-of-time compilation failed ({e}). It needs libtpu: "
        f"pip install 'jax[tpu]=={jax.__version__}' (no TPU required); names look like "
        f"v5p:4x8x8, v5e:16x16, v6e:16x16, v4:4x4x8.") from e


def memory_of_train_step(config: ml_collections.ConfigDict, devices) -> dict:
  """Compiles the train step for `devices` (abstract shapes only) and reads its memory analysis."""
  # The attention kernel (`auto`, splash) is the one of the devices compiled for, not this host's.
  with layers.compiling_for(devices[0].platform):
    return _compile_train_step(config, devices)


def _compile_train_step(config: ml_collections.ConfigDict, devices) -> dict:
  trainer = train.Trainer(config, devices=devices)
  t, mesh = config.train, trainer.mesh
  shards = sharding.batch_shards(mesh, trainer.rules)
  micro = t.batch_size // t.grad_accum_steps
  # Before the compile, which can take minutes: a wrong mesh or batch split shows at once.
  logging.info("plan: mesh %s over %d %s devices (config.sharding.mesh = %s); batch %d over %d "
               "batch shards: %d examples per device per step%s", dict(mesh.shape), len(devices),
               devices[0].device_kind, dict(config.sharding.mesh), t.batch_size, shards,
               t.batch_size // shards,
               f" in {t.grad_accum_steps} micro-batches of {micro // shards}"
               if t.grad_accum_steps > 1 else "")
  logging.info("compiling the train step for %d %s devices (this can take minutes)", len(devices),
               devices[0].device_kind)
  start = time.perf_counter()
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(trainer.mesh))
  out = {"mesh": dict(trainer.mesh.shape), "device_kind": devices[0].device_kind,
         "attention": layers.resolve_attention(config.model.attention),
         "num_devices": len(devices)}
  with jax.set_mesh(trainer.mesh):
    lowered = trainer.train_step.lower(trainer.abstract_state,
                                       trainer.abstract_batch(config.train.batch_size), key)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      # The TPU compiler refuses a step that does not fit its HBM: that is the plan's answer.
      logging.warning("the train step does not fit one device: %s", e)
      out.update(fits=False, compile_error=str(e).strip().splitlines()[0],
                 compile_s=round(time.perf_counter() - start, 1))
      return out
  compile_s = time.perf_counter() - start
  logging.info("compiled in %.1f s", compile_s)
  mem = compiled.memory_analysis()
  out["compile_s"] = round(compile_s, 1)
  if mem is not None:
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    out.update(
        state_and_batch_gib=args / GIB,
        temp_gib=temp / GIB,
        # Donated state: outputs reuse the argument buffers (alias), so they are not counted twice.
        peak_gib=(args + outs - alias + temp) / GIB,
    )
  cost = compiled.cost_analysis()
  if isinstance(cost, list):   # older JAX returned one dict per partition
    cost = cost[0] if cost else None
  if cost and "flops" in cost:
    # XLA's count covers every op, but each while-loop body once: with scan_layers it undercounts
    # the layers (the analytic flops_per_example does not).
    out["xla_flops_per_device"] = float(cost["flops"])
    out["xla_flops_counts_loop_bodies_once"] = bool(config.model.scan_layers)
  return out


def plan(config: ml_collections.ConfigDict, *, devices=None, device_memory_gib: float | None = None,
         device_kind: str | None = None, compile_step: bool = True) -> dict:
  """The plan as a dict (see the module docstring). `device_kind` (e.g. "H100") names the
  accelerator the fake CPU devices stand for, for the ideal step time at its peak FLOP/s."""
  model_config = config_check.validate(config)
  devices = jax.devices() if devices is None else devices
  t = config.train
  result = {
      "config": {"image_size": model_config.image_size, "patch_size": model_config.patch_size,
                 "tokens": model_config.num_tokens, "token_dim": model_config.token_dim,
                 "batch_size": t.batch_size, "grad_accum_steps": t.grad_accum_steps,
                 "remat": model_config.remat, "scan_layers": model_config.scan_layers,
                 "dtype": model_config.dtype},
      **count_params(model_config),
  }
  fwd = farmer.forward_flops_per_example(model_config)
  result["flops_per_example"] = {"forward_af": fwd["af"], "forward_prior": fwd["prior"],
                                 "train": farmer.train_flops_per_example(model_config)}
  result["train_flops_per_step"] = result["flops_per_example"]["train"] * t.batch_size
  device_kind = device_kind or devices[0].device_kind
  result["device_kind"] = device_kind
  peak = metrics.peak_tflops(device_kind)
  if compile_step:
    mem = memory_of_train_step(config, devices)
    result["memory"] = mem
    if device_memory_gib and "peak_gib" in mem:
      mem["device_memory_gib"] = device_memory_gib
      mem["fits"] = mem["peak_gib"] <= device_memory_gib
  if peak:
    # At 100% MFU; divide by the MFU you expect (40-60% is typical for such Transformers).
    per_step_s = result["train_flops_per_step"] / (len(devices) * peak * 1e12)
    result["peak_tflops_per_device"] = peak
    result["ideal_step_s"] = per_step_s
  logging.info("plan: %s", result)
  return result
