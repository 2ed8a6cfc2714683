r"""One process, whatever backend JAX finds: train-step speed, TFLOP/s and MFU per attention
implementation, sampling time per image, train-step memory against --mode=plan, Inception throughput.

    python benchmarks/accelerator.py [--config=configs/imagenet256_1p1b.py] [--patches=16,8] \
        [--attention=einsum,dot_product,splash] [--batches=64,32,16,8,4,2,1] [--depth=0] [--steps=5] \
        [--sample_batches=16,256] [--inception_batch=256] [--out=FILE]
    python benchmarks/accelerator.py --smoke     # seconds on CPU: the digits tiny model

For each patch size and attention implementation the train step (bfloat16, the config's remat,
layers scanned unless --no_scan) runs at the largest per-device batch of --batches that compiles and runs, timed over --steps steps
after a warm-up step; --depth > 0 cuts every Transformer to that many layers (when the full model
does not fit one device). MFU counts model matmul FLOPs (farmer.train_flops_per_example) against
the device's peak (metrics.PEAK_TFLOPS). The compiled step's memory analysis is what --mode=plan
reports; the device's high-water mark so far in the process (memory_stats, where the backend has
it) stands beside it as an upper bound. A JSON line is printed after every measurement, so a run
cut short by a time limit keeps what it measured; the last line holds everything.
Sampling times the config's sampler (guided as the config samples) with the exact KV-cached
inverse and with a student decoder, per image, at each --sample_batches. Images are synthetic
uniform uint8 and weights random: these are timings only, and the output says so.

Imports neither TensorFlow, tensorflow-datasets nor clu. The last line of stdout is one JSON object.
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from farmer_jax import cli, metrics, sample, sharding, train  # noqa: E402
from farmer_jax.evaluation import fid_mode, weights  # noqa: E402
from farmer_jax.models import farmer, layers  # noqa: E402

GIB = 1024 ** 3


def log(*args):
  print(*args, file=sys.stderr, flush=True)


def configure(base, *, attention: str, batch: int, depth: int, dtype: str, scan: bool = True):
  c = base.copy_and_resolve_references()
  c.model.update(attention=attention, dtype=dtype, scan_layers=scan)
  if depth > 0:
    c.model.update(af_layers=min(c.model.af_layers, depth),
                   prior_layers=min(c.model.prior_layers, depth))
  c.train.update(batch_size=batch * jax.device_count(), grad_accum_steps=1)
  c.eval.batch_size = c.train.batch_size
  c.sample.batch_size = jax.device_count()
  return c


def process_peak_gib() -> float | None:
  """The device's high-water mark so far in this process (every earlier case included), where the
  backend reports one: an upper bound for the case just run, beside its compiled figure."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / GIB


def time_train_step(config, steps: int) -> dict:
  """Compile (with the plan's memory analysis), warm up, time `steps` steps."""
  trainer = train.Trainer(config)
  b, c = config.train.batch_size, trainer.model_config
  rng = np.random.default_rng(0)
  batch = trainer.batch_to_global({
      "image": rng.integers(0, c.num_levels, (b, c.image_size, c.image_size, c.channels),
                            dtype=np.uint8),
      "label": rng.integers(0, max(c.num_classes, 1), (b,), dtype=np.int32)})
  key = jax.random.key(0)
  with jax.set_mesh(trainer.mesh):
    start = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch(b),
                                        key).compile()
    mem = compiled.memory_analysis()
    state = trainer.init()
    state, scalars = compiled(state, batch, key)
    jax.block_until_ready(scalars)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, scalars = compiled(state, batch, key)
      jax.block_until_ready(scalars)
      times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  out = {"batch_per_device": b // jax.device_count(), "step_s": step_s,
         "compile_and_first_step_s": round(compile_s, 1),
         "loss_finite": bool(np.isfinite(float(scalars["loss"]))),
         **metrics.throughput(1.0 / step_s, trainer.flops_per_step, trainer.mesh.size,
                              trainer.device_kind)}
  if mem is not None:
    out["plan_peak_gib"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                            - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / GIB
  out["process_peak_gib_so_far"] = process_peak_gib()
  return out


def out_of_memory(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def largest_batch_that_runs(base, batches, steps: int, **kw) -> dict:
  """The first of `batches` (largest first) that fits; any other error is reported, not hidden as
  a batch that does not fit."""
  for batch in batches:
    try:
      result = time_train_step(configure(base, batch=batch, **kw), steps)
      log(f"  batch {batch}/device: {result['step_s'] * 1e3:.1f} ms/step, "
          f"{result['tflops_per_device']:.3g} TFLOP/s, MFU {result.get('mfu')}")
      return result
    except Exception as e:  # noqa: BLE001 (judged just below)
      message = (str(e).splitlines() or [type(e).__name__])[0][:300]
      if not out_of_memory(e):
        log(f"  batch {batch}/device failed: {message}")
        return {"error": f"batch {batch}/device: {type(e).__name__}: {message}"}
      log(f"  batch {batch}/device does not fit: {message}")
  return {"error": "no batch in --batches fits"}


def time_sampling(base, batch: int, reps: int) -> dict:
  """Seconds per image: the config's sampler, exact inverse and a (random-weight) student."""
  c = base.copy_and_resolve_references()
  c.sample.batch_size = batch
  trainer = train.Trainer(c)
  model, mc = trainer.model, trainer.model_config
  student = farmer.make_flow(mc, causal=False)
  labels = (np.arange(batch) % max(mc.num_classes, 1)).astype(np.int32)
  sampler = sample.sampler_config(c.sample)
  out = {"guidance": sampler.guidance, "attention": c.model.attention}
  with jax.set_mesh(trainer.mesh):
    params = trainer.eval_params(trainer.init())
    for name, decoder in (("exact", None), ("student", (student, params["flow"]))):
      run = lambda: sample.generate(model, params, labels, jax.random.key(1), batch_size=batch,
                                    sampler=sampler, progress=False, student=decoder,
                                    out_sharding=sharding.replicated(trainer.mesh))
      run()   # compile
      times = []
      for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
      out[f"{name}_s_per_image"] = float(np.median(times)) / batch
  return out


def inception_throughput(batch: int, reps: int, resize: int) -> dict:
  from farmer_jax import config_base  # noqa: PLC0415
  fid = config_base.base_config().fid
  fid.update(batch_size=batch, resize=resize)
  mesh, rules = sharding.mesh_and_rules(config_base.base_config().sharding)
  with jax.set_mesh(mesh):
    extractor = fid_mode.FeatureExtractor(weights.load_variables("random"), mesh, rules, fid)
    images = np.random.default_rng(0).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
    extractor.from_array(images, 256, "warm-up")
    start = time.perf_counter()
    for _ in range(reps):
      extractor.from_array(images, 256, "timing")
    seconds = time.perf_counter() - start
  return {"batch": batch, "resize": resize, "images_per_s": batch * reps / seconds}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/imagenet256_1p1b.py")
  ap.add_argument("--patches", default="16,8")
  ap.add_argument("--attention", default=None,
                  help="implementations side by side (default: einsum and what auto picks here: "
                       "dot_product on GPU, splash on TPU)")
  ap.add_argument("--batches", default="64,32,16,8,4,2,1")
  ap.add_argument("--depth", type=int, default=0)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--no_scan", action="store_true",
                  help="unrolled layers (default: scanned, so compile time does not grow with depth)")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--sample_batches", default="16,256")
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--inception_batch", type=int, default=256)
  ap.add_argument("--inception_resize", type=int, default=299)
  ap.add_argument("--smoke", action="store_true", help="the digits tiny model, seconds on CPU")
  ap.add_argument("--out")
  args = ap.parse_args(argv)
  if args.smoke:
    args.config, args.patches, args.batches = "configs/digits.py", "tiny", "4,2"
    args.sample_batches, args.steps, args.reps = "4", 2, 1
    args.inception_batch, args.inception_resize = 8, 75
  if args.attention is None:
    args.attention = ",".join(dict.fromkeys(("einsum", layers.resolve_attention("auto"),
                                             "dot_product")))
  dev = jax.devices()[0]
  result = {"backend": jax.default_backend(), "device_kind": dev.device_kind,
            "num_devices": jax.device_count(), "jax": jax.__version__,
            "peak_tflops_per_device": metrics.peak_tflops(dev.device_kind),
            "note": "synthetic uint8 images and random weights: timings only", "train": {},
            "sampling": {}}
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", args.config)
  for patch in args.patches.split(","):
    base = cli.load_config(f"{path}:{patch}")
    for attention in args.attention.split(","):
      log(f"train step: {args.config}:{patch}, attention {attention}, {args.dtype}")
      result["train"][f"{patch}/{attention}"] = largest_batch_that_runs(
          base, [int(b) for b in args.batches.split(",")], args.steps, attention=attention,
          depth=args.depth, dtype=args.dtype, scan=not args.no_scan)
      metrics.print_json_line(result, args.out)   # what is measured so far survives a time-out
    for batch in (int(b) for b in args.sample_batches.split(",")):
      log(f"sampling: {args.config}:{patch}, batch {batch}")
      small = configure(base, attention=args.attention.split(",")[-1], batch=1,
                        depth=args.depth, dtype=args.dtype, scan=not args.no_scan)
      result["sampling"][f"{patch}/batch{batch}"] = time_sampling(small, batch, args.reps)
      metrics.print_json_line(result, args.out)
  log("inception features")
  result["inception"] = inception_throughput(args.inception_batch, args.reps,
                                             args.inception_resize)
  metrics.print_json_line(result, args.out)
  return result


if __name__ == "__main__":
  main()
