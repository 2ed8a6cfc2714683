"""FID, Inception Score and improved precision/recall from Inception features, as ADM's evaluator.

- FID (Heusel et al. 2017): ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) over pool3
  statistics (mean, unbiased covariance), in float64 on the host (statistics need N >= 2).
- Inception Score (Salimans et al. 2016): the features are cut into `splits` consecutive parts;
  per part exp(mean_x KL(p(y|x) || p(y))) with p(y) the part's mean; mean and std over parts.
  p(y|x) is the softmax over all 1008 outputs of pool3 @ W, without the fc bias, as the original
  IS code and ADM's evaluator take it from TF's graph (`softmax/logits/MatMul`). ADM cuts
  5000-sample parts: 10 parts at 50K samples, the same thing.
- Precision / recall (Kynkaanniemi et al. 2019, ADM's ManifoldEstimator): a set's manifold is the
  union of balls around its features with radius the distance to the k-th nearest neighbour in
  the same set (k = 3; the point itself is the 0-th). Precision: the fraction of samples inside the
  reference manifold; recall: the fraction of references inside the sample manifold. Squared
  Euclidean distances, computed in fixed-size blocks with JAX (ADM: 10000-row blocks; ADM tries
  float16 distances first, ours are float32).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special


def statistics(features_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """-> (mu [D], sigma [D, D]) in float64: the mean and the unbiased covariance (N - 1)."""
  f = np.asarray(features_NxD, np.float64)
  if len(f) < 2:
    raise ValueError(f"FID statistics need at least 2 feature vectors, got {len(f)}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _trace_sqrt(m: np.ndarray) -> float:
  """tr(M^(1/2)) of a symmetric PSD matrix (rounding's tiny negative eigenvalues count as 0)."""
  return float(np.sum(np.sqrt(np.maximum(np.linalg.eigvalsh((m + m.T) / 2), 0.0))))


def _fid(diff: np.ndarray, trace1: float, sigma2: np.ndarray, trace_sqrt: float) -> float:
  return float(diff @ diff + trace1 + np.trace(sigma2) - 2.0 * trace_sqrt)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

  tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which equal those
  of the symmetric PSD matrix A S2 A with A = S1^(1/2): two symmetric eigendecompositions instead
  of a general matrix square root (faster at 2048 dims, and real by construction).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma "
                     f"{sigma1.shape} vs {sigma2.shape}")
  w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
  root1 = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T
  return _fid(mu1 - mu2, np.trace(sigma1), sigma2, _trace_sqrt(root1 @ sigma2 @ root1))


def frechet_distance_of_features(features_NxD: np.ndarray, mu2: np.ndarray,
                                 sigma2: np.ndarray) -> float:
  """FID of a feature set against statistics. With fewer features than dimensions it avoids the
  D x D decompositions: S1 = F^T F (F the centred features / sqrt(N - 1)), and the nonzero
  eigenvalues of S1 S2 = F^T (F S2) are those of the N x N matrix F S2 F^T."""
  f = np.asarray(features_NxD, np.float64)
  n, d = f.shape
  if n - 1 >= d:
    return frechet_distance(*statistics(f), mu2, sigma2)
  mu1 = f.mean(axis=0)
  factor = (f - mu1) / np.sqrt(n - 1)
  sigma2 = np.asarray(sigma2, np.float64)
  return _fid(mu1 - np.asarray(mu2, np.float64), float(np.sum(factor ** 2)), sigma2,
              _trace_sqrt(factor @ sigma2 @ factor.T))


def inception_score(logits_NxK: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """-> (mean, std) over `splits` consecutive parts of exp(E_x KL(p(y|x) || p(y)))."""
  logits = np.asarray(logits_NxK, np.float64)
  if not 1 <= splits <= len(logits):
    raise ValueError(f"inception score: {splits} splits need at least as many samples, got "
                     f"{len(logits)}")
  log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  for i in range(splits):
    part = log_p[i * len(log_p) // splits:(i + 1) * len(log_p) // splits]
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(len(part))
    kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------
# Precision / recall: blockwise distances on the device.
# ---------------------------------------------------------------------------------------------


def _squared_distances(a_RxD: jax.Array, b_CxD: jax.Array) -> jax.Array:
  """|a_i - b_j|^2 as |a|^2 - 2 a.b + |b|^2, floored at 0 (the expansion can dip below)."""
  ab = jnp.dot(a_RxD, b_CxD.T, precision=jax.lax.Precision.HIGHEST)
  d = jnp.sum(a_RxD ** 2, 1)[:, None] - 2.0 * ab + jnp.sum(b_CxD ** 2, 1)[None, :]
  return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour_block(rows_RxD, cols_NBxCxD, num_cols, k: int):
  """Squared distance from each row to its k-th nearest column (0-th: the nearest) -> [R]."""
  block = cols_NBxCxD.shape[1]

  def step(best_RxK, inputs):
    i, cols = inputs
    d = _squared_distances(rows_RxD, cols)
    d = jnp.where(i * block + jnp.arange(block)[None, :] < num_cols, d, jnp.inf)
    smallest = -jax.lax.top_k(-jnp.concatenate([best_RxK, d], axis=1), k + 1)[0]
    return smallest, None

  init = jnp.full((rows_RxD.shape[0], k + 1), jnp.inf, jnp.float32)
  best, _ = jax.lax.scan(step, init, (jnp.arange(cols_NBxCxD.shape[0]), cols_NBxCxD))
  return best[:, k]


@jax.jit
def _inside_block(rows_RxD, cols_NBxCxD, radii_NBxC):
  """Whether each row lies within some column's ball (squared radius; padded columns: -inf)."""
  def step(inside_R, inputs):
    cols, radii = inputs
    d = _squared_distances(rows_RxD, cols)
    return inside_R | jnp.any(d <= radii[None, :], axis=1), None

  inside, _ = jax.lax.scan(step, jnp.zeros(rows_RxD.shape[0], bool), (cols_NBxCxD, radii_NBxC))
  return inside


def _blocks(x: np.ndarray, block: int, fill: float = 0.0) -> np.ndarray:
  """[N, ...] -> [ceil(N / block), block, ...], padded with `fill`."""
  n = -(-len(x) // block) * block
  pad = np.full((n - len(x),) + x.shape[1:], fill, x.dtype)
  return np.concatenate([x, pad]).reshape((n // block, block) + x.shape[1:])


def manifold_radii(features_NxD: np.ndarray, k: int = 3, block: int = 10_000) -> np.ndarray:
  """Squared distance of each feature to its k-th nearest neighbour in the same set -> [N]."""
  f = np.asarray(features_NxD, np.float32)
  if len(f) <= k:
    raise ValueError(f"precision/recall with k={k} need more than {k} features, got {len(f)}")
  block = min(block, len(f))
  cols = _blocks(f, block)
  radii = [_kth_neighbour_block(rows, cols, len(f), k) for rows in _blocks(f, block)]
  return np.asarray(jnp.concatenate(radii))[:len(f)]


def fraction_inside(features_NxD: np.ndarray, manifold_MxD: np.ndarray, radii_M: np.ndarray,
                    block: int = 10_000) -> float:
  """Fraction of `features` within at least one ball (centre manifold_j, squared radius radii_j)."""
  f = np.asarray(features_NxD, np.float32)
  block = min(block, max(len(f), len(manifold_MxD)))
  cols = _blocks(np.asarray(manifold_MxD, np.float32), block)
  radii = _blocks(np.asarray(radii_M, np.float32), block, fill=-np.inf)
  inside = [_inside_block(rows, cols, radii) for rows in _blocks(f, block)]
  return float(np.mean(np.asarray(jnp.concatenate(inside))[:len(f)]))


def precision_recall(samples_NxD: np.ndarray, reference_MxD: np.ndarray, k: int = 3,
                     block: int = 10_000) -> tuple[float, float]:
  """-> (precision, recall) of the samples against the reference."""
  sample_radii = manifold_radii(samples_NxD, k, block)
  reference_radii = manifold_radii(reference_MxD, k, block)
  precision = fraction_inside(samples_NxD, reference_MxD, reference_radii, block)
  recall = fraction_inside(reference_MxD, samples_NxD, sample_radii, block)
  return precision, recall
