"""The networks of Adversarial Flow Models (SPEC sec. 7, farmer_jax/afm.py trains them).

G and D are transformers of equal size over patch tokens with adaLN-Zero class conditioning: every
layer's LayerNorm shift and scale and its residual gates come from the class embedding. G maps
noise of the data's shape to a sample in one pass; D reads a CLS token through a linear logit.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from farmer_jax.models import farmer, layers




@dataclasses.dataclass(frozen=True)
class NetConfig:
  image_size: int
  channels: int
  patch_size: int
  width: int
  depth: int
  head_dim: int
  mlp_ratio: int
  num_classes: int      # 0: unconditional (one embedding)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  shape: tuple[int, int, int] | None = None) -> "NetConfig":
    """`shape` (H, W, C) of what G generates: by default config.data's images."""
    a, data = config.afm, config.data
    size, channels = (shape[0], shape[2]) if shape else (data.image_size, data.channels)
    return cls(size, channels, a.patch_size, a.width, a.depth, a.head_dim, a.mlp_ratio,
               data.num_classes)

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def token_dim(self) -> int:
    return self.patch_size ** 2 * self.channels


def _plain_norm(x):
  return nn.LayerNorm(use_bias=False, use_scale=False)(x)


class AdaLNLayer(nn.Module):
  """Pre-norm bidirectional layer with adaLN-Zero conditioning (DiT): from the condition c [B, W],
  shift, scale and gate of the attention and MLP branches; the gates start at 0."""
  width: int
  head_dim: int
  mlp_ratio: int

  @nn.compact
  def __call__(self, x_BxNxW: jax.Array, c_BxW: jax.Array) -> jax.Array:
    mod = layers.dense(6 * self.width, (layers.EMBED, layers.HIDDEN), jnp.float32, "modulation",
                       kernel_init=nn.initializers.zeros)(nn.silu(c_BxW))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod[:, None, :], 6, axis=-1)
    h = _plain_norm(x_BxNxW) * (1 + scale1) + shift1
    attn, _ = layers.Attention(self.width, self.head_dim, causal=False, name="attn")(h)
    x_BxNxW = x_BxNxW + gate1 * attn
    h = _plain_norm(x_BxNxW) * (1 + scale2) + shift2
    x_BxNxW = x_BxNxW + gate2 * layers.MLP(self.width, self.mlp_ratio, name="mlp")(h)
    return layers.constrain(x_BxNxW, layers.ACT_BATCH, layers.ACT_SEQ, layers.ACT_EMBED)


class Trunk(nn.Module):
  """Images [B, H, W, C] and labels [B] -> (token features [B, (1+)N, W], condition [B, W]):
  patch embedding, learned positions, an optional leading CLS token, `depth` adaLN layers."""
  net: NetConfig
  cls_token: bool

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, labels_B: jax.Array):
    n = self.net
    tokens = farmer.patchify(x_BxHxWxC, n.patch_size)
    h = layers.dense(n.width, (None, layers.EMBED), jnp.float32, "embed")(tokens)
    h = h + self.param("pos", layers.param_init(nn.initializers.normal(0.02), None, layers.EMBED),
                       (n.num_tokens, n.width))
    if self.cls_token:
      cls = self.param("cls", layers.param_init(nn.initializers.normal(0.02), layers.EMBED),
                       (n.width,))
      h = jnp.concatenate([jnp.broadcast_to(cls, (h.shape[0], 1, n.width)), h], axis=1)
    table = self.param("class_embed", layers.param_init(nn.initializers.normal(0.02),
                                                        layers.VOCAB, layers.EMBED),
                       (max(n.num_classes, 1), n.width))
    c_BxW = table[labels_B]
    for i in range(n.depth):
      h = AdaLNLayer(n.width, n.head_dim, n.mlp_ratio, name=f"layer_{i}")(h, c_BxW)
    return h, c_BxW


class Generator(nn.Module):
  """G(eps, c): eps [B, H, W, C] -> sample [B, H, W, C] in one pass (adaLN final layer, zero-init
  output projection: G starts at 0)."""
  net: NetConfig

  @nn.compact
  def __call__(self, eps_BxHxWxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    n = self.net
    h, c_BxW = Trunk(n, cls_token=False, name="trunk")(eps_BxHxWxC, labels_B)
    shift, scale = jnp.split(layers.dense(2 * n.width, (layers.EMBED, layers.HIDDEN), jnp.float32,
                                          "final_modulation", kernel_init=nn.initializers.zeros)(
                                              nn.silu(c_BxW))[:, None, :], 2, axis=-1)
    h = _plain_norm(h) * (1 + scale) + shift
    out = layers.dense(n.token_dim, (layers.EMBED, None), jnp.float32, "out",
                       kernel_init=nn.initializers.zeros)(h)
    return farmer.unpatchify(out, n.patch_size, n.image_size, n.channels)


class Discriminator(nn.Module):
  """D(x, c): images [B, H, W, C] -> logits [B], a linear layer on the final CLS token."""
  net: NetConfig

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    h, _ = Trunk(self.net, cls_token=True, name="trunk")(x_BxHxWxC, labels_B)
    h = layers.layer_norm(jnp.float32, "ln_final")(h[:, 0])
    return layers.dense(1, (layers.EMBED, None), jnp.float32, "logit")(h)[:, 0]
