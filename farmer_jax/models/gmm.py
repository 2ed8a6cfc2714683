"""Diagonal Gaussian mixtures over whole token vectors (SPEC sec. 3). Pure functions, float32.

A mixture over D-dim vectors has `logits [..., K]`, `means [..., K, D]`, `scales [..., K, D]` (std devs).
Heads emit a flat vector of K * (1 + 2 D) numbers per position; `unpack` turns it into the three parts.
"""
import math

import jax
import jax.numpy as jnp

_LOG_2PI = math.log(2.0 * math.pi)


def squareplus(x: jax.Array) -> jax.Array:
  """(x + sqrt(x^2 + 4)) / 2: smooth, positive, ~linear for large x, 1 at x = 0."""
  return 0.5 * (x + jnp.sqrt(jnp.square(x) + 4.0))


def num_outputs(k: int, dim: int) -> int:
  """Width of the linear head that parameterises a K-component mixture over `dim` values."""
  return k * (1 + 2 * dim)


def unpack(raw: jax.Array, k: int, dim: int, scale_floor: float):
  """raw [..., K*(1+2D)] -> logits [..., K], means [..., K, D], scales [..., K, D], all float32."""
  raw = raw.astype(jnp.float32)
  logits = raw[..., :k]
  means = raw[..., k:k + k * dim].reshape(*raw.shape[:-1], k, dim)
  scales = squareplus(raw[..., k + k * dim:].reshape(*raw.shape[:-1], k, dim)) + scale_floor
  return logits, means, scales


def component_log_probs(x: jax.Array, means: jax.Array, scales: jax.Array) -> jax.Array:
  """log N(x; mean_k, diag(scale_k^2)) for every component: x [..., D] -> [..., K]."""
  x = x.astype(jnp.float32)[..., None, :]
  zs = (x - means) / scales
  return -0.5 * jnp.sum(jnp.square(zs) + _LOG_2PI, axis=-1) - jnp.sum(jnp.log(scales), axis=-1)


def log_prob(x: jax.Array, logits: jax.Array, means: jax.Array, scales: jax.Array) -> jax.Array:
  """log sum_k pi_k N(x; mean_k, scale_k^2): x [..., D] -> [...]. Parameters broadcast against x."""
  log_weights = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jax.nn.logsumexp(log_weights + component_log_probs(x, means, scales), axis=-1)


def sample(key: jax.Array, logits: jax.Array, means: jax.Array, scales: jax.Array,
           temperature: float = 1.0, scale: float = 1.0) -> jax.Array:
  """One draw per mixture: [..., K] / [..., K, D] -> [..., D].

  Decoupled sampling (SPEC sec. 5.2): the component is drawn from softmax(logits / temperature) and
  the draw within it uses std * scale. Parameters broadcast against each other (a mixture shared
  by several positions can come with a singleton axis).
  """
  batch = jnp.broadcast_shapes(logits.shape[:-1], means.shape[:-2], scales.shape[:-2])
  k, d = means.shape[-2:]
  logits = jnp.broadcast_to(logits, (*batch, k))
  means, scales = (jnp.broadcast_to(a, (*batch, k, d)) for a in (means, scales))
  k_comp, k_noise = jax.random.split(key)
  comp = jax.random.categorical(k_comp, logits.astype(jnp.float32) / temperature, axis=-1)
  pick = lambda a: jnp.take_along_axis(a, comp[..., None, None], axis=-2)[..., 0, :]
  mean, std = pick(means), pick(scales)
  return mean + scale * std * jax.random.normal(k_noise, mean.shape, jnp.float32)


def standard_normal_log_prob(x: jax.Array) -> jax.Array:
  """log N(x; 0, I) summed over the last axis (JetFormer's redundant-channel model)."""
  x = x.astype(jnp.float32)
  return -0.5 * jnp.sum(jnp.square(x) + _LOG_2PI, axis=-1)


# ---------------------------------------------------------------------------------------------
# Guided sampling (SPEC sec. 5). `Mixture` = (logits [..., K], means [..., K, D], scales [..., K, D]).
# ---------------------------------------------------------------------------------------------


def tempered(mixture, temperature: float = 1.0, scale: float = 1.0):
  """Mixture logits / temperature, component std * scale."""
  logits, means, scales = mixture
  return logits / temperature, means, scales * scale


def sample_many(key: jax.Array, mixture, n: int, temperature: float = 1.0,
                scale: float = 1.0) -> jax.Array:
  """n independent draws per mixture: -> [n, ..., D]."""
  logits, means, scales = mixture
  lead = lambda a: jnp.broadcast_to(a, (n, *a.shape))
  return sample(key, lead(logits), lead(means), lead(scales), temperature, scale)


def resample_cfg(key: jax.Array, cond, uncond, *, w: float, num_cond: int, num_uncond: int,
                 t_pi: float = 1.0, t_sigma: float = 1.0, t_pi_v: float = 1.0,
                 t_sigma_v: float = 1.0, t_s: float = 1.0, ts_mode: str = "multiply",
                 weight_all_by_w: bool = False, num_draws: int | None = None) -> jax.Array:
  """Resampling-based classifier-free guidance (paper Algorithm 1) towards p_c^(w+1) / p_u^w.

  Proposes `num_cond` candidates from the conditional mixture and `num_uncond` from the
  unconditional one (both tempered by T_pi on the logits and T_sigma on the stds), weights each by
  its importance ratio to the target, evaluated with densities tempered by (T_pi_v, T_sigma_v):
      conditional proposals:    w       * (log p_c(x) - log p_u(x))
      unconditional proposals:  (w + 1) * (log p_c(x) - log p_u(x))   (w with `weight_all_by_w`,
                                                                         the appendix's variant)
  With untempered densities and many candidates this is self-normalised importance resampling, so
  the draw converges to the target (with w = 0: to p_c). The log-weights are then multiplied by T_s
  (`ts_mode="multiply"`, ours) or divided by it (`"divide"`), and one candidate is drawn from their
  softmax. Mixture parameters [..., K] / [..., K, D] -> [..., D], or [num_draws, ..., D] drawn with
  replacement from the same pool (the shared redundant-channel GMM, SPEC sec. 5.3).
  """
  if ts_mode not in ("multiply", "divide"):
    raise ValueError(f"ts_mode must be 'multiply' or 'divide', got {ts_mode!r}")
  k_c, k_u, k_pick = jax.random.split(key, 3)
  parts = []
  if num_cond:
    parts.append(sample_many(k_c, cond, num_cond, t_pi, t_sigma))
  if num_uncond:
    parts.append(sample_many(k_u, uncond, num_uncond, t_pi, t_sigma))
  cands_SxD = jnp.concatenate(parts, axis=0)                      # [S, ..., D]
  log_ratio = (log_prob(cands_SxD, *tempered(cond, t_pi_v, t_sigma_v))
               - log_prob(cands_SxD, *tempered(uncond, t_pi_v, t_sigma_v)))   # [S, ...]
  factor_u = w if weight_all_by_w else w + 1.0
  factor = jnp.concatenate([jnp.full((num_cond,), w), jnp.full((num_uncond,), factor_u)])
  log_w = factor.reshape(-1, *([1] * (log_ratio.ndim - 1))) * log_ratio
  log_w = log_w * t_s if ts_mode == "multiply" else log_w / t_s
  shape = () if num_draws is None else (num_draws,)
  idx = jax.random.categorical(k_pick, jnp.moveaxis(log_w, 0, -1), axis=-1,
                               shape=shape + log_w.shape[1:])  # [(n,) ...]
  cands = jnp.moveaxis(cands_SxD, 0, -2)                        # [..., S, D]
  if num_draws is None:
    return jnp.take_along_axis(cands, idx[..., None, None], axis=-2)[..., 0, :]
  cands = jnp.broadcast_to(cands, (num_draws, *cands.shape))
  return jnp.take_along_axis(cands, idx[..., None, None], axis=-2)[..., 0, :]


def naive_cfg(key: jax.Array, cond, uncond, *, w: float, temperature: float = 1.0,
              scale: float = 1.0, max_tries: int = 32, grid: int = 64) -> jax.Array:
  """The JetFormer / GIVT baseline: a component from the conditional weights, then per dimension
  rejection sampling from N_c,k(x)^(1+w) / p_u(x)^w, p_u the unconditional mixture's marginal.

  Proposal: the chosen conditional component (std * scale). The bound on target / proposal is taken
  on a grid over mean +- 6 std (times 1.1): `max_tries` proposals, the first accepted wins; if none
  is, the one with the largest ratio is used (the bounded-tries fallback). -> [..., D].
  """
  k_comp, k_prop, k_acc = jax.random.split(key, 3)
  logits_c, means_c, scales_c = cond
  comp = jax.random.categorical(k_comp, logits_c / temperature, axis=-1)
  pick = lambda a: jnp.take_along_axis(a, comp[..., None, None], axis=-2)[..., 0, :]
  mu, sd = pick(means_c), pick(scales_c) * scale                     # [..., D]
  logits_u, means_u, scales_u = uncond
  log_pi_u = jax.nn.log_softmax(logits_u, axis=-1)[..., None, None, :]   # [..., 1, 1, K]

  def log_ratio(x_TxD):            # x [..., T, D] -> log target - log proposal [..., T, D]
    log_nc = -0.5 * jnp.square((x_TxD - mu[..., None, :]) / sd[..., None, :])
    xs = x_TxD[..., None]                                            # [..., T, D, 1]
    mu_u, sd_u = (jnp.swapaxes(a, -1, -2)[..., None, :, :] for a in (means_u, scales_u))
    log_pu = jax.nn.logsumexp(log_pi_u - 0.5 * jnp.square((xs - mu_u) / sd_u) - jnp.log(sd_u)
                              - 0.5 * _LOG_2PI, axis=-1)
    # N_c^(1+w) / p_u^w over N_c (dropping constants): w * (log N_c - log p_u).
    return w * (log_nc - jnp.log(sd[..., None, :]) - 0.5 * _LOG_2PI - log_pu)

  offsets = jnp.linspace(-6.0, 6.0, grid)[:, None]
  log_bound = jnp.max(log_ratio(mu[..., None, :] + offsets * sd[..., None, :]), axis=-2)
  log_bound = log_bound + jnp.log(1.1)                              # [..., D]
  eps = jax.random.normal(k_prop, (*mu.shape[:-1], max_tries, mu.shape[-1]))
  props = mu[..., None, :] + sd[..., None, :] * eps                 # [..., T, D]
  lr = log_ratio(props)
  accept = jnp.log(jax.random.uniform(k_acc, lr.shape)) < lr - log_bound[..., None, :]
  first = jnp.argmax(accept, axis=-2)                               # first accepted try
  best = jnp.argmax(lr, axis=-2)
  chosen = jnp.where(jnp.any(accept, axis=-2), first, best)         # [..., D]
  return jnp.take_along_axis(props, chosen[..., None, :], axis=-2)[..., 0, :]
