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
