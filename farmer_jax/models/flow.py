"""Autoregressive affine flow blocks over token sequences (SPEC sec. 2).

One block maps a sequence x [B, N, D] to z [B, N, D] in its processing order (natural, or reversed
when `flip`):

    z_i = (x_i - mu(x_<i)) * exp(-a(x_<i)),       logdet = -sum_i sum_j a(x_<i)_j

`mu, a` come from a causal Transformer whose output at position i sees only tokens < i: either the
sequence is shifted right behind a learned start vector (ours, `start_token=True`, every token is
transformed) or the outputs are shifted and token 1 is left unchanged (the paper's form). The output
projection is zero-initialised, so every block is exactly the identity at initialisation.

The affine step and the logdet always run in float32, whatever the Transformer's compute dtype.

Distillation (SPEC sec. 6): a block built with `causal=False` is a one-step student of the
teacher block with the same parameters. `student_inverse` reads z (all of it: bidirectional
attention) through the teacher's input layout and inverts in one parallel pass with the teacher's
affine form, x = z * exp(a(z)) + mu(z). The exact inverse has this form with mu, a functions of
z_<i, so a student initialised from the teacher starts close to it and needs no new parameters.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from farmer_jax.models import layers


def soft_clip(a_raw: jax.Array, clip: float) -> jax.Array:
  """c * tanh(a / c) bounds the log-scale to (-c, c) smoothly; clip <= 0 disables it."""
  return clip * jnp.tanh(a_raw / clip) if clip > 0 else a_raw


def block_flips(t: int) -> bool:
  """Block t reverses the token order on entry and restores it on exit for odd t (TARFlow's pattern)."""
  return t % 2 == 1


def last_block_flips(num_blocks: int) -> bool:
  return num_blocks > 0 and block_flips(num_blocks - 1)


class AffineBlock(nn.Module):
  """One AF block f_t. Call maps data-side x [B, N, D] -> (z [B, N, D], logdet [B]), natural order."""
  token_dim: int
  num_tokens: int
  width: int
  depth: int
  flip: bool
  head_dim: int = 64
  mlp_ratio: int = 4
  start_token: bool = True
  logscale_clip: float = 4.0
  num_classes: int = 0          # > 0: class-conditional block (ours, optional); labels in [0, C]
  dtype: Any = jnp.float32
  scan_layers: bool = False     # see layers.Transformer
  remat: str = "none"
  attention: str = "einsum"     # layers.ATTENTION
  causal: bool = True           # False: the distilled one-step student of this block (SPEC sec. 6)

  def setup(self):
    self.embed = layers.dense(self.width, (None, layers.EMBED), self.dtype, "embed")
    self.pos = self.param("pos", layers.param_init(nn.initializers.normal(0.02), None, layers.EMBED),
                          (self.num_tokens, self.width))
    if self.start_token:
      self.start = self.param("start", layers.param_init(nn.initializers.normal(0.02), layers.EMBED),
                              (self.width,))
    if self.num_classes > 0:
      self.class_embed = nn.Embed(
          self.num_classes + 1, self.width, name="class_embed",
          embedding_init=layers.param_init(nn.linear.default_embed_init, layers.VOCAB, layers.EMBED))
    self.transformer = layers.Transformer(self.width, self.depth, self.head_dim, self.mlp_ratio,
                                          causal=self.causal, dtype=self.dtype,
                                          scan_layers=self.scan_layers, remat=self.remat,
                                          attention=self.attention, name="transformer")
    # Zero-initialised: every block starts as the identity (SPEC sec. 2).
    self.head = layers.dense(2 * self.token_dim, (layers.EMBED, layers.OUT), self.dtype, "head",
                             kernel_init=nn.initializers.zeros)

  def affine_params(self, x_BxNxD: jax.Array, labels_B: jax.Array | None):
    """Shift and log-scale for every token from its strict prefix, processing order, float32."""
    h_BxNxW = self.embed(x_BxNxD.astype(self.dtype))
    if self.start_token:
      start = jnp.broadcast_to(self.start.astype(h_BxNxW.dtype), (h_BxNxW.shape[0], 1, self.width))
      h_BxNxW = jnp.concatenate([start, h_BxNxW[:, :-1]], axis=1)
    h_BxNxW = h_BxNxW + self.pos.astype(h_BxNxW.dtype)
    if self.num_classes > 0:
      h_BxNxW = h_BxNxW + self.class_embed(labels_B)[:, None].astype(h_BxNxW.dtype)
    out_BxNx2D = self.head(self.transformer(h_BxNxW)).astype(jnp.float32)
    if not self.start_token:
      # Output i has seen tokens <= i, so it parameterises token i + 1; token 1 stays as it is.
      out_BxNx2D = jnp.concatenate([jnp.zeros_like(out_BxNx2D[:, :1]), out_BxNx2D[:, :-1]], axis=1)
    mu_BxNxD, a_raw_BxNxD = jnp.split(out_BxNx2D, 2, axis=-1)
    return mu_BxNxD, soft_clip(a_raw_BxNxD, self.logscale_clip)

  def _order(self, x_BxNxD: jax.Array) -> jax.Array:
    return x_BxNxD[:, ::-1] if self.flip else x_BxNxD

  def __call__(self, x_BxNxD: jax.Array, labels_B: jax.Array | None = None):
    x_BxNxD = self._order(x_BxNxD.astype(jnp.float32))
    mu_BxNxD, a_BxNxD = self.affine_params(x_BxNxD, labels_B)
    z_BxNxD = (x_BxNxD - mu_BxNxD) * jnp.exp(-a_BxNxD)
    logdet_B = -jnp.sum(a_BxNxD, axis=(1, 2))
    return self._order(z_BxNxD), logdet_B

  def student_inverse(self, z_BxNxD: jax.Array, labels_B: jax.Array | None = None) -> jax.Array:
    """One parallel pass z [B, N, D] -> x [B, N, D] (natural order): x = z * exp(a(z)) + mu(z).

    The student's approximation of `inverse` (for a block built with causal=False; with
    causal=True it is the teacher's network read on z instead of x, which is not the inverse).
    """
    z_BxNxD = self._order(z_BxNxD.astype(jnp.float32))
    mu_BxNxD, a_BxNxD = self.affine_params(z_BxNxD, labels_B)
    return self._order(z_BxNxD * jnp.exp(a_BxNxD) + mu_BxNxD)

  def inverse(self, z_BxNxD: jax.Array, labels_B: jax.Array | None = None) -> jax.Array:
    """Exact sequential inverse with a KV cache: one Transformer pass of one token per step.

    A `lax.scan` over positions carries preallocated per-layer keys / values [B, N, H, K]; step j
    feeds the token decoded at step j - 1 (or the start vector) at position j and decodes the next
    token from the parameters it emits. N steps of O(N) attention instead of N full passes.
    """
    z_BxNxD = self._order(z_BxNxD.astype(jnp.float32))
    b, n, _ = z_BxNxD.shape
    caches = self.transformer.init_cache(b, n)
    # With a start token, step j emits token j. Without one, token 0 passes unchanged and step j
    # (fed token j) emits token j + 1.
    first = 0 if self.start_token else 1
    x_prev_BxD = z_BxNxD[:, 0]

    def step(block, carry, j, z_BxNxD, labels_B):
      caches, x_prev_BxD = carry
      h_Bx1xW = block.embed(x_prev_BxD[:, None].astype(block.dtype))
      if block.start_token:
        h_Bx1xW = jnp.where(j == 0, block.start.astype(h_Bx1xW.dtype), h_Bx1xW)
      h_Bx1xW = h_Bx1xW + jax.lax.dynamic_index_in_dim(block.pos, j, keepdims=True).astype(h_Bx1xW.dtype)
      if block.num_classes > 0:
        h_Bx1xW = h_Bx1xW + block.class_embed(labels_B)[:, None].astype(h_Bx1xW.dtype)
      out_Bx1xW, caches = block.transformer(h_Bx1xW, caches, j)
      mu_BxD, a_raw_BxD = jnp.split(block.head(out_Bx1xW)[:, 0].astype(jnp.float32), 2, axis=-1)
      z_t_BxD = jax.lax.dynamic_index_in_dim(z_BxNxD, j + first, axis=1, keepdims=False)
      x_t_BxD = z_t_BxD * jnp.exp(soft_clip(a_raw_BxD, block.logscale_clip)) + mu_BxD
      return (caches, x_t_BxD), x_t_BxD

    scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=(0, nn.broadcast, nn.broadcast), out_axes=1)
    _, x_BxTxD = scan(self, (caches, x_prev_BxD), jnp.arange(n - first), z_BxNxD, labels_B)
    if not self.start_token:
      x_BxTxD = jnp.concatenate([z_BxNxD[:, :1], x_BxTxD], axis=1)
    return self._order(x_BxTxD)

  def inverse_recompute(self, z_BxNxD: jax.Array, labels_B: jax.Array | None = None) -> jax.Array:
    """The same inverse recomputing the whole prefix at every token: O(N) full passes.

    The reference the KV-cached `inverse` is tested and benchmarked against.
    """
    z_BxNxD = self._order(z_BxNxD.astype(jnp.float32))

    def step(block, carry):
      i, x_BxNxD = carry
      mu_BxNxD, a_BxNxD = block.affine_params(x_BxNxD, labels_B)
      x_i = z_BxNxD[:, i] * jnp.exp(a_BxNxD[:, i]) + mu_BxNxD[:, i]
      return i + 1, x_BxNxD.at[:, i].set(x_i)

    _, x_BxNxD = nn.while_loop(lambda _, carry: carry[0] < self.num_tokens, step, self,
                               (jnp.int32(0), jnp.zeros_like(z_BxNxD)))
    return self._order(x_BxNxD)


class Flow(nn.Module):
  """F = f_n o ... o f_1 with alternating token-order flips (identity, flip, identity, ...)."""
  token_dim: int
  num_tokens: int
  num_blocks: int
  width: int
  depth: int
  head_dim: int = 64
  mlp_ratio: int = 4
  start_token: bool = True
  logscale_clip: float = 4.0
  num_classes: int = 0
  dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  attention: str = "einsum"
  causal: bool = True           # False: the one-step student (SPEC sec. 6), same parameter tree

  def setup(self):
    self.blocks = [
        AffineBlock(self.token_dim, self.num_tokens, self.width, self.depth, flip=block_flips(t),
                    head_dim=self.head_dim, mlp_ratio=self.mlp_ratio,
                    start_token=self.start_token, logscale_clip=self.logscale_clip,
                    num_classes=self.num_classes, dtype=self.dtype, scan_layers=self.scan_layers,
                    remat=self.remat, causal=self.causal, attention=self.attention,
                    name=f"block_{t}")
        for t in range(self.num_blocks)
    ]

  def __call__(self, x_BxNxD: jax.Array, labels_B: jax.Array | None = None):
    """x [B, N, D] -> (z [B, N, D], total logdet [B])."""
    z_BxNxD = x_BxNxD.astype(jnp.float32)
    logdet_B = jnp.zeros(x_BxNxD.shape[0], jnp.float32)
    for block in self.blocks:
      z_BxNxD, block_logdet_B = block(z_BxNxD, labels_B)
      logdet_B = logdet_B + block_logdet_B
    return z_BxNxD, logdet_B

  def forward_chain(self, x_BxNxD: jax.Array, labels_B: jax.Array | None = None) -> list[jax.Array]:
    """[Z^0 = x, Z^1, ..., Z^n]: the input and every block's output, each [B, N, D] (natural order)."""
    chain = [x_BxNxD.astype(jnp.float32)]
    for block in self.blocks:
      chain.append(block(chain[-1], labels_B)[0])
    return chain

  def student_chain(self, z_BxNxD: jax.Array,
                    labels_B: jax.Array | None = None) -> list[jax.Array]:
    """The student's reversed chain on its own outputs: [Z~^{n-1}, ..., Z~^0] from Z~^n = z,
    Z~^{t-1} = g_t(Z~^t) (one parallel pass per block), each [B, N, D]."""
    chain = [z_BxNxD.astype(jnp.float32)]
    for block in reversed(self.blocks):
      chain.append(block.student_inverse(chain[-1], labels_B))
    return chain[1:]

  def student_inverse(self, z_BxNxD: jax.Array,
                      labels_B: jax.Array | None = None) -> jax.Array:
    """z [B, N, D] -> x in n parallel passes (the distilled decode; for causal=False)."""
    return self.student_chain(z_BxNxD, labels_B)[-1]

  def inverse(self, z_BxNxD: jax.Array, labels_B: jax.Array | None = None,
              recompute: bool = False) -> jax.Array:
    """z [B, N, D] -> x: the blocks' exact inverses in reverse order (KV-cached unless `recompute`)."""
    x_BxNxD = z_BxNxD.astype(jnp.float32)
    for block in reversed(self.blocks):
      invert = block.inverse_recompute if recompute else block.inverse
      x_BxNxD = invert(x_BxNxD, labels_B)
    return x_BxNxD
