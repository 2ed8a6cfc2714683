"""Transformer building blocks shared by the flow and the prior.

Shapes: B batch, N sequence length, W width, H heads, K head dim (64, SPEC sec. 2).
Parameters are float32; `dtype` is the compute dtype (float32 or bfloat16). Softmax and layer norm
statistics run in float32 whatever the compute dtype.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class Attention(nn.Module):
  """Multi-head self-attention, causal or bidirectional."""
  width: int
  head_dim: int = 64
  causal: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxW: jax.Array) -> jax.Array:
    if self.width % self.head_dim:
      raise ValueError(f"width {self.width} is not a multiple of head_dim {self.head_dim}")
    heads = self.width // self.head_dim
    dense = lambda name: nn.DenseGeneral((heads, self.head_dim), dtype=self.dtype, name=name)
    q_BxNxHxK = dense("query")(x_BxNxW)
    k_BxNxHxK = dense("key")(x_BxNxW)
    v_BxNxHxK = dense("value")(x_BxNxW)
    # [B, H, N, N] layout: plain batched matmuls were the fastest form on CPU (STYLE.md figures).
    logits_BxHxNxN = jnp.einsum("bqhk,bshk->bhqs", q_BxNxHxK, k_BxNxHxK).astype(jnp.float32)
    logits_BxHxNxN = logits_BxHxNxN * (self.head_dim ** -0.5)
    if self.causal:
      n = x_BxNxW.shape[1]
      mask_NxN = jnp.tril(jnp.ones((n, n), bool))
      logits_BxHxNxN = jnp.where(mask_NxN, logits_BxHxNxN, jnp.finfo(jnp.float32).min)
    probs_BxHxNxN = jax.nn.softmax(logits_BxHxNxN, axis=-1).astype(self.dtype)
    out_BxNxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxNxN, v_BxNxHxK)
    return nn.DenseGeneral(self.width, axis=(-2, -1), dtype=self.dtype, name="out")(out_BxNxHxK)


class MLP(nn.Module):
  width: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxW: jax.Array) -> jax.Array:
    h = nn.Dense(self.width * self.mlp_ratio, dtype=self.dtype, name="up")(x_BxNxW)
    h = nn.gelu(h)
    return nn.Dense(self.width, dtype=self.dtype, name="down")(h)


class TransformerLayer(nn.Module):
  """Pre-norm layer: x + Attn(LN(x)), then x + MLP(LN(x))."""
  width: int
  head_dim: int = 64
  mlp_ratio: int = 4
  causal: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxW: jax.Array) -> jax.Array:
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)
    x_BxNxW = x_BxNxW + Attention(self.width, self.head_dim, self.causal, self.dtype,
                                  name="attn")(norm("ln_attn")(x_BxNxW))
    x_BxNxW = x_BxNxW + MLP(self.width, self.mlp_ratio, self.dtype,
                            name="mlp")(norm("ln_mlp")(x_BxNxW))
    return x_BxNxW


class Transformer(nn.Module):
  """`depth` pre-norm layers followed by a final layer norm. Input and output [B, N, W]."""
  width: int
  depth: int
  head_dim: int = 64
  mlp_ratio: int = 4
  causal: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxW: jax.Array) -> jax.Array:
    x_BxNxW = x_BxNxW.astype(self.dtype)
    for i in range(self.depth):
      x_BxNxW = TransformerLayer(self.width, self.head_dim, self.mlp_ratio, self.causal,
                                 self.dtype, name=f"layer_{i}")(x_BxNxW)
    return nn.LayerNorm(dtype=self.dtype, name="ln_final")(x_BxNxW)
