r"""The density baselines a FARMER run must beat: scikit-learn Gaussian mixtures, test bits/dim.

    python benchmarks/gmm_baseline.py [--dataset=digits|mnist5k] [--components=1,5,10]
        [--pca_dims=10,20] [--pca_components=1,5] [--reg_covar=1e-6,1e-3] [--out=FILE]

Data: a tfds data set of `farmer_jax/datasets.py` (its fixed train/test split), uniformly
dequantised in the same [-1, 1] space and bits/dim as the trainer (SPEC sec. 1):
x = (v + u) / L * 2 - 1 with u ~ U(0, 1) (train draws with seed 0, test with seed 1), L the set's
levels (digits 17, mnist5k 256); bpd = nll_nats_per_dim / ln 2 + log2(L / 2).

Two model families, each fitted on train and scored on test (random_state=0), for each
`--reg_covar` (the variance GaussianMixture adds to every covariance diagonal; sklearn's default
1e-6 lets directions that are nearly constant in train, such as MNIST's border pixels, cost
thousands of nats on the test images that use them):
- full: a full-covariance `GaussianMixture` in all D dimensions, for each of `--components`.
- pca: x is rotated into the train split's principal axes, z = V^T (x - mean) with V orthogonal
  (D x D), so log p(x) = log p(z) with no Jacobian term. The top k coordinates get a
  full-covariance GaussianMixture; the other D - k an independent zero-mean Gaussian, either
  `isotropic` (one variance: the mean of their train eigenvalues) or `diagonal` (each its train
  eigenvalue), plus reg_covar. That is a proper density in the full space; swept over k in
  `--pca_dims`, the mixture's `--pca_components` and both complements. With one component and the
  diagonal complement it is the full-covariance single Gaussian, whatever k.
The best of each family is picked on the test split, as the figures it is compared with are, so
the baseline is optimistic. The defaults per data set are sized for 2 CPU cores: mnist5k's took 5.2
minutes (5.5 CPU-minutes) on 2 cores shared with other jobs, digits' 2.5. Prints one line per
model, then as the last line one JSON object with every figure and the best.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
from sklearn.mixture import GaussianMixture

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from farmer_jax import datasets, metrics  # noqa: E402

# Per data set: full-covariance components, PCA dims k, PCA mixture components, reg_covar values.
DEFAULTS = {
    "digits": {"components": (1, 5, 10, 20), "pca_dims": (10, 20, 30, 40),
               "pca_components": (1, 5, 10, 20), "reg_covar": (1e-6, 1e-3)},
    "mnist5k": {"components": (1, 5), "pca_dims": (50, 100, 200), "pca_components": (1, 5),
                "reg_covar": (1e-6, 1e-4, 1e-3)},
}
COMPLEMENTS = ("isotropic", "diagonal")
TRAIN_DEQUANT_SEED, TEST_DEQUANT_SEED = 0, 1


def dequantise(v_NxD: np.ndarray, num_levels: int, seed: int) -> np.ndarray:
  """Integer levels [N, D] -> float64 [N, D] in [-1, 1], one uniform draw per value."""
  u = np.random.default_rng(seed).random(v_NxD.shape)
  return (v_NxD + u) / num_levels * 2.0 - 1.0


def to_bpd(log_density_N: np.ndarray, dims: int, num_levels: int) -> float:
  """Mean log density (nats) per image in [-1, 1] space -> bits/dim of the L-level data."""
  return float(-np.mean(log_density_N) / dims / math.log(2.0) + math.log2(num_levels / 2.0))


class Pca:
  """The train split's principal axes: z = (x - mean) @ rotation, rotation orthogonal (D x D),
  columns by decreasing variance (`variances`: the train eigenvalues, biased covariance)."""

  def __init__(self, x_NxD: np.ndarray):
    self.mean = x_NxD.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(np.cov(x_NxD - self.mean, rowvar=False, bias=True))
    order = np.argsort(eigval)[::-1]
    self.rotation, self.variances = eigvec[:, order], np.maximum(eigval[order], 0.0)

  def project(self, x_NxD: np.ndarray) -> np.ndarray:
    return (x_NxD - self.mean) @ self.rotation


def complement_log_density(z_rest: np.ndarray, variances: np.ndarray, complement: str,
                           reg_covar: float) -> np.ndarray:
  """Zero-mean Gaussian log density of the coordinates beyond the top k: per-axis variance
  (`diagonal`) or their mean (`isotropic`), plus reg_covar as the mixture gets on its diagonal."""
  var = variances if complement == "diagonal" else np.full_like(variances, variances.mean())
  var = var + reg_covar
  return -0.5 * np.sum(z_rest ** 2 / var + np.log(2 * np.pi * var), axis=1)


def float_list(s: str) -> tuple[float, ...]:
  return tuple(float(v) for v in s.split(",") if v.strip())


def int_list(s: str) -> tuple[int, ...]:
  return tuple(int(v) for v in s.split(",") if v.strip())


def best_row(rows: list[dict]) -> dict | None:
  return min(rows, key=lambda r: r["test_bpd"]) if rows else None


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default="digits", choices=sorted(DEFAULTS))
  parser.add_argument("--components", type=int_list,
                      help="full-covariance mixture sizes (default: per data set; '' for none)")
  parser.add_argument("--pca_dims", type=int_list,
                      help="PCA dims k (default: per data set; '' for none)")
  parser.add_argument("--pca_components", type=int_list,
                      help="mixture sizes on the PCA coordinates (default: per data set)")
  parser.add_argument("--reg_covar", type=float_list,
                      help="reg_covar values of both families (default: per data set)")
  parser.add_argument("--out", help="also write the JSON result to this file")
  args = parser.parse_args(argv)
  sweep = {f: DEFAULTS[args.dataset][f] if getattr(args, f) is None else getattr(args, f)
           for f in ("components", "pca_dims", "pca_components", "reg_covar")}

  num_levels = datasets.num_levels(args.dataset)
  train, _ = datasets.load_split(args.dataset, "train")
  test, _ = datasets.load_split(args.dataset, "test")
  x_train = dequantise(train.reshape(len(train), -1).astype(np.float64), num_levels,
                       TRAIN_DEQUANT_SEED)
  x_test = dequantise(test.reshape(len(test), -1).astype(np.float64), num_levels,
                      TEST_DEQUANT_SEED)
  dims = x_train.shape[1]
  print(f"{args.dataset}: train {x_train.shape}, test {x_test.shape}, L={num_levels}", flush=True)
  bpd = lambda log_density: round(to_bpd(log_density, dims, num_levels), 4)  # noqa: E731

  full = []
  for reg in sweep["reg_covar"]:
    for k in sweep["components"]:
      start = time.perf_counter()
      gmm = GaussianMixture(n_components=k, covariance_type="full", reg_covar=reg,
                            random_state=0).fit(x_train)
      full.append({"components": k, "reg_covar": reg, "test_bpd": bpd(gmm.score_samples(x_test)),
                   "train_bpd": bpd(gmm.score_samples(x_train)), "converged": bool(gmm.converged_),
                   "seconds": round(time.perf_counter() - start, 1)})
      print(f"  full {k:2d} components, reg {reg:.0e}: test {full[-1]['test_bpd']:.4f} bpd, "
            f"train {full[-1]['train_bpd']:.4f} ({full[-1]['seconds']} s)", flush=True)

  pca_rows = []
  if sweep["pca_dims"]:
    pca = Pca(x_train)
    z_train, z_test = pca.project(x_train), pca.project(x_test)
  for d in sweep["pca_dims"]:
    if not 0 < d < dims:
      raise ValueError(f"--pca_dims: {d} must lie in (0, {dims})")
    for reg in sweep["reg_covar"]:
      for k in sweep["pca_components"]:
        start = time.perf_counter()
        gmm = GaussianMixture(n_components=k, covariance_type="full", reg_covar=reg,
                              random_state=0).fit(z_train[:, :d])
        seconds = round(time.perf_counter() - start, 1)
        for complement in COMPLEMENTS:   # the same mixture under either complement
          def log_density(z):
            return gmm.score_samples(z[:, :d]) + complement_log_density(
                z[:, d:], pca.variances[d:], complement, reg)
          pca_rows.append({"dims": d, "components": k, "reg_covar": reg, "complement": complement,
                           "test_bpd": bpd(log_density(z_test)),
                           "train_bpd": bpd(log_density(z_train)),
                           "converged": bool(gmm.converged_), "seconds": seconds})
          print(f"  pca k={d:3d}, {k:2d} components, reg {reg:.0e}, {complement:9s}: test "
                f"{pca_rows[-1]['test_bpd']:.4f} bpd, train {pca_rows[-1]['train_bpd']:.4f} "
                f"({seconds} s)", flush=True)

  best_full, best_pca = best_row(full), best_row(pca_rows)
  best = best_row([r for r in (best_full, best_pca) if r])
  result = {"dataset": args.dataset, "num_levels": num_levels, "dims": dims,
            "train_images": len(x_train), "test_images": len(x_test),
            "dequant_seeds": {"train": TRAIN_DEQUANT_SEED, "test": TEST_DEQUANT_SEED},
            "selected_on": "test split (an optimistic baseline)",
            "full": full, "pca": pca_rows, "best_full": best_full, "best_pca": best_pca,
            "best": None if best is None else {"family": "full" if best is best_full else "pca",
                                               **best}}
  metrics.print_json_line(result, args.out)
  return result


if __name__ == "__main__":
  main()
