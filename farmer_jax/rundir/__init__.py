"""The run directory: every file under --workdir is laid out, written and read here (files.py),
one live run holds it (lock.py), and its checkpoints are restored past damaged ones
(checkpoints.py); this package is the only code that touches workdir paths.

All I/O goes through `etils.epath`, so a `gs://` workdir (or any filesystem that epath reaches
through tf.io.gfile or fsspec) behaves like a local one. Layout (`RunDir`):

  checkpoints/<step>/          Orbax checkpoints (`Checkpointer`); damaged ones are moved aside to
  damaged_checkpoints/<step>   (never deleted)
  lock.json                    the live run's holder: host, pid, start, heartbeat (`hold`)
  config.json                  the config of the first run (`check_config`)
  train_log.jsonl              one line per log interval, no step twice after a resume
  events.out.tfevents.*        TensorBoard (farmer_jax/summary.py)
  plan.json                    --mode=plan
  eval/metrics.json            the latest evaluation; eval/history.jsonl one line per
                               (step, mode, params); eval/fid_<step>_<tag>.json
  samples/samples_<step>.npz   end-of-run samples (never replaced); --mode=sample writes
                               samples_<step>_<tag>.npz, the tag naming decoder, guidance, seed and
                               a hash of the full sample config, recorded inside the npz (`info`)
  distill/, afm/               the distillation and AFM-on-latents runs, the same layout inside

Writes are atomic (a temporary name, then a rename) and made by process 0 only. JSON is strict:
a non-finite number is written as null and named in a "status" field. A run that fails before its
first step removes what it created (`hold`), so a corrected config can start in the same workdir.
"""
from farmer_jax.rundir.checkpoints import (DECODERS, Checkpointer, decoder, has_student,
                                           latest_checkpointer, require_student)
from farmer_jax.rundir.files import (RunDir, WorkdirError, append_jsonl, as_path, check_config,
                                     dumps, exists, hashed, is_remote, keep_existing_samples,
                                     png_bytes, read_json, read_jsonl, read_npz, sample_tag,
                                     strict_json, truncate_log, unique, write_bytes, write_error,
                                     write_json, write_npz, write_png)
from farmer_jax.rundir.lock import (HEARTBEAT_S, LEASE_S, Lock, check_held, describe, held, hold,
                                    stale_reason, started)

__all__ = [
    "Checkpointer",
    "DECODERS",
    "HEARTBEAT_S",
    "LEASE_S",
    "Lock",
    "RunDir",
    "WorkdirError",
    "append_jsonl",
    "as_path",
    "check_config",
    "check_held",
    "decoder",
    "describe",
    "dumps",
    "exists",
    "has_student",
    "hashed",
    "held",
    "hold",
    "is_remote",
    "keep_existing_samples",
    "latest_checkpointer",
    "png_bytes",
    "read_json",
    "read_jsonl",
    "read_npz",
    "require_student",
    "sample_tag",
    "stale_reason",
    "started",
    "strict_json",
    "truncate_log",
    "unique",
    "write_bytes",
    "write_error",
    "write_json",
    "write_npz",
    "write_png",
]
