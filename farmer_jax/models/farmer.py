"""The whole FARMER model: patchify -> autoregressive flow -> channel split -> AR prior (SPEC sec. 1-4).

    log p(x | c) = sum_i log G_i(z_i^I) + sum_i log G_{N+1}(z_i^R) + sum_t logdet_t
    nll = -log p(x | c) / (N d)          (nats per dimension of x in [-1, 1])
    bpd = nll / ln 2 + log2(L / 2)       (probability of the discrete bin, L intensity levels)
"""
import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from farmer_jax.models import flow, gmm, layers, prior

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that fixes the model's shapes and function. `config.model` plus four data fields."""
  # From config.data.
  image_size: int
  channels: int
  num_classes: int
  num_levels: int
  # From config.model (see configs/digits.py for what each means and where its value comes from).
  patch_size: int
  af_blocks: int
  af_layers: int
  af_width: int
  prior_layers: int
  prior_width: int
  d_informative: int
  class_repeat: int
  k_informative: int
  k_redundant: int
  head_dim: int = 64
  mlp_ratio: int = 4
  af_start_token: bool = True
  logscale_clip: float = 4.0
  af_class_conditional: bool = False
  redundant_model: str = "gmm"
  label_dropout: float = 0.1
  final_permutation: bool = True
  scale_floor: float = 1e-6
  dtype: str = "float32"
  scan_layers: bool = False      # ours: nn.scan over each Transformer's layers (stacked params)
  remat: str = "none"            # ours: layers.REMAT_POLICIES (none | full | dots | dots_no_batch)
  redundant_head_width: int = 0  # ours: > 0 puts a Linear(prior_width -> this) before that head
  attention: str = "einsum"      # layers.ATTENTION: the kernel, not the model

  @property
  def token_dim(self) -> int:
    return self.channels * self.patch_size ** 2

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_dims(self) -> int:
    return self.num_tokens * self.token_dim

  @classmethod
  def from_config(cls, config) -> "ModelConfig":
    """Builds and validates from a full experiment config (fields `data` and `model`)."""
    fields = dataclasses.fields(cls)
    data_fields = ("image_size", "channels", "num_classes", "num_levels")
    model_fields = {f.name for f in fields} - set(data_fields)
    unknown = sorted(set(config.model.keys()) - model_fields)
    if unknown:
      raise ValueError(f"config.model has unknown field(s) {unknown}; known: {sorted(model_fields)}")
    required = {f.name for f in fields if f.default is dataclasses.MISSING} - set(data_fields)
    missing = sorted(required - set(config.model.keys()))
    if missing:
      raise ValueError(f"config.model is missing field(s) {missing}")
    kwargs = {name: config.data[name] for name in data_fields}
    kwargs.update(config.model.to_dict())
    model_config = cls(**kwargs)
    model_config.validate()
    return model_config

  def validate(self) -> None:
    """Raises ValueError naming the offending config field and what would fix it."""
    def need(ok: bool, field: str, why: str):
      if not ok:
        raise ValueError(f"config.{field} = {self._value(field)!r}: {why}")

    for f in ("data.image_size", "data.channels", "model.patch_size", "model.af_layers",
              "model.af_width", "model.prior_layers", "model.prior_width", "model.class_repeat",
              "model.k_informative", "model.k_redundant", "model.head_dim", "model.mlp_ratio"):
      need(isinstance(self._value(f), int) and self._value(f) > 0, f, "must be a positive integer")
    need(isinstance(self.af_blocks, int) and self.af_blocks >= 0, "model.af_blocks",
         "must be a non-negative integer")
    need(isinstance(self.num_classes, int) and self.num_classes >= 0, "data.num_classes",
         "must be >= 0 (0 for unconditional data)")
    need(isinstance(self.num_levels, int) and self.num_levels >= 2, "data.num_levels",
         "must be an integer >= 2 (256 for uint8 images)")
    need(self.image_size % self.patch_size == 0, "model.patch_size",
         f"must divide data.image_size = {self.image_size}")
    need(1 <= self.d_informative <= self.token_dim, "model.d_informative",
         f"must be in [1, token dim = channels * patch_size^2 = {self.token_dim}]")
    for f in ("model.af_width", "model.prior_width"):
      need(self._value(f) % self.head_dim == 0, f, f"must be a multiple of model.head_dim = {self.head_dim}")
    need(self.redundant_model in ("gmm", "normal"), "model.redundant_model", "must be 'gmm' or 'normal'")
    need(0.0 <= self.label_dropout < 1.0, "model.label_dropout", "must be in [0, 1)")
    need(self.logscale_clip >= 0.0, "model.logscale_clip", "must be >= 0 (0 disables the soft clip)")
    need(self.scale_floor > 0.0, "model.scale_floor", "must be > 0")
    need(self.dtype in _DTYPES, "model.dtype", f"must be one of {sorted(_DTYPES)}")
    need(self.remat in layers.REMAT_POLICIES, "model.remat",
         f"must be one of {sorted(layers.REMAT_POLICIES)}")
    need(isinstance(self.scan_layers, bool), "model.scan_layers", "must be True or False")
    need(self.attention in layers.ATTENTION, "model.attention",
         f"must be one of {layers.ATTENTION}")
    need(isinstance(self.redundant_head_width, int) and self.redundant_head_width >= 0,
         "model.redundant_head_width", "must be an integer >= 0 (0: no projection)")

  def _value(self, dotted: str):
    return getattr(self, dotted.split(".", 1)[1])


def forward_flops_per_example(c: ModelConfig) -> dict[str, float]:
  """Matmul FLOPs of one forward pass of one example, {"af", "prior", "total"}.

  2 FLOPs per multiply-add of every dense layer at every position it runs on, plus attention's
  two [T, T] matmuls per layer counted in full (the causal mask does not skip them in our
  kernels). Element-wise work (norms, softmax, GMM terms) is left out, as is customary for MFU.
  """
  def transformer(t: int, w: int, depth: int) -> float:
    dense = 2 * t * (4 * w * w + 2 * c.mlp_ratio * w * w)
    attention = 2 * 2 * t * t * w
    return depth * (dense + attention)

  n, d = c.num_tokens, c.token_dim
  af_block = (2 * n * d * c.af_width + transformer(n, c.af_width, c.af_layers)
              + 2 * n * c.af_width * 2 * d)
  d_red = d - c.d_informative
  prior_flops = (2 * n * c.d_informative * c.prior_width
                 + transformer(c.class_repeat + n, c.prior_width, c.prior_layers)
                 + 2 * n * c.prior_width * gmm.num_outputs(c.k_informative, c.d_informative))
  if d_red > 0 and c.redundant_model == "gmm":
    head_in = c.redundant_head_width or c.prior_width
    if c.redundant_head_width:
      prior_flops += 2 * c.prior_width * head_in
    prior_flops += 2 * head_in * gmm.num_outputs(c.k_redundant, d_red)
  af = c.af_blocks * af_block
  return {"af": float(af), "prior": float(prior_flops), "total": float(af + prior_flops)}


def train_flops_per_example(c: ModelConfig) -> float:
  """Forward + backward (2x forward) matmul FLOPs of one training example."""
  return 3.0 * forward_flops_per_example(c)["total"]


def patchify(images_BxHxWxC: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], patches in row-major order, each flattened (p, p, C)."""
  b, h, w, c = images_BxHxWxC.shape
  x = images_BxHxWxC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x_BxNxD: jax.Array, p: int, image_size: int, channels: int) -> jax.Array:
  """Inverse of `patchify`: [B, N, p*p*C] -> [B, H, W, C]."""
  b, g = x_BxNxD.shape[0], image_size // p
  x = x_BxNxD.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, image_size, image_size, channels)


def bits_per_dim(nll_per_dim: jax.Array, num_levels: int) -> jax.Array:
  """SPEC sec. 1: density on [-1, 1] -> probability of the discrete bin, in bits per value."""
  return nll_per_dim / math.log(2.0) + math.log2(num_levels / 2.0)


def make_flow(c: ModelConfig, causal: bool = True, name: str | None = None) -> flow.Flow:
  """The AF of this config; `causal=False` gives its one-step student (same parameter tree)."""
  return flow.Flow(
      token_dim=c.token_dim, num_tokens=c.num_tokens, num_blocks=c.af_blocks, width=c.af_width,
      depth=c.af_layers, head_dim=c.head_dim, mlp_ratio=c.mlp_ratio,
      start_token=c.af_start_token, logscale_clip=c.logscale_clip,
      num_classes=c.num_classes if c.af_class_conditional else 0, dtype=_DTYPES[c.dtype],
      scan_layers=c.scan_layers, remat=c.remat, attention=c.attention, causal=causal, name=name)


class Farmer(nn.Module):
  """Images [B, H, W, C] in [-1, 1] and labels [B] (0..C-1, or C for the null class) -> nll parts."""
  config: ModelConfig

  def setup(self):
    c = self.config
    dtype = _DTYPES[c.dtype]
    self.flow = make_flow(c, name="flow")
    self.prior = prior.Prior(
        token_dim=c.token_dim, d_informative=c.d_informative, num_tokens=c.num_tokens,
        num_classes=c.num_classes, class_repeat=c.class_repeat, width=c.prior_width,
        depth=c.prior_layers, k_informative=c.k_informative, k_redundant=c.k_redundant,
        redundant_model=c.redundant_model, head_dim=c.head_dim, mlp_ratio=c.mlp_ratio,
        scale_floor=c.scale_floor, dtype=dtype, scan_layers=c.scan_layers, remat=c.remat,
        attention=c.attention, redundant_head_width=c.redundant_head_width, name="prior")

  @property
  def prior_reads_reversed(self) -> bool:
    """Final permutation: the prior reads tokens opposite to the last AF block's order."""
    return flow.last_block_flips(self.config.af_blocks) != self.config.final_permutation

  def _to_prior_order(self, z_BxNxD: jax.Array) -> jax.Array:
    return z_BxNxD[:, ::-1] if self.prior_reads_reversed else z_BxNxD

  def __call__(self, images_BxHxWxC: jax.Array, labels_B: jax.Array,
               train: bool = False) -> Mapping[str, Any]:
    """Returns per-example [B] values, all per dimension of x: `nll` (nats), `bpd`, and the parts
    `nll_informative`, `nll_redundant`, `logdet` with nll = nll_informative + nll_redundant - logdet.
    Also `z` [B, N, d] (natural token order). With train=True, labels are dropped to the null class
    with probability `label_dropout` (needs the 'dropout' rng)."""
    c = self.config
    if c.num_classes == 0:
      labels_B = jnp.full(images_BxHxWxC.shape[:1], c.num_classes, jnp.int32)
    elif train and c.label_dropout > 0:
      drop = jax.random.bernoulli(self.make_rng("dropout"), c.label_dropout, labels_B.shape)
      labels_B = jnp.where(drop, c.num_classes, labels_B)
    x_BxNxD = patchify(images_BxHxWxC.astype(jnp.float32), c.patch_size)
    z_BxNxD, logdet_B = self.flow(x_BxNxD, labels_B)
    log_p_inf_B, log_p_red_B = self.prior(self._to_prior_order(z_BxNxD), labels_B)
    per_dim = lambda v: v / c.num_dims
    nll_B = -per_dim(log_p_inf_B + log_p_red_B + logdet_B)
    return dict(nll=nll_B, bpd=bits_per_dim(nll_B, c.num_levels),
                nll_informative=-per_dim(log_p_inf_B), nll_redundant=-per_dim(log_p_red_B),
                logdet=per_dim(logdet_B), z=z_BxNxD)

  def decode(self, z_BxNxD: jax.Array, labels_B: jax.Array, recompute: bool = False) -> jax.Array:
    """Latents (natural order) -> images [B, H, W, C] through the exact AF inverse (not clipped);
    KV-cached unless `recompute`."""
    c = self.config
    x_BxNxD = self.flow.inverse(z_BxNxD, labels_B, recompute)
    return unpatchify(x_BxNxD, c.patch_size, c.image_size, c.channels)

  def decode_parallel(self, z_BxNxD: jax.Array, labels_B: jax.Array, spec: flow.ParallelInverse,
                      student_guess=None) -> tuple[jax.Array, jax.Array]:
    """`decode` by (Gauss-Seidel-)Jacobi (`Flow.inverse_parallel`) -> (images [B, H, W, C], not
    clipped; passes per AF block int32 [n], block 0 first)."""
    c = self.config
    x_BxNxD, passes_n = self.flow.inverse_parallel(z_BxNxD, labels_B, spec, student_guess)
    return unpatchify(x_BxNxD, c.patch_size, c.image_size, c.channels), passes_n

  def sample(self, key: jax.Array, labels_B: jax.Array,
             sampler: prior.SamplerConfig = prior.SamplerConfig(),
             recompute: bool = False) -> jax.Array:
    """Draws latents from the prior (guided or not, SPEC sec. 5) and inverts the flow.

    -> images [B, H, W, C] clipped to [-1, 1]. `recompute=True` is the slow reference path (prefix
    recomputation in the prior and in every AF block) with identical random draws.
    """
    labels_B = self.sample_labels(labels_B)
    z_BxNxD = self.sample_latents(key, labels_B, sampler, recompute)
    return jnp.clip(self.decode(z_BxNxD, labels_B, recompute), -1.0, 1.0)

  def sample_labels(self, labels_B: jax.Array) -> jax.Array:
    """The labels the model samples with: the null class throughout for unconditional data."""
    if self.config.num_classes == 0:
      return jnp.full_like(labels_B, self.config.num_classes)
    return labels_B

  def encode(self, images_BxHxWxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Images in [-1, 1] -> latents z [B, N, d] in natural token order (the AF forward, one
    parallel pass per block; `labels_B` only reach a class-conditional AF)."""
    x_BxNxD = patchify(images_BxHxWxC.astype(jnp.float32), self.config.patch_size)
    return self.flow(x_BxNxD, self.sample_labels(labels_B))[0]

  def complete_latents(self, key: jax.Array, z_inf_BxNxI: jax.Array, labels_B: jax.Array,
                       sampler: prior.SamplerConfig = prior.SamplerConfig()) -> jax.Array:
    """Informative latents z^I [B, N, d_I] (natural order) -> z [B, N, d] (natural order), the
    redundant channels drawn from the shared GMM of one parallel prior pass (`Prior.complete`).
    `labels_B` as returned by `sample_labels`."""
    z_BxNxD = self.prior.complete(key, self._to_prior_order(z_inf_BxNxI), labels_B, sampler)
    return self._to_prior_order(z_BxNxD)

  def sample_latents(self, key: jax.Array, labels_B: jax.Array,
                     sampler: prior.SamplerConfig = prior.SamplerConfig(),
                     recompute: bool = False) -> jax.Array:
    """Latents z [B, N, d] from the prior in natural token order: what the AF inverse (or its
    distilled student) decodes. `labels_B` as returned by `sample_labels`."""
    draw = self.prior.decode_recompute if recompute else self.prior.decode
    return self._to_prior_order(draw(key, labels_B, sampler))
