"""The FID variant of InceptionV3 in Flax (NHWC): 2048-d pool3 features and the 1008-way logits.

This is the network of TensorFlow's `inception-2015-12-05` graph, which both ADM's evaluator and
pytorch-fid (as `pt_inception-2015-12-05-*.pth`) use for FID, IS and precision/recall. It differs
from the usual InceptionV3 in four places, all kept here:
  - the average pools inside the A, C and first E blocks leave the zero padding out of the mean
    (count_include_pad=False), as TF's pooling does;
  - the last E block pools its pool branch with a 3x3 max pool (stride 1), not an average;
  - 1008 output classes (TF's 1000 ImageNet classes plus 8 unused);
  - every convolution is followed by batch norm with eps 1e-3 (inference statistics) and a ReLU.

Submodule names are those of torchvision's Inception3 (`Conv2d_1a_3x3`, `Mixed_5b.branch1x1`, ...,
each holding `conv` and `bn`), so `weights.py` maps a PyTorch state dict onto it by name.

Input: float images [B, H, W, 3] on the 0..255 scale, any H, W (resized to `resize` inside).
Two input conventions (`preprocess`):
  "adm"          TF's graph, as ADM's evaluator feeds it: bilinear resize with TF1's legacy
                 coordinates (source = dest * in/out, no half-pixel offset), then (x - 128) / 128.
  "pytorch_fid"  pytorch-fid's: x / 255, bilinear resize as torch's F.interpolate with
                 align_corners=False (half-pixel centres, no antialiasing), then 2x - 1.
"""
import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax.evaluation import fid_config

PREPROCESS = fid_config.PREPROCESS
PRECISION = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}
POOL3_DIM = 2048
NUM_LOGITS = 1008
MIN_RESIZE = fid_config.MIN_RESIZE


@functools.lru_cache(maxsize=16)
def resize_matrix(in_size: int, out_size: int, half_pixel: bool) -> np.ndarray:
  """Bilinear interpolation as a matrix: out = M @ in along one axis -> float32 [out, in].

  half_pixel=True: torch's align_corners=False, source = (dest + 0.5) * in/out - 0.5, clamped at 0.
  half_pixel=False: TF1's ResizeBilinear (align_corners=False), source = dest * in/out.
  Both clamp the upper neighbour at the last row; neither antialiases when shrinking.
  """
  scale = in_size / out_size
  dest = np.arange(out_size, dtype=np.float64)
  src = np.maximum((dest + 0.5) * scale - 0.5, 0.0) if half_pixel else dest * scale
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def preprocess(images_BxHxWxC: jax.Array, size: int, mode: str,
               precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """0..255 images (C = 1 is repeated to 3) -> the network's input [B, size, size, 3] in [-1, 1]."""
  if mode not in PREPROCESS:
    raise ValueError(f"preprocess={mode!r}: use one of {PREPROCESS}")
  x = images_BxHxWxC.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if mode == "pytorch_fid":
    x = x / 255.0
  half_pixel = mode == "pytorch_fid"
  mh = resize_matrix(x.shape[1], size, half_pixel)
  mw = resize_matrix(x.shape[2], size, half_pixel)
  x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=precision)
  x = jnp.einsum("pw,bowc->bopc", mw, x, precision=precision)
  return (x - 128.0) / 128.0 if mode == "adm" else 2.0 * x - 1.0


def _pairs(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class ConvBN(nn.Module):
  """Conv (no bias) -> batch norm (eps 1e-3, inference statistics) -> ReLU; torch's BasicConv2d."""
  features: int
  kernel: int | tuple[int, int]
  stride: int = 1
  padding: int | tuple[int, int] = 0
  precision: str = "highest"

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    ph, pw = _pairs(self.padding)
    x = nn.Conv(self.features, _pairs(self.kernel), strides=self.stride,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=PRECISION[self.precision], name="conv")(x_BxHxWxC)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average over the real (unpadded) neighbours only, as TF pools."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, pad: int) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class Layer(NamedTuple):
  """One ConvBN layer of a branch."""
  name: str
  features: int
  kernel: int | tuple[int, int]
  stride: int = 1
  padding: int | tuple[int, int] = 0


def _row7(name: str, features: int) -> Layer:
  return Layer(name, features, (1, 7), padding=(0, 3))


def _col7(name: str, features: int) -> Layer:
  return Layer(name, features, (7, 1), padding=(3, 0))


def _chain(x: jax.Array, precision: str, *layers: Layer) -> jax.Array:
  """Applies ConvBN layers in order; called inside a compact method, they become its children."""
  for layer in layers:
    x = ConvBN(layer.features, layer.kernel, layer.stride, layer.padding, precision,
               name=layer.name)(x)
  return x


class BlockA(nn.Module):
  """Mixed_5b-5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1 -> 224 + pool_features channels."""
  pool_features: int
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        _chain(x, p, Layer("branch1x1", 64, 1)),
        _chain(x, p, Layer("branch5x5_1", 48, 1), Layer("branch5x5_2", 64, 5, padding=2)),
        _chain(x, p, Layer("branch3x3dbl_1", 64, 1), Layer("branch3x3dbl_2", 96, 3, padding=1),
               Layer("branch3x3dbl_3", 96, 3, padding=1)),
        _chain(_avg_pool_3x3_same(x), p, Layer("branch_pool", self.pool_features, 1)),
    ], axis=-1)


class BlockB(nn.Module):
  """Mixed_6a, grid reduction: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2 -> 384 + 96 + C channels."""
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        _chain(x, p, Layer("branch3x3", 384, 3, 2)),
        _chain(x, p, Layer("branch3x3dbl_1", 64, 1), Layer("branch3x3dbl_2", 96, 3, padding=1),
               Layer("branch3x3dbl_3", 96, 3, 2)),
        _max_pool_3x3(x, 2, 0),
    ], axis=-1)


class BlockC(nn.Module):
  """Mixed_6b-6e: factorised 7x7 convolutions with `c7` inner channels -> 768 channels."""
  c7: int
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    p, c7 = self.precision, self.c7
    return jnp.concatenate([
        _chain(x, p, Layer("branch1x1", 192, 1)),
        _chain(x, p, Layer("branch7x7_1", c7, 1), _row7("branch7x7_2", c7),
               _col7("branch7x7_3", 192)),
        _chain(x, p, Layer("branch7x7dbl_1", c7, 1), _col7("branch7x7dbl_2", c7),
               _row7("branch7x7dbl_3", c7), _col7("branch7x7dbl_4", c7),
               _row7("branch7x7dbl_5", 192)),
        _chain(_avg_pool_3x3_same(x), p, Layer("branch_pool", 192, 1)),
    ], axis=-1)


class BlockD(nn.Module):
  """Mixed_7a, grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2 -> 320 + 192 + C."""
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        _chain(x, p, Layer("branch3x3_1", 192, 1), Layer("branch3x3_2", 320, 3, 2)),
        _chain(x, p, Layer("branch7x7x3_1", 192, 1), _row7("branch7x7x3_2", 192),
               _col7("branch7x7x3_3", 192), Layer("branch7x7x3_4", 192, 3, 2)),
        _max_pool_3x3(x, 2, 0),
    ], axis=-1)


class BlockE(nn.Module):
  """Mixed_7b / 7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1 -> 2048 channels.

  `max_pool`: the FID graph's Mixed_7c pools its pool branch with a max, Mixed_7b with an average.
  """
  max_pool: bool = False
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    p = self.precision

    def fork(y, prefix):   # 1x3 and 3x1 side by side
      return jnp.concatenate([_chain(y, p, Layer(f"{prefix}a", 384, (1, 3), padding=(0, 1))),
                              _chain(y, p, Layer(f"{prefix}b", 384, (3, 1), padding=(1, 0)))],
                             axis=-1)

    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_3x3_same(x)
    return jnp.concatenate([
        _chain(x, p, Layer("branch1x1", 320, 1)),
        fork(_chain(x, p, Layer("branch3x3_1", 384, 1)), "branch3x3_2"),
        fork(_chain(x, p, Layer("branch3x3dbl_1", 448, 1),
                    Layer("branch3x3dbl_2", 384, 3, padding=1)), "branch3x3dbl_3"),
        _chain(pooled, p, Layer("branch_pool", 192, 1)),
    ], axis=-1)


class Logits(nn.Module):
  """pool3 [B, 2048] -> [B, 1008]: pool3 @ kernel (+ bias where `bias`); the bias always exists."""
  bias: bool = True
  precision: str = "highest"

  @nn.compact
  def __call__(self, pool3_BxD: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (pool3_BxD.shape[-1], NUM_LOGITS))
    bias = self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
    logits = jnp.dot(pool3_BxD, kernel, precision=PRECISION[self.precision])
    return logits + bias if self.bias else logits


class FIDInceptionV3(nn.Module):
  """images [B, H, W, C] (0..255, C = 1 or 3) -> {"pool3": [B, 2048], "logits": [B, 1008]}.

  `fc_bias=False` gives TF's `softmax/logits/MatMul`, pool3 @ W without the bias, which is what
  the Inception Score of Salimans et al. and ADM's evaluator take the softmax of.
  """
  resize: int = 299
  preprocess: str = "adm"
  precision: str = "highest"
  fc_bias: bool = True

  @nn.compact
  def __call__(self, images_BxHxWxC: jax.Array) -> dict[str, jax.Array]:
    if self.resize < MIN_RESIZE:
      raise ValueError(f"resize={self.resize}: InceptionV3 needs at least {MIN_RESIZE} px")
    p = self.precision
    x = preprocess(images_BxHxWxC, self.resize, self.preprocess, PRECISION[p])
    x = _chain(x, p, Layer("Conv2d_1a_3x3", 32, 3, 2), Layer("Conv2d_2a_3x3", 32, 3),
               Layer("Conv2d_2b_3x3", 64, 3, padding=1))
    x = _max_pool_3x3(x, 2, 0)
    x = _chain(x, p, Layer("Conv2d_3b_1x1", 80, 1), Layer("Conv2d_4a_3x3", 192, 3))
    x = _max_pool_3x3(x, 2, 0)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = BlockA(pool_features, self.precision, name=name)(x)
    x = BlockB(self.precision, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = BlockC(c7, self.precision, name=name)(x)
    x = BlockD(self.precision, name="Mixed_7a")(x)
    x = BlockE(False, self.precision, name="Mixed_7b")(x)
    x = BlockE(True, self.precision, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = Logits(self.fc_bias, self.precision, name="fc")(pool3)
    return {"pool3": pool3, "logits": logits}


def variable_shapes(resize: int = MIN_RESIZE) -> dict:
  """{"params", "batch_stats"} as ShapeDtypeStructs (nothing computed or allocated)."""
  model = FIDInceptionV3(resize=resize)
  return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           jnp.zeros((1, resize, resize, 3), jnp.float32)))


def random_variables(seed: int = 0) -> dict:
  """Random numpy variables for plumbing checks only (their features mean nothing): He-normal
  conv kernels, so that features stay O(1) through the 94 layers, a LeCun-normal fc, BN as the
  identity (scale 1, bias 0, running mean 0, variance 1). numpy draws them in a fraction of a
  second, where jax.random on CPU takes many."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    name = path[-1].key
    if name == "kernel":   # conv HWIO or fc [in, out]: fan-in is all but the last axis
      gain = 1.0 if path[-2].key == "fc" else 2.0
      return (rng.standard_normal(shape.shape, np.float32)
              * np.float32(np.sqrt(gain / math.prod(shape.shape[:-1]))))
    return np.full(shape.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(draw, variable_shapes())
