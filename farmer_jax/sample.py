"""Sampling entry points: class-conditional image generation, `samples_<step>.npz` and a PNG grid.

The sampler is the KV-cached prior decode (unguided decoupled sampling, resampling CFG or naive
CFG, `prior.SamplerConfig`) followed by the KV-cached exact AF inverse or the distilled one-step
student (farmer_jax/distill.py), jitted once per model, settings and batch shape. Images leave as
uint8 in the dataset's native levels 0..L-1.
"""
import dataclasses
import functools
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax import rundir
from farmer_jax.models import farmer, flow, prior


def quantize(images: np.ndarray, num_levels: int) -> np.ndarray:
  """[-1, 1] -> levels 0..L-1 (uint8): the bin that uniform dequantisation x = (v + u)/L*2 - 1 came from."""
  v = np.floor((np.asarray(images, np.float32) + 1.0) / 2.0 * num_levels)
  return np.clip(v, 0, num_levels - 1).astype(np.uint8)


def parse_classes(spec, num_classes: int) -> np.ndarray:
  """`config.sample.classes`: "all" or a comma-separated list such as "3,5" -> int32 class ids.

  Unconditional data (num_classes = 0) samples the null class, id 0 = C, whatever the spec.
  """
  if num_classes == 0:
    return np.zeros(1, np.int32)
  if str(spec).strip().lower() == "all":
    return np.arange(num_classes, dtype=np.int32)
  try:
    ids = [int(v) for v in str(spec).split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"config.sample.classes = {spec!r}: use 'all' or comma-separated integers "
                     f"such as '3,5'") from None
  bad = [v for v in ids if not 0 <= v < num_classes]
  if not ids or bad:
    raise ValueError(f"config.sample.classes = {spec!r}: class ids must lie in [0, {num_classes})"
                     f"{f'; out of range: {bad}' if bad else ''}")
  return np.asarray(ids, np.int32)


def sampler_config(sample_cfg) -> prior.SamplerConfig:
  """The `prior.SamplerConfig` fields of `config.sample`, validated."""
  names = {f.name for f in dataclasses.fields(prior.SamplerConfig)}
  s = prior.SamplerConfig(**{k: v for k, v in sample_cfg.items() if k in names})
  s.validate()
  return s


def grid_labels(classes: np.ndarray, per_class: int) -> np.ndarray:
  """Labels for a grid with one row per class: [len(classes) * per_class]."""
  return np.repeat(np.asarray(classes, np.int32), per_class)


def denoise(model: farmer.Farmer, params, images: jax.Array, labels: jax.Array,
            sigma: float) -> jax.Array:
  """TARFlow's score step for a model trained on noisy data: x + sigma^2 * d log p(x) / dx."""
  log_p = lambda x: -jnp.sum(model.apply({"params": params}, x, labels)["nll"]) * model.config.num_dims
  return images + sigma ** 2 * jax.grad(log_p)(images)


def batch_sampler(model: farmer.Farmer, sampler: prior.SamplerConfig = prior.SamplerConfig(),
                  student_flow: flow.Flow | None = None, denoise_sigma: float = 0.0):
  """FARMER's sampler of one batch, to be jitted: fn(params, student_params, key, labels [B]) ->
  images [B, H, W, C] in [-1, 1]. The AR prior draws the latents (KV-cached); the exact inverse
  decodes them, or `student_flow` (with student_params) in one parallel pass per block."""
  def sample_fn(p, sp, k, y):
    if student_flow is None:
      images = model.apply({"params": p}, k, y, sampler, method=farmer.Farmer.sample)
    else:
      y = model.apply({"params": p}, y, method=farmer.Farmer.sample_labels)
      z = model.apply({"params": p}, k, y, sampler, method=farmer.Farmer.sample_latents)
      x = student_flow.apply({"params": sp}, z, y, method=flow.Flow.student_inverse)
      c = model.config
      images = jnp.clip(farmer.unpatchify(x, c.patch_size, c.image_size, c.channels), -1.0, 1.0)
    if denoise_sigma > 0:
      images = jnp.clip(denoise(model, p, images, y, denoise_sigma), -1.0, 1.0)
    return images
  return sample_fn


@functools.lru_cache(maxsize=32)
def jitted_sampler(model: farmer.Farmer, sampler: prior.SamplerConfig, student_flow, denoise_sigma,
                   out_sharding, rules):
  """`batch_sampler` jitted once per model, sampler settings, decoder, output placement and
  logical-axis rules (which tracing reads), so that repeated sampling (every distillation
  evaluation, every FID run in a process) compiles once per batch shape."""
  del rules   # part of the cache key only
  return jax.jit(batch_sampler(model, sampler, student_flow, denoise_sigma),
                 out_shardings=out_sharding)


def generate(model: farmer.Farmer, params, labels: np.ndarray, key: jax.Array, *,
             batch_size: int, sampler: prior.SamplerConfig = prior.SamplerConfig(),
             denoise_sigma: float = 0.0, progress: bool = True,
             out_sharding: jax.sharding.Sharding | None = None,
             student: tuple[flow.Flow, Any] | None = None, as_float: bool = False) -> np.ndarray:
  """Samples one image per label in fixed-size batches (one compilation): -> uint8 [N, H, W, C].

  `denoise_sigma` > 0 applies the score-based denoising step with that noise level.
  `out_sharding`: where the images of a batch end up; with parameters spread over several
  processes, a replicated sharding over the mesh, so that every process can read them.
  `student`: (the distilled student Flow, its params) decodes the prior's latents in one parallel
  pass per block instead of the exact sequential inverse (SPEC sec. 6); the same `key` draws the
  same latents either way. `as_float`: float32 images in [-1, 1] instead of uint8 levels.
  """
  sample_fn = jitted_sampler(model, sampler, None if student is None else student[0],
                             denoise_sigma, out_sharding, tuple(nn.get_logical_axis_rules()))
  student_params = None if student is None else student[1]
  if progress:
    logging.info("sampling %d images in batches of %d; the first batch compiles the sampler",
                 len(labels), batch_size)
  out, start_time = [], time.perf_counter()
  for start in range(0, len(labels), batch_size):
    chunk = labels[start:start + batch_size]
    padded = np.pad(chunk, (0, batch_size - len(chunk)), mode="edge")
    images = jax.device_get(sample_fn(params, student_params, jax.random.fold_in(key, start),
                                      jnp.asarray(padded)))
    images = images if as_float else quantize(images, model.config.num_levels)
    out.append(images[:len(chunk)])
    if progress:
      done = min(start + batch_size, len(labels))
      elapsed = time.perf_counter() - start_time
      logging.info("sampled %d/%d images (%.3f s/img, ETA %.0f s)", done, len(labels),
                   elapsed / done, elapsed / done * (len(labels) - done))
  return np.concatenate(out)


def levels_to_uint8(images: np.ndarray, num_levels: int) -> np.ndarray:
  """Native levels 0..L-1 -> uint8 0..255, same shape."""
  return (np.asarray(images, np.float32) * (255.0 / (num_levels - 1))).round().astype(np.uint8)


def grid_image(images: np.ndarray, num_levels: int, rows: int, min_cell: int = 64) -> np.ndarray:
  """uint8 level images [N, H, W, C] as a rows x (N/rows) grid, upscaled so that a cell is at
  least `min_cell` pixels -> uint8 [rows * H', cols * W', C]."""
  n, h, w, c = images.shape
  cols = -(-n // rows)
  pixels = levels_to_uint8(images, num_levels)
  pixels = np.pad(pixels, ((0, rows * cols - n), (0, 0), (0, 0), (0, 0)))
  up = max(1, min_cell // max(h, w))
  pixels = pixels.repeat(up, axis=1).repeat(up, axis=2)
  # A grey line right of and below every cell, so that images with dark borders stay apart.
  pixels = np.pad(pixels, ((0, 0), (0, 2), (0, 2), (0, 0)), constant_values=96)
  h, w = pixels.shape[1:3]
  return pixels.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_grid_png(path, images: np.ndarray, num_levels: int, rows: int) -> np.ndarray:
  """`grid_image` written as a PNG at `path` (through the run directory's writer); returns it."""
  grid = grid_image(images, num_levels, rows)
  rundir.write_png(path, grid)
  return grid


def to_rgb_uint8(images: np.ndarray, num_levels: int) -> np.ndarray:
  """Native levels 0..L-1 [N, H, W, C] -> uint8 [N, H, W, 3] in 0..255 (grey repeated to RGB)."""
  pixels = levels_to_uint8(images, num_levels)
  return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def npz_arrays(images: np.ndarray, labels: np.ndarray, num_levels: int,
               info: dict | None = None) -> dict:
  """images (native levels), labels, num_levels, `arr_0` (uint8 RGB 0..255 NHWC, the key ADM's
  evaluator reads, so that it takes the file unchanged) and `info` (JSON: what made them)."""
  out = {"images": images, "labels": labels, "num_levels": np.int32(num_levels),
         "arr_0": to_rgb_uint8(images, num_levels)}
  if info is not None:
    out["info"] = np.asarray(rundir.dumps(info))
  return out


def write_samples(run: rundir.RunDir, step: int, images: np.ndarray, labels: np.ndarray,
                  num_levels: int, rows: int, tag: str = "", info: dict | None = None
                  ) -> np.ndarray:
  """Writes samples/samples_<step>[_<tag>].png (the grid) and then .npz (`npz_arrays`), so that
  an npz on disk means a complete set. Returns the grid (uint8 [H', W', C])."""
  grid = save_grid_png(run.samples(step, tag, "png"), images, num_levels, rows)
  rundir.write_npz(run.samples(step, tag), **npz_arrays(images, labels, num_levels, info))
  logging.info("wrote %s and .png", run.samples(step, tag))
  return grid
