"""Transformer building blocks shared by the flow and the prior.

Shapes: B batch, N sequence length, W width, H heads, K head dim (64, SPEC sec. 2).
Parameters are float32; `dtype` is the compute dtype (float32 or bfloat16). Softmax and layer norm
statistics run in float32 whatever the compute dtype.

Sharding: every parameter and the main activations carry logical axis names (below); the config's
`sharding.rules` table maps them to mesh axes (farmer_jax/sharding.py). Model code never names a
mesh axis. Outside a mesh, or without rules in context, the annotations do nothing.
"""
import contextlib
import functools
import math
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
#   einsum       batched matmuls in the [B, H, T, K] layout, softmax in float32: the reference, and
#                the fastest form on CPU. A full causal pass runs query blocks of CAUSAL_BLOCK
#                against only the keys at or before them, skipping the blocks the mask zeroes.
#   dot_product  jax.nn.dot_product_attention: cuDNN's fused kernel on a GPU where it serves the
#                case (bfloat16 / float16, head dim a multiple of 8 up to 128, a full causal or
#                unmasked pass; not decoding against a KV cache), XLA's own implementation
#                otherwise (the fallback is chosen while tracing and logged once).
#   splash       the Pallas splash-attention kernel for TPU that ships with JAX: a full causal pass
#                (padded at the end to a multiple of SPLASH_BLOCK) or an unmasked one whose length
#                is such a multiple, run per shard of the batch and heads (shard_map over the mesh
#                in context). Other cases (decoding against a cache, unmasked odd lengths) take
#                dot_product's XLA path, logged once. Off TPU the kernel runs in Pallas'
#                interpreter: correct and slow (for tests).
#   auto         einsum on CPU, dot_product on GPU, splash on TPU: by the platform being compiled
#                for (this process's backend, or `compiling_for`'s).
ATTENTION = ("einsum", "dot_product", "splash", "auto")
_AUTO = {"cpu": "einsum", "gpu": "dot_product", "tpu": "splash"}
CAUSAL_BLOCK = 64     # query block of the einsum causal pass (the fastest on CPU: docs/cpu.md)
SPLASH_BLOCK = 128    # splash's query and key block: TPU tiles of 128 lanes

_compile_target: list[str] = []


@contextlib.contextmanager
def compiling_for(platform: str):
  """Models traced inside pick `auto` and splash's mode for `platform` ("cpu" | "gpu" | "tpu")
  rather than for this process's backend: ahead-of-time compiles for other machines (--mode=plan
  for a TPU slice from a CPU host)."""
  _compile_target.append(platform)
  try:
    yield
  finally:
    _compile_target.pop()


def target_platform() -> str:
  return _compile_target[-1] if _compile_target else jax.default_backend()


def resolve_attention(name: str) -> str:
  """The implementation `name` stands for on the platform being compiled for."""
  if name not in ATTENTION:
    raise ValueError(f"config.model.attention = {name!r}: must be one of {ATTENTION}")
  if name == "auto":
    return _AUTO.get(target_platform(), "dot_product")
  return name


def _cudnn_serves(dtype, head_dim: int, unmasked_or_causal: bool) -> bool:
  return (target_platform() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128 and unmasked_or_causal)


_fallbacks_logged: set[str] = set()


def _log_fallback(message: str) -> None:
  if message not in _fallbacks_logged:
    _fallbacks_logged.add(message)
    logging.warning(message)


def _low_precision(*arrays) -> bool:
  return any(jnp.result_type(a) in (jnp.bfloat16, jnp.float16) for a in arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_lp(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """Low-precision operands, float32 result."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_lp_fwd(spec, a, b):
  return _einsum_lp(spec, a, b), (a, b)


def _einsum_lp_bwd(spec, residuals, ct):
  # Every index of a two-operand einsum sits in two or three of (a, b, out), so each operand's
  # gradient is the einsum of the other two; those run in the same low precision with float32
  # accumulation as the forward (autodiff's transposes would take a float32 cotangent).
  a, b = residuals
  (sa, sb), so = spec.split("->")[0].split(","), spec.split("->")[1]
  ct = ct.astype(jnp.result_type(a, b))
  return (_einsum_lp(f"{so},{sb}->{sa}", ct, b).astype(a.dtype),
          _einsum_lp(f"{sa},{so}->{sb}", a, ct).astype(b.dtype))


_einsum_lp.defvjp(_einsum_lp_fwd, _einsum_lp_bwd)


def einsum_f32(spec: str, a: jax.Array, b: jax.Array, dtype=None) -> jax.Array:
  """jnp.einsum of two operands accumulating in float32, returned in `dtype` (default: the
  operands'). Every product of the models goes through it. With bfloat16 operands the products
  of the backward pass take bfloat16 operands too: XLA's CPU backend runs a bfloat16 product
  with a float32 result on AMX / AVX512-BF16, about 4x its float32 rate and 5x that of a
  bfloat16 result (docs/cpu.md); TPUs and GPUs accumulate in float32 anyway. Float32 operands
  take plain jnp.einsum. `spec` has no index that only one operand carries and the output drops
  (each index of a product here is in two or three of the operands and the output)."""
  if not _low_precision(a, b):
    out = jnp.einsum(spec, a, b)
  else:
    out = _einsum_lp(spec, a, b)
  return out.astype(dtype or jnp.result_type(a, b))


def _dense_core(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, q_pos_T, masked: bool, dtype) -> jax.Array:
  """Every query against every key, positions above each query's masked -> [B, H, T, K]."""
  logits_BxHxTxS = einsum_f32("bhqk,bhsk->bhqs", q_BxHxTxK, k_BxHxSxK, jnp.float32)
  if masked:
    mask_TxS = jnp.arange(k_BxHxSxK.shape[2])[None, :] <= q_pos_T[:, None]
    logits_BxHxTxS = jnp.where(mask_TxS, logits_BxHxTxS, jnp.finfo(jnp.float32).min)
  probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1).astype(dtype)
  return einsum_f32("bhqs,bhsk->bhqk", probs_BxHxTxS, v_BxHxSxK.astype(dtype))


def _einsum(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, q_pos_T, masked: bool, dtype) -> jax.Array:
  t, s = q_BxHxTxK.shape[2], k_BxHxSxK.shape[2]
  if not (masked and t == s and t > CAUSAL_BLOCK):
    return _dense_core(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, q_pos_T, masked, dtype)
  # A full causal pass (queries at 0 .. T-1): the block of queries lo .. hi-1 sees keys 0 .. hi-1
  # only, about half the products of the square at 256 tokens and more beyond.
  outs = []
  for lo in range(0, t, CAUSAL_BLOCK):
    hi = min(lo + CAUSAL_BLOCK, t)
    outs.append(_dense_core(q_BxHxTxK[:, :, lo:hi], k_BxHxSxK[:, :, :hi], v_BxHxSxK[:, :, :hi],
                            q_pos_T[lo:hi], True, dtype))
  return jnp.concatenate(outs, axis=2)


def _dot_product(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, q_pos_T, masked: bool, dtype,
                 allow_cudnn: bool = True) -> jax.Array:
  t, s = q_BxHxTxK.shape[2], k_BxHxSxK.shape[2]
  # T == S: the full pass (a cache is then written whole at index 0), JAX's own causal mask.
  causal_square = masked and t == s
  mask = None
  if masked and not causal_square:
    mask = (jnp.arange(s)[None, :] <= q_pos_T[:, None])[None, None]   # [1, 1, T, S]
  # jax.nn.dot_product_attention takes [B, T, H, K].
  q, k, v = (jnp.swapaxes(a, 1, 2).astype(dtype) for a in (q_BxHxTxK, k_BxHxSxK, v_BxHxSxK))
  call = lambda impl: jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=causal_square, scale=1.0, implementation=impl)
  if allow_cudnn and _cudnn_serves(q.dtype, q.shape[-1], mask is None):
    try:
      return jnp.swapaxes(call("cudnn"), 1, 2)
    except (ValueError, NotImplementedError, RuntimeError) as e:
      _log_fallback(f"cuDNN attention refused {tuple(q.shape)} {q.dtype} ({e}); using XLA's")
  return jnp.swapaxes(call("xla"), 1, 2)


def mesh_axes_size(mesh, axes) -> int:
  """Devices along `axes` (one mesh axis name, a tuple of them, or None) of a (abstract) mesh."""
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def fit_spec(spec: jax.sharding.PartitionSpec, shape, mesh) -> jax.sharding.PartitionSpec:
  """`spec` for an array of `shape`, without the mesh axes of any dimension they do not divide
  (that dimension stays whole)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  return jax.sharding.PartitionSpec(
      *(a if d % mesh_axes_size(mesh, a) == 0 else None for a, d in zip(entries, shape)))


def _splash(q_BxHxTxK, k_BxHxTxK, v_BxHxTxK, causal: bool, dtype) -> jax.Array:
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask
  interpret = target_platform() != "tpu"
  if interpret:
    _log_fallback("splash attention off TPU: running the kernel in Pallas' interpreter (slow)")

  def per_shard(q, k, v):   # this shard's [b, h, T, K]
    length, heads = q.shape[2], q.shape[1]
    one = (splash_attention_mask.CausalMask if causal else splash_attention_mask.FullMask)(
        (length, length))
    b = SPLASH_BLOCK
    kernel = splash_attention_kernel.make_splash_mha(
        splash_attention_mask.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
        block_sizes=splash_attention_kernel.BlockSizes(
            block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
            block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b),
        interpret=interpret)
    return jax.vmap(kernel)(q, k, v)

  q, k, v = (a.astype(dtype) for a in (q_BxHxTxK, k_BxHxTxK, v_BxHxTxK))
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return per_shard(q, k, v)
  # A Pallas kernel is not partitioned by XLA: each device runs it on its own batch and heads.
  spec = fit_spec(nn.logical_to_mesh_axes((ACT_BATCH, ACT_HEADS, None, None)), q.shape, mesh)
  return jax.shard_map(per_shard, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def attend(q_BxHxTxK: jax.Array, k_BxHxSxK: jax.Array, v_BxHxSxK: jax.Array, q_pos_T: jax.Array,
           masked: bool, implementation: str, dtype: Dtype) -> jax.Array:
  """softmax(q k^T / sqrt(K), keys at positions <= each query's when `masked`) v -> [B, H, T, K].

  Query t sits at position q_pos_T[t]; keys at 0 .. S-1. Logits and softmax are float32 (inside
  the fused kernels, their own accumulation), the products run in `dtype`."""
  q_BxHxTxK = q_BxHxTxK * q_BxHxTxK.shape[-1] ** -0.5
  t, s = q_BxHxTxK.shape[2], k_BxHxSxK.shape[2]
  impl = resolve_attention(implementation)
  if impl == "splash":
    if t == s and masked:
      # Causal: keys appended at the end are never seen by the real queries, so a length short of
      # a multiple of SPLASH_BLOCK (the prior's class tokens + N) is padded there and cut after.
      pad = [(0, 0), (0, 0), (0, -t % SPLASH_BLOCK), (0, 0)]
      padded = [jnp.pad(a, pad) for a in (q_BxHxTxK, k_BxHxSxK, v_BxHxSxK)]
      return _splash(*padded, True, dtype)[:, :, :t]
    if t == s and t % SPLASH_BLOCK == 0:
      return _splash(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, False, dtype)
    _log_fallback(f"splash attention serves full causal passes, and unmasked ones of a multiple "
                  f"of {SPLASH_BLOCK} tokens; {t} queries against {s} keys"
                  f"{'' if masked else ' (unmasked)'} take dot_product's XLA path")
    return _dot_product(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, q_pos_T, masked, dtype,
                        allow_cudnn=False)
  if impl == "dot_product":
    return _dot_product(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, q_pos_T, masked, dtype)
  return _einsum(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, q_pos_T, masked, dtype)


def constrain(x: jax.Array, *names) -> jax.Array:
  """Sharding constraint by logical names (a no-op outside a mesh or without rules)."""
  return nn.with_logical_constraint(x, names)


def param_init(init: Callable, *names) -> Callable:
  """An initialiser whose parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, names)


class Dense(nn.Module):
  """x [..., K] -> x W + b [..., N], the product in `dtype` by `einsum_f32` and the bias added in
  float32; the result in `out_dtype` (None: `dtype`). Parameters `kernel` [K, N] and `bias` [N]
  (float32), those of nn.Dense. Heads whose outputs feed float32 math (the flow's affine
  parameters, the GMM parameters) take out_dtype float32: the float32 accumulator is kept, not
  rounded to bfloat16 and cast back."""
  features: int
  names: tuple[str, str]
  dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  out_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", param_init(self.kernel_init, *self.names),
                        (x.shape[-1], self.features))
    bias = self.param("bias", param_init(self.bias_init, self.names[1]), (self.features,))
    y = einsum_f32("...k,kn->...n", x.astype(self.dtype), kernel.astype(self.dtype), jnp.float32)
    return (y + bias).astype(self.out_dtype or self.dtype)


def dense(features: int, names: tuple[str, str], dtype: Dtype, name: str,
          kernel_init: Callable = nn.initializers.lecun_normal(),
          bias_init: Callable = nn.initializers.zeros, out_dtype: Dtype | None = None) -> Dense:
  """A Dense layer whose kernel [in, out] and bias [out] carry logical axis names."""
  return Dense(features, names, dtype, kernel_init, bias_init, out_dtype, name=name)


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(dtype=dtype, name=name, scale_init=param_init(nn.initializers.ones, EMBED),
                      bias_init=param_init(nn.initializers.zeros, EMBED))


class Attention(nn.Module):
  """Multi-head self-attention, causal or bidirectional, with an optional KV cache.

  Q, K and V come from one fused projection, written in the [B, H, T, K] layout the products take.
  Without a cache, x [B, N, W] attends within itself. With `cache = (k, v)` ([B, H, L, K], the full
  preallocated length L) and `index`, x [B, T, W] holds positions index .. index+T-1 (`index` a
  scalar) or the positions index[0], ..., index[T-1] (`index` an int array [T], e.g. one position
  per run of a strided sweep): their keys and values are written into the cache in place (no
  growth) and each query attends to the cached positions <= its own. Returns (out [B, T, W], new
  cache or None).
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
    # [3 (q, k, v), H, K, W]: fan-in W for each of the three, as three separate projections. W
    # last is the layout XLA's CPU matmul takes for this product: stored otherwise, the kernel
    # is transposed on every call, which inside the decoding loop is every token.
    w_in = nn.initializers.lecun_normal(in_axis=3, out_axis=(1, 2), batch_axis=(0,))
    kernel = self.param("qkv", param_init(w_in, None, HEADS, HEAD_DIM, EMBED),
                        (3, heads, self.head_dim, self.width))
    bias = self.param("qkv_bias", param_init(nn.initializers.zeros, None, HEADS, HEAD_DIM),
                      (3, heads, self.head_dim))
    qkv_3xBxHxTxK = einsum_f32("btw,chkw->cbhtk", x_BxTxW.astype(self.dtype),
                               kernel.astype(self.dtype), jnp.float32)
    qkv_3xBxHxTxK = (qkv_3xBxHxTxK + bias[:, None, :, None, :]).astype(self.dtype)
    qkv_3xBxHxTxK = constrain(qkv_3xBxHxTxK, None, ACT_BATCH, ACT_HEADS, ACT_SEQ, None)
    q_BxHxTxK, k_BxHxSxK, v_BxHxSxK = qkv_3xBxHxTxK[0], qkv_3xBxHxTxK[1], qkv_3xBxHxTxK[2]
    t = x_BxTxW.shape[1]
    q_pos = jnp.arange(t)
    if cache is not None and jnp.ndim(index) == 0:    # positions index .. index + T - 1
      k_BxHxSxK = jax.lax.dynamic_update_slice_in_dim(cache[0], k_BxHxSxK.astype(cache[0].dtype),
                                                      index, axis=2)
      v_BxHxSxK = jax.lax.dynamic_update_slice_in_dim(cache[1], v_BxHxSxK.astype(cache[1].dtype),
                                                      index, axis=2)
      cache = (k_BxHxSxK, v_BxHxSxK)
      q_pos = q_pos + index
    elif cache is not None:                           # one position per query: index [T]
      k_BxHxSxK = cache[0].at[:, :, index].set(k_BxHxSxK.astype(cache[0].dtype))
      v_BxHxSxK = cache[1].at[:, :, index].set(v_BxHxSxK.astype(cache[1].dtype))
      cache = (k_BxHxSxK, v_BxHxSxK)
      q_pos = index
    out_BxHxTxK = attend(q_BxHxTxK, k_BxHxSxK, v_BxHxSxK, q_pos, self.causal or cache is not None,
                         self.attention, self.dtype)
    w_out = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    kernel = self.param("out", param_init(w_out, HEADS, HEAD_DIM, EMBED),
                        (heads, self.head_dim, self.width))
    bias = self.param("out_bias", param_init(nn.initializers.zeros, EMBED), (self.width,))
    out = einsum_f32("bhtk,hkw->btw", out_BxHxTxK.astype(self.dtype), kernel.astype(self.dtype),
                     jnp.float32)
    return (out + bias).astype(self.dtype), cache


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
  index .. index+T-1 (or, for an int array index [T], those positions; `Attention`) and the call
  returns (out, new caches); without them it returns out.

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
    """Zero keys and values for every layer, each [B, H, length, K]: a list of (k, v) per layer,
    or one stacked (k, v) [depth, B, H, length, K] when the layers are scanned."""
    shape = (batch, self.width // self.head_dim, length, self.head_dim)
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
