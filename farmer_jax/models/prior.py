"""The autoregressive prior over latent tokens, with GMM heads (SPEC sec. 3).

Input sequence (length M + N):  [class] x M, Linear(z_1^I), ..., Linear(z_N^I), learned positions.
Causal Transformer outputs at positions M-1 .. M+N-1 (N + 1 of them):
  output at the last class slot      -> G_1         (informative GMM for token 1)
  output at z_i^I, i < N             -> G_{i+1}
  output at z_N^I                    -> G_{N+1}     (one shared GMM for the redundant channels of all tokens)

    log p(Z | c) = sum_i log G_i(z_i^I) + sum_i log G_{N+1}(z_i^R)

Class ids are 0..C-1; id C is the null class (label dropout, CFG, and unconditional data with C = 0).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from farmer_jax.models import gmm, layers


class Prior(nn.Module):
  token_dim: int                 # d
  d_informative: int             # d_I; d_I == d means no split
  num_tokens: int                # N
  num_classes: int               # C (0: unconditional)
  class_repeat: int              # M
  width: int
  depth: int
  k_informative: int
  k_redundant: int
  redundant_model: str = "gmm"   # "gmm" (FARMER) or "normal" (JetFormer's N(0, I))
  head_dim: int = 64
  mlp_ratio: int = 4
  scale_floor: float = 1e-6
  dtype: Any = jnp.float32

  @property
  def d_redundant(self) -> int:
    return self.token_dim - self.d_informative

  @property
  def null_class(self) -> int:
    return self.num_classes

  def setup(self):
    self.class_embed = nn.Embed(self.num_classes + 1, self.width, name="class_embed")
    self.embed = nn.Dense(self.width, dtype=self.dtype, name="embed")
    self.pos = self.param("pos", nn.initializers.normal(0.02),
                          (self.class_repeat + self.num_tokens, self.width))
    self.transformer = layers.Transformer(self.width, self.depth, self.head_dim, self.mlp_ratio,
                                          causal=True, dtype=self.dtype, name="transformer")
    self.head_informative = nn.Dense(gmm.num_outputs(self.k_informative, self.d_informative),
                                     dtype=self.dtype, name="head_informative")
    if self.d_redundant > 0 and self.redundant_model == "gmm":
      self.head_redundant = nn.Dense(gmm.num_outputs(self.k_redundant, self.d_redundant),
                                     dtype=self.dtype, name="head_redundant")

  def hidden(self, z_inf_BxNxI: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Transformer outputs that predict G_1 .. G_{N+1}: [B, N + 1, W]."""
    b = z_inf_BxNxI.shape[0]
    cls_BxMxW = jnp.broadcast_to(self.class_embed(labels_B)[:, None].astype(self.dtype),
                                 (b, self.class_repeat, self.width))
    tok_BxNxW = self.embed(z_inf_BxNxI.astype(self.dtype))
    seq = jnp.concatenate([cls_BxMxW, tok_BxNxW], axis=1) + self.pos.astype(self.dtype)
    return self.transformer(seq)[:, self.class_repeat - 1:]

  def informative_gmm(self, h_BxNxW: jax.Array):
    """GMM parameters of G_i from the outputs predicting it (float32)."""
    return gmm.unpack(self.head_informative(h_BxNxW), self.k_informative, self.d_informative,
                      self.scale_floor)

  def redundant_gmm(self, h_BxW: jax.Array):
    """Shared GMM G_{N+1} from the output at z_N^I (float32)."""
    return gmm.unpack(self.head_redundant(h_BxW), self.k_redundant, self.d_redundant,
                      self.scale_floor)

  def __call__(self, z_BxNxD: jax.Array, labels_B: jax.Array):
    """Log-likelihood parts, each [B]: (sum_i log G_i(z_i^I), sum_i log G_{N+1}(z_i^R))."""
    z_BxNxD = z_BxNxD.astype(jnp.float32)
    z_inf, z_red = z_BxNxD[..., :self.d_informative], z_BxNxD[..., self.d_informative:]
    h_BxN1xW = self.hidden(z_inf, labels_B)
    log_p_inf_B = jnp.sum(gmm.log_prob(z_inf, *self.informative_gmm(h_BxN1xW[:, :-1])), axis=1)
    if self.d_redundant == 0:
      log_p_red_B = jnp.zeros_like(log_p_inf_B)
    elif self.redundant_model == "normal":
      log_p_red_B = jnp.sum(gmm.standard_normal_log_prob(z_red), axis=1)
    else:
      logits, means, scales = self.redundant_gmm(h_BxN1xW[:, -1])
      # One mixture scores all N redundant vectors: broadcast it over the token axis.
      log_p_red_B = jnp.sum(gmm.log_prob(z_red, logits[:, None], means[:, None], scales[:, None]),
                            axis=1)
    return log_p_inf_B, log_p_red_B

  def sample(self, key: jax.Array, labels_B: jax.Array, temperature: float = 1.0,
             scale: float = 1.0, temperature_redundant: float = 1.0,
             scale_redundant: float = 1.0) -> jax.Array:
    """Plain ancestral sampling, token by token, recomputing the prefix: -> z [B, N, D] float32."""
    b, n = labels_B.shape[0], self.num_tokens

    def step(prior, carry):
      i, z_inf, k = carry
      k, k_i = jax.random.split(k)
      h_i = prior.hidden(z_inf, labels_B)[:, i]
      z_i = gmm.sample(k_i, *prior.informative_gmm(h_i), temperature, scale)
      return i + 1, z_inf.at[:, i].set(z_i), k

    key, k_red = jax.random.split(key)
    init = (jnp.int32(0), jnp.zeros((b, n, self.d_informative), jnp.float32), key)
    _, z_inf, _ = nn.while_loop(lambda _, c: c[0] < n, step, self, init)
    if self.d_redundant == 0:
      return z_inf
    if self.redundant_model == "normal":
      z_red = scale_redundant * jax.random.normal(k_red, (b, n, self.d_redundant), jnp.float32)
    else:
      logits, means, scales = self.redundant_gmm(self.hidden(z_inf, labels_B)[:, -1])
      z_red = gmm.sample(k_red, jnp.repeat(logits[:, None], n, axis=1), means[:, None], scales[:, None],
                         temperature_redundant, scale_redundant)
    return jnp.concatenate([z_inf, z_red], axis=-1)
