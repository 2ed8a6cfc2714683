r"""Class accuracy of an AFM digits run's samples against step (configs/afm_digits.py).

    python benchmarks/afm_digits.py --workdir=runs/afm_digits [--out=FILE]
    python benchmarks/afm_digits.py --workdir=runs/digits/afm     # on FARMER's latents

Every samples/samples_<step>.npz the run wrote (G EMA, fixed noise, `sample.per_class` images of each
class) is judged by the digits SVC of benchmarks/digits_guidance.py (RBF SVC on the real training
split, levels / 16): class accuracy = the fraction labelled as the conditioned class. Also a
Frechet distance in pixel space (levels / 16, 64 values) against the 360 real test images.
Last line of stdout: one JSON object {"curve": [{"step", "class_accuracy", "pixel_fd"}, ...]}.
"""
import argparse
import glob
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.digits_guidance import judge  # noqa: E402
from farmer_jax import datasets, metrics  # noqa: E402
from farmer_jax.evaluation import scores  # noqa: E402


def frechet(a: np.ndarray, b: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to the rows of a and b (the FID formula)."""
  return scores.frechet_distance(a.mean(0), np.cov(a, rowvar=False),
                                 b.mean(0), np.cov(b, rowvar=False))


def curve(workdir: str) -> list[dict]:
  clf, _ = judge()
  x_test, _ = datasets.load_split("digits", "test")
  real = x_test.reshape(len(x_test), -1) / 16.0
  rows = []
  for path in glob.glob(os.path.join(workdir, "samples", "samples_*.npz")):
    m = re.fullmatch(r"samples_(\d+)(_student)?\.npz", os.path.basename(path))
    if not m:
      continue
    with np.load(path) as f:
      images, labels = f["images"], f["labels"]
    flat = images.reshape(len(images), -1) / 16.0
    rows.append({"step": int(m.group(1)),
                 "class_accuracy": float(np.mean(clf.predict(flat) == labels)),
                 "pixel_fd": frechet(flat, real), "num_samples": int(len(labels))})
  return sorted(rows, key=lambda r: r["step"])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  _, real_acc = judge()
  rows = curve(args.workdir)
  for r in rows:
    print(f"step {r['step']}: class accuracy {r['class_accuracy']:.3f}, pixel FD "
          f"{r['pixel_fd']:.3f}", file=sys.stderr)
  metrics.print_json_line({"workdir": args.workdir, "judge_test_accuracy": real_acc,
                           "judge": "sklearn SVC (RBF) on real digits train split",
                           "fd_space": "pixels (levels / 16), vs the 360 real test images",
                           "curve": rows}, args.out)


if __name__ == "__main__":
  main()
