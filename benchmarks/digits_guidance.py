r"""The sample-quality judge of an embedded data set: class accuracy and Frechet distances of
class-conditional samples under unguided, naive-CFG and resampling-CFG sampling.

    python benchmarks/digits_guidance.py --workdir=runs/digits [--config=configs/digits.py]
        [--per_class=50] [--seeds=1] [--settings=resample_w3,unguided_T1_s1,config]
        [--extra='{"w2_ts0.9": {"guidance": "resample", "w": 2.0, "t_sigma": 0.9}}'] [--out=FILE]
    python benchmarks/digits_guidance.py --baseline_only [--config=configs/digits.py]

The data set is `config.data.name` of `--config` (a `get_config()` file, `path[:variant]`; default
configs/digits.py): one of the embedded tfds sets of farmer_jax/datasets.py (digits, mnist5k).
Images are judged as pixels in [0, 1]: native levels / (L - 1). The model is rebuilt with the
model, data and train sections that `--workdir` recorded (its config.json, overrides included)
over `--config`'s; the sampler (`config`) is `--config`'s.

- Judge: an RBF support-vector classifier (scikit-learn `SVC`, default C and gamma) trained on the
  set's training split; its accuracy on the test split is `judge_test_accuracy`.
- class_accuracy: the fraction of samples the judge labels as the class they were drawn for.
- pixel_fd: the Frechet distance between Gaussians fitted to the samples and to the test split
  (farmer_jax.evaluation.scores, the FID formula) in pixel space.
- pca_fd: the same on the top `--pca_components` (default 20) principal coordinates of a PCA
  fitted on the training split; the share of the training variance they explain is reported.
  Fewer dimensions make the distance less dominated by the pixel-level noise of a few hundred
  samples in 64 (digits) or 784 (mnist5k) dimensions.
- pixel_mean_term, pixel_variance: the pixel FD's parts, ||mu - mu_test||^2 and tr(Sigma) of
  the images (test_split's own variance is the target): the FD is the mean term plus
  tr(Sigma) + tr(Sigma_test) - 2 tr((Sigma Sigma_test)^(1/2)), so they tell a biased mean, too
  little variance (collapse) and variance in the wrong directions apart.

Each setting samples `per_class` images of every class with jax.random.key(seed) for each of
`--seeds` seeds (0, 1, ...) from the latest checkpoint of `--workdir` (trained with `--config`);
a setting's figures are the means over seeds, with their standard deviation and the per-seed
figures beside them (one seed: no spread). Grids (seed 0's first 10 of each class, rows =
classes) go to `<workdir>/guidance/<setting>.png` (`<setting>-2.png`, ... when an earlier judge
wrote that name; the path is the setting's `grid` in the JSON). Settings are names of
`SETTINGS`, `config` (the config's own `config.sample` sampler, with its `denoise`), or names
defined by `--extra`: a JSON object {name: {SamplerConfig field: value, ..., optionally
"denoise": true}}. Without `--settings` every name of `SETTINGS` runs; the `--extra` names run in
addition.

References, judged the same way (`references` in the JSON; `--baseline_only` runs only these and
needs no workdir):
- test_split: the real test images; class_accuracy is the judge's test accuracy and the distances
  are to the training split (two finite samples of the same distribution: a floor, not 0).
- gmm_per_class: per class, scikit-learn `GaussianMixture(3, covariance_type="full",
  random_state=seed)` fitted on that class's training images in [0, 1], sampled `per_class` times;
  samples are clipped to [0, 1] and rounded to the nearest of the set's L levels, as model samples
  are integer levels; over the same seeds as the settings. `--gmm_components=0` skips it.
Last line of stdout: one JSON object.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from sklearn.svm import SVC

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from farmer_jax import cli, datasets  # noqa: E402
from farmer_jax.evaluation import scores  # noqa: E402
from farmer_jax.models import prior  # noqa: E402

SETTINGS = {
    "unguided_T1_s1": prior.SamplerConfig(),
    "unguided_T1.3_s0.9": prior.SamplerConfig(temperature=1.3, scale=0.9),
    "unguided_T1_s0.8": prior.SamplerConfig(scale=0.8, scale_redundant=0.8),
    "naive_w1": prior.SamplerConfig(guidance="naive", w=1.0),
    "naive_w3": prior.SamplerConfig(guidance="naive", w=3.0),
    "resample_w1": prior.SamplerConfig(guidance="resample", w=1.0),
    "resample_w2": prior.SamplerConfig(guidance="resample", w=2.0),
    "resample_w3": prior.SamplerConfig(guidance="resample", w=3.0),
    "resample_w5": prior.SamplerConfig(guidance="resample", w=5.0),
    "resample_w3_tsigma0.8": prior.SamplerConfig(guidance="resample", w=3.0, t_sigma=0.8),
    "resample_w3_paper_temps": prior.SamplerConfig(guidance="resample", w=3.0, t_sigma=0.9,
                                                   t_pi_v=0.2, t_sigma_v=0.9, t_s=1.1),
}
DEFAULT_CONFIG = "configs/digits.py"


def load_config(spec: str):
  """`path[:variant]` -> its get_config(); a relative path not found here is read from the
  repository root."""
  path, sep, variant = spec.partition(":")
  if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO, path)):
    path = os.path.join(REPO, path)
  return cli.load_config(path + sep + variant)


RECORDED_SECTIONS = ("model", "data", "train")


def with_recorded(config, workdir: str | None):
  """`config` with the model, data and train fields that `workdir`'s config.json records (the
  config the run was trained with, overrides included), so that a run trained with
  `--config.model.X=...` is rebuilt as trained (and denoises with the noise it was trained
  with). The sampler stays `config`'s; fields the file does not record keep `config`'s values."""
  import ml_collections  # noqa: PLC0415
  from farmer_jax import rundir  # noqa: PLC0415
  recorded = rundir.read_json(rundir.RunDir(workdir).config) if workdir else None
  if recorded is None:
    return config

  def overlay(target: ml_collections.ConfigDict, values: dict) -> None:
    for key, value in values.items():
      if key not in target:
        continue
      if isinstance(target[key], ml_collections.ConfigDict) and isinstance(value, dict):
        overlay(target[key], value)
      else:
        target[key] = value

  with config.unlocked():
    overlay(config, {k: v for k, v in recorded.items() if k in RECORDED_SECTIONS})
  return config


def flat_unit(images: np.ndarray, num_levels: int) -> np.ndarray:
  """Native levels [N, H, W, C] -> float64 [N, H*W*C] in [0, 1]."""
  return images.reshape(len(images), -1) / float(num_levels - 1)


def judge(name: str = datasets.DIGITS) -> tuple[SVC, float]:
  """-> (the RBF SVC trained on set `name`'s training split in [0, 1], its test accuracy)."""
  levels = datasets.num_levels(name)
  x_tr, y_tr = datasets.load_split(name, "train")
  x_te, y_te = datasets.load_split(name, "test")
  clf = SVC().fit(flat_unit(x_tr, levels), y_tr)
  return clf, float(clf.score(flat_unit(x_te, levels), y_te))


class Judge:
  """Class accuracy and Frechet distances (pixel and PCA space) to set `name`'s test split."""

  def __init__(self, name: str, pca_components: int):
    self.name, self.num_levels = name, datasets.num_levels(name)
    self.clf, self.test_accuracy = judge(name)
    x_tr, _ = datasets.load_split(name, "train")
    x_te, y_te = datasets.load_split(name, "test")
    self.train, self.test, self.test_labels = (flat_unit(x_tr, self.num_levels),
                                               flat_unit(x_te, self.num_levels), y_te)
    self.pca = PCA(pca_components, random_state=0).fit(self.train)
    self.test_stats = (scores.statistics(self.test),
                       scores.statistics(self.pca.transform(self.test)))

  def distances(self, flat: np.ndarray, stats=None) -> dict:
    pixel, pca = stats or self.test_stats
    mu, sigma = scores.statistics(flat)
    return {"pixel_fd": round(scores.frechet_distance(mu, sigma, *pixel), 4),
            "pca_fd": round(scores.frechet_distance(
                *scores.statistics(self.pca.transform(flat)), *pca), 4),
            # The pixel FD's parts: its mean term, and the total variance of the images (the
            # reference's is test_split's); the rest of the FD is the covariances' mismatch.
            "pixel_mean_term": round(float(np.sum((mu - pixel[0]) ** 2)), 4),
            "pixel_variance": round(float(np.trace(sigma)), 4)}

  def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict:
    """Samples in native levels [N, H, W, C] drawn for `labels` [N] -> their figures."""
    flat = flat_unit(images, self.num_levels)
    return {"class_accuracy": round(float(np.mean(self.clf.predict(flat) == labels)), 4),
            **self.distances(flat), "num_images": int(len(labels))}

  def test_reference(self) -> dict:
    train_stats = (scores.statistics(self.train),
                   scores.statistics(self.pca.transform(self.train)))
    return {"class_accuracy": round(self.test_accuracy, 4),
            **self.distances(self.test, train_stats), "num_images": int(len(self.test)),
            "distances_to": "train split"}


def gmm_per_class_samples(name: str, per_class: int, components: int, seed: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
  """Per class a full-covariance GaussianMixture on the training images in [0, 1], sampled
  `per_class` times, clipped to [0, 1], rounded to levels -> (uint8 images [10 * per_class, H, W,
  C], labels), class-major."""
  levels = datasets.num_levels(name)
  x_tr, y_tr = datasets.load_split(name, "train")
  images, labels = [], []
  for c in np.unique(y_tr):
    gmm = GaussianMixture(components, covariance_type="full", random_state=seed)
    x, _ = gmm.fit(flat_unit(x_tr[y_tr == c], levels)).sample(per_class)
    images.append(np.rint(np.clip(x, 0.0, 1.0) * (levels - 1)).astype(np.uint8))
    labels.append(np.full(per_class, c, np.int32))
  return np.concatenate(images).reshape(-1, *x_tr.shape[1:]), np.concatenate(labels)


def sampler_settings(names: list[str], extra: dict, config) -> dict:
  """-> {name: (SamplerConfig, denoise)} for `names` (SETTINGS, 'config', or keys of `extra`)."""
  from farmer_jax import sample  # noqa: PLC0415 (JAX: only when sampling)
  out = {}
  for name in names:
    if name in extra:
      fields = dict(extra[name])
      denoise = bool(fields.pop("denoise", False))
      s = prior.SamplerConfig(**fields)
      s.validate(prefix=f"--extra {name}")
    elif name == "config":
      s, denoise = sample.sampler_config(config.sample), bool(config.sample.denoise)
    elif name in SETTINGS:
      s, denoise = SETTINGS[name], False
    else:
      raise ValueError(f"unknown setting {name!r}: use one of {sorted(SETTINGS)}, 'config', or "
                       f"a name defined by --extra")
    out[name] = (s, denoise)
  return out


FIGURES = ("class_accuracy", "pixel_fd", "pca_fd", "pixel_mean_term", "pixel_variance")


def over_seeds(per_seed: list[dict]) -> dict:
  """The judge's figures of one sampler under several seeds -> their means (rounded as the judge
  rounds), `<figure>_std` (population standard deviation) and the per-seed figures."""
  out = {f: round(float(np.mean([r[f] for r in per_seed])), 4) for f in FIGURES}
  out["num_images"] = per_seed[0]["num_images"]
  if len(per_seed) > 1:
    out.update({f"{f}_std": round(float(np.std([r[f] for r in per_seed])), 4) for f in FIGURES})
    out["per_seed"] = [{f: r[f] for f in FIGURES} for r in per_seed]
  return out


def sample_settings(config, workdir: str, settings: dict, per_class: int, judge_fn,
                    seeds: int = 1) -> tuple:
  """Samples every setting from the latest checkpoint of `workdir` under keys 0..seeds-1
  -> (step, results)."""
  import jax  # noqa: PLC0415 (only when sampling)
  from farmer_jax import rundir, sample, train  # noqa: PLC0415
  trainer = train.Trainer(config)
  state = rundir.Checkpointer(workdir, read_only=True).restore(trainer.abstract_state)
  params = trainer.eval_params(state)
  num_classes = config.data.num_classes
  labels = sample.grid_labels(np.arange(num_classes), per_class)
  shown = min(per_class, 10)
  grid_idx = np.concatenate([np.arange(shown) + k * per_class for k in range(num_classes)])
  results = {}
  for name, (s, denoise) in settings.items():
    t0 = time.perf_counter()
    per_seed, grid = [], None
    for seed in range(seeds):
      images = sample.generate(trainer.model, params, labels, jax.random.key(seed),
                               batch_size=config.sample.batch_size, sampler=s,
                               denoise_sigma=config.train.noise_min if denoise else 0.0,
                               progress=False)
      per_seed.append(judge_fn(images, labels))
      if seed == 0:   # never over an earlier judge's grid: <setting>-2.png, -3, ... after it
        grid = rundir.unique(rundir.as_path(workdir) / "guidance" / f"{name}.png")
        sample.save_grid_png(grid, images[grid_idx], config.data.num_levels, rows=num_classes)
    results[name] = {**over_seeds(per_seed), "sampler": dataclasses.asdict(s),
                     "denoise": denoise, "grid": os.fspath(grid),
                     "seconds": round(time.perf_counter() - t0, 1)}
    log(name, results[name])
  return int(state.step), results


def log(name: str, r: dict) -> None:
  def fig(f, fmt):
    return format(r[f], fmt) + (f" +- {r[f + '_std']:{fmt}}" if f + "_std" in r else "")
  print(f"{name}: class accuracy {fig('class_accuracy', '.3f')}, "
        f"pixel FD {fig('pixel_fd', '.4f')}, PCA FD {fig('pca_fd', '.4f')}"
        + (f" ({r['seconds']} s)" if "seconds" in r else ""),
        file=sys.stderr, flush=True)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default=DEFAULT_CONFIG, help="path[:variant] of a get_config() file")
  ap.add_argument("--workdir", help="the trained run to sample (not with --baseline_only)")
  ap.add_argument("--baseline_only", action="store_true",
                  help="judge only the references (test split, per-class GMM); no workdir")
  ap.add_argument("--per_class", type=int, default=50)
  ap.add_argument("--seeds", type=int, default=1,
                  help="sampling seeds per setting and for the GMM (figures: their means)")
  ap.add_argument("--settings", default=None,
                  help=f"comma-separated names: of SETTINGS ({','.join(SETTINGS)}), 'config', or "
                       f"of --extra (default: all of SETTINGS)")
  ap.add_argument("--extra", default="{}", help="JSON {name: {SamplerConfig field: value}}")
  ap.add_argument("--pca_components", type=int, default=20)
  ap.add_argument("--gmm_components", type=int, default=3,
                  help="per-class GMM baseline components (0: no baseline)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  if not args.baseline_only and not args.workdir:
    ap.error("--workdir is required unless --baseline_only")
  if args.seeds < 1 or args.per_class < 1:
    ap.error(f"--seeds ({args.seeds}) and --per_class ({args.per_class}) must be >= 1")
  config = with_recorded(load_config(args.config), args.workdir)
  name = config.data.name
  if datasets.num_levels(name) != config.data.num_levels:
    raise ValueError(f"{args.config}: config.data.num_levels = {config.data.num_levels}, but "
                     f"{name} has {datasets.num_levels(name)} levels")
  extra = json.loads(args.extra)
  names = list(SETTINGS) if args.settings is None else [
      n for n in args.settings.split(",") if n.strip()]
  names += [n for n in extra if n not in names]
  settings = {} if args.baseline_only else sampler_settings(names, extra, config)

  j = Judge(name, args.pca_components)
  print(f"judge: SVC on {name}, accuracy on the real test split {j.test_accuracy:.4f}; PCA "
        f"{args.pca_components} components explain "
        f"{j.pca.explained_variance_ratio_.sum():.3f} of the training variance",
        file=sys.stderr, flush=True)
  references = {"test_split": j.test_reference()}
  log("test_split", references["test_split"])
  if args.gmm_components > 0:
    t0 = time.perf_counter()
    references["gmm_per_class"] = {
        **over_seeds([j(*gmm_per_class_samples(name, args.per_class, args.gmm_components, seed))
                      for seed in range(args.seeds)]),
        "components": args.gmm_components,
                                   "seconds": round(time.perf_counter() - t0, 1)}
    log("gmm_per_class", references["gmm_per_class"])

  step, results = None, {}
  if settings:
    step, results = sample_settings(config, args.workdir, settings, args.per_class, j,
                                    args.seeds)
  out = {"dataset": name, "config": args.config, "workdir": args.workdir, "step": step,
         "per_class": args.per_class, "seeds": args.seeds, "num_levels": j.num_levels,
         "judge": f"sklearn SVC (RBF) on the real {name} train split, pixels / (L - 1)",
         "judge_test_accuracy": j.test_accuracy,
         "frechet": f"Gaussians fitted to the images and to the {len(j.test)} test images, in "
                    f"pixel space [0, 1] and in the train split's PCA space",
         "pca": {"components": args.pca_components,
                 "explained_variance": round(float(j.pca.explained_variance_ratio_.sum()), 4)},
         "references": references, "results": results}
  from farmer_jax import metrics  # noqa: PLC0415 (JAX, only to print)
  metrics.print_json_line(out, args.out)
  return out


if __name__ == "__main__":
  main()
