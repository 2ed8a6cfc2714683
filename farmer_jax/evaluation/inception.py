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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PREPROCESS = ("adm", "pytorch_fid")
PRECISION = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}
POOL3_DIM = 2048
NUM_LOGITS = 1008
MIN_RESIZE = 75      # the smallest input whose feature maps stay non-empty through Mixed_7c


@functools.lru_cache(maxsize=16)
def resize_matrix(in_size: int, out_size: int, half_pixel: bool) -> np.ndarray:
  """Bilinear interpolation as a matrix: out = M @ in along one axis. -> float32 [out_size, in_size].

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


class BlockA(nn.Module):
  """Mixed_5b-5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1 -> 224 + pool_features channels."""
  pool_features: int
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    b1 = conv(64, 1, name="branch1x1")(x)
    b5 = conv(64, 5, padding=2, name="branch5x5_2")(conv(48, 1, name="branch5x5_1")(x))
    b3 = conv(64, 1, name="branch3x3dbl_1")(x)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(conv(96, 3, padding=1, name="branch3x3dbl_2")(b3))
    bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class BlockB(nn.Module):
  """Mixed_6a, grid reduction: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2 -> 384 + 96 + C channels."""
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    b3 = conv(384, 3, stride=2, name="branch3x3")(x)
    bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(conv(64, 1, name="branch3x3dbl_1")(x))
    bd = conv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2, 0)], axis=-1)


class BlockC(nn.Module):
  """Mixed_6b-6e: factorised 7x7 convolutions with `c7` inner channels -> 768 channels."""
  c7: int
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    row = lambda f, name: conv(f, (1, 7), padding=(0, 3), name=name)
    col = lambda f, name: conv(f, (7, 1), padding=(3, 0), name=name)
    b1 = conv(192, 1, name="branch1x1")(x)
    b7 = conv(self.c7, 1, name="branch7x7_1")(x)
    b7 = col(192, "branch7x7_3")(row(self.c7, "branch7x7_2")(b7))
    bd = conv(self.c7, 1, name="branch7x7dbl_1")(x)
    bd = row(self.c7, "branch7x7dbl_3")(col(self.c7, "branch7x7dbl_2")(bd))
    bd = row(192, "branch7x7dbl_5")(col(self.c7, "branch7x7dbl_4")(bd))
    bp = conv(192, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class BlockD(nn.Module):
  """Mixed_7a, grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2 -> 320 + 192 + C."""
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    b3 = conv(320, 3, stride=2, name="branch3x3_2")(conv(192, 1, name="branch3x3_1")(x))
    b7 = conv(192, 1, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], axis=-1)


class BlockE(nn.Module):
  """Mixed_7b / 7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1 -> 2048 channels.

  `max_pool`: the FID graph's Mixed_7c pools its pool branch with a max, Mixed_7b with an average.
  """
  max_pool: bool = False
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    split = lambda y, prefix: jnp.concatenate(
        [conv(384, (1, 3), padding=(0, 1), name=f"{prefix}a")(y),
         conv(384, (3, 1), padding=(1, 0), name=f"{prefix}b")(y)], axis=-1)
    b1 = conv(320, 1, name="branch1x1")(x)
    b3 = split(conv(384, 1, name="branch3x3_1")(x), "branch3x3_2")
    bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(conv(448, 1, name="branch3x3dbl_1")(x))
    bd = split(bd, "branch3x3dbl_3")
    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_3x3_same(x)
    bp = conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """pool3 [B, 2048] -> [B, 1008]: pool3 @ kernel (+ bias where `bias`); the bias always exists."""
  bias: bool = True
  precision: str = "highest"

  @nn.compact
  def __call__(self, pool3_BxD: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool3_BxD.shape[-1], NUM_LOGITS))
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
      raise ValueError(f"resize={self.resize}: InceptionV3 needs inputs of at least {MIN_RESIZE} px")
    conv = functools.partial(ConvBN, precision=self.precision)
    x = preprocess(images_BxHxWxC, self.resize, self.preprocess, PRECISION[self.precision])
    x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2, 0)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)
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


def flops_per_image(resize: int = 299) -> float:
  """Multiply-add FLOPs (2 per MAC) of the convolutions and the fc layer for one image, from the
  shapes the network traces (pooling, batch norm and the resize are left out: < 1%)."""
  macs = []

  def count(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Conv, Logits)):
      kernel = math.prod(module.kernel_size) if isinstance(module, nn.Conv) else 1
      macs.append(math.prod(out.shape[1:]) * kernel * args[0].shape[-1])
    return out

  model = FIDInceptionV3(resize=resize)
  image = jax.ShapeDtypeStruct((1, resize, resize, 3), jnp.float32)
  with nn.intercept_methods(count):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x), image)
  return 2.0 * sum(macs)
