"""Command-line entry.

    python -m farmer_jax.main --config=configs/digits.py --workdir=runs/digits [--mode=train]

Modes:
  train     trains, resuming from the latest checkpoint in --workdir; evaluates and samples at the end
            (with phase=distill: distils the AF inverse into <workdir>/distill, farmer_jax/distill.py;
            with phase=afm, e.g. configs/afm_digits.py: an adversarial flow model, farmer_jax/afm.py)
  evaluate  test-split bpd of the latest checkpoint -> <workdir>/eval/metrics.json
            (phase=distill: the student's evaluation -> <workdir>/distill/eval/metrics.json)
  sample    <workdir>/samples/samples_<step>_<tag>.npz and .png with the config's sampler, decoded
            by the distilled student when <workdir>/distill has one (sample.decoder); the tag names
            decoder, guidance, seed and a hash of the sample settings (or sample.name)
  plan      parameter counts, FLOPs and compiled per-device memory of the train step, as JSON
            (--plan_devices=N fake CPU devices, or --plan_topology=v5p:4x8x8 for TPU AOT)
  fid       FID / IS / precision-recall of config.fid.num_samples samples against
            config.fid.reference -> <workdir>/eval/fid_<step>_<tag>.json (farmer_jax/evaluation/)
  fields    every config field with its value (--config's, else config_base.py's default) and its
            source or meaning; needs no --workdir
Any config field can be overridden, e.g. --config.train.num_steps=100. A config problem (an unknown
field, a value of the wrong type or out of range, a missing config file or variant) stops the run
before any compute with one line naming the field, and exit status 2 (farmer_jax/cli.py).

--workdir may be local or remote (gs://...): every file goes through farmer_jax/rundir/. One run
holds a workdir at a time (lock.json). In training, distillation and AFM, SIGTERM or SIGINT saves
a checkpoint of the current step and exits 0, and rerunning the same command resumes; elsewhere
SIGINT stops with one line (exit 130).

Several processes (TPU pod hosts, SLURM tasks, Open MPI ranks) are detected from the environment
and joined with jax.distributed.initialize(); elsewhere pass --coordinator_address,
--num_processes and --process_id to every process.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from farmer_jax import cli, config_base, config_check, metrics, modes, rundir, sharding

FIELDS_MODE = "fields"   # handled here: needs no workdir, no devices
MODES = (*modes.MODES, FIELDS_MODE)
# One line each for --help; the module docstring says more.
_MODE_HELP = {
    "train": "train (or distil / AFM, by config.phase), resuming from --workdir's checkpoint",
    "evaluate": "test-split bpd of the latest checkpoint -> <workdir>/eval/metrics.json",
    "sample": "samples of the latest checkpoint -> <workdir>/samples/*.npz and .png",
    "plan": "parameters, FLOPs and compiled per-device memory of the train step (--plan_*)",
    "fid": "FID / IS / precision-recall against config.fid.reference",
    FIELDS_MODE: "list every config field, its value and source (no --workdir needed)",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file and its variant, e.g. configs/digits.py:tiny (required "
    "except with --mode=fields).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and outputs, local or gs://... (required "
    "except with --mode=fields).")
_MODE = flags.DEFINE_enum("mode", "train", list(MODES), "What to do.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, where the cluster is not auto-detected.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
_PLAN_DEVICES = flags.DEFINE_integer(
    "plan_devices", None, "--mode=plan: compile for this many fake CPU devices (default: the "
    "devices present).")
_PLAN_TOPOLOGY = flags.DEFINE_string(
    "plan_topology", None, "--mode=plan: TPU slice to compile for ahead of time, e.g. v5p:4x8x8 "
    "(needs libtpu: pip install jax[tpu] at the pinned version).")
_PLAN_MEMORY = flags.DEFINE_float("plan_device_memory_gib", None,
                                  "--mode=plan: memory of one device, to say whether it fits.")
_PLAN_KIND = flags.DEFINE_string("plan_device_kind", None,
                                 "--mode=plan: accelerator the fake devices stand for (H100, A100, "
                                 "TPU v5p, ...), for the ideal step time at its peak.")
# --help lists these (not the libraries' flags). --config and --workdir are not marked required
# because --mode=fields needs neither: main() checks them.
_OUR_FLAGS = (_CONFIG, _WORKDIR, _MODE, _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _PLAN_DEVICES,
              _PLAN_TOPOLOGY, _PLAN_MEMORY, _PLAN_KIND)

# Variables whose presence says this process is one of several.
_MULTI_PROCESS_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                      "JAX_COORDINATOR_ADDRESS")


def initialize_distributed() -> None:
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    return
  sizes = [os.environ.get(v) for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")]
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if (any(s and int(s) > 1 for s in sizes) or "," in hosts
      or "JAX_COORDINATOR_ADDRESS" in os.environ):
    jax.distributed.initialize()   # the cluster's environment gives address, count and rank


def check_mesh(config, num_devices: int) -> None:
  """config.sharding.mesh against the device count: one line, exit 2, before any run starts."""
  try:
    sharding.mesh_shape(config.sharding.mesh, num_devices)
  except ValueError as e:
    cli.fail(str(e))


def run_plan(config, workdir: str) -> dict:
  from farmer_jax import plan  # noqa: PLC0415 (plan mode only)
  if _PLAN_TOPOLOGY.value:
    devices = plan.tpu_devices(_PLAN_TOPOLOGY.value)
    target = f"TPU topology {_PLAN_TOPOLOGY.value}: {len(devices)} {devices[0].device_kind} devices"
  elif _PLAN_DEVICES.value:
    devices = jax.devices("cpu")[:_PLAN_DEVICES.value]
    target = f"{len(devices)} fake CPU devices (--plan_devices)"
  else:
    devices = jax.devices()
    target = f"the {len(devices)} {devices[0].device_kind} devices present"
  if _PLAN_KIND.value:
    target += f", standing for {_PLAN_KIND.value}"
  check_mesh(config, len(devices))
  logging.info("plan: %s for %s", flags.FLAGS[_CONFIG.name].config_filename, target)
  result = plan.plan(config, devices=devices, device_memory_gib=_PLAN_MEMORY.value,
                     device_kind=_PLAN_KIND.value)
  metrics.print_json_line(result, rundir.unique(rundir.RunDir(workdir).plan))
  return result


def usage() -> str:
  return cli.usage_text({m: _MODE_HELP.get(m, "") for m in MODES}, _OUR_FLAGS)


def list_fields(config) -> None:
  """--mode=fields: the config's fields (or base_config()'s defaults) with their sources."""
  text = "\n".join(cli.list_fields(config if config is not None else config_base.base_config()))
  try:
    print(text, flush=True)
  except BrokenPipeError:   # `| head`: the reader has what it wanted
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]} (flags look like --name=value; see --help)")
  metrics.quiet_library_logs()
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _MODE.value == FIELDS_MODE:
    list_fields(config)
    return
  for name, value in (("config", config), ("workdir", workdir)):
    if value is None:
      cli.fail(f"--{name} is required with --mode={_MODE.value} (only --mode=fields goes without)")
  try:   # every mode, before any device work
    modes.check(_MODE.value, config)
    config_check.validate(config)
    # The rule table's shape too (config_check leaves config.sharding to sharding.py, whose mesh
    # check needs the device count, known only once the backend and any cluster are up).
    sharding.rules_from_config(config.sharding.rules)
  except ValueError as e:   # ConfigError, or the rules' ValueError naming config.sharding.rules
    cli.fail(str(e))
  try:
    if _MODE.value == "plan":
      if _PLAN_DEVICES.value:   # before any backend starts
        jax.config.update("jax_num_cpu_devices", _PLAN_DEVICES.value)
      run_plan(config, workdir)
      return
    initialize_distributed()
    check_mesh(config, jax.device_count())
    logging.info("JAX %s: process %d/%d, %d devices (%d local); workdir %s", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.device_count(),
                 jax.local_device_count(), rundir.as_path(workdir))
    result = modes.run(_MODE.value, config, workdir)
    if _MODE.value == "fid":
      metrics.print_json_line(result)
  except config_check.ConfigError as e:   # the devices' checks (batch over the mesh), config.json
    cli.fail(str(e))
  except (rundir.WorkdirError, FileNotFoundError) as e:
    # The user's to fix (a live run holds the workdir, the disk is full or read-only, nothing is
    # trained there yet, a file named in the config is missing): one line, exit 1.
    logging.error("%s", e)
    sys.exit(f"farmer_jax: {e}")
  except KeyboardInterrupt:   # outside the training loops, which save and exit 0 themselves
    sys.stderr.write("farmer_jax: interrupted\n")
    sys.exit(130)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(usage))
