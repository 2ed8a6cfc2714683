"""The config's schema (the known fields of every section) and its validation, for every phase.

Everything is checked before any compute; a problem raises `ConfigError` (a ValueError) whose
message names the field, its value and the rule, which main.py prints as one line (exit 2).
Defaults and sources of the fields: config_base.py.
"""
import dataclasses
import difflib

import ml_collections

from farmer_jax import config_base, rundir, sample
from farmer_jax.evaluation import fid_config
from farmer_jax.models import farmer, prior


ConfigError = config_base.ConfigError



SECTIONS = {
    "data": {"name", "image_size", "channels", "num_levels", "num_classes", "hflip", "data_dir",
             "train_split", "eval_split", "shuffle_buffer"},
    "train": {"batch_size", "num_steps", "learning_rate", "min_learning_rate", "warmup_steps",
              "b1", "b2", "weight_decay", "grad_clip", "ema_decay", "noise_max", "noise_min",
              "latent_norm_penalty", "grad_accum_steps", "skip_nonfinite", "log_every",
              "checkpoint_every", "keep_checkpoints"},
    "eval": {"batch_size", "every", "dequant_seed"},
    "sharding": {"mesh", "rules"},
    "sample": {"per_class", "batch_size", "seed", "classes", "denoise", "decoder", "name",
               "inverse", "jacobi_tolerance", "jacobi_max_iterations", "jacobi_segments",
               "jacobi_init",
               *(f.name for f in dataclasses.fields(prior.SamplerConfig))},
    "distill": {"teacher_workdir", "teacher_step", "batch_size", "num_steps", "noise_max",
                "data_noise", "learning_rate", "min_learning_rate", "warmup_steps", "b1", "b2",
                "weight_decay", "grad_clip", "ema_decay", "skip_nonfinite", "log_every",
                "checkpoint_every", "keep_checkpoints", "eval_every", "eval_samples"},
    "fid": fid_config.FIELDS,
    "afm": {"batch_size", "num_steps", "patch_size", "width", "depth", "head_dim", "mlp_ratio",
            "learning_rate", "min_learning_rate", "warmup_steps", "b1", "b2", "weight_decay",
            "grad_clip", "ema_decay", "lambda_ot_max", "lambda_ot_min", "r_fraction", "r_eps",
            "r_weight", "center_weight", "grad_norm", "skip_nonfinite", "log_every",
            "checkpoint_every", "keep_checkpoints", "eval_every", "target", "farmer_workdir",
            "farmer_step", "stats_batches"},
}
TOP_LEVEL = {"seed", "phase", "model", *SECTIONS}
AFM_TARGETS = ("pixels", "farmer_latent")   # SPEC sec. 7: a data set's pixels, FARMER's z^I


def unknown_field_message(section: str, name: str) -> str:
  """`config.<section>.<name>` is no field: the message names the closest known ones."""
  known = sorted(SECTIONS[section]) if section else sorted(TOP_LEVEL)
  close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
  where = f"config.{section}" if section else "config"
  hint = (f"did you mean {' or '.join(f'{where}.{c}' for c in close)}?" if close
          else f"known: {', '.join(known)}")
  return (f"{where}.{name} is not a config field; {hint} (python -m farmer_jax.main "
          f"--mode=fields lists them all)")


def _checker(config: ml_collections.ConfigDict):
  """need(ok, "section.field", why) raises ValueError naming the field and its value."""
  def need(ok: bool, field: str, why: str):
    if not ok:
      value = config.get(field) if "." not in field else config[field.split(".")[0]].get(
          field.split(".")[1])
      raise ConfigError(f"config.{field} = {value!r}: {why}")
  return need


def _check_optimizer(need, name: str, s) -> None:
  """The fields `make_optimizer` and `apply_gradients` read, of section `name` (= s)."""
  need(s.learning_rate > 0, f"{name}.learning_rate", "must be > 0")
  need(0 <= s.min_learning_rate <= s.learning_rate, f"{name}.min_learning_rate",
       f"must be in [0, {name}.learning_rate]")
  need(s.warmup_steps >= 0, f"{name}.warmup_steps", "must be >= 0")
  need(0 <= s.ema_decay < 1, f"{name}.ema_decay", "must be in [0, 1) (0 disables EMA)")
  need(s.grad_clip >= 0, f"{name}.grad_clip", "must be >= 0 (0 disables clipping)")


def validate_distill(config: ml_collections.ConfigDict) -> None:
  """The `distill` section, for phase=distill (SPEC sec. 6)."""
  need, d = _checker(config), config.distill
  for f in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every",
            "eval_samples"):
    need(isinstance(d[f], int) and d[f] > 0, f"distill.{f}",
         "must be a positive integer" + (" (paper: 60 epochs)" if f == "num_steps" else ""))
  need(d.batch_size is None or (isinstance(d.batch_size, int) and d.batch_size > 0),
       "distill.batch_size", "must be a positive integer or None (train.batch_size)")
  need(d.teacher_step is None or (isinstance(d.teacher_step, int) and d.teacher_step > 0),
       "distill.teacher_step", "must be a positive integer or None (the latest checkpoint)")
  need(d.noise_max >= 0, "distill.noise_max", "must be >= 0 (paper: 0.3)")
  need(d.data_noise is None or d.data_noise >= 0, "distill.data_noise",
       "must be >= 0 or None (train.noise_min)")
  _check_optimizer(need, "distill", d)
  need(config.model.af_blocks and config.model.af_blocks > 0, "model.af_blocks",
       "must be > 0 to distil: there is no AF inverse to distil")


def validate_afm(config: ml_collections.ConfigDict) -> None:
  """The `afm` section, for phase=afm (SPEC sec. 7)."""
  need, a = _checker(config), config.afm
  for f in ("batch_size", "num_steps", "patch_size", "width", "depth", "head_dim", "mlp_ratio",
            "log_every", "checkpoint_every", "keep_checkpoints", "eval_every"):
    need(isinstance(a[f], int) and a[f] > 0, f"afm.{f}", "must be a positive integer")
  need(a.width % a.head_dim == 0, "afm.width", f"must be a multiple of afm.head_dim = {a.head_dim}")
  need(a.target in AFM_TARGETS, "afm.target", f"must be one of {AFM_TARGETS}")
  if a.target == "pixels":
    need(config.data.image_size % a.patch_size == 0, "afm.patch_size",
         f"must divide data.image_size = {config.data.image_size}")
  else:   # the grid of FARMER latent tokens, image_size / model.patch_size on a side
    grid = config.data.image_size // (config.model.patch_size or 1)
    need(grid % a.patch_size == 0, "afm.patch_size",
         f"must divide FARMER's token grid side data.image_size / model.patch_size = {grid}")
    need(isinstance(a.stats_batches, int) and a.stats_batches > 0, "afm.stats_batches",
         "must be a positive integer")
    need(a.farmer_step is None or (isinstance(a.farmer_step, int) and a.farmer_step > 0),
         "afm.farmer_step", "must be a positive integer or None (the latest checkpoint)")
  _check_optimizer(need, "afm", a)
  need(0 <= a.lambda_ot_min <= a.lambda_ot_max, "afm.lambda_ot_min",
       "must be in [0, afm.lambda_ot_max] (paper: 0.005 and 0.2)")
  need(0 < a.r_fraction <= 1, "afm.r_fraction", "must be in (0, 1] (paper: 0.25)")
  need(a.r_eps > 0, "afm.r_eps", "must be > 0 (paper: 0.01)")
  need(a.r_weight >= 0, "afm.r_weight", "must be >= 0 (paper: 0.25)")
  need(a.center_weight >= 0, "afm.center_weight", "must be >= 0 (paper: 0.01)")


def validate(config: ml_collections.ConfigDict) -> farmer.ModelConfig:
  """Raises ValueError naming the field for unknown or invalid fields; returns the model config."""
  for name in sorted(set(config.keys()) - TOP_LEVEL):
    raise ConfigError(unknown_field_message("", name))
  for section, known in SECTIONS.items():
    if section not in config:
      raise ConfigError(f"config.{section} is missing")
    for name in sorted(set(config[section].keys()) - known):
      raise ConfigError(unknown_field_message(section, name))

  need = _checker(config)
  t, e, s = config.train, config.eval, config.sample
  for f in ("train.batch_size", "train.num_steps", "train.log_every", "train.checkpoint_every",
            "train.grad_accum_steps", "eval.batch_size", "eval.every", "sample.batch_size"):
    section, name = f.split(".")
    need(isinstance(config[section][name], int) and config[section][name] > 0, f,
         "must be a positive integer")
  need(t.get("warmup_steps", 0) >= 0, "train.warmup_steps", "must be >= 0")
  need(t.learning_rate > 0, "train.learning_rate", "must be > 0")
  need(0 <= t.min_learning_rate <= t.learning_rate, "train.min_learning_rate",
       "must be in [0, train.learning_rate]")
  need(0 <= t.ema_decay < 1, "train.ema_decay", "must be in [0, 1) (0 disables EMA)")
  need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
  need(0 <= t.noise_min <= t.noise_max, "train.noise_min", "must be in [0, train.noise_max]")
  need(isinstance(s.per_class, int) and s.per_class > 0, "sample.per_class",
       "must be a positive integer")
  need(t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
       f"must divide train.batch_size = {t.batch_size}")
  need(t.get("keep_checkpoints", 1) > 0, "train.keep_checkpoints", "must be a positive integer")
  need(s.get("decoder", "auto") in rundir.DECODERS, "sample.decoder",
       f"must be one of {rundir.DECODERS}")
  need(config.get("phase", "train") in config_base.PHASES, "phase",
       f"must be one of {config_base.PHASES}")
  if config.get("phase") == "distill":
    validate_distill(config)
  if config.get("phase") == "afm":
    validate_afm(config)
  try:   # the checks that live with what they configure raise plain ValueErrors
    model_config = farmer.ModelConfig.from_config(config)
    sample.sampler_config(s)
    sample.parallel_inverse(s, model_config)
    sample.parse_classes(s.classes, model_config.num_classes)
    fid_config.validate(config.fid)
  except ConfigError:
    raise
  except ValueError as e:
    if not str(e).startswith("config."):
      raise   # not a message about a field: a bug, with its traceback
    raise ConfigError(str(e)) from None
  return model_config
