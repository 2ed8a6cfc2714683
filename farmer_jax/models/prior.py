"""The autoregressive prior over latent tokens, with GMM heads (SPEC sec. 3).

Input sequence (length M + N):  [class] x M, Linear(z_1^I), ..., Linear(z_N^I), learned positions.
Causal Transformer outputs at positions M-1 .. M+N-1 (N + 1 of them):
  output at the last class slot      -> G_1         (informative GMM for token 1)
  output at z_i^I, i < N             -> G_{i+1}
  output at z_N^I                    -> G_{N+1}     (one shared GMM for the redundant channels of all tokens)

    log p(Z | c) = sum_i log G_i(z_i^I) + sum_i log G_{N+1}(z_i^R)

Class ids are 0..C-1; id C is the null class (label dropout, CFG, and unconditional data with C = 0).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from farmer_jax.models import gmm, layers


GUIDANCE_MODES = ("none", "resample", "naive")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How the prior draws latents (SPEC sec. 5). Field names follow the paper's Table 6.

  guidance: "none" (decoupled sampling: logits / temperature, std * scale, per head),
            "resample" (Algorithm 1) or "naive" (JetFormer/GIVT rejection sampling).
  """
  guidance: str = "none"
  w: float = 0.0
  temperature: float = 1.0             # informative head, unguided and naive
  scale: float = 1.0
  temperature_redundant: float = 1.0   # redundant head, unguided and naive
  scale_redundant: float = 1.0
  num_cond: int = 5                    # s_c
  num_uncond: int = 5                  # s_u
  t_pi: float = 1.0
  t_sigma: float = 1.0
  t_pi_v: float = 1.0
  t_sigma_v: float = 1.0
  t_s: float = 1.0
  ts_mode: str = "multiply"            # ours: log-weights * T_s ("divide": / T_s)
  weight_all_by_w: bool = False        # the appendix's variant: every candidate weighted by w
  redundant_pool: int = 64             # ours: candidates for the shared redundant GMM
  naive_max_tries: int = 32

  def validate(self, prefix: str = "config.sample") -> None:
    def need(ok, field, why):
      if not ok:
        raise ValueError(f"{prefix}.{field} = {getattr(self, field)!r}: {why}")
    need(self.guidance in GUIDANCE_MODES, "guidance", f"must be one of {GUIDANCE_MODES}")
    need(self.w >= 0, "w", "must be >= 0")
    for f in ("temperature", "scale", "temperature_redundant", "scale_redundant", "t_pi",
              "t_sigma", "t_pi_v", "t_sigma_v", "t_s"):
      need(getattr(self, f) > 0, f, "must be > 0")
    need(self.num_cond >= 0 and self.num_uncond >= 0 and self.num_cond + self.num_uncond > 0,
         "num_cond", "num_cond and num_uncond must be >= 0 with a positive sum")
    need(self.ts_mode in ("multiply", "divide"), "ts_mode", "must be 'multiply' or 'divide'")
    need(self.redundant_pool > 0, "redundant_pool", "must be a positive integer")
    need(self.naive_max_tries > 0, "naive_max_tries", "must be a positive integer")


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
  scan_layers: bool = False      # see layers.Transformer
  redundant_head_width: int = 0  # > 0: the redundant head reads a Linear(width -> this) projection
  remat: str = "none"
  attention: str = "einsum"      # layers.ATTENTION

  @property
  def d_redundant(self) -> int:
    return self.token_dim - self.d_informative

  @property
  def null_class(self) -> int:
    return self.num_classes

  def setup(self):
    self.class_embed = nn.Embed(
        self.num_classes + 1, self.width, name="class_embed",
        embedding_init=layers.param_init(nn.linear.default_embed_init, layers.VOCAB, layers.EMBED))
    self.embed = layers.dense(self.width, (None, layers.EMBED), self.dtype, "embed")
    self.pos = self.param("pos", layers.param_init(nn.initializers.normal(0.02), None, layers.EMBED),
                          (self.class_repeat + self.num_tokens, self.width))
    self.transformer = layers.Transformer(self.width, self.depth, self.head_dim, self.mlp_ratio,
                                          causal=True, dtype=self.dtype, scan_layers=self.scan_layers,
                                          remat=self.remat, attention=self.attention,
                                          name="transformer")
    # The GMM heads' float32 results feed the float32 mixture math directly.
    self.head_informative = layers.dense(gmm.num_outputs(self.k_informative, self.d_informative),
                                         (layers.EMBED, layers.OUT), self.dtype, "head_informative",
                                         out_dtype=jnp.float32)
    if self.d_redundant > 0 and self.redundant_model == "gmm":
      if self.redundant_head_width:
        self.redundant_proj = layers.dense(self.redundant_head_width, (None, layers.EMBED),
                                           self.dtype, "redundant_proj")
      self.head_redundant = layers.dense(gmm.num_outputs(self.k_redundant, self.d_redundant),
                                         (layers.EMBED, layers.OUT), self.dtype, "head_redundant",
                                         out_dtype=jnp.float32)

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
    if self.redundant_head_width:
      h_BxW = self.redundant_proj(h_BxW)
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

  def _draw(self, key, mixture, s: SamplerConfig, b: int, redundant: bool,
            num_draws: int | None = None):
    """One latent per example from mixture params of a [B] (unguided) or [2B] (cond + null) batch."""
    if s.guidance == "none":
      t, sc = (s.temperature_redundant, s.scale_redundant) if redundant else (s.temperature, s.scale)
      if num_draws is None:
        return gmm.sample(key, *mixture, t, sc)
      return gmm.sample_many(key, mixture, num_draws, t, sc)
    cond = tuple(a[:b] for a in mixture)
    uncond = tuple(a[b:] for a in mixture)
    if s.guidance == "naive":
      t, sc = (s.temperature_redundant, s.scale_redundant) if redundant else (s.temperature, s.scale)
      draw = lambda k: gmm.naive_cfg(k, cond, uncond, w=s.w, temperature=t, scale=sc,
                                     max_tries=s.naive_max_tries)
      return draw(key) if num_draws is None else jax.vmap(draw)(jax.random.split(key, num_draws))
    num_cond, num_uncond = s.num_cond, s.num_uncond
    if redundant:   # one larger pool, same proportions, resampled with replacement
      total = s.num_cond + s.num_uncond
      num_cond = round(s.redundant_pool * s.num_cond / total)
      num_uncond = s.redundant_pool - num_cond
    return gmm.resample_cfg(key, cond, uncond, w=s.w, num_cond=num_cond, num_uncond=num_uncond,
                            t_pi=s.t_pi, t_sigma=s.t_sigma, t_pi_v=s.t_pi_v,
                            t_sigma_v=s.t_sigma_v, t_s=s.t_s, ts_mode=s.ts_mode,
                            weight_all_by_w=s.weight_all_by_w, num_draws=num_draws)

  def decode(self, key: jax.Array, labels_B: jax.Array, s: SamplerConfig) -> jax.Array:
    """KV-cached sampling of z [B, N, D] (prior order), guided or not.

    The class slots are prefilled in one pass; then a `lax.scan` over the N informative tokens feeds
    each drawn z_i^I at its position into preallocated per-layer caches. With guidance the
    conditional and null-class branches are one batch of 2B that share every drawn token. The
    output at z_N^I parameterises the shared redundant GMM, drawn N times per example.
    """
    b, n, m = labels_B.shape[0], self.num_tokens, self.class_repeat
    guided = s.guidance != "none"
    labels = (jnp.concatenate([labels_B, jnp.full_like(labels_B, self.null_class)])
              if guided else labels_B)
    caches = self.transformer.init_cache(labels.shape[0], m + n)
    cls = jnp.broadcast_to(self.class_embed(labels)[:, None].astype(self.dtype),
                           (labels.shape[0], m, self.width)) + self.pos[:m].astype(self.dtype)
    out, caches = self.transformer(cls, caches, 0)

    def step(prior, carry, i):
      caches, h_last, k = carry
      k, k_i = jax.random.split(k)
      z_i = prior._draw(k_i, prior.informative_gmm(h_last), s, b, redundant=False)   # [B, d_I]
      z_in = jnp.concatenate([z_i, z_i]) if guided else z_i
      e = prior.embed(z_in[:, None].astype(prior.dtype))
      e = e + jax.lax.dynamic_index_in_dim(prior.pos, m + i, keepdims=True).astype(e.dtype)
      out, caches = prior.transformer(e, caches, m + i)
      return (caches, out[:, 0], k), z_i

    key, k_red = jax.random.split(key)
    scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False}, out_axes=1)
    (_, h_last, _), z_inf = scan(self, (caches, out[:, -1], key), jnp.arange(n))
    return self._with_redundant(k_red, z_inf, h_last, s)

  def decode_recompute(self, key: jax.Array, labels_B: jax.Array, s: SamplerConfig) -> jax.Array:
    """`decode` recomputing the whole prefix at every token: the same key schedule and draws, O(N)
    full passes. The reference that the KV-cached `decode` is tested and benchmarked against."""
    b, n = labels_B.shape[0], self.num_tokens
    guided = s.guidance != "none"
    labels = (jnp.concatenate([labels_B, jnp.full_like(labels_B, self.null_class)])
              if guided else labels_B)
    both = lambda z: jnp.concatenate([z, z]) if guided else z

    def step(prior, carry):
      i, z_inf, k = carry
      k, k_i = jax.random.split(k)
      h_i = jax.lax.dynamic_index_in_dim(prior.hidden(both(z_inf), labels), i, axis=1,
                                         keepdims=False)
      z_i = prior._draw(k_i, prior.informative_gmm(h_i), s, b, redundant=False)
      return i + 1, z_inf.at[:, i].set(z_i), k

    key, k_red = jax.random.split(key)
    init = (jnp.int32(0), jnp.zeros((b, n, self.d_informative), jnp.float32), key)
    _, z_inf, _ = nn.while_loop(lambda _, c: c[0] < n, step, self, init)
    return self.complete(k_red, z_inf, labels_B, s)

  def complete(self, key: jax.Array, z_inf_BxNxI: jax.Array, labels_B: jax.Array,
               s: SamplerConfig) -> jax.Array:
    """Given informative latents z^I [B, N, d_I] (prior order) from anywhere, draws the redundant
    channels from the shared GMM G_{N+1} after one parallel causal pass over them (with guidance,
    the conditional and null-class branches as one batch of 2B) -> z [B, N, D].

    With `key` the redundant key of `decode` (its second split), this is exactly `decode`'s last
    step; an AFM generator's z^I takes it with no token loop (SPEC sec. 7, farmer_jax/afm_latent.py).
    """
    z_inf_BxNxI = z_inf_BxNxI.astype(jnp.float32)
    if self.d_redundant == 0:
      return z_inf_BxNxI
    if s.guidance != "none":
      labels = jnp.concatenate([labels_B, jnp.full_like(labels_B, self.null_class)])
      z_in = jnp.concatenate([z_inf_BxNxI, z_inf_BxNxI])
    else:
      labels, z_in = labels_B, z_inf_BxNxI
    return self._with_redundant(key, z_inf_BxNxI, self.hidden(z_in, labels)[:, -1], s)

  def _with_redundant(self, key, z_inf_BxNxI, h_last, s: SamplerConfig) -> jax.Array:
    """Appends redundant channels drawn from G_{N+1} (params from h_last) -> z [B, N, D]."""
    b, n = z_inf_BxNxI.shape[:2]
    if self.d_redundant == 0:
      return z_inf_BxNxI
    if self.redundant_model == "normal":
      z_red = s.scale_redundant * jax.random.normal(key, (b, n, self.d_redundant), jnp.float32)
    else:
      z_red = jnp.swapaxes(self._draw(key, self.redundant_gmm(h_last), s, b, redundant=True,
                                      num_draws=n), 0, 1)
    return jnp.concatenate([z_inf_BxNxI, z_red], axis=-1)
