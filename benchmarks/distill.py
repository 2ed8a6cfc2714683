r"""Decoding speed of the distilled one-step student against the exact AF inverse (SPEC sec. 6).

    python benchmarks/distill.py [--tokens=64,256] [--batch=16] [--reps=7] [--budget_s=8] [--out=FILE]

Models: patch 2 on 16x16 or 32x32 RGB images (64 or 256 tokens of d = 12), an AF of
`--af_blocks` x `--af_layers` (default 2 x 1) at the paper's AF width 768 (head_dim 64), a tiny
prior (2 layers, width 64), random weights (Flax init plus N(0, 0.05^2) on every parameter; speed
does not depend on the values). Depth and block count scale both decoders alike; the width decides
the regime: at 768 one layer's weights (28 MB) do not stay in a CPU's caches, so each of the exact
inverse's token steps streams them from memory as on an accelerator, while the student reads them
once per block. The student has the same architecture with bidirectional attention and its own
perturbed copy of the AF weights. Every figure is measured in this one run on the same model and
latents: `jax.jit` compiled once, a warm-up call excluded, then the median over a few
`jax.block_until_ready` repetitions, divided by the batch. `--batch=1` (default) is the latency of
one image; larger batches amortise the exact inverse's weight reads over more tokens per step.

  teacher_inverse_s_per_img  Flow.inverse: the exact KV-cached inverse, N sequential steps per block
  student_inverse_s_per_img  Flow.student_inverse: one parallel pass per block
  inverse_speedup            teacher_inverse_s_per_img / student_inverse_s_per_img
  prior_s_per_img            the KV-cached AR prior decode (unguided) alone
  total_teacher_s_per_img    prior + exact inverse, one jitted function (Farmer.sample)
  total_student_s_per_img    prior + student, one jitted function (what sample.decoder=student runs)
  total_speedup              total_teacher_s_per_img / total_student_s_per_img
  sequential_passes_{exact,student}  Transformer passes that must run one after another:
                             af_blocks x tokens (one token each) against af_blocks (all tokens)

Both inverses do the same matmul work (the KV-cached step attends over the preallocated cache), so
the speedup is what latency the sequential steps cost on the device: large where each step is
launch- or weight-bandwidth-bound (accelerators, the paper's 22x), small on a compute-bound CPU.

Progress goes to stderr; the last line of stdout is one JSON object {"device", "batch", "configs"}
with one entry per token count.
"""
import math
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sampling  # noqa: E402  (benchmarks/sampling.py: random weights and the timer)
from farmer_jax.models import farmer, flow  # noqa: E402


def model_config(tokens: int, args) -> farmer.ModelConfig:
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f"--tokens: {tokens} is not a square number (tokens = (image_size / 2)^2)")
  c = farmer.ModelConfig(
      image_size=side * 2, channels=3, num_classes=10, num_levels=256, patch_size=2,
      af_blocks=args.af_blocks, af_layers=args.af_layers, af_width=args.width, prior_layers=2,
      prior_width=64, d_informative=4, class_repeat=4, k_informative=8, k_redundant=8,
      head_dim=64)
  c.validate()
  return c


def bench_config(tokens: int, args) -> dict:
  batch, reps, budget_s = args.batch, args.reps, args.budget_s
  c = model_config(tokens, args)
  model = farmer.Farmer(c)
  params = sampling.random_params(model, c)
  student = farmer.make_flow(c, causal=False)
  student_params = sampling.random_params(model, c, seed=1)["flow"]
  sampling.log(f"[{tokens} tokens] image {c.image_size}x{c.image_size}x{c.channels}, "
               f"d={c.token_dim}, AF {c.af_blocks} x {c.af_layers} at width {c.af_width}, "
               f"batch {batch}")
  labels = jnp.arange(batch, dtype=jnp.int32) % c.num_classes
  key = jax.random.key(1)
  timing = dict(reps=reps, budget_s=budget_s)

  latents = jax.jit(lambda p, k, y: model.apply({"params": p}, k, y,
                                                method=farmer.Farmer.sample_latents))
  exact_inverse = jax.jit(lambda p, z, y: model.apply({"params": p}, z, y,
                                                      method=lambda m, z, y: m.flow.inverse(z, y)))
  student_inverse = jax.jit(lambda sp, z, y: student.apply({"params": sp}, z, y,
                                                           method=flow.Flow.student_inverse))
  total_exact = jax.jit(lambda p, k, y: model.apply({"params": p}, k, y,
                                                    method=farmer.Farmer.sample))

  def sample_student(p, sp, k, y):
    z = model.apply({"params": p}, k, y, method=farmer.Farmer.sample_latents)
    x = student.apply({"params": sp}, z, y, method=flow.Flow.student_inverse)
    return jnp.clip(farmer.unpatchify(x, c.patch_size, c.image_size, c.channels), -1.0, 1.0)
  total_student = jax.jit(sample_student)

  z, prior_s, _ = sampling.timed("prior", latents, params, key, labels, **timing)
  x_exact, teacher_s, _ = sampling.timed("exact inverse", exact_inverse, params, z, labels,
                                         **timing)
  x_student, student_s, _ = sampling.timed("student inverse", student_inverse, student_params, z,
                                           labels, **timing)
  _, total_teacher_s, _ = sampling.timed("prior + exact", total_exact, params, key, labels,
                                         **timing)
  _, total_student_s, _ = sampling.timed("prior + student", total_student, params,
                                         student_params, key, labels, **timing)
  per_img = lambda s: s / batch
  r = {"tokens": tokens, "image_size": c.image_size, "token_dim": c.token_dim,
       "af_blocks": c.af_blocks, "af_layers": c.af_layers, "af_width": c.af_width,
       "teacher_inverse_s_per_img": per_img(teacher_s),
       "student_inverse_s_per_img": per_img(student_s),
       "inverse_speedup": teacher_s / student_s,
       "prior_s_per_img": per_img(prior_s),
       "total_teacher_s_per_img": per_img(total_teacher_s),
       "total_student_s_per_img": per_img(total_student_s),
       "total_speedup": total_teacher_s / total_student_s,
       "sequential_passes_exact": c.af_blocks * c.num_tokens,
       "sequential_passes_student": c.af_blocks,
       # Sanity, not speed: both decoders produced finite images of the same shape.
       "outputs_finite": bool(jnp.all(jnp.isfinite(x_exact)) & jnp.all(jnp.isfinite(x_student)))}
  r = {k: (round(v, 7) if isinstance(v, float) else v) for k, v in r.items()}
  sampling.log(f"  -> inverse_speedup {r['inverse_speedup']:.1f}x, total_speedup "
               f"{r['total_speedup']:.2f}x")
  return r


def main(argv=None) -> dict:
  parser = sampling.parser_with_common_args(__doc__.splitlines()[0], 1,
                                            "images per call (1: latency)")
  parser.add_argument("--width", type=int, default=768, help="AF width (paper: 768)")
  parser.add_argument("--af_blocks", type=int, default=2)
  parser.add_argument("--af_layers", type=int, default=1)
  return sampling.run_benchmark(parser, argv, model_config, bench_config)


if __name__ == "__main__":
  main()
