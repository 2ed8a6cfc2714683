"""Sampling entry points: class-conditional image generation, `samples_<step>.npz` and a PNG grid.

This is the plain sampler (ancestral GMM sampling with decoupled temperature / scale, exact sequential
AF inverse). Images leave as uint8 in the dataset's native levels 0..L-1.
"""
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from farmer_jax.models import farmer


def quantize(images: np.ndarray, num_levels: int) -> np.ndarray:
  """[-1, 1] -> levels 0..L-1 (uint8): the bin that uniform dequantisation x = (v + u)/L*2 - 1 came from."""
  v = np.floor((np.asarray(images, np.float32) + 1.0) / 2.0 * num_levels)
  return np.clip(v, 0, num_levels - 1).astype(np.uint8)


def grid_labels(num_classes: int, per_class: int) -> np.ndarray:
  """Labels for a grid with one row per class ([C * per_class]); one null-class row if C == 0."""
  return np.repeat(np.arange(max(num_classes, 1), dtype=np.int32), per_class)


def generate(model: farmer.Farmer, params, labels: np.ndarray, key: jax.Array, *,
             batch_size: int, temperature: float = 1.0, scale: float = 1.0) -> np.ndarray:
  """Samples one image per label, in fixed-size batches (one compilation). -> uint8 [N, H, W, C]."""
  sample_fn = jax.jit(lambda p, k, y: model.apply({"params": p}, k, y, temperature=temperature,
                                                  scale=scale, method=farmer.Farmer.sample))
  out = []
  for start in range(0, len(labels), batch_size):
    chunk = labels[start:start + batch_size]
    padded = np.pad(chunk, (0, batch_size - len(chunk)), mode="edge")
    images = sample_fn(params, jax.random.fold_in(key, start), jnp.asarray(padded))
    out.append(quantize(jax.device_get(images), model.config.num_levels)[:len(chunk)])
    logging.info("sampled %d/%d", min(start + batch_size, len(labels)), len(labels))
  return np.concatenate(out)


def save_grid_png(path: str, images: np.ndarray, num_levels: int, rows: int,
                  min_cell: int = 32) -> np.ndarray:
  """Saves uint8 level images [N, H, W, C] as a rows x (N/rows) grid, upscaled so cells are visible.

  Returns the grid as uint8 [rows * H', cols * W', C].
  """
  n, h, w, c = images.shape
  cols = -(-n // rows)
  pixels = (images.astype(np.float32) * (255.0 / (num_levels - 1))).round().astype(np.uint8)
  pixels = np.pad(pixels, ((0, rows * cols - n), (0, 0), (0, 0), (0, 0)))
  grid = pixels.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
  up = max(1, min_cell // max(h, w))
  grid = grid.repeat(up, axis=0).repeat(up, axis=1)
  Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
  return grid


def write_samples(workdir: str, step: int, images: np.ndarray, labels: np.ndarray,
                  num_levels: int, rows: int) -> tuple[str, np.ndarray]:
  """Writes `samples/samples_<step>.npz` (images, labels, num_levels) and the PNG grid.

  Returns the npz path and the grid (uint8 [H', W', C]).
  """
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  npz = os.path.join(out_dir, f"samples_{step}.npz")
  png = os.path.join(out_dir, f"samples_{step}.png")
  grid = None
  if jax.process_index() == 0:
    np.savez(npz, images=images, labels=labels, num_levels=np.int32(num_levels))
    grid = save_grid_png(png, images, num_levels, rows)
    logging.info("wrote %s and %s", npz, png)
  return npz, grid
