"""Sampling entry points: class-conditional image generation, `samples_<step>.npz` and a PNG grid.

The sampler is the KV-cached prior decode (unguided decoupled sampling, resampling CFG or naive
CFG, `prior.SamplerConfig`) followed by the AF inverse: the KV-cached sequential one, its Jacobi or
Gauss-Seidel-Jacobi iteration to a tolerance (`sample.inverse`, docs/jacobi.md), or the distilled
one-step student (farmer_jax/distill.py); jitted once per model, settings and batch shape. Images
leave as uint8 in the dataset's native levels 0..L-1.
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


def parse_segments(spec, num_blocks: int, positions: int) -> tuple[int, ...]:
  """`config.sample.jacobi_segments`: one count ("4") or one per AF block in forward order
  ("8,1,1,1") -> a tuple; each in [1, positions] (the tokens a block decodes)."""
  try:
    counts = tuple(int(v) for v in str(spec).split(",") if v.strip())
  except ValueError:
    counts = ()
  if len(counts) not in (1, num_blocks) or not all(1 <= c <= positions for c in counts):
    raise ValueError(
        f"config.sample.jacobi_segments = {spec!r}: one count, or one per AF block "
        f"({num_blocks}, comma-separated, block 0 first), each an integer in [1, {positions}] "
        f"(the tokens each block decodes)")
  return counts


def parallel_inverse(sample_cfg, model_config: farmer.ModelConfig, has_student: bool = True
                     ) -> flow.ParallelInverse | None:
  """`sample.inverse` and its `jacobi_*` fields, validated -> the settings of the
  (Gauss-Seidel-)Jacobi inverse, or None for the sequential one. Without a student to start from
  (`has_student` False: the end of training) jacobi_init 'student' falls back to 'previous'."""
  method = sample_cfg.get("inverse", "sequential")
  if method not in flow.INVERSES:
    raise ValueError(f"config.sample.inverse = {method!r}: must be one of {flow.INVERSES}")
  tolerance = sample_cfg.get("jacobi_tolerance", 0.0)
  if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
    raise ValueError(f"config.sample.jacobi_tolerance = {tolerance!r}: must be a number >= 0 (the "
                     f"max abs change of x between two passes that stops a segment)")
  cap = sample_cfg.get("jacobi_max_iterations", 0)
  if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
    raise ValueError(f"config.sample.jacobi_max_iterations = {cap!r}: must be an integer >= 0 "
                     f"(0: a segment's length, where Jacobi is exact; strided: the segment count, "
                     f"where its sweeps are)")
  positions = model_config.num_tokens - (0 if model_config.af_start_token else 1)
  segments = parse_segments(sample_cfg.get("jacobi_segments", "1"), model_config.af_blocks,
                            positions)
  init = sample_cfg.get("jacobi_init", "previous")
  if init not in flow.JACOBI_INITS:
    raise ValueError(f"config.sample.jacobi_init = {init!r}: must be one of {flow.JACOBI_INITS}")
  if method == "sequential":
    return None
  if sample_cfg.get("decoder", "auto") == "student":
    raise ValueError(f"config.sample.inverse = {method!r} iterates the exact AF inverse, but "
                     f"sample.decoder = 'student' decodes with the student alone: set decoder "
                     f"'auto' or 'exact' (jacobi_init='student' starts from the student)")
  if init == "student" and not has_student:
    logging.warning("sample.jacobi_init = 'student' without a distilled student here: each block "
                    "starts from its input ('previous') instead")
    init = "previous"
  return flow.ParallelInverse(method, (1,) if method == "jacobi" else segments, float(tolerance),
                              cap, init)


def wants_student(sample_cfg) -> bool:
  """Whether the config's decode needs the distilled student as a start (not as the decoder)."""
  return (sample_cfg.get("inverse", "sequential") != "sequential"
          and sample_cfg.get("jacobi_init", "previous") == "student")


def decoder_name(student: bool, parallel: flow.ParallelInverse | None) -> str:
  """What decodes, for file tags and npz info: "student" (alone), "jacobi" / "gs_jacobi" /
  "strided" (the parallel exact inverse, whatever its start) or "exact" (the sequential one)."""
  if parallel is not None:
    return parallel.method
  return "student" if student else "exact"


def grid_labels(classes: np.ndarray, per_class: int) -> np.ndarray:
  """Labels for a grid with one row per class: [len(classes) * per_class]."""
  return np.repeat(np.asarray(classes, np.int32), per_class)


def denoise(model: farmer.Farmer, params, images: jax.Array, labels: jax.Array,
            sigma: float) -> jax.Array:
  """TARFlow's score step for a model trained on noisy data: x + sigma^2 * d log p(x) / dx."""
  log_p = lambda x: -jnp.sum(model.apply({"params": params}, x, labels)["nll"]) * model.config.num_dims
  return images + sigma ** 2 * jax.grad(log_p)(images)


def decode_parallel(model: farmer.Farmer, params, z_BxNxD: jax.Array, labels_B: jax.Array,
                    parallel: flow.ParallelInverse, student_flow: flow.Flow | None = None,
                    student_params=None) -> tuple[jax.Array, jax.Array]:
  """Latents -> (images [B, H, W, C] not clipped, AF passes per block [n]) by the
  (Gauss-Seidel-)Jacobi inverse; block t starts from the student's block t on its input when
  parallel.init is "student" (then `student_flow` and its params are needed)."""
  guess = None
  if parallel.init == "student":
    if student_flow is None:
      raise ValueError("config.sample.jacobi_init = 'student' needs a distilled student")

    def guess(t, z_t_BxNxD):
      return student_flow.apply({"params": student_params}, z_t_BxNxD, labels_B,
                                method=lambda f, z, y: f.blocks[t].student_inverse(z, y))
  return model.apply({"params": params}, z_BxNxD, labels_B, parallel, guess,
                     method=farmer.Farmer.decode_parallel)


def batch_sampler(model: farmer.Farmer, sampler: prior.SamplerConfig = prior.SamplerConfig(),
                  student_flow: flow.Flow | None = None, denoise_sigma: float = 0.0,
                  parallel: flow.ParallelInverse | None = None, with_passes: bool = False):
  """FARMER's sampler of one batch, to be jitted: fn(params, student_params, key, labels [B]) ->
  images [B, H, W, C] in [-1, 1]. The AR prior draws the latents (KV-cached); the exact inverse
  decodes them, or `student_flow` (with student_params) in one parallel pass per block. With
  `parallel` the exact inverse runs by (Gauss-Seidel-)Jacobi and `student_flow`, if given, only
  gives each block's start (jacobi_init 'student'). `with_passes`: fn returns (images, AF passes
  per block int32 [n], block 0 first; [0] without `parallel`)."""
  def sample_fn(p, sp, k, y):
    passes_n = jnp.zeros((0,), jnp.int32)
    if parallel is not None:
      y = model.apply({"params": p}, y, method=farmer.Farmer.sample_labels)
      z = model.apply({"params": p}, k, y, sampler, method=farmer.Farmer.sample_latents)
      images, passes_n = decode_parallel(model, p, z, y, parallel, student_flow, sp)
      images = jnp.clip(images, -1.0, 1.0)
    elif student_flow is None:
      images = model.apply({"params": p}, k, y, sampler, method=farmer.Farmer.sample)
    else:
      y = model.apply({"params": p}, y, method=farmer.Farmer.sample_labels)
      z = model.apply({"params": p}, k, y, sampler, method=farmer.Farmer.sample_latents)
      x = student_flow.apply({"params": sp}, z, y, method=flow.Flow.student_inverse)
      c = model.config
      images = jnp.clip(farmer.unpatchify(x, c.patch_size, c.image_size, c.channels), -1.0, 1.0)
    if denoise_sigma > 0:
      images = jnp.clip(denoise(model, p, images, y, denoise_sigma), -1.0, 1.0)
    return (images, passes_n) if with_passes else images
  return sample_fn


@functools.lru_cache(maxsize=32)
def jitted_sampler(model: farmer.Farmer, sampler: prior.SamplerConfig, student_flow, denoise_sigma,
                   out_sharding, rules, parallel: flow.ParallelInverse | None = None):
  """`batch_sampler` (with passes) jitted once per model, sampler settings, decoder, output
  placement and logical-axis rules (which tracing reads), so that repeated sampling (every
  distillation evaluation, every FID run in a process) compiles once per batch shape."""
  del rules   # part of the cache key only
  passes_sharding = out_sharding
  if isinstance(out_sharding, jax.sharding.NamedSharding):   # [n] counts: whole everywhere
    passes_sharding = jax.sharding.NamedSharding(out_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(batch_sampler(model, sampler, student_flow, denoise_sigma, parallel, True),
                 out_shardings=(out_sharding, passes_sharding))


def generate(model: farmer.Farmer, params, labels: np.ndarray, key: jax.Array, *,
             batch_size: int, sampler: prior.SamplerConfig = prior.SamplerConfig(),
             denoise_sigma: float = 0.0, progress: bool = True,
             out_sharding: jax.sharding.Sharding | None = None,
             student: tuple[flow.Flow, Any] | None = None, as_float: bool = False,
             parallel: flow.ParallelInverse | None = None, passes: list | None = None
             ) -> np.ndarray:
  """Samples one image per label in fixed-size batches (one compilation): -> uint8 [N, H, W, C].

  `denoise_sigma` > 0 applies the score-based denoising step with that noise level.
  `out_sharding`: where the images of a batch end up; with parameters spread over several
  processes, a replicated sharding over the mesh, so that every process can read them.
  `student`: (the distilled student Flow, its params) decodes the prior's latents in one parallel
  pass per block instead of the exact sequential inverse (SPEC sec. 6); the same `key` draws the
  same latents either way. `as_float`: float32 images in [-1, 1] instead of uint8 levels.
  `parallel`: the exact inverse by (Gauss-Seidel-)Jacobi (`student` then only starts each block,
  jacobi_init 'student'); the AF passes each block used are logged per batch and, with `passes`
  (a list), appended to it as int [n] arrays (block 0 first).
  """
  sample_fn = jitted_sampler(model, sampler, None if student is None else student[0],
                             denoise_sigma, out_sharding, tuple(nn.get_logical_axis_rules()),
                             parallel)
  student_params = None if student is None else student[1]
  if progress:
    logging.info("sampling %d images in batches of %d; the first batch compiles the sampler",
                 len(labels), batch_size)
  out, start_time = [], time.perf_counter()
  for start in range(0, len(labels), batch_size):
    chunk = labels[start:start + batch_size]
    padded = np.pad(chunk, (0, batch_size - len(chunk)), mode="edge")
    images, passes_n = jax.device_get(sample_fn(params, student_params,
                                                jax.random.fold_in(key, start),
                                                jnp.asarray(padded)))
    images = images if as_float else quantize(images, model.config.num_levels)
    out.append(images[:len(chunk)])
    if passes is not None and parallel is not None:
      passes.append(np.asarray(passes_n))
    done = min(start + batch_size, len(labels))
    if parallel is not None:
      logging.info("%s inverse, batch of images %d-%d: AF passes per block (block 0 first) %s "
                   "of %d tokens each", parallel.method, start, done - 1, passes_n.tolist(),
                   model.config.num_tokens)
    if progress:
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


def sample_grid(run: rundir.RunDir, step: int, draw, *, classes: np.ndarray, per_class: int,
                num_levels: int, tag: str, info: dict, requested: bool, writer=None) -> str:
  """The end-of-run / --mode=sample grid of every phase: `per_class` images of each of `classes`
  from `draw(labels [N]) -> uint8 [N, H, W, C]`, one grid row per class, written as
  samples/samples_<step>[_<tag>].png and .npz (with `info`, and to TensorBoard through `writer`).
  An existing npz of that name is kept (rundir.keep_existing_samples; `requested`: the name was
  asked for, so other settings there are an error). Returns the npz path."""
  npz = run.samples(step, tag)
  if rundir.keep_existing_samples(npz, info, requested=requested):
    return str(npz)
  labels = grid_labels(classes, per_class)
  grid = write_samples(run, step, draw(labels), labels, num_levels, rows=len(classes), tag=tag,
                       info=info)
  if writer is not None:
    writer.write_images(step, {"samples": grid[None]})
  return str(npz)


def write_samples(run: rundir.RunDir, step: int, images: np.ndarray, labels: np.ndarray,
                  num_levels: int, rows: int, tag: str = "", info: dict | None = None
                  ) -> np.ndarray:
  """Writes samples/samples_<step>[_<tag>].png (the grid) and then .npz (`npz_arrays`), so that
  an npz on disk means a complete set. Returns the grid (uint8 [H', W', C])."""
  grid = save_grid_png(run.samples(step, tag, "png"), images, num_levels, rows)
  rundir.write_npz(run.samples(step, tag), **npz_arrays(images, labels, num_levels, info))
  logging.info("wrote %s and .png", run.samples(step, tag))
  return grid
