r"""The baseline a FARMER digits run must beat: scikit-learn GaussianMixture test bits/dim.

    python benchmarks/gmm_baseline.py [--out gmm_baseline.json]

Full-covariance mixtures with 1, 5, 10 and 20 components (random_state=0) are fitted to the
uniformly dequantised digits train split and scored on the test split dequantised with another
fixed seed, in the same [-1, 1] space and bits/dim as the trainer (SPEC sec. 1):
x = (v + u) / L * 2 - 1 with u ~ U(0, 1), L = 17; bpd = nll_nats_per_dim / ln 2 + log2(L / 2).
Prints one line per mixture, then as the last line one JSON object.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
from sklearn.mixture import GaussianMixture

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from farmer_jax import datasets  # noqa: E402

NUM_LEVELS = 17               # digits values are 0..16
COMPONENTS = (1, 5, 10, 20)
TRAIN_DEQUANT_SEED, TEST_DEQUANT_SEED = 0, 1


def dequantise(v_NxD: np.ndarray, seed: int) -> np.ndarray:
  """Integer levels [N, D] -> float64 [N, D] in [-1, 1], one uniform draw per value."""
  u = np.random.default_rng(seed).random(v_NxD.shape)
  return (v_NxD + u) / NUM_LEVELS * 2.0 - 1.0


def bits_per_dim(gmm: GaussianMixture, x_NxD: np.ndarray) -> float:
  nll_nats_per_dim = -gmm.score(x_NxD) / x_NxD.shape[1]    # score: mean log density per sample
  return nll_nats_per_dim / math.log(2.0) + math.log2(NUM_LEVELS / 2.0)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="also write the JSON result to this file")
  args = parser.parse_args(argv)

  train, _ = datasets.load_split("digits", "train")
  test, _ = datasets.load_split("digits", "test")
  x_train = dequantise(train.reshape(len(train), -1).astype(np.float64), TRAIN_DEQUANT_SEED)
  x_test = dequantise(test.reshape(len(test), -1).astype(np.float64), TEST_DEQUANT_SEED)
  print(f"digits: train {x_train.shape}, test {x_test.shape}, L={NUM_LEVELS}", flush=True)

  bpd = {}
  for k in COMPONENTS:
    start = time.perf_counter()
    gmm = GaussianMixture(n_components=k, covariance_type="full", random_state=0).fit(x_train)
    bpd[str(k)] = round(bits_per_dim(gmm, x_test), 4)
    print(f"  {k:2d} components: test {bpd[str(k)]:.4f} bpd, train "
          f"{bits_per_dim(gmm, x_train):.4f} bpd, converged={gmm.converged_} "
          f"({time.perf_counter() - start:.1f} s)", flush=True)

  best = min(bpd, key=bpd.get)
  result = {"dataset": "digits", "covariance": "full", "num_levels": NUM_LEVELS,
            "dequant_seeds": {"train": TRAIN_DEQUANT_SEED, "test": TEST_DEQUANT_SEED},
            "bpd_by_components": bpd, "best_components": int(best), "best_bpd": bpd[best]}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
