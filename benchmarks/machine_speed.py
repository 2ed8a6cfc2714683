r"""The machine's float32 matmul rate: the yardstick for wall times measured on different days.

    python benchmarks/machine_speed.py [--size=2048] [--repeats=5] [--jax] [--out=FILE]

Times `--repeats` products of two [size, size] float32 matrices with numpy (its BLAS, on every core
it is allowed) after one warm-up product, and prints GFLOP/s (2 size^3 per product): the median,
the best and each call's. On the shared 2-core machines of these pages it gave 125-141 GFLOP/s on a
day when the matmul peak had been about 290 on others, and a training run's wall time moved with it
(docs/cpu.md, "The machines' speed"): quote it beside any wall time, and compare wall times only
after dividing by it, or measure side by side in one run. `--jax` also times XLA's jitted
products of the same size: float32, bfloat16 operands with a float32 result, and bfloat16 with a
bfloat16 result (`jax_matmul_gflops`).

Progress goes to stderr; the last line of stdout is one JSON object.
"""
import argparse
import os
import sys
import time

import numpy as np


def matmul_gflops(size: int, repeats: int) -> list[float]:
  """GFLOP/s of `repeats` timed [size, size] @ [size, size] float32 products (one warm-up)."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((size, size), np.float32)
  b = rng.standard_normal((size, size), np.float32)
  a @ b
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    a @ b
    rates.append(2.0 * size ** 3 / (time.perf_counter() - t0) / 1e9)
  return rates


# Operand dtype, result dtype of the JAX products `--jax` times.
JAX_PRODUCTS = {"float32": ("float32", "float32"),
                "bfloat16_to_float32": ("bfloat16", "float32"),
                "bfloat16": ("bfloat16", "bfloat16")}


def jax_matmul_gflops(size: int, repeats: int) -> dict[str, float]:
  """Median GFLOP/s of jitted [size, size] products under XLA for each of JAX_PRODUCTS. XLA's
  CPU backend runs bfloat16 operands on AMX / AVX512-BF16 where the CPU has them only when the
  result is float32, which is why the models' products accumulate in float32 (docs/cpu.md)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  rates = {}
  for name, (operand, result) in JAX_PRODUCTS.items():
    a, b = (jax.random.normal(jax.random.key(i), (size, size)).astype(operand) for i in (0, 1))
    product = jax.jit(lambda a, b, result=result: jnp.dot(a, b, preferred_element_type=result))
    product(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      product(a, b).block_until_ready()
      times.append(time.perf_counter() - t0)
    rates[name] = round(2.0 * size ** 3 / float(np.median(times)) / 1e9, 1)
  return rates


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", type=int, default=2048)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--jax", action="store_true",
                  help="also time XLA's products: float32, bfloat16 to float32, bfloat16")
  ap.add_argument("--out", default=None, help="also write the JSON here")
  args = ap.parse_args(argv)
  if args.size < 1 or args.repeats < 1:
    ap.error(f"--size ({args.size}) and --repeats ({args.repeats}) must be >= 1")
  rates = matmul_gflops(args.size, args.repeats)
  out = {"matmul_gflops": round(float(np.median(rates)), 1),
         "matmul_gflops_best": round(max(rates), 1),
         "per_call": [round(r, 1) for r in rates], "size": args.size, "dtype": "float32",
         "cpu_count": os.cpu_count(),
         "cores_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
         else os.cpu_count()}
  print(f"float32 matmul {args.size}^2: {out['matmul_gflops']} GFLOP/s (median of "
        f"{args.repeats}), best {out['matmul_gflops_best']}", file=sys.stderr)
  if args.jax:
    out["jax_matmul_gflops"] = jax_matmul_gflops(args.size, args.repeats)
    print(f"XLA {args.size}^2 products, GFLOP/s: {out['jax_matmul_gflops']}", file=sys.stderr)
  from farmer_jax import metrics  # noqa: PLC0415 (JAX, only to print)
  metrics.print_json_line(out, args.out)
  return out


if __name__ == "__main__":
  main()
