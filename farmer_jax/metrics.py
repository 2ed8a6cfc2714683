"""Logging: console and TensorBoard, throughput and ETA, the scripts' JSON result line."""
import logging as py_logging
import time

from absl import logging
import jax
import numpy as np

from farmer_jax import rundir, summary


class _OnlyOurInfo(py_logging.Filter):
  """Libraries (Orbax, clu's echo of our own scalars) log several INFO lines per checkpoint; keep
  their warnings and errors, and our INFO lines."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "farmer_jax" in record.pathname


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_OnlyOurInfo())


def create_writer(run: rundir.RunDir, start_step: int = 0) -> summary.SummaryWriter:
  """TensorBoard summaries in the run directory, written by process 0. A run resumed at
  `start_step` marks the restart, so that TensorBoard drops the replayed steps' old events."""
  return summary.SummaryWriter(run.path, enabled=jax.process_index() == 0,
                               start_step=start_step or None)


class Progress:
  """Steps per second over the last interval and an ETA to `total_steps`."""

  def __init__(self, start_step: int, total_steps: int):
    self.total_steps = total_steps
    self._last_step, self._last_time = start_step, time.perf_counter()

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta_s = (self.total_steps - step) / rate if rate > 0 else float("inf")
    return {"steps_per_sec": rate, "eta_min": eta_s / 60.0}


# Dense bfloat16 peak TFLOP/s per chip (vendors' figures; H100/H200 the SXM parts), matched in order
# against `device.device_kind` ("TPU v5 lite" is v5e, "TPU v6 lite" v6e, plain "TPU v5" v5p).
PEAK_TFLOPS = (
    ("TPU v6", 918.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("H200", 989.0), ("H100", 989.0),
    ("A100", 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """Peak TFLOP/s of one device of this kind, or None where unknown (CPUs)."""
  for name, peak in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def throughput(steps_per_sec: float, flops_per_step: float, num_devices: int,
               device_kind: str) -> dict[str, float]:
  """Model TFLOP/s per device and, where the device's peak is known, MFU (model FLOPs only:
  rematerialised recomputation does not count)."""
  tflops = steps_per_sec * flops_per_step / num_devices / 1e12
  out = {"tflops_per_device": tflops}
  peak = peak_tflops(device_kind)
  if peak:
    out["mfu"] = tflops / peak
  return out


def mean_of(per_step: list[dict]) -> dict[str, float]:
  """Averages a list of per-step scalar dicts (one device->host transfer for the lot)."""
  stacked = jax.device_get(jax.tree.map(lambda *xs: np.stack(xs), *per_step))
  return {k: float(np.mean(v)) for k, v in stacked.items()}


def format_scalars(step: int, total: int, scalars: dict) -> str:
  parts = [f"step {step}/{total}"]
  for k, v in scalars.items():
    parts.append(f"{k} {v:.4g}")
  return " | ".join(parts)


def print_json_line(payload: dict, path=None) -> None:
  """A script's result: one JSON line on stdout (its last line), and, if `path` is given, the same
  JSON indented (for reading and diffing) written atomically to `path` (local or gs://)."""
  if path:
    rundir.write_bytes(path, (rundir.dumps(payload, indent=1) + "\n").encode())
  print(rundir.dumps(payload), flush=True)
