r"""Sampling speed of FARMER: KV caches against prefix recomputation, guided against unguided.

    python benchmarks/sampling.py [--tokens=64,256] [--batch=16] [--reps=7] [--budget_s=8] \
        [--out=FILE]

One tiny model per token count (image 16x16 or 32x32, patch 2, 3 channels -> d = 12, d_I = 4;
4 AF blocks of 2 layers, width 64; prior of 2 layers, width 64; head_dim 32; M = 4, K_I = K_R = 8;
10 classes) with random weights: Flax init, then Gaussian noise (std 0.05) on every parameter, so no
AF block is the identity and the inverse really runs its Transformers. Every figure below is
measured on the same model and weights, with `jax.jit` compiled once, one warm-up call (compile
excluded), then the median over a few `jax.block_until_ready` repetitions, divided by the batch:

  naive_s_per_img      Farmer.sample, guidance "none", recompute=True: the prior and every AF block
                       recompute the whole prefix at every token (N full passes each).
  cached_s_per_img     Farmer.sample, guidance "none", recompute=False: KV-cached prior decode and
                       KV-cached AF inverses (one token per scan step).
  kv_speedup           naive_s_per_img / cached_s_per_img.
  unguided_s_per_img   the cached unguided figure, measured again right before the guided one so the
                       pair shares the machine's state (not reused from cached_s_per_img).
  guided_s_per_img     KV-cached Farmer.sample with resampling CFG (paper's Algorithm 1, Table 6
                       style): SamplerConfig(guidance="resample", w=2.0, num_cond=5, num_uncond=5).
  guided_over_unguided guided_s_per_img / unguided_s_per_img.
  prior_s_per_img      Prior.decode alone (KV-cached, unguided): the AR prior's share of cached.
  inverse_s_per_img    Flow.inverse alone (KV-cached) on the prior's latents: the AF share.
  guided_prior_s_per_img  Prior.decode alone, guided sampler (cond + null branches: batch 2B).
  max_abs_diff_naive_vs_cached  max |naive - cached| over the sampled images (same key: the two
                       paths must draw identical samples); `clipped_fraction` is the share of
                       cached image values at +-1 (where the final clip hides differences), and
                       max_abs_diff_latents_naive_vs_cached compares the prior's latents unclipped.
  *_compile_s          compile + first call of that jitted function (not part of any figure).

Progress goes to stderr; the last line of stdout is one JSON object {"device", "batch", "configs"}.
"""
import argparse
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from farmer_jax import metrics  # noqa: E402
from farmer_jax.models import farmer, prior  # noqa: E402

PATCH = 2
PERTURB_STD = 0.05
UNGUIDED = prior.SamplerConfig()
GUIDED = prior.SamplerConfig(guidance="resample", w=2.0, num_cond=5, num_uncond=5)


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def model_config(tokens: int) -> farmer.ModelConfig:
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f"--tokens: {tokens} is not a square number (tokens = (image_size / 2)^2)")
  c = farmer.ModelConfig(
      image_size=side * PATCH, channels=3, num_classes=10, num_levels=256, patch_size=PATCH,
      af_blocks=4, af_layers=2, af_width=64, prior_layers=2, prior_width=64, d_informative=4,
      class_repeat=4, k_informative=8, k_redundant=8, head_dim=32)
  c.validate()
  return c


def random_params(model: farmer.Farmer, c: farmer.ModelConfig, seed: int = 0):
  """Flax init plus N(0, PERTURB_STD^2) on every leaf: zero-initialised AF heads become non-zero."""
  k_init, k_noise = jax.random.split(jax.random.key(seed))
  images = jnp.zeros((1, c.image_size, c.image_size, c.channels), jnp.float32)
  params = model.init(k_init, images, jnp.zeros((1,), jnp.int32))["params"]
  leaves, treedef = jax.tree.flatten(params)
  noise_keys = jax.random.split(k_noise, len(leaves))
  return treedef.unflatten([p + PERTURB_STD * jax.random.normal(k, p.shape, p.dtype)
                            for p, k in zip(leaves, noise_keys)])


def timed(name: str, fn, *args, reps: int, budget_s: float, min_reps: int = 2):
  """(output, median seconds per call, compile seconds) of an already-jitted fn.

  The first call (compile + run) is excluded. Then at least `min_reps` and at most `reps` timed
  calls, stopping early once `budget_s` seconds of timed calls have been spent.
  """
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  times = []
  while len(times) < reps and (len(times) < min_reps or sum(times) < budget_s):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  log(f"    {name:<16} {median * 1e3:9.1f} ms/batch  (median of {len(times)}: "
      f"{', '.join(f'{t * 1e3:.1f}' for t in times)}; compile+first {compile_s:.1f} s)")
  return out, median, compile_s


def bench_config(tokens: int, batch: int, reps: int, budget_s: float) -> dict:
  c = model_config(tokens)
  model = farmer.Farmer(c)
  params = random_params(model, c)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  log(f"[{tokens} tokens] image {c.image_size}x{c.image_size}x{c.channels}, d={c.token_dim}, "
      f"{n_params:,} params, batch {batch}")
  labels = jnp.arange(batch, dtype=jnp.int32) % c.num_classes
  key = jax.random.key(1)
  variables = {"params": params}

  def sample_fn(sampler, recompute):
    return jax.jit(lambda v, k, y: model.apply(v, k, y, sampler, recompute,
                                               method=farmer.Farmer.sample))

  def prior_fn(sampler, recompute=False):
    def draw(m, k, y):
      return (m.prior.decode_recompute if recompute else m.prior.decode)(k, y, sampler)
    return jax.jit(lambda v, k, y: model.apply(v, k, y, method=draw))

  # The latents in natural order, as Farmer.sample hands them to the flow.
  def invert(m, z, y):
    return m.flow.inverse(z[:, ::-1] if m.prior_reads_reversed else z, y, False)
  inverse = jax.jit(lambda v, z, y: model.apply(v, z, y, method=invert))

  r = {"tokens": tokens, "image_size": c.image_size, "token_dim": c.token_dim,
       "num_params": int(n_params)}
  cached_img, cached_s, r["cached_compile_s"] = timed(
      "cached", sample_fn(UNGUIDED, False), variables, key, labels, reps=reps, budget_s=budget_s)
  naive_img, naive_s, r["naive_compile_s"] = timed(
      "naive", sample_fn(UNGUIDED, True), variables, key, labels, reps=reps, budget_s=budget_s)
  z, prior_s, _ = timed("prior (cached)", prior_fn(UNGUIDED), variables, key, labels,
                        reps=reps, budget_s=budget_s)
  _, inverse_s, _ = timed("inverse (cached)", inverse, variables, z, labels, reps=reps,
                          budget_s=budget_s)
  # Measured again (not reused from `cached`) so that it sits right next to the guided figure.
  _, unguided_s, _ = timed("unguided", sample_fn(UNGUIDED, False), variables, key, labels,
                           reps=reps, budget_s=budget_s)
  _, guided_s, r["guided_compile_s"] = timed(
      "guided", sample_fn(GUIDED, False), variables, key, labels, reps=reps, budget_s=budget_s)
  _, guided_prior_s, _ = timed("guided prior", prior_fn(GUIDED), variables, key, labels,
                               reps=reps, budget_s=budget_s)
  # Correctness of the comparison, untimed: the prior's latents both ways (cheap next to the flow).
  z_naive = jax.jit(lambda v, k, y: model.apply(
      v, k, y, method=lambda m, k, y: m.prior.decode_recompute(k, y, UNGUIDED)))(
          variables, key, labels)

  per_img = lambda s: s / batch
  r.update(
      naive_s_per_img=per_img(naive_s),
      cached_s_per_img=per_img(cached_s),
      kv_speedup=naive_s / cached_s,
      unguided_s_per_img=per_img(unguided_s),
      guided_s_per_img=per_img(guided_s),
      guided_over_unguided=guided_s / unguided_s,
      prior_s_per_img=per_img(prior_s),
      inverse_s_per_img=per_img(inverse_s),
      prior_share_of_cached=prior_s / (prior_s + inverse_s),
      guided_prior_s_per_img=per_img(guided_prior_s),
      max_abs_diff_naive_vs_cached=float(jnp.max(jnp.abs(naive_img - cached_img))),
      max_abs_diff_latents_naive_vs_cached=float(jnp.max(jnp.abs(z_naive - z))),
      clipped_fraction=float(jnp.mean(jnp.abs(cached_img) >= 1.0)),
  )
  r = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
  log(f"  -> kv_speedup {r['kv_speedup']:.1f}x, guided/unguided {r['guided_over_unguided']:.2f}, "
      f"prior {r['prior_share_of_cached']:.0%} of cached, max |naive - cached| "
      f"{r['max_abs_diff_naive_vs_cached']:.2e}")
  return r


def parser_with_common_args(description: str, batch_default: int,
                            batch_help: str) -> argparse.ArgumentParser:
  """--tokens, --batch, --reps, --budget_s, --out: the flags every speed benchmark here takes."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--tokens", default="64,256",
                      help="comma-separated token counts, each a square (image_size = 2 sqrt(N))")
  parser.add_argument("--batch", type=int, default=batch_default, help=batch_help)
  parser.add_argument("--reps", type=int, default=7, help="most timed calls per figure")
  parser.add_argument("--budget_s", type=float, default=8.0,
                      help="stop timing a figure after this many seconds (at least 2 calls)")
  parser.add_argument("--out", help="also write the JSON result to this file")
  return parser


def run_benchmark(parser: argparse.ArgumentParser, argv, check_tokens, bench) -> dict:
  """Parses the flags, checks every token count (`check_tokens(t, args)` raises on a bad one)
  before any timing, runs `bench(t, args)` per count and prints the JSON result line."""
  args = parser.parse_args(argv)
  if args.batch < 1 or args.reps < 2:
    parser.error("--batch must be >= 1 and --reps >= 2")
  tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
  for t in tokens:
    check_tokens(t, args)
  start = time.perf_counter()
  dev = jax.devices()[0]
  device = f"{dev.platform}: {dev.device_kind}, {os.cpu_count()} host cores"
  log(f"{device}; jax {jax.__version__}; load average {os.getloadavg()[0]:.2f}")
  configs = [bench(t, args) for t in tokens]
  result = {"device": device, "batch": args.batch, "configs": configs,
            "wall_s": round(time.perf_counter() - start, 1)}
  metrics.print_json_line(result, args.out)
  return result


def main(argv=None) -> dict:
  parser = parser_with_common_args(__doc__.splitlines()[0], 16, "images per sampling call")
  return run_benchmark(parser, argv, lambda t, args: model_config(t),
                       lambda t, args: bench_config(t, args.batch, args.reps, args.budget_s))


if __name__ == "__main__":
  main()
