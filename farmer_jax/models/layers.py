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


def init_kv_cache(batch: int, length: int, width: int, depth: int, head_dim: int = 64,
                  dtype: Dtype = jnp.float32) -> list[tuple[jax.Array, jax.Array]]:
  """Preallocated keys and values for `depth` layers: [(k, v)] each [B, length, H, K], zeros."""
  shape = (batch, length, width // head_dim, head_dim)
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(depth)]


class Attention(nn.Module):
  """Multi-head self-attention, causal or bidirectional, with an optional KV cache.

  Without a cache, x [B, N, W] attends within itself. With `cache = (k, v)` ([B, L, H, K], the full
  preallocated length L) and `index`, x [B, T, W] holds positions index .. index+T-1: their keys and
  values are written into the cache in place (dynamic_update_slice, no growth) and the queries attend
  causally to positions <= their own. Returns (out [B, T, W], new cache or None).
  """
  width: int
  head_dim: int = 64
  causal: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxW: jax.Array, cache=None, index=None):
    if self.width % self.head_dim:
      raise ValueError(f"width {self.width} is not a multiple of head_dim {self.head_dim}")
    heads = self.width // self.head_dim
    dense = lambda name: nn.DenseGeneral((heads, self.head_dim), dtype=self.dtype, name=name)
    q_BxTxHxK = dense("query")(x_BxTxW)
    k_BxSxHxK = dense("key")(x_BxTxW)
    v_BxSxHxK = dense("value")(x_BxTxW)
    t = x_BxTxW.shape[1]
    q_pos = jnp.arange(t)
    if cache is not None:
      k_BxSxHxK = jax.lax.dynamic_update_slice_in_dim(cache[0], k_BxSxHxK.astype(cache[0].dtype),
                                                      index, axis=1)
      v_BxSxHxK = jax.lax.dynamic_update_slice_in_dim(cache[1], v_BxSxHxK.astype(cache[1].dtype),
                                                      index, axis=1)
      cache = (k_BxSxHxK, v_BxSxHxK)
      q_pos = q_pos + index
    # [B, H, T, S] layout: plain batched matmuls were the fastest form on CPU (STYLE.md figures).
    logits_BxHxTxS = jnp.einsum("bqhk,bshk->bhqs", q_BxTxHxK, k_BxSxHxK).astype(jnp.float32)
    logits_BxHxTxS = logits_BxHxTxS * (self.head_dim ** -0.5)
    if self.causal or cache is not None:
      mask_TxS = jnp.arange(k_BxSxHxK.shape[1])[None, :] <= q_pos[:, None]
      logits_BxHxTxS = jnp.where(mask_TxS, logits_BxHxTxS, jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1).astype(self.dtype)
    out_BxTxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxTxS, v_BxSxHxK.astype(self.dtype))
    out = nn.DenseGeneral(self.width, axis=(-2, -1), dtype=self.dtype, name="out")(out_BxTxHxK)
    return out, cache


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
  """Pre-norm layer: x + Attn(LN(x)), then x + MLP(LN(x)). Returns (x, new cache or None)."""
  width: int
  head_dim: int = 64
  mlp_ratio: int = 4
  causal: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxW: jax.Array, cache=None, index=None):
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)
    attn, cache = Attention(self.width, self.head_dim, self.causal, self.dtype,
                            name="attn")(norm("ln_attn")(x_BxNxW), cache, index)
    x_BxNxW = x_BxNxW + attn
    x_BxNxW = x_BxNxW + MLP(self.width, self.mlp_ratio, self.dtype,
                            name="mlp")(norm("ln_mlp")(x_BxNxW))
    return x_BxNxW, cache


class Transformer(nn.Module):
  """`depth` pre-norm layers followed by a final layer norm, input and output [B, T, W].

  `caches` (from `init_kv_cache`) and `index` switch on incremental decoding: x then holds
  positions index .. index+T-1 and the call returns (out, new caches); without them it returns out.
  """
  width: int
  depth: int
  head_dim: int = 64
  mlp_ratio: int = 4
  causal: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxW: jax.Array, caches=None, index=None):
    x_BxTxW = x_BxTxW.astype(self.dtype)
    new_caches = []
    for i in range(self.depth):
      x_BxTxW, cache = TransformerLayer(self.width, self.head_dim, self.mlp_ratio, self.causal,
                                        self.dtype, name=f"layer_{i}")(
                                            x_BxTxW, None if caches is None else caches[i], index)
      new_caches.append(cache)
    out = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x_BxTxW)
    return out if caches is None else (out, new_caches)
