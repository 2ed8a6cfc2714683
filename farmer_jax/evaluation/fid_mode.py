"""--mode=fid: FID, Inception Score and precision/recall of samples against a reference.

    python -m farmer_jax.main --config=configs/imagenet256_1p9b.py:8 --workdir=W --mode=fid \\
        --config.fid.inception_weights=pt_inception-2015-12-05-6726825d.pth \\
        --config.fid.reference=VIRTUAL_imagenet256_labeled.npz

Order (so that a missing file fails before hours of sampling): Inception weights, reference
features, then `fid.num_samples` samples from the latest checkpoint with `config.sample`'s settings
(labels cycle through `sample.classes`; ADM draws them at random) or the images of `fid.samples`,
then their features and the scores. Features are computed in fixed global batches of
`fid.batch_size` split over the config's mesh (every process feeds its share; the features come
back replicated); statistics and scores are then computed on the host (FID, IS) and on one device
(precision/recall), identically on every process.

Writes W/eval/fid_<step>_<tag>.json: fid, inception_score (+ _std), precision, recall, num_samples,
num_reference, the reference and how its statistics were obtained, the Inception weights and input
convention, the sample settings, timings; and, unless fid.save_samples=False or the samples came
from a file, W/samples/fid_samples_<step>_<tag>.npz (with `arr_0`, so ADM's evaluator reads it).
The tag names the decoder, guidance, seed and a hash of the sample and FID settings; an existing
name gets -2, -3, ... Decoded by the distilled student (`sample.decoder`, as --mode=sample; the
step is then the teacher's) when W/distill holds one, else by the exact inverse of `sample.inverse`
(the (Gauss-Seidel-)Jacobi one adds `inverse_passes_per_block` to the JSON).
"""
import functools
import io
import json
import re
import time
from typing import Iterable, Iterator

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from farmer_jax import config_check, distill, input_pipeline, rundir, sample, sharding, train
from farmer_jax.evaluation import fid_config, inception, scores, weights

ADM_REFERENCE_BATCHES = "https://github.com/openai/guided-diffusion/tree/main/evaluations"


@functools.lru_cache(maxsize=4)
def _jitted_features(resize: int, preprocess: str, precision: str, mesh, rules):
  """The jitted network for one input convention and mesh, kept across FeatureExtractors (the
  reference and the samples, repeated evaluations) so that it is traced and compiled once."""
  model = inception.FIDInceptionV3(resize=resize, preprocess=preprocess, precision=precision,
                                   fc_bias=False)
  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh, rules)

  def apply(variables, images_BxHxWx3, mask_B, to_255):
    out = model.apply(variables, images_BxHxWx3.astype(jnp.float32) * to_255)
    return {**out, "mask": mask_B}

  return jax.jit(apply, in_shardings=(repl, data, data, repl), out_shardings=repl)


class FeatureExtractor:
  """pool3 features and logits (pool3 @ W, no bias: IS convention) of uint8 images."""

  def __init__(self, variables: dict, mesh, rules, fid: ml_collections.ConfigDict):
    sharding.check_batch_size(fid.batch_size, mesh, rules, "config.fid.batch_size")
    self.batch_size, self.mesh, self.rules = fid.batch_size, mesh, rules
    self.variables = jax.device_put(variables, sharding.replicated(mesh))
    self._apply = _jitted_features(fid.resize, fid.preprocess, fid.precision, mesh, rules)

  def from_local_batches(self, batches: Iterable[dict], total: int, num_levels: int,
                         what: str) -> dict[str, np.ndarray]:
    """batches: this process's share of each global batch, {"image": uint8 [b, H, W, C] in levels
    0..num_levels-1, "mask": bool [b]} (b = batch_size / processes); stops after `total` real
    images. -> {"pool3": [total, 2048], "logits": [total, 1008]} (float32, every process)."""
    to_255 = jnp.float32(255.0 / (num_levels - 1))
    parts, done = {"pool3": [], "logits": []}, 0
    start = last_log = time.perf_counter()
    in_flight = None    # the previous batch's result: the device works while the host collects

    def collect(out) -> int:
      out = jax.device_get(out)
      for k in parts:
        parts[k].append(out[k][out["mask"]])
      return int(out["mask"].sum())

    for batch in batches:
      image = batch["image"]
      if image.shape[-1] == 1:   # grey to RGB on the host: one compilation for either
        image = np.repeat(image, 3, axis=-1)
      batch = sharding.to_global({"image": image, "mask": batch["mask"]}, self.mesh, self.rules)
      out = self._apply(self.variables, batch["image"], batch["mask"], to_255)
      if in_flight is not None:
        done += collect(in_flight)
      in_flight = out
      now = time.perf_counter()
      if done >= total:
        break
      if now - last_log > 10:
        last_log, rate = now, done / (now - start)
        logging.info("inception features of %s: %d/%d images (%.1f img/s, ETA %.0f s)", what,
                     done, total, rate, (total - done) / max(rate, 1e-9))
    if in_flight is not None and done < total:
      done += collect(in_flight)
    if done < total:
      raise ValueError(f"{what}: expected {total} images, got {done}")
    logging.info("inception features of %s: %d images in %.1f s", what, total,
                 time.perf_counter() - start)
    return {k: np.concatenate(v)[:total] for k, v in parts.items()}

  def from_array(self, images_NxHxWxC: np.ndarray, num_levels: int,
                 what: str) -> dict[str, np.ndarray]:
    """Features of an array that every process holds whole (samples, a reference npz)."""
    return self.from_local_batches(self._local_batches(images_NxHxWxC), len(images_NxHxWxC),
                                   num_levels, what)

  def _local_batches(self, images: np.ndarray) -> Iterator[dict]:
    b = self.batch_size // jax.process_count()
    for start in range(0, len(images), self.batch_size):
      lo = start + jax.process_index() * b
      chunk = images[lo:lo + b]
      pad = np.zeros((b - len(chunk),) + images.shape[1:], images.dtype)
      yield {"image": np.concatenate([chunk, pad]), "mask": np.arange(b) < len(chunk)}


# ---------------------------------------------------------------------------------------------
# Reference and samples.
# ---------------------------------------------------------------------------------------------


def check_reference(spec: str | None) -> None:
  """Fails early, with where to get one, when the reference is not set or not there."""
  if spec is None:
    raise ValueError(
        "config.fid.reference is not set: pass ADM's reference batch for the data set (for "
        f"ImageNet 256: VIRTUAL_imagenet256_labeled.npz, linked from {ADM_REFERENCE_BATCHES}), "
        "or 'tfds:<split>' of config.data, e.g. --config.fid.reference=tfds:test")
  if not spec.startswith(fid_config.TFDS_PREFIX) and not epath.Path(spec).exists():
    raise FileNotFoundError(
        f"config.fid.reference = {spec!r} does not exist. ADM's reference batches (ImageNet 256: "
        f"VIRTUAL_imagenet256_labeled.npz) are linked from {ADM_REFERENCE_BATCHES}; farmer_jax "
        "never downloads.")


def reference_features(config: ml_collections.ConfigDict, extractor: FeatureExtractor) -> dict:
  """-> {"mu", "sigma", "pool3" (None where the npz has statistics only), "num_reference",
  "stats_source"}."""
  fid = config.fid
  spec, limit = fid.reference, fid.num_reference or None
  if spec.startswith(fid_config.TFDS_PREFIX):
    data = config.data.copy_and_resolve_references()
    data.eval_split = spec[len(fid_config.TFDS_PREFIX):]
    total = input_pipeline.num_eval_examples(data)
    n = min(total, limit or total)
    batches = input_pipeline.eval_iterator(data, global_batch_size=fid.batch_size)
    pool3 = extractor.from_local_batches(batches, n, data.num_levels, f"reference {spec}")["pool3"]
    mu, sigma = scores.statistics(pool3)
    return {"mu": mu, "sigma": sigma, "pool3": pool3, "num_reference": n,
            "stats_source": f"features of {n} images of {data.name}:{data.eval_split}"}
  with np.load(_read(spec)) as z:
    images = z["arr_0"][:limit] if "arr_0" in z.files else None
    stats = (z["mu"], z["sigma"]) if {"mu", "sigma"} <= set(z.files) else None
  if images is None and stats is None:
    raise ValueError(f"config.fid.reference = {spec!r} has neither arr_0 (uint8 NHWC images) nor "
                     f"mu and sigma (ADM's reference batch format)")
  pool3 = None
  if images is not None:
    check_uint8_images(images, f"config.fid.reference = {spec!r}: arr_0")
    pool3 = extractor.from_array(images, 256, f"reference {epath.Path(spec).name}")["pool3"]
  if stats is not None:   # ADM's evaluator also prefers the batch's stored statistics for FID
    if fid.preprocess != "adm":
      logging.warning("the reference's stored mu/sigma come from TF's graph (ADM's input "
                      "convention) but config.fid.preprocess=%s", fid.preprocess)
    mu, sigma, source = stats[0], stats[1], f"mu/sigma stored in {epath.Path(spec).name}"
  else:
    (mu, sigma), source = scores.statistics(pool3), f"features of arr_0 of {epath.Path(spec).name}"
  return {"mu": mu, "sigma": sigma, "pool3": pool3, "stats_source": source,
          "num_reference": None if pool3 is None else len(pool3)}


def _read(path) -> io.BytesIO:
  """A file on any filesystem epath reaches (local, gs://, ...), for np.load."""
  return io.BytesIO(epath.Path(path).read_bytes())


def check_uint8_images(images: np.ndarray, what: str) -> None:
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"{what} must be uint8 [N, H, W, 3 or 1], got {images.dtype} "
                     f"{list(images.shape)}")


def read_samples(path: str, num: int) -> tuple[np.ndarray, int, int]:
  """A samples npz: ours (images in native levels + num_levels) or ADM's (arr_0, 0..255).
  -> (the first `num` images, num_levels, the checkpoint step they came from: ours record it in
  `info`, else the digits of a name ending in _<step>.npz, else 0)."""
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"config.fid.samples = {path!r} does not exist")
  with np.load(_read(path)) as z:
    if {"images", "num_levels"} <= set(z.files):
      images, levels = z["images"][:num], int(z["num_levels"])
    elif "arr_0" in z.files:
      images, levels = z["arr_0"][:num], 256
    else:
      raise ValueError(f"config.fid.samples = {path!r} has neither images + num_levels (ours) "
                       f"nor arr_0 (ADM's format)")
    step = int(json.loads(str(z["info"])).get("step", 0)) if "info" in z.files else None
  if step is None:
    match = re.search(r"_(\d+)\.npz$", path)
    step = int(match.group(1)) if match else 0
  check_uint8_images(images, f"config.fid.samples = {path!r}")
  if len(images) < num:
    logging.warning("%s holds %d images, fewer than config.fid.num_samples = %d: using them all",
                    path, len(images), num)
  return images, levels, step


# ---------------------------------------------------------------------------------------------
# The mode.
# ---------------------------------------------------------------------------------------------


def evaluate_fid(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=fid (see the module docstring); returns what it writes to W/eval/fid_<step>_<tag>.json
  (the tag as for --mode=sample, with the FID settings in its hash)."""
  with rundir.hold(workdir):
    return _evaluate_fid(config, workdir)


def _evaluate_fid(config: ml_collections.ConfigDict, workdir: str) -> dict:
  fid = config.fid
  config_check.validate(config)
  check_reference(fid.reference)
  variables = weights.load_variables(fid.inception_weights, seed=config.seed)
  if fid.inception_weights == weights.RANDOM:
    logging.warning("Inception with RANDOM WEIGHTS (config.fid.inception_weights=random): %s",
                    weights.RANDOM_NOTE)
  trainer = state = student = parallel = None
  decoder = "exact"
  if fid.samples is None:
    if rundir.decoder(config, workdir) == "student" or sample.wants_student(config.sample):
      # The distilled student decodes (or starts the Jacobi inverse), with the prior of the
      # teacher step it was distilled from.
      dist, state, student_state, _ = distill.restore_student(config, workdir)
      trainer = dist.trainer
      student = (dist.student, dist.student_params(student_state))
    else:
      trainer, state = train.restore_latest(config, workdir)
    parallel = sample.parallel_inverse(config.sample, trainer.model_config)
    decoder = sample.decoder_name(student is not None, parallel)
    mesh, rules = trainer.mesh, trainer.rules
  else:
    mesh = sharding.make_mesh(config.sharding.mesh)
    rules = sharding.rules_from_config(config.sharding.rules)
  run = rundir.RunDir(workdir)
  # Output names say what made them: the sampler (or the samples file) and the FID settings.
  tag = rundir.sample_tag(config.sample, decoder, {"fid": fid.to_dict()}) if fid.samples is None \
      else "file_" + rundir.hashed(fid.to_dict())
  seconds = {}
  with jax.set_mesh(mesh):
    extractor = FeatureExtractor(variables, mesh, rules, fid)
    t = time.perf_counter()
    ref = reference_features(config, extractor)
    seconds["reference_features"] = time.perf_counter() - t

    t = time.perf_counter()
    if trainer is not None:
      step = int(state.step)
      labels = np.resize(sample.parse_classes(config.sample.classes,
                                              trainer.model_config.num_classes), fid.num_samples)
      passes = []
      images = trainer.generate(state, labels, student=student, parallel=parallel, passes=passes)
      num_levels = trainer.model_config.num_levels
      samples_npz = None
      if fid.save_samples:
        info = {"step": step, "decoder": decoder, "seed": config.sample.seed,
                "sample": config.sample.to_dict()}
        samples_npz = str(rundir.write_npz(
            rundir.unique(run.samples_dir / f"fid_samples_{step}_{tag}.npz"),
            **sample.npz_arrays(images, labels, num_levels, info)))
        logging.info("wrote %s", samples_npz)
    else:
      images, num_levels, step = read_samples(fid.samples, fid.num_samples)
      samples_npz = fid.samples
    seconds["sampling"] = time.perf_counter() - t

    t = time.perf_counter()
    feats = extractor.from_array(images, num_levels, "samples")
    seconds["sample_features"] = time.perf_counter() - t

  t = time.perf_counter()
  is_mean, is_std = scores.inception_score(feats["logits"], fid.is_splits)
  precision = recall = None
  if ref["pool3"] is not None:
    precision, recall = scores.precision_recall(feats["pool3"], ref["pool3"], fid.pr_k,
                                                fid.pr_batch_size)
  else:
    logging.warning("the reference has statistics but no images: no precision / recall")
  result = {
      "step": step,
      "fid": scores.frechet_distance_of_features(feats["pool3"], ref["mu"], ref["sigma"]),
      "inception_score": is_mean, "inception_score_std": is_std,
      "precision": precision, "recall": recall,
      "num_samples": len(images), "num_reference": ref["num_reference"],
      "reference": fid.reference, "reference_stats": ref["stats_source"],
      "inception_weights": fid.inception_weights,
      "inception": {"resize": fid.resize, "preprocess": fid.preprocess,
                    "precision": fid.precision},
      "is_splits": fid.is_splits, "pr_k": fid.pr_k,
      "samples_npz": samples_npz,
      "decoder": decoder if trainer is not None else None,
      # (Gauss-Seidel-)Jacobi: the mean AF passes per block over the batches, block 0 first.
      "inverse_passes_per_block": (np.mean(passes, axis=0).round(2).tolist()
                                   if parallel is not None and trainer is not None else None),
      "sample": (config.sample.to_dict() | {"labels": "cycle through sample.classes"}
                 if trainer is not None else None),
      "dataset": config.data.name,
  }
  seconds["scores"] = time.perf_counter() - t
  result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
  if fid.inception_weights == weights.RANDOM:
    result["warning"] = weights.RANDOM_NOTE
    logging.warning("RANDOM Inception weights: %s", weights.RANDOM_NOTE)
  logging.info("FID %.4g, IS %.4g +- %.2g, precision %s, recall %s (%d samples, step %d)",
               result["fid"], is_mean, is_std, precision, recall, len(images), step)
  rundir.write_json(rundir.unique(run.eval_dir / f"fid_{step}_{tag}.json"), result)
  return result
