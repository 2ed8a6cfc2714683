r"""The distilled student against the exact AF inverse on a trained digits workdir: pixel error on
the same latents and class accuracy of the samples each one decodes.

    python -m farmer_jax.main --config=configs/digits.py --workdir=runs/digits            # teacher
    python -m farmer_jax.main --config=configs/digits.py:distill --workdir=runs/digits    # student
    python benchmarks/digits_distill.py --workdir=runs/digits [--per_class=50] [--out=FILE]

For each sampler setting, `per_class` images of every class are drawn from the prior of the teacher
checkpoint the student was distilled from (<workdir>/distill/teacher.json) with one key, and the
same latents are decoded twice: by the exact KV-cached inverse and by the student. Reported per
setting: the mean and max abs difference of the two decodes in [-1, 1] pixel units and in intensity
levels (0..16), and the class accuracy of each set judged by the RBF SVC of
benchmarks/digits_guidance.py (trained on the real digits training split). Grids go to
<workdir>/distill/compare/<setting>_{exact,student,pair}.png (pair: exact left, student right,
rows = classes). Last line of stdout: one JSON object.
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from configs import digits  # noqa: E402
from digits_guidance import SETTINGS, judge  # noqa: E402
from farmer_jax import distill, metrics, rundir, sample  # noqa: E402

DEFAULT_SETTINGS = "resample_w3,unguided_T1_s1"


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="a digits workdir with <workdir>/distill")
  ap.add_argument("--per_class", type=int, default=50)
  ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                  help=f"comma-separated names of digits_guidance.SETTINGS ({', '.join(SETTINGS)})")
  ap.add_argument("--out", default=None, help="also write the JSON result here")
  args = ap.parse_args(argv)
  names = [n for n in args.settings.split(",") if n]
  unknown = [n for n in names if n not in SETTINGS]
  if unknown:
    ap.error(f"--settings: unknown {unknown}; known: {sorted(SETTINGS)}")

  config = digits.get_config("distill")
  dist, teacher_state, student_state, info = distill.restore_student(config, args.workdir)
  params = dist.trainer.eval_params(teacher_state)
  student = (dist.student, dist.student_params(student_state))
  clf, real_acc = judge()
  print(f"judge: SVC, accuracy on the real test split {real_acc:.4f}", file=sys.stderr)
  labels = sample.grid_labels(np.arange(10), args.per_class)
  grid_idx = np.concatenate([np.arange(10) + k * args.per_class for k in range(10)])
  out_dir = os.path.join(str(rundir.RunDir(args.workdir).distill), "compare")
  os.makedirs(out_dir, exist_ok=True)
  accuracy = lambda im: float(np.mean(clf.predict(
      sample.quantize(im, 17).reshape(len(im), -1) / 16.0) == labels))
  results = {}
  for name in names:
    t0 = time.perf_counter()
    kwargs = dict(batch_size=100, sampler=SETTINGS[name], progress=False, as_float=True)
    with jax.set_mesh(dist.mesh):
      exact = sample.generate(dist.trainer.model, params, labels, jax.random.key(0), **kwargs)
      fast = sample.generate(dist.trainer.model, params, labels, jax.random.key(0),
                             student=student, **kwargs)
    level_diff = np.abs(sample.quantize(fast, 17).astype(int) - sample.quantize(exact, 17))
    r = {"pixel_mae": float(np.mean(np.abs(fast - exact))),
         "pixel_max_abs": float(np.max(np.abs(fast - exact))),
         "level_mae": float(np.mean(level_diff)),
         "same_level_fraction": float(np.mean(level_diff == 0)),
         "class_accuracy_exact": accuracy(exact), "class_accuracy_student": accuracy(fast)}
    r["accuracy_gap"] = r["class_accuracy_student"] - r["class_accuracy_exact"]
    results[name] = r
    grids = {}
    for kind, images in (("exact", exact), ("student", fast)):
      grids[kind] = sample.save_grid_png(os.path.join(out_dir, f"{name}_{kind}.png"),
                                         sample.quantize(images[grid_idx], 17), 17, rows=10)
    gap = np.full((grids["exact"].shape[0], 16, grids["exact"].shape[2]), 255, np.uint8)
    pair = np.concatenate([grids["exact"], gap, grids["student"]], axis=1)
    from PIL import Image  # noqa: PLC0415
    Image.fromarray(pair[..., 0]).save(os.path.join(out_dir, f"{name}_pair.png"))
    print(f"{name}: pixel MAE {r['pixel_mae']:.4f}, class accuracy exact "
          f"{r['class_accuracy_exact']:.3f} / student {r['class_accuracy_student']:.3f} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
  result = {"workdir": args.workdir, "teacher": info, "student_step": int(student_state.step),
            "per_class": args.per_class, "judge": "sklearn SVC (RBF) on real digits train split",
            "judge_test_accuracy": real_acc, "results": results}
  metrics.print_json_line(result, args.out)
  return result


if __name__ == "__main__":
  main()
