"""Transformer building blocks shared by the flow and the prior.

Shapes: B batch, N sequence length, W width, H heads, K head dim (64, SPEC sec. 2).
Parameters are float32; `dtype` is the compute dtype (float32 or bfloat16). Softmax and layer norm
statistics run in float32 whatever the compute dtype.

Sharding: every parameter and the main activations carry logical axis names (below); the config's
`sharding.rules` table maps them to mesh axes (farmer_jax/sharding.py). Model code never names a
mesh axis. Outside a mesh, or without rules in context, the annotations do nothing.
"""
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Logical axes of parameters.
EMBED = "embed"          # model width W
HIDDEN = "mlp"           # MLP hidden width
HEADS = "heads"          # attention heads H
HEAD_DIM = "head_dim"    # K
VOCAB = "classes"        # class-embedding table rows
OUT = "out"              # outputs of a head (affine params, GMM params)
LAYERS = "layers"        # the stacked axis of scanned layers
# Logical axes of activations.
ACT_BATCH = "act_batch"
ACT_SEQ = "act_seq"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_MLP = "act_mlp"

# Rematerialisation policies by config name (`model.remat`): what the backward pass may keep.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,                                          # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,      # recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,       # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}


# Attention implementations (`model.attention`): a choice of kernel, not of model (the parameters
# and the function are the same, so a workdir trained with one evaluates and resumes with another).
#   einsum       [B, H, T, S] logits by batched matmuls, softmax in float32: the reference, and
#                the fastest form on CPU.
#   dot_product  jax.nn.dot_product_attention: cuDNN's fused kernel on a GPU where it serves the
#                case (bfloat16 / float16, head dim a multiple of 8 up to 128, a full causal or
#                unmasked pass; not decoding against a KV cache), XLA's own implementation
#                otherwise (the fallback is chosen while tracing and logged once).
#   auto         dot_product on GPU and TPU, einsum on CPU (by the backend this process runs on).
ATTENTION = ("einsum", "dot_product", "auto")


def resolve_attention(name: str) -> str:
  """The implementation `name` stands for on the backend this process runs on."""
  if name not in ATTENTION:
    raise ValueError(f"config.model.attention = {name!r}: must be one of {ATTENTION}")
  if name == "auto":
    return "einsum" if jax.default_backend() == "cpu" else "dot_product"
  return name


def _cudnn_serves(dtype, head_dim: int, unmasked_or_causal: bool) -> bool:
  return (jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128 and unmasked_or_causal)


_fallbacks_logged: set[str] = set()


def _log_fallback(message: str) -> None:
  if message not in _fallbacks_logged:
    _fallbacks_logged.add(message)
    logging.warning(message)


def attend(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, q_pos_T: jax.Array,
           masked: bool, implementation: str, dtype: Dtype) -> jax.Array:
  """softmax(q k^T / sqrt(K), keys at positions <= each query's when `masked`) v -> [B, T, H, K].

  Query t sits at position q_pos_T[t]; keys at 0 .. S-1. Logits and softmax are float32, the
  products run in `dtype`."""
  scale = q_BxTxHxK.shape[-1] ** -0.5
  t, s = q_BxTxHxK.shape[1], k_BxSxHxK.shape[1]
  if resolve_attention(implementation) == "dot_product":
    # T == S: the full pass (a cache is then written whole at index 0), JAX's own causal mask.
    causal_square = masked and t == s
    mask = None
    if masked and not causal_square:
      mask = (jnp.arange(s)[None, :] <= q_pos_T[:, None])[None, None]   # [1, 1, T, S]
    q, k, v = (a.astype(dtype) for a in (q_BxTxHxK, k_BxSxHxK, v_BxSxHxK))
    call = lambda impl: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal_square,
                                                     scale=scale, implementation=impl)
    if _cudnn_serves(q.dtype, q.shape[-1], mask is None):
      try:
        return call("cudnn")
      except (ValueError, NotImplementedError, RuntimeError) as e:
        _log_fallback(f"cuDNN attention refused {tuple(q.shape)} {q.dtype} ({e}); using XLA's")
    return call("xla")
  # [B, H, T, S] layout: plain batched matmuls were the fastest form on CPU (STYLE.md figures).
  logits_BxHxTxS = jnp.einsum("bqhk,bshk->bhqs", q_BxTxHxK, k_BxSxHxK).astype(jnp.float32)
  logits_BxHxTxS = logits_BxHxTxS * scale
  if masked:
    mask_TxS = jnp.arange(s)[None, :] <= q_pos_T[:, None]
    logits_BxHxTxS = jnp.where(mask_TxS, logits_BxHxTxS, jnp.finfo(jnp.float32).min)
  probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1).astype(dtype)
  return jnp.einsum("bhqs,bshk->bqhk", probs_BxHxTxS, v_BxSxHxK.astype(dtype))


def constrain(x: jax.Array, *names) -> jax.Array:
  """Sharding constraint by logical names (a no-op outside a mesh or without rules)."""
  return nn.with_logical_constraint(x, names)


def param_init(init: Callable, *names) -> Callable:
  """An initialiser whose parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, names)


def dense(features: int, names: tuple[str, str], dtype: Dtype, name: str,
          kernel_init: Callable = nn.initializers.lecun_normal(),
          bias_init: Callable = nn.initializers.zeros) -> nn.Dense:
  """nn.Dense whose kernel [in, out] and bias [out] carry logical axis names."""
  return nn.Dense(features, dtype=dtype, name=name, kernel_init=param_init(kernel_init, *names),
                  bias_init=param_init(bias_init, names[1]))


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(dtype=dtype, name=name, scale_init=param_init(nn.initializers.ones, EMBED),
                      bias_init=param_init(nn.initializers.zeros, EMBED))


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
  attention: str = "einsum"     # ATTENTION

  @nn.compact
  def __call__(self, x_BxTxW: jax.Array, cache=None, index=None):
    if self.width % self.head_dim:
      raise ValueError(f"width {self.width} is not a multiple of head_dim {self.head_dim}")
    heads = self.width // self.head_dim
    w_in = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))

    def project(name):
      kernel = self.param(name, param_init(w_in, EMBED, HEADS, HEAD_DIM),
                          (self.width, heads, self.head_dim))
      bias = self.param(f"{name}_bias", param_init(nn.initializers.zeros, HEADS, HEAD_DIM),
                        (heads, self.head_dim))
      y = jnp.einsum("btw,whk->bthk", x_BxTxW.astype(self.dtype), kernel.astype(self.dtype))
      return constrain(y + bias.astype(self.dtype), ACT_BATCH, ACT_SEQ, ACT_HEADS, None)

    q_BxTxHxK, k_BxSxHxK, v_BxSxHxK = project("query"), project("key"), project("value")
    t = x_BxTxW.shape[1]
    q_pos = jnp.arange(t)
    if cache is not None:
      k_BxSxHxK = jax.lax.dynamic_update_slice_in_dim(cache[0], k_BxSxHxK.astype(cache[0].dtype),
                                                      index, axis=1)
      v_BxSxHxK = jax.lax.dynamic_update_slice_in_dim(cache[1], v_BxSxHxK.astype(cache[1].dtype),
                                                      index, axis=1)
      cache = (k_BxSxHxK, v_BxSxHxK)
      q_pos = q_pos + index
    out_BxTxHxK = attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, q_pos, self.causal or cache is not None,
                         self.attention, self.dtype)
    w_out = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    kernel = self.param("out", param_init(w_out, HEADS, HEAD_DIM, EMBED),
                        (heads, self.head_dim, self.width))
    bias = self.param("out_bias", param_init(nn.initializers.zeros, EMBED), (self.width,))
    out = jnp.einsum("bthk,hkw->btw", out_BxTxHxK, kernel.astype(self.dtype))
    return out + bias.astype(self.dtype), cache


class MLP(nn.Module):
  width: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxW: jax.Array) -> jax.Array:
    h = dense(self.width * self.mlp_ratio, (EMBED, HIDDEN), self.dtype, "up")(x_BxNxW)
    h = constrain(nn.gelu(h), ACT_BATCH, ACT_SEQ, ACT_MLP)
    return dense(self.width, (HIDDEN, EMBED), self.dtype, "down")(h)


class TransformerLayer(nn.Module):
  """Pre-norm layer: x + Attn(LN(x)), then x + MLP(LN(x)). Returns (x, new cache or None)."""
  width: int
  head_dim: int = 64
  mlp_ratio: int = 4
  causal: bool = True
  dtype: Dtype = jnp.float32
  attention: str = "einsum"

  @nn.compact
  def __call__(self, x_BxNxW: jax.Array, cache=None, index=None):
    x_BxNxW = constrain(x_BxNxW, ACT_BATCH, ACT_SEQ, ACT_EMBED)
    attn, cache = Attention(self.width, self.head_dim, self.causal, self.dtype, self.attention,
                            name="attn")(layer_norm(self.dtype, "ln_attn")(x_BxNxW), cache, index)
    x_BxNxW = x_BxNxW + attn
    x_BxNxW = x_BxNxW + MLP(self.width, self.mlp_ratio, self.dtype,
                            name="mlp")(layer_norm(self.dtype, "ln_mlp")(x_BxNxW))
    return constrain(x_BxNxW, ACT_BATCH, ACT_SEQ, ACT_EMBED), cache


class Transformer(nn.Module):
  """`depth` pre-norm layers followed by a final layer norm, input and output [B, T, W].

  `caches` (from `init_cache`) and `index` switch on incremental decoding: x then holds positions
  index .. index+T-1 and the call returns (out, new caches); without them it returns out.

  `scan_layers` stacks the layers' parameters on a leading `layers` axis and runs them with
  `nn.scan` (one compiled layer body: compile time independent of depth); `remat` names a policy
  of REMAT_POLICIES for what the backward pass keeps. Neither changes the function computed.
  """
  width: int
  depth: int
  head_dim: int = 64
  mlp_ratio: int = 4
  causal: bool = True
  dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  attention: str = "einsum"     # ATTENTION

  def init_cache(self, batch: int, length: int, dtype: Dtype | None = None):
    """Zero keys and values for every layer, each [B, length, H, K]: a list of (k, v) per layer,
    or one stacked (k, v) [depth, B, length, H, K] when the layers are scanned."""
    shape = (batch, length, self.width // self.head_dim, self.head_dim)
    dtype = dtype or self.dtype
    if self.scan_layers:
      stacked = (self.depth,) + shape
      return (jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype))
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.depth)]

  @nn.compact
  def __call__(self, x_BxTxW: jax.Array, caches=None, index=None):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"config.model.remat = {self.remat!r}: must be one of "
                       f"{sorted(REMAT_POLICIES)}")
    x_BxTxW = x_BxTxW.astype(self.dtype)
    layer = TransformerLayer
    if self.remat != "none":
      layer = nn.remat(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
    args = (self.width, self.head_dim, self.mlp_ratio, self.causal, self.dtype, self.attention)
    if self.scan_layers:
      stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0, nn.broadcast), length=self.depth,
                      metadata_params={nn.PARTITION_NAME: LAYERS})
      x_BxTxW, new_caches = stack(*args, name="layers")(x_BxTxW, caches, index)
    else:
      new_caches = []
      for i in range(self.depth):
        x_BxTxW, cache = layer(*args, name=f"layer_{i}")(
            x_BxTxW, None if caches is None else caches[i], index)
        new_caches.append(cache)
    out = layer_norm(self.dtype, "ln_final")(x_BxTxW)
    return out if caches is None else (out, new_caches)
