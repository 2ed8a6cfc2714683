r"""Sampling speed of FARMER: KV caches against prefix recomputation, guided against unguided;
with --inverses, the parallel AF inverses (Jacobi, Gauss-Seidel-Jacobi) against the sequential one.

    python benchmarks/sampling.py [--tokens=64,256] [--batch=16] [--reps=7] [--budget_s=8] \
        [--out=FILE]
    python benchmarks/sampling.py --inverses [--tokens=64,256] [--widths=64,768] [--batches=1,16] \
        [--tolerances=1e-3,1e-2] [--segments=4,16] [--strided=16] [--out=FILE]
    python benchmarks/sampling.py --inverses --digits_workdir=W [--per_class=50] [--out=FILE]

The --inverses figures are described in `bench_inverses` and `bench_digits_inverses` below.

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
import dataclasses
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from farmer_jax import metrics, sample  # noqa: E402
from farmer_jax.models import farmer, flow, prior  # noqa: E402

PATCH = 2
PERTURB_STD = 0.05
UNGUIDED = prior.SamplerConfig()
GUIDED = prior.SamplerConfig(guidance="resample", w=2.0, num_cond=5, num_uncond=5)


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def model_config(tokens: int, af_width: int = 64) -> farmer.ModelConfig:
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f"--tokens: {tokens} is not a square number (tokens = (image_size / 2)^2)")
  c = farmer.ModelConfig(
      image_size=side * PATCH, channels=3, num_classes=10, num_levels=256, patch_size=PATCH,
      af_blocks=4, af_layers=2, af_width=af_width, prior_layers=2, prior_width=64,
      d_informative=4, class_repeat=4, k_informative=8, k_redundant=8,
      head_dim=32 if af_width <= 64 else 64)
  c.validate()
  return c


def random_params(model: farmer.Farmer, c: farmer.ModelConfig, seed: int = 0,
                  width_free_heads: bool = False):
  """Flax init plus N(0, PERTURB_STD^2) on every leaf: zero-initialised AF heads become non-zero.

  `width_free_heads`: the AF heads' noise is PERTURB_STD * sqrt(64 / af_width) instead, so that
  every block's shift and log-scale have the same spread at any width (std about 0.4, as at width
  64, where the trained digits default's are 0.2-0.5); at a full PERTURB_STD a 768-wide head gives
  them std 1.2-1.4, a flow far stronger than trained ones."""
  k_init, k_noise = jax.random.split(jax.random.key(seed))
  images = jnp.zeros((1, c.image_size, c.image_size, c.channels), jnp.float32)
  params = model.init(k_init, images, jnp.zeros((1,), jnp.int32))["params"]
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  noise_keys = jax.random.split(k_noise, len(leaves))
  head_std = PERTURB_STD * math.sqrt(64 / c.af_width) if width_free_heads else PERTURB_STD

  def std(path) -> float:
    names = [getattr(k, "key", "") for k in path]
    return head_std if names[0] == "flow" and "head" in names else PERTURB_STD
  return treedef.unflatten([p + std(path) * jax.random.normal(k, p.shape, p.dtype)
                            for (path, p), k in zip(leaves, noise_keys)])


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


# ---------------------------------------------------------------------------------------------
# --inverses: the parallel AF inverses (models/flow.py `inverse_parallel`, docs/jacobi.md).
# ---------------------------------------------------------------------------------------------


def inverse_variants(tolerances, segments, tokens: int, strided=()
                     ) -> dict[str, flow.ParallelInverse]:
  """The parallel inverses timed per synthetic config: Jacobi from each block's input at every
  tolerance, from the latent z at the first, Gauss-Seidel-Jacobi at each segment count (< tokens)
  at the first, strided sweeps at each of their segment counts (< tokens) and every tolerance,
  and one pass per block (untimed quality: the cost of a pass)."""
  t0 = tolerances[0]
  out = {f"jacobi_tol{t:g}": flow.ParallelInverse("jacobi", tolerance=t) for t in tolerances}
  out[f"jacobi_z_tol{t0:g}"] = flow.ParallelInverse("jacobi", tolerance=t0, init="z")
  for g in segments:
    if g < tokens:
      out[f"gs_jacobi{g}_tol{t0:g}"] = flow.ParallelInverse("gs_jacobi", (g,), t0)
  for g in strided:
    if g < tokens:
      for t in tolerances:
        out[f"strided{g}_tol{t:g}"] = flow.ParallelInverse("strided", (g,), t)
  out["one_pass"] = flow.ParallelInverse("jacobi", max_iterations=1)
  return out


def paired(name: str, reference_fn, fn, *args, reps: int, budget_s: float, min_reps: int = 2):
  """(output of fn, its median seconds, median of the per-pair ratios reference / fn) of two
  compiled functions called alternately, a warm-up each first: on a shared machine both calls of a
  pair meet about the same load, so the ratio is steadier than a ratio of separate medians."""
  jax.block_until_ready(reference_fn(*args))
  out = jax.block_until_ready(fn(*args))
  ref_times, times = [], []
  while len(times) < reps and (len(times) < min_reps or sum(times) + sum(ref_times) < budget_s):
    for fun, into in ((reference_fn, ref_times), (fn, times)):
      start = time.perf_counter()
      jax.block_until_ready(fun(*args))
      into.append(time.perf_counter() - start)
  ratio = statistics.median(r / t for r, t in zip(ref_times, times))
  log(f"    {name:<24} {statistics.median(times) * 1e3:9.1f} ms/batch, {ratio:.2f}x the reference "
      f"(median of {len(times)} pairs: {', '.join(f'{r / t:.2f}' for r, t in zip(ref_times, times))})")
  return out, statistics.median(times), ratio


def level_agreement(images, reference, num_levels: int) -> dict:
  """max |images - reference| in [-1, 1] units, and the fractions of pixels on the same level and
  within one level of the reference's (uint8 quantisation of `sample.quantize`)."""
  a = sample.quantize(np.asarray(images), num_levels).astype(np.int32)
  b = sample.quantize(np.asarray(reference), num_levels).astype(np.int32)
  return {"max_abs_diff": round(float(np.max(np.abs(np.asarray(images) - np.asarray(reference)))), 6),
          "same_level_fraction": round(float(np.mean(a == b)), 6),
          "within_one_level_fraction": round(float(np.mean(np.abs(a - b) <= 1)), 6)}


def pass_work(spec: flow.ParallelInverse, passes, tokens: int) -> list[float]:
  """Passes per block in full-block-pass units: a Gauss-Seidel-Jacobi pass covers one segment; a
  strided sweep covers every token once (in segment-length steps), after one full pass."""
  if spec.method == "strided":
    return [float(p) + 1 for p in passes]
  seg = [-(-tokens // spec.block_segments(t)) for t in range(len(passes))]
  return [round(float(p) * s / tokens, 2) for p, s in zip(passes, seg)]


def bench_inverses(tokens: int, width: int, batch: int, tolerances, segments, reps: int,
                   budget_s: float, width_free_heads: bool = True, strided=()) -> dict:
  """The sequential and parallel AF inverses of one random-weight model (`model_config(tokens,
  width)`, `random_params` with `width_free_heads`) on the same prior latents, each jitted on its
  own, each variant timed in pairs with the sequential inverse (`paired`):

    sequential_s_per_img   Farmer.decode, the KV-cached sequential inverse (N steps per block)
    <variant>.s_per_img    Farmer.decode_parallel with that ParallelInverse (inverse_variants)
    <variant>.speedup      the median over pairs of sequential time / variant time
    <variant>.passes       Transformer passes each AF block made (block 0 first); strided:
                           sweeps (each S steps of R tokens, after one full pass)
    <variant>.work         the same in full passes over the block's N tokens (`pass_work`)
    <variant>.max_abs_diff, same_level_fraction, within_one_level_fraction: against the
                           sequential decode, images clipped to [-1, 1], 256 levels
    load_average           the host's 1-minute load when the config started and ended (2 cores:
                           above about 1.5, other work shared the machine and the figures)
    pass_s_per_img         one full causal pass of one block (from `one_pass`: n blocks x 1 pass)
    break_even_passes      the paired ratio sequential / one_pass: passes per block below which
                           a parallel inverse is faster on this machine
  """
  load_start = os.getloadavg()[0]
  c = model_config(tokens, width)
  model = farmer.Farmer(c)
  params = random_params(model, c, width_free_heads=width_free_heads)
  af_params = sum(p.size for p in jax.tree.leaves(params["flow"]))
  log(f"[inverses: {tokens} tokens, AF width {width}, batch {batch}] {af_params:,} AF params")
  labels = jnp.arange(batch, dtype=jnp.int32) % c.num_classes
  variables = {"params": params}
  z = jax.jit(lambda v, k, y: model.apply(v, k, y, UNGUIDED, method=farmer.Farmer.sample_latents))(
      variables, jax.random.key(1), labels)
  decode = jax.jit(lambda v, z, y: jnp.clip(model.apply(v, z, y, method=farmer.Farmer.decode),
                                            -1.0, 1.0))
  seq_img, seq_s, _ = timed("sequential", decode, variables, z, labels, reps=reps,
                            budget_s=budget_s)
  r = {"tokens": tokens, "af_width": width, "batch": batch, "width_free_heads": width_free_heads,
       "af_blocks": c.af_blocks,
       "af_layers": c.af_layers, "af_params": int(af_params),
       "sequential_s_per_img": round(seq_s / batch, 6), "variants": {}}
  for name, spec in inverse_variants(tolerances, segments, tokens, strided).items():
    fn = jax.jit(lambda v, z, y, spec=spec: model.apply(
        v, z, y, spec, method=farmer.Farmer.decode_parallel))
    (images, passes), t, ratio = paired(name, decode, fn, variables, z, labels, reps=reps,
                                        budget_s=budget_s)
    if name == "one_pass":   # a cost probe, not an inverse: timed but not judged
      r["pass_s_per_img"] = round(t / batch / c.af_blocks, 6)
      r["break_even_passes"] = round(ratio, 2)   # (sequential / n) / (one pass / n)
      continue
    v = {"method": spec.method, "segments": spec.segments[0], "tolerance": spec.tolerance,
         "init": spec.init, "s_per_img": round(t / batch, 6), "speedup": round(ratio, 3),
         "passes": np.asarray(passes).tolist(),
         "work": pass_work(spec, np.asarray(passes), tokens),
         **level_agreement(jnp.clip(images, -1.0, 1.0), seq_img, c.num_levels)}
    r["variants"][name] = v
    log(f"  -> {name}: {v['speedup']:.2f}x, passes {v['passes']}, same level "
        f"{v['same_level_fraction']:.4f}, max |diff| {v['max_abs_diff']:.2e}")
  r["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
  return r


def bench_digits_inverses(workdir: str, tolerances, per_class: int, reps: int, budget_s: float,
                          spread_seeds: int) -> dict:
  """The trained digits default of `workdir` (configs/digits.py; its distilled student in
  <workdir>/distill when there is one), on prior latents drawn with the config's sampler:

    speed[batch]    s/img of each decoder on the same latents at batch 1 and the config's
                    sample batch (100), and its speedup over the sequential inverse (`paired`)
    quality[name]   on `per_class` x 10 latents (key 0): passes per block (mean over batches of
                    100), max abs difference and same-level fractions against the sequential
                    decode (17 levels), class accuracy (the SVC of digits_guidance.py) and the
                    Frechet distance of 64-pixel Gaussians (afm_digits.py) to the test split
    spread          class accuracy and Frechet distance of the sequential decode with sampling
                    keys 1 .. spread_seeds: the run-to-run spread the others are judged against
  Decoders: sequential, student (alone), and Jacobi / Gauss-Seidel-Jacobi (4 segments) at each
  tolerance started from each block's input ("previous"), z, and the student.
  """
  from afm_digits import frechet  # noqa: PLC0415 (scipy; --digits_workdir only)
  from digits_guidance import judge  # noqa: PLC0415 (scikit-learn)
  from configs import digits  # noqa: PLC0415
  from farmer_jax import datasets, distill, rundir, train  # noqa: PLC0415

  config = digits.get_config("default")
  student = None
  if rundir.has_student(workdir):
    dist, state, student_state, info = distill.restore_student(digits.get_config("distill"),
                                                               workdir)
    trainer, student = dist.trainer, (dist.student, dist.student_params(student_state))
  else:
    trainer, state = train.restore_latest(config, workdir)
  model, params, c = trainer.model, trainer.eval_params(state), trainer.model_config
  sampler = sample.sampler_config(config.sample)
  decoders = {"sequential": None}
  if student is not None:
    decoders["student"] = "student"
  for tol in tolerances:
    for init in ("previous", "z") + (("student",) if student is not None else ()):
      decoders[f"jacobi_{init}_tol{tol:g}"] = flow.ParallelInverse("jacobi", tolerance=tol,
                                                                   init=init)
    decoders[f"gs_jacobi4_previous_tol{tol:g}"] = flow.ParallelInverse("gs_jacobi", (4,), tol)
  student_flow, student_params = student if student is not None else (None, None)

  def decoder_fn(spec):
    if spec is None:
      return lambda z, y: (model.apply({"params": params}, z, y, method=farmer.Farmer.decode),
                           jnp.zeros((0,), jnp.int32))
    if spec == "student":
      def run(z, y):
        x = student_flow.apply({"params": student_params}, z, y, method=flow.Flow.student_inverse)
        return farmer.unpatchify(x, c.patch_size, c.image_size, c.channels), jnp.zeros((0,), jnp.int32)
      return run
    return lambda z, y: sample.decode_parallel(model, params, z, y, spec, student_flow,
                                               student_params)

  def clipped(f):
    def run(z, y):
      images, passes = f(z, y)
      return jnp.clip(images, -1.0, 1.0), passes
    return run

  fns = {name: jax.jit(clipped(decoder_fn(spec))) for name, spec in decoders.items()}
  latents = jax.jit(lambda k, y: model.apply({"params": params}, k, y, sampler,
                                             method=farmer.Farmer.sample_latents))
  result = {"workdir": workdir, "step": int(state.step), "sampler": str(sampler),
            "student": student is not None, "speed": {}, "quality": {}}
  with jax.set_mesh(trainer.mesh):
    for batch in (1, config.sample.batch_size):
      y = jnp.arange(batch, dtype=jnp.int32) % 10
      z = latents(jax.random.key(1), y)
      speed = {}
      for name in decoders:
        _, t, ratio = paired(f"{name} b{batch}", fns["sequential"], fns[name], z, y, reps=reps,
                             budget_s=budget_s)
        speed[name] = {"s_per_img": round(t / batch, 7), "speedup": round(ratio, 3)}
      result["speed"][f"batch{batch}"] = speed

    clf, real_acc = judge()
    x_test, _ = datasets.load_split("digits", "test")
    real = x_test.reshape(len(x_test), -1) / 16.0
    labels = sample.grid_labels(np.arange(10), per_class)
    bs = config.sample.batch_size

    def decode_all(name, key):
      images, passes = [], []
      for start in range(0, len(labels), bs):
        y = jnp.asarray(np.resize(labels[start:start + bs], bs).astype(np.int32))
        im, p = fns[name](latents(jax.random.fold_in(key, start), y), y)
        images.append(np.asarray(im)[:len(labels[start:start + bs])])
        passes.append(np.asarray(p))
      return np.concatenate(images), np.asarray(passes)

    def judged(images):
      flat = sample.quantize(images, 17).reshape(len(images), -1) / 16.0
      return {"class_accuracy": round(float(np.mean(clf.predict(flat) == labels)), 4),
              "frechet_distance": round(frechet(flat, real), 4)}

    reference, _ = decode_all("sequential", jax.random.key(0))
    for name in decoders:
      images, passes = (reference, None) if name == "sequential" else decode_all(
          name, jax.random.key(0))
      q = {**judged(images), **level_agreement(images, reference, 17)}
      if passes is not None and passes.size:
        q["passes"] = np.round(passes.mean(axis=0), 2).tolist()
        q["work"] = pass_work(decoders[name], passes.mean(axis=0), c.num_tokens)
      result["quality"][name] = q
      log(f"  {name:<28} {q}")
    spread = [judged(decode_all("sequential", jax.random.key(s))[0])
              for s in range(1, spread_seeds + 1)]
    result["spread"] = {"keys": list(range(1, spread_seeds + 1)), "runs": spread}
  result.update(judge_test_accuracy=real_acc, num_samples=int(len(labels)),
                load_average_end=round(os.getloadavg()[0], 2))
  return result


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


def describe_device() -> str:
  """The first device and the host's cores (logged with jax's version and the load) -> a line."""
  dev = jax.devices()[0]
  device = f"{dev.platform}: {dev.device_kind}, {os.cpu_count()} host cores"
  log(f"{device}; jax {jax.__version__}; load average {os.getloadavg()[0]:.2f}")
  return device


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
  device = describe_device()
  configs = [bench(t, args) for t in tokens]
  result = {"device": device, "batch": args.batch, "configs": configs,
            "wall_s": round(time.perf_counter() - start, 1)}
  metrics.print_json_line(result, args.out)
  return result


def floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v.strip()]


def ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> dict:
  parser = parser_with_common_args(__doc__.splitlines()[0], 16, "images per sampling call")
  parser.add_argument("--inverses", action="store_true",
                      help="time the parallel AF inverses instead (bench_inverses)")
  parser.add_argument("--widths", default="64,768", help="--inverses: AF widths")
  parser.add_argument("--batches", default="1,16", help="--inverses: batch sizes")
  parser.add_argument("--tolerances", default="1e-3,1e-2",
                      help="--inverses: Jacobi tolerances ([-1, 1] units)")
  parser.add_argument("--segments", default="4,16", help="--inverses: Gauss-Seidel-Jacobi counts")
  parser.add_argument("--strided", default="16",
                      help="--inverses: strided sweeps' segment counts ('' for none)")
  parser.add_argument("--full_head_noise", action="store_true",
                      help="--inverses: AF heads perturbed like every other weight (std 0.05) "
                           "instead of the width-free scale (random_params)")
  parser.add_argument("--digits_workdir", default=None,
                      help="--inverses: the trained digits default (and its student) instead")
  parser.add_argument("--per_class", type=int, default=50, help="--digits_workdir: judged samples")
  parser.add_argument("--spread_seeds", type=int, default=3,
                      help="--digits_workdir: sequential runs with other keys (the spread)")
  args = parser.parse_known_args(argv)[0]
  if not args.inverses:
    return run_benchmark(parser, argv, lambda t, args: model_config(t),
                         lambda t, args: bench_config(t, args.batch, args.reps, args.budget_s))
  tolerances = floats(args.tolerances)
  start = time.perf_counter()
  device = describe_device()
  if args.digits_workdir:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    result = {"device": device, "digits": bench_digits_inverses(
        args.digits_workdir, tolerances, args.per_class, args.reps, args.budget_s,
        args.spread_seeds)}
  else:
    tokens = ints(args.tokens)
    for t in tokens:
      model_config(t)
    configs = [bench_inverses(t, w, b, tolerances, ints(args.segments), args.reps, args.budget_s,
                              width_free_heads=not args.full_head_noise,
                              strided=ints(args.strided) if args.strided else ())
               for t in tokens for w in ints(args.widths) for b in ints(args.batches)]
    result = {"device": device, "configs": configs}
  result["wall_s"] = round(time.perf_counter() - start, 1)
  metrics.print_json_line(result, args.out)
  return result


if __name__ == "__main__":
  main()
