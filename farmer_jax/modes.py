"""What `--mode` runs for each phase: the entry points of train.py, distill.py, afm.py and the
FID evaluation, chosen from the config's phase and, for sampling, `sample.decoder`."""
import jax
import ml_collections

from farmer_jax import config_check, distill, rundir, sample as sampling, train

MODES = ("train", "evaluate", "sample", "plan", "fid")


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=evaluate: test-split bpd of the latest checkpoint -> eval/metrics.json and a line of
  eval/history.jsonl."""
  with rundir.hold(workdir) as run:
    trainer, state = train.restore_latest(config, workdir)
    with jax.set_mesh(trainer.mesh):
      return trainer.evaluate(state, run, mode="evaluate")


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=sample: samples_<step>_<tag>.npz and .png from the latest checkpoint, decoded by the
  distilled student when `sample.decoder` says so ("auto": when <workdir>/distill holds one), else
  by the exact inverse of `sample.inverse` (a Jacobi start from the student also reads it).
  Returns the npz path."""
  config_check.validate(config)
  if rundir.decoder(config, workdir) == "student" or sampling.wants_student(config.sample):
    return distill.sample_with_student(config, workdir)
  with rundir.hold(workdir) as run:
    trainer, state = train.restore_latest(config, workdir)
    parallel = sampling.parallel_inverse(config.sample, trainer.model_config)
    tag = rundir.sample_tag(config.sample, sampling.decoder_name(False, parallel))
    with jax.set_mesh(trainer.mesh):
      return trainer.sample(state, run, tag=tag, parallel=parallel)


def check(mode: str, config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError when `mode` does not exist for the config's phase."""
  if mode not in MODES:
    raise config_check.ConfigError(f"--mode={mode}: one of {MODES}")
  if config.get("phase", "train") == "afm" and mode not in ("train", "sample", "plan"):
    raise config_check.ConfigError(f"--mode={mode} is not available with config.phase = 'afm' "
                                   f"(train, sample)")


def run(mode: str, config: ml_collections.ConfigDict, workdir: str):
  """Runs `mode` (not plan, which main.py handles) for the config's phase."""
  check(mode, config)
  phase = config.get("phase", "train")
  if phase == "afm":
    from farmer_jax import afm  # noqa: PLC0415 (phase=afm only)
    return (afm.train_and_evaluate if mode == "train" else afm.sample_latest)(config, workdir)
  if mode == "train":
    return (distill.distill_and_evaluate if phase == "distill"
            else train.train_and_evaluate)(config, workdir)
  if mode == "evaluate":
    return (distill.evaluate_latest if phase == "distill" else evaluate)(config, workdir)
  if mode == "fid":
    from farmer_jax.evaluation import fid_mode  # noqa: PLC0415 (fid mode only)
    return fid_mode.evaluate_fid(config, workdir)
  return sample(config, workdir)
