r"""Class accuracy of digits samples under unguided, naive-CFG and resampling-CFG sampling.

    python benchmarks/digits_guidance.py --workdir=runs/digits [--per_class=50] [--out=FILE]

The judge is an RBF support-vector classifier (scikit-learn `SVC`, default C and gamma) trained on
the real digits training split (native levels / 16) and checked on the test split. Each setting
samples `per_class` images of every class from the latest checkpoint of `--workdir` (trained with
configs/digits.py), and reports the fraction the judge labels as the conditioned class. Grids go to
`<workdir>/guidance/<setting>.png`. Last line of stdout: one JSON object.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from sklearn.svm import SVC

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import digits  # noqa: E402
from farmer_jax import datasets, rundir, sample, train  # noqa: E402
from farmer_jax.models import prior  # noqa: E402

SETTINGS = {
    "unguided_T1_s1": prior.SamplerConfig(),
    "unguided_T1.3_s0.9": prior.SamplerConfig(temperature=1.3, scale=0.9),
    "unguided_T1_s0.8": prior.SamplerConfig(scale=0.8, scale_redundant=0.8),
    "naive_w1": prior.SamplerConfig(guidance="naive", w=1.0),
    "naive_w3": prior.SamplerConfig(guidance="naive", w=3.0),
    "resample_w1": prior.SamplerConfig(guidance="resample", w=1.0),
    "resample_w2": prior.SamplerConfig(guidance="resample", w=2.0),
    "resample_w3": prior.SamplerConfig(guidance="resample", w=3.0),
    "resample_w5": prior.SamplerConfig(guidance="resample", w=5.0),
    "resample_w3_tsigma0.8": prior.SamplerConfig(guidance="resample", w=3.0, t_sigma=0.8),
    "resample_w3_paper_temps": prior.SamplerConfig(guidance="resample", w=3.0, t_sigma=0.9,
                                                   t_pi_v=0.2, t_sigma_v=0.9, t_s=1.1),
}


def judge() -> tuple[SVC, float]:
  x_tr, y_tr = datasets.load_split("digits", "train")
  x_te, y_te = datasets.load_split("digits", "test")
  clf = SVC().fit(x_tr.reshape(len(x_tr), -1) / 16.0, y_tr)
  return clf, float(clf.score(x_te.reshape(len(x_te), -1) / 16.0, y_te))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--per_class", type=int, default=50)
  ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  config = digits.get_config()
  trainer = train.Trainer(config)
  ckpt = rundir.Checkpointer(args.workdir, read_only=True)
  state = ckpt.restore(trainer.abstract_state)
  params = trainer.eval_params(state)
  clf, real_acc = judge()
  print(f"judge: SVC, accuracy on the real test split {real_acc:.4f}", file=sys.stderr)
  labels = sample.grid_labels(np.arange(10), args.per_class)
  results = {}
  os.makedirs(os.path.join(args.workdir, "guidance"), exist_ok=True)
  for name in args.settings.split(","):
    s = SETTINGS[name]
    t0 = time.perf_counter()
    images = sample.generate(trainer.model, params, labels, jax.random.key(0), batch_size=100,
                             sampler=s, progress=False)
    pred = clf.predict(images.reshape(len(images), -1) / 16.0)
    acc = float(np.mean(pred == labels))
    results[name] = {"class_accuracy": acc, "sampler": dataclasses.asdict(s)}
    grid_idx = np.concatenate([np.arange(10) + k * args.per_class for k in range(10)])
    sample.save_grid_png(os.path.join(args.workdir, "guidance", f"{name}.png"), images[grid_idx],
                         17, rows=10)
    print(f"{name}: class accuracy {acc:.3f} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
  out = {"workdir": args.workdir, "step": int(state.step), "per_class": args.per_class,
         "judge": "sklearn SVC (RBF) on real digits train split",
         "judge_test_accuracy": real_acc, "results": results}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
