r"""Training throughput, TFLOP/s per device and MFU of a config's jitted train step.

    python benchmarks/train_throughput.py --config=configs/imagenet256_1p1b.py:16 \
        --set train.batch_size=32 --set model.remat=dots_no_batch [--steps=10] [--out=FILE]

Builds the trainer exactly as `python -m farmer_jax.main` does (mesh, rules, shardings, donation)
on the devices present, then times `--steps` train steps after one compile-and-warm-up step. The
images are uniform random uint8 (speed does not depend on pixel values; no data set is read).
MFU counts model matmul FLOPs only (farmer.train_flops_per_example: forward + backward, no remat
recomputation) against the device's bf16 peak (metrics.PEAK_TFLOPS).

Progress goes to stderr; the last line of stdout is one JSON object.
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from farmer_jax import cli, metrics, train  # noqa: E402
from farmer_jax.models import farmer  # noqa: E402


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  cli.add_config_arguments(parser)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--out")
  args = parser.parse_args(argv)
  config = cli.load_config(args.config, args.set)
  start = time.perf_counter()
  trainer = train.Trainer(config)
  c, b = trainer.model_config, config.train.batch_size
  rng = np.random.default_rng(0)
  dev = jax.devices()[0]
  print(f"{dev.device_kind} x {jax.device_count()}, batch {b}, mesh {dict(trainer.mesh.shape)}",
        file=sys.stderr, flush=True)
  with jax.set_mesh(trainer.mesh):
    state = trainer.init()
    batch = trainer.batch_to_global({
        "image": rng.integers(0, c.num_levels, (b, c.image_size, c.image_size, c.channels),
                              dtype=np.uint8),
        "label": rng.integers(0, max(c.num_classes, 1), (b,), dtype=np.int32)})
    key = jax.random.key(0)
    t0 = time.perf_counter()
    state, scalars = trainer.train_step(state, batch, key)
    loss = float(scalars["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, scalars = trainer.train_step(state, batch, key)
      jax.block_until_ready(scalars["loss"])
      times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  result = {
      "device": dev.device_kind, "num_devices": jax.device_count(), "batch_size": b,
      "tokens": c.num_tokens, "remat": c.remat, "scan_layers": c.scan_layers, "dtype": c.dtype,
      "grad_accum_steps": config.train.grad_accum_steps,
      "params_total": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "train_flops_per_example": farmer.train_flops_per_example(c),
      "compile_and_first_step_s": round(compile_s, 2), "step_s_median": step_s,
      "examples_per_s": b / step_s, "first_loss": loss, "last_loss": float(scalars["loss"]),
      **metrics.throughput(1.0 / step_s, trainer.flops_per_step, jax.device_count(),
                           dev.device_kind),
      "wall_s": round(time.perf_counter() - start, 1),
  }
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    result["peak_memory_gib"] = stats["peak_bytes_in_use"] / 1024 ** 3
  metrics.print_json_line(result, args.out)
  return result


if __name__ == "__main__":
  main()
