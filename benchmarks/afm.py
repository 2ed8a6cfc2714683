r"""FARMER's samplers side by side on one trained digits workdir: the AR prior + exact AF inverse,
the AR prior + distilled student, and the AFM generator of z^I + the student (no token loop).

    python -m farmer_jax.main --config=configs/digits.py --workdir=W                  # FARMER
    python -m farmer_jax.main --config=configs/digits.py:distill --workdir=W          # student
    python -m farmer_jax.main --config=configs/afm_farmer_latent.py --workdir=W       # AFM on z^I
    python benchmarks/afm.py --workdir=W [--batch=100] [--per_class=50] [--out=FILE]

Paths (each the jitted function the library samples with; sampler settings of configs/digits.py,
resampling CFG w = 3, which the AFM path applies to the redundant GMM draw only):
  ar_exact      Prior.decode (KV-cached, one token per step) + the exact KV-cached AF inverse
  ar_student    Prior.decode + the student (one parallel pass per AF block)
  afm_student   G (one pass) + one parallel prior pass for z^R (Prior.complete) + the student
  afm_exact     G + the prior pass + the exact inverse (for completeness)
  ar_student_unguided  ar_student with no guidance (T = 1, s = 1): G is unguided too
Speed: `--batch` images per call, compile and one warm-up excluded, the median of up to `--reps`
calls (`--budget_s` per figure), divided by the batch, all in this one process side by side;
speedups are ratios to ar_student and ar_exact. Quality: `per_class` images of each class per
path (one key), judged by the digits SVC of benchmarks/digits_guidance.py (class accuracy), and a
Frechet distance of 64-pixel Gaussians (levels / 16) against the 360 real test images. Grids
(rows = classes) go to <W>/afm/compare/<path>.png. Last line of stdout: one JSON object.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from afm_digits import frechet  # noqa: E402
from digits_guidance import judge  # noqa: E402
from sampling import log, timed  # noqa: E402
from configs import afm_farmer_latent  # noqa: E402
from farmer_jax import afm, datasets, metrics, rundir, sample  # noqa: E402
from farmer_jax.models import prior  # noqa: E402

PATHS = ("ar_exact", "ar_student", "afm_student", "afm_exact", "ar_student_unguided")


def restore(workdir: str, decoder: str, batch: int):
  """(AFM trainer, state) on the digits FARMER latents of `workdir`, decoding with `decoder`."""
  config = afm_farmer_latent.get_config("default")
  config.sample.update(decoder=decoder, batch_size=batch)
  return config, *afm.restore_latest(config, workdir)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True,
                  help="a digits FARMER workdir with distill/ (student) and afm/ (AFM on z^I)")
  ap.add_argument("--batch", type=int, default=100, help="images per timed call")
  ap.add_argument("--per_class", type=int, default=50, help="0: speed only")
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--budget_s", type=float, default=10.0)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)

  config, trainer, state = restore(args.workdir, "student", args.batch)
  _, trainer_exact, _ = restore(args.workdir, "exact", args.batch)
  target = trainer.target
  model, sampler = target.model, target.sampler
  params, student_params = target.params["farmer"], target.params["student"]
  g_params = state.g.ema_params
  log(f"FARMER {target.info['workdir']} step {target.info['step']}, student of that step, "
      f"AFM step {int(state.step)}; batch {args.batch}")

  ar_exact = jax.jit(sample.batch_sampler(model, sampler))
  ar_student = jax.jit(sample.batch_sampler(model, sampler, target.student))
  ar_unguided = jax.jit(sample.batch_sampler(model, prior.SamplerConfig(), target.student))
  fns = {
      "ar_exact": lambda k, y: ar_exact(params, None, k, y),
      "ar_student": lambda k, y: ar_student(params, student_params, k, y),
      "afm_student": lambda k, y: trainer.generate_batch(g_params, target.params, k, y)[0],
      "afm_exact": lambda k, y: trainer_exact.generate_batch(g_params, trainer_exact.target.params,
                                                             k, y)[0],
      "ar_student_unguided": lambda k, y: ar_unguided(params, student_params, k, y),
  }
  labels = jnp.arange(args.batch, dtype=jnp.int32) % 10
  key = jax.random.key(1)
  result = {"workdir": args.workdir, "device": jax.devices()[0].device_kind, "batch": args.batch,
            "farmer_step": target.info["step"], "afm_step": int(state.step),
            "sampler": str(sampler)}
  with jax.set_mesh(trainer.mesh):
    seconds = {}
    for name in PATHS:
      _, seconds[name], _ = timed(name, fns[name], key, labels, reps=args.reps,
                                  budget_s=args.budget_s)
      result[f"{name}_s_per_img"] = round(seconds[name] / args.batch, 7)
    for name in PATHS:
      result[f"{name}_speedup_over_ar_exact"] = round(seconds["ar_exact"] / seconds[name], 3)
    result["afm_student_speedup_over_ar_student"] = round(
        seconds["ar_student"] / seconds["afm_student"], 3)
    c = target.model_config
    result["sequential_passes"] = {
        "ar_exact": c.num_tokens + c.af_blocks * c.num_tokens,
        "ar_student": c.num_tokens + c.af_blocks,
        "afm_student": 2 + c.af_blocks, "afm_exact": 2 + c.af_blocks * c.num_tokens,
        "ar_student_unguided": c.num_tokens + c.af_blocks}

    if args.per_class > 0:
      clf, real_acc = judge()
      x_test, _ = datasets.load_split("digits", "test")
      real = x_test.reshape(len(x_test), -1) / 16.0
      grid_labels = sample.grid_labels(np.arange(10), args.per_class)
      out_dir = os.path.join(str(rundir.RunDir(args.workdir).afm), "compare")
      os.makedirs(out_dir, exist_ok=True)
      quality = {"judge_test_accuracy": real_acc, "num_samples": int(len(grid_labels))}
      for name in PATHS:
        images = []
        for start in range(0, len(grid_labels), args.batch):
          chunk = grid_labels[start:start + args.batch]
          y = jnp.asarray(np.pad(chunk, (0, args.batch - len(chunk)), mode="edge"))
          out = np.asarray(jax.device_get(fns[name](jax.random.fold_in(key, start), y)))
          images.append(sample.quantize(out, 17)[:len(chunk)])
        images = np.concatenate(images)
        flat = images.reshape(len(images), -1) / 16.0
        quality[name] = {"class_accuracy": float(np.mean(clf.predict(flat) == grid_labels)),
                         "pixel_fd": round(frechet(flat, real), 4)}
        # 10 columns of each class (the first 10 of its per_class images), rows = classes.
        first = images.reshape(10, args.per_class, *images.shape[1:])[:, :10].reshape(
            -1, *images.shape[1:])
        sample.save_grid_png(os.path.join(out_dir, f"{name}.png"), first, 17, rows=10)
        log(f"  {name:<12} class accuracy {quality[name]['class_accuracy']:.3f}, pixel FD "
            f"{quality[name]['pixel_fd']:.3f}")
      result["quality"] = quality
  metrics.print_json_line(result, args.out)
  return result


if __name__ == "__main__":
  main()
