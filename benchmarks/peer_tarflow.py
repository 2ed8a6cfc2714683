r"""farmer_jax against PyTorch TARFlow (apple/ml-tarflow) on the same CPU, side by side (issue 16).

    python benchmarks/peer_tarflow.py --tarflow=/path/ml-tarflow/transformer_flow.py \
        --torch_python=/path/venv/bin/python --out=peer_tarflow.json
    python benchmarks/peer_tarflow.py --smoke                   # seconds, tiny sizes
    python benchmarks/peer_tarflow.py --systems=farmer_jax      # our side alone, no torch needed

Run it with the project's Python (the one farmer_jax is installed in). TARFlow is not part of this
repository: `--tarflow` is the path of its `transformer_flow.py` and `--torch_python` a Python
that has torch, both the user's; they default to the environment variables FARMER_TARFLOW and
FARMER_TORCH_PYTHON (which also let tests/test_benchmarks.py run the side-by-side smoke test).

How it measures. Each system is one long-lived worker process: this file re-run with `--worker=jax`
under this Python, or `--worker=torch` under `--torch_python` (it imports `transformer_flow` from
the given path; torch.set_num_threads(--torch_threads), 2 by default; XLA uses every core, which is
2 on the machines this was written for). The driver sends one JSON line per request and reads one
back; each worker times its own call. A figure starts with one untimed call per system (JAX's
compilation, torch's allocator warm-up: reported as `first_call_s`), then `--repeats` timed calls
per system in the order A B, B A, A B, ... (so neither always goes first), `--pause` seconds apart
(default 0; 0.5 s, time for the threads of the call before to stop spinning, changed nothing
measurable: docs/cpu.md), and reports medians.
Each call also reports the cores its process kept busy (CPU time / wall time, every thread) and
those other processes did (/proc/stat's busy time less ours). Measure on an otherwise idle
machine: a config during which other processes held more than a quarter of a core gets a
`warning`. Sharing hurts torch far more than XLA: TARFlow's C64 forward with 2 threads took 1.9 s
next to a busy process against 0.17 s with 1 thread (OpenMP's threads wait for each other).

Configs (32x32x3 images, 10 classes, head dim 64, MLP ratio 4, both flows class-conditional):
    C64   patch 4 (64 tokens of 48), width 128, 4 blocks x 2 layers, batch 64
    C256  patch 2 (256 tokens of 12), width 256, 4 blocks x 4 layers, batch 64
    smoke (--smoke) 8x8x3, patch 2 (16 tokens), width 64, 1 block x 1 layer, batch 4, 4 samples,
          2 repeats: a check that everything runs, not a measurement
farmer_jax's model is configs/digits.py with those fields overridden, its AF class-conditional
(model.af_class_conditional) and the smallest prior: 1 layer of width 64, one class slot, K = 1
for both GMM heads, d_informative = the token dim (no split). TARFlow's is
`transformer_flow.Model(in_channels=3, img_size=32, patch_size, channels=width, num_blocks=4,
layers_per_block, num_classes=10)`.

Parameters: TARFlow is a flow and a fixed Gaussian; farmer_jax adds its AR prior, whose smallest
form still has 64K-70K parameters (a 64-wide layer: the width must be a multiple of
model.head_dim, and mlp_ratio is shared with the AF), +3.8% on TARFlow's count at C64 and +0.5% at
C256. So the counts that must agree within 1% (or the run stops before timing) are farmer_jax's
flow against TARFlow's model (+0.12% and +0.03%: a start vector, a null-class row and a final
layer norm per block); both totals and their difference are reported too.

Figures, each per call (seconds, median), and `ratios` = farmer_jax / TARFlow:
    train            one optimiser step on one batch. farmer_jax: the Trainer's jitted train_step
                     (dequantisation, noise, label dropout, loss and gradients, clipping, AdamW,
                     EMA). TARFlow: the step of its train.py in float32 on CPU: Gaussian input
                     noise (0.05), labels dropped to -1 with p = 0.1, forward, loss, backward,
                     AdamW(0.9, 0.95); no learning-rate schedule, no grad scaler (no AMP on CPU).
    forward          the loss of one batch, no gradients. farmer_jax: the Trainer's jitted
                     eval_step; TARFlow: model(x, y) and get_loss under torch.no_grad().
    sample_unguided  16 images (smoke: 4), random classes. farmer_jax: sample.generate (KV-cached
                     prior decode, then the KV-cached exact AF inverse) on the EMA weights;
                     TARFlow: model.reverse(noise, y) (KV-cached per block). Neither denoises.
    sample_guided    the same with guidance weight 3 (GUIDANCE_W): farmer_jax's resampling CFG
                     (guidance="resample", w=3, the digits default), TARFlow's CFG
                     (reverse(..., guidance=3), on both the shift and the scale).
    train_gflops     matmul FLOPs of a train step / train seconds. Counted as
                     farmer.train_flops_per_example does (2 per multiply-add, attention's two
                     [T, T] products in full, backward = 2x forward). farmer_jax: its whole model
                     (flow + prior); TARFlow: the AF part of the same count, which is exactly
                     TARFlow's matmuls (proj_in, qkv, proj, MLP, proj_out; attention).

Progress goes to stderr; the last line of stdout is one JSON object ({"configs": {name: {"shape",
"params", "workers", "seconds", "all_seconds", "first_call_s", "cores_used",
"other_processes_cores", "ratios", "train_flops_per_step", "train_gflops"[, "warning"]}}, ...});
`--out=FILE` writes it too. With `--systems=farmer_jax` there are no TARFlow figures and no ratios.
"""
import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SYSTEMS = ("farmer_jax", "tarflow")
FIGURES = ("train", "forward", "sample_unguided", "sample_guided")
PARAM_TOLERANCE = 0.01      # |farmer_jax flow / TARFlow - 1|
GUIDANCE_W = 3.0            # configs/digits.py's resampling CFG weight; TARFlow's cfg the same
NUM_CLASSES = 10
CHANNELS = 3
HEAD_DIM = 64               # TARFlow's MetaBlock default
NOISE_STD = 0.05            # TARFlow train.py's default Gaussian input noise
LABEL_DROPOUT = 0.1         # farmer_jax's model.label_dropout; TARFlow's --drop_label set to match
SMOKE_REPEATS = 2
# Other processes' median cores during a timed call above which a config's figures get a warning.
OTHER_CORES_WARNING = 0.25


@dataclasses.dataclass(frozen=True)
class Shape:
  image_size: int
  patch_size: int
  width: int
  blocks: int
  layers: int
  batch: int
  samples: int

  @property
  def token_dim(self) -> int:
    return CHANNELS * self.patch_size ** 2

  @property
  def tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2


CONFIGS = {
    "C64": Shape(image_size=32, patch_size=4, width=128, blocks=4, layers=2, batch=64, samples=16),
    "C256": Shape(image_size=32, patch_size=2, width=256, blocks=4, layers=4, batch=64, samples=16),
}
SMOKE = {"smoke": Shape(image_size=8, patch_size=2, width=64, blocks=1, layers=1, batch=4,
                        samples=4)}


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# farmer_jax's side (imports JAX; runs in the worker, and in the driver for the FLOP counts).
# ---------------------------------------------------------------------------------------------


def farmer_config(shape: Shape):
  """configs/digits.py with the data, model and batch fields of `shape` overridden."""
  spec = importlib.util.spec_from_file_location("peer_tarflow_digits",
                                                os.path.join(REPO, "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("default")
  c.data.update(image_size=shape.image_size, channels=CHANNELS, num_levels=256,
                num_classes=NUM_CLASSES)
  c.model.update(patch_size=shape.patch_size, af_blocks=shape.blocks, af_layers=shape.layers,
                 af_width=shape.width, head_dim=HEAD_DIM, af_class_conditional=True,
                 label_dropout=LABEL_DROPOUT,
                 # The smallest prior: one layer at the smallest width head_dim allows, one class
                 # slot, one component per head, no informative / redundant split.
                 prior_layers=1, prior_width=HEAD_DIM, class_repeat=1,
                 d_informative=shape.token_dim, k_informative=1, k_redundant=1)
  c.train.update(batch_size=shape.batch)
  c.eval.update(batch_size=shape.batch)
  c.sample.update(batch_size=shape.samples)
  return c


def train_flops_per_step(shape: Shape) -> dict:
  """Matmul FLOPs of one train step of each system (see the docstring)."""
  from farmer_jax import config_check
  from farmer_jax.models import farmer
  c = config_check.validate(farmer_config(shape))
  return {"farmer_jax": farmer.train_flops_per_example(c) * shape.batch,
          "tarflow": 3.0 * farmer.forward_flops_per_example(c)["af"] * shape.batch}


def farmer_jax_system(shape: Shape, _args):
  """-> (info, {figure: fn}): fn runs one call of that figure to completion."""
  import flax.linen as nn
  import jax
  import numpy as np
  from farmer_jax import sample, sharding, train
  from farmer_jax.models import prior

  trainer = train.Trainer(farmer_config(shape), devices=jax.devices()[:1])
  c, b = trainer.model_config, shape.batch
  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  with jax.set_mesh(trainer.mesh):
    state = trainer.init()
    batch = trainer.batch_to_global({
        "image": rng.integers(0, c.num_levels, (b, c.image_size, c.image_size, c.channels),
                              dtype=np.uint8),
        "label": rng.integers(0, c.num_classes, (b,), dtype=np.int32),
        "mask": np.ones((b,), np.bool_)})
  labels = rng.integers(0, c.num_classes, (shape.samples,), dtype=np.int32)
  count = lambda tree: int(sum(a.size for a in jax.tree.leaves(tree)))
  info = {"params": {"total": count(state.params), "flow": count(state.params["flow"]),
                     "prior": count(state.params["prior"])},
          "jax": jax.__version__, "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", "")}

  def train_step():
    nonlocal state
    with jax.set_mesh(trainer.mesh):
      state, scalars = trainer.train_step(state, batch, key)
      jax.block_until_ready((state, scalars))

  def forward():
    with jax.set_mesh(trainer.mesh):
      jax.block_until_ready(trainer.eval_step(state.params, batch, key))

  def sampler(s: prior.SamplerConfig):
    def draw():   # returns host arrays: the images are ready
      with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        sample.generate(trainer.model, trainer.eval_params(state), labels, key,
                        batch_size=len(labels), sampler=s, progress=False, as_float=True,
                        out_sharding=sharding.replicated(trainer.mesh))
    return draw

  return info, {"train": train_step, "forward": forward,
                "sample_unguided": sampler(prior.SamplerConfig()),
                "sample_guided": sampler(prior.SamplerConfig(guidance="resample", w=GUIDANCE_W))}


# ---------------------------------------------------------------------------------------------
# TARFlow's side (imports torch and the user's transformer_flow.py; runs in the torch worker).
# ---------------------------------------------------------------------------------------------


def load_tarflow(path: str):
  spec = importlib.util.spec_from_file_location("transformer_flow", path)
  if spec is None or spec.loader is None:
    raise ValueError(f"--tarflow={path}: not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "Model"):
    raise ValueError(f"--tarflow={path} has no class Model: pass ml-tarflow's transformer_flow.py")
  return module


def tarflow_system(shape: Shape, args):
  """-> (info, {figure: fn}), as `farmer_jax_system`."""
  import torch
  torch.set_num_threads(args.torch_threads)
  tarflow = load_tarflow(args.tarflow)
  torch.manual_seed(0)
  model = tarflow.Model(in_channels=CHANNELS, img_size=shape.image_size,
                        patch_size=shape.patch_size, channels=shape.width,
                        num_blocks=shape.blocks, layers_per_block=shape.layers,
                        num_classes=NUM_CLASSES)
  # TARFlow train.py's optimiser.
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                weight_decay=1e-4)
  gen = torch.Generator().manual_seed(0)
  b, s = shape.batch, shape.image_size
  levels = torch.randint(0, 256, (b, CHANNELS, s, s), generator=gen)
  images = (levels.float() + 0.5) / 128.0 - 1.0          # NCHW in [-1, 1]
  labels = torch.randint(0, NUM_CLASSES, (b,), generator=gen)
  noise = torch.randn(shape.samples, shape.tokens, shape.token_dim, generator=gen)
  sample_labels = torch.randint(0, NUM_CLASSES, (shape.samples,), generator=gen)
  info = {"params": {"total": int(sum(p.numel() for p in model.parameters()))},
          "torch": torch.__version__, "threads": torch.get_num_threads()}

  def train_step():
    x = images + NOISE_STD * torch.randn_like(images)
    dropped = torch.rand(b) < LABEL_DROPOUT
    y = torch.where(dropped, torch.full_like(labels, -1), labels)   # -1: TARFlow's null label
    optimizer.zero_grad()
    z, _, logdets = model(x, y)
    model.get_loss(z, logdets).backward()
    optimizer.step()

  def forward():
    with torch.no_grad():
      z, _, logdets = model(images, labels)
      model.get_loss(z, logdets).item()

  def sampler(guidance: float):
    def draw():
      with torch.no_grad():
        model.reverse(noise, sample_labels, guidance=guidance)
    return draw

  return info, {"train": train_step, "forward": forward, "sample_unguided": sampler(0.0),
                "sample_guided": sampler(GUIDANCE_W)}


# ---------------------------------------------------------------------------------------------
# Worker: one JSON request per stdin line, one JSON reply per line on the real stdout.
#   {"cmd": "setup", "shape": {...}}  -> {"info": {...}}      (builds the model; drops the last)
#   {"cmd": "run", "figure": NAME}    -> {"seconds", "cpu_s", "machine_busy_s"}   (one call:
#                                        wall time, this process's CPU time, the whole machine's)
#   {"cmd": "quit"}
# A failure replies {"error": traceback} and the worker goes on reading.
# ---------------------------------------------------------------------------------------------


def machine_busy_s() -> float:
  """CPU seconds all processes have spent busy since boot (/proc/stat; NaN where there is none)."""
  try:
    with open("/proc/stat") as f:
      ticks = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return math.nan
  idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)    # idle, iowait
  busy = sum(ticks[:8]) - idle                               # user .. steal (guest is in user)
  return busy / os.sysconf("SC_CLK_TCK")


def timed(fn) -> dict:
  """Runs fn once -> its wall seconds, this process's CPU seconds (every thread) and the machine's."""
  busy, cpu, start = machine_busy_s(), time.process_time(), time.perf_counter()
  fn()
  return {"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
          "machine_busy_s": machine_busy_s() - busy}


def serve(args) -> None:
  # Libraries may print to stdout: the replies get the real one, everything else goes to stderr.
  channel = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  build = {"jax": farmer_jax_system, "torch": tarflow_system}[args.worker]
  figures = {}
  for line in sys.stdin:
    request = json.loads(line)
    if request["cmd"] == "quit":
      break
    try:
      if request["cmd"] == "setup":
        figures = {}
        gc.collect()
        info, figures = build(Shape(**request["shape"]), args)
        reply = {"info": info}
      elif request["cmd"] == "run":
        reply = timed(figures[request["figure"]])
      else:
        raise ValueError(f"unknown request {request!r}")
    except Exception:   # reported to the driver, which stops the run with it
      reply = {"error": traceback.format_exc()}
    channel.write(json.dumps(reply) + "\n")


class Worker:
  """The driver's handle on one worker process."""

  def __init__(self, system: str, command: list[str]):
    self.system = system
    log(f"starting the {system} worker: {' '.join(command)}")
    self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, bufsize=1, cwd=REPO)

  def call(self, **request) -> dict:
    try:
      self.proc.stdin.write(json.dumps(request) + "\n")
      self.proc.stdin.flush()
      line = self.proc.stdout.readline()
    except BrokenPipeError:
      line = ""
    if not line:
      raise SystemExit(f"peer_tarflow: the {self.system} worker exited with status "
                       f"{self.proc.wait()} during {request}; its messages are above")
    reply = json.loads(line)
    if "error" in reply:
      raise SystemExit(f"peer_tarflow: the {self.system} worker failed on {request}:\n"
                       f"{reply['error']}")
    return reply

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
      except (BrokenPipeError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()


def start_workers(systems: list[str], args) -> dict[str, Worker]:
  script = os.path.abspath(__file__)
  workers = {}
  for system in systems:
    if system == "farmer_jax":
      command = [sys.executable, script, "--worker=jax"]
    else:
      command = [args.torch_python, script, "--worker=torch", f"--tarflow={args.tarflow}",
                 f"--torch_threads={args.torch_threads}"]
    workers[system] = Worker(system, command)
  return workers


# ---------------------------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------------------------


def check_params(params: dict) -> None:
  """Adds the relative differences to `params`; stops the run when the flows differ by > 1%."""
  if "tarflow" not in params:
    return
  tarflow = params["tarflow"]["total"]
  params["flow_rel_diff"] = params["farmer_jax"]["flow"] / tarflow - 1.0
  params["total_rel_diff"] = params["farmer_jax"]["total"] / tarflow - 1.0
  log(f"  parameters: farmer_jax {params['farmer_jax']['total']:,} (flow "
      f"{params['farmer_jax']['flow']:,}, prior {params['farmer_jax']['prior']:,}), "
      f"TARFlow {tarflow:,}: flows differ by {100 * params['flow_rel_diff']:+.2f}%, totals by "
      f"{100 * params['total_rel_diff']:+.2f}%")
  if abs(params["flow_rel_diff"]) > PARAM_TOLERANCE:
    raise SystemExit(f"peer_tarflow: farmer_jax's flow has {params['farmer_jax']['flow']:,} "
                     f"parameters and TARFlow {tarflow:,}: {100 * params['flow_rel_diff']:+.2f}%, "
                     f"outside {100 * PARAM_TOLERANCE:.0f}%; the configs do not match")


def median_of(calls: list[dict], value) -> float:
  return statistics.median(value(c) for c in calls)


def measure_config(name: str, shape: Shape, workers: dict[str, Worker], repeats: int,
                   pause: float = 0.0) -> dict:
  systems = list(workers)
  log(f"{name}: {shape}")
  info = {s: w.call(cmd="setup", shape=dataclasses.asdict(shape))["info"]
          for s, w in workers.items()}
  params = {s: i.pop("params") for s, i in info.items()}
  check_params(params)
  first, calls = {s: {} for s in systems}, {s: {f: [] for f in FIGURES} for s in systems}
  for figure in FIGURES:
    for s in systems:
      first[s][figure] = workers[s].call(cmd="run", figure=figure)["seconds"]
    for r in range(repeats):
      for s in (systems if r % 2 == 0 else systems[::-1]):   # A B, B A, A B, ...
        # The other system's threads (XLA's pool, torch's OpenMP) spin for a while after a
        # call: a pause keeps that out of the next call's time.
        time.sleep(pause)
        calls[s][figure].append(workers[s].call(cmd="run", figure=figure))
    log(f"  {figure}: " + ", ".join(
        f"{s} {median_of(calls[s][figure], lambda c: c['seconds']):.4g} s (first call "
        f"{first[s][figure]:.3g} s)" for s in systems))
  per_figure = lambda value: {s: {f: median_of(calls[s][f], value) for f in FIGURES}
                              for s in systems}
  seconds = per_figure(lambda c: c["seconds"])
  other = per_figure(lambda c: max(0.0, c["machine_busy_s"] - c["cpu_s"]) / c["seconds"])
  flops = {s: v for s, v in train_flops_per_step(shape).items() if s in systems}
  result = {"shape": {**dataclasses.asdict(shape), "tokens": shape.tokens,
                      "token_dim": shape.token_dim},
            "params": params, "workers": info, "seconds": seconds,
            "all_seconds": {s: {f: [c["seconds"] for c in v] for f, v in calls[s].items()}
                            for s in systems},
            "first_call_s": first,
            "cores_used": per_figure(lambda c: c["cpu_s"] / c["seconds"]),
            "other_processes_cores": other,
            "train_flops_per_step": flops,
            "train_gflops": {s: flops[s] / seconds[s]["train"] / 1e9 for s in systems}}
  busy = sorted(f"{s}.{f} {v:.2f}" for s in systems for f, v in other[s].items()
                if v > OTHER_CORES_WARNING)
  if busy:
    result["warning"] = (f"other processes kept cores busy while {name} was timed (median cores: "
                         f"{', '.join(busy)}): its figures are not a clean measurement")
    log(f"  WARNING: {result['warning']}")
  if "tarflow" in systems and "farmer_jax" in systems:
    result["ratios"] = {f: seconds["farmer_jax"][f] / seconds["tarflow"][f] for f in FIGURES}
    log("  farmer_jax / TARFlow: " + ", ".join(f"{f} {v:.2f}x"
                                               for f, v in result["ratios"].items()))
  return result


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tarflow", default=os.environ.get("FARMER_TARFLOW"),
                      help="ml-tarflow's transformer_flow.py (default: $FARMER_TARFLOW)")
  parser.add_argument("--torch_python", default=os.environ.get("FARMER_TORCH_PYTHON"),
                      help="a Python with torch (default: $FARMER_TORCH_PYTHON)")
  parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: C64,C256")
  parser.add_argument("--systems", default=",".join(SYSTEMS),
                      help="farmer_jax,tarflow (side by side) or one of them alone")
  parser.add_argument("--repeats", type=int, default=None,
                      help=f"timed calls per figure and system (default 5; --smoke: "
                           f"{SMOKE_REPEATS})")
  parser.add_argument("--torch_threads", type=int, default=2)
  parser.add_argument("--pause", type=float, default=0.0,
                      help="seconds between timed calls (for the last call's threads to settle)")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that it runs")
  parser.add_argument("--out", help="also write the JSON result here")
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return args
  systems = [s.strip() for s in args.systems.split(",") if s.strip()]
  if not systems or set(systems) - set(SYSTEMS) or len(set(systems)) != len(systems):
    parser.error(f"--systems={args.systems}: use farmer_jax,tarflow or one of them")
  args.systems = systems
  names = [c.strip() for c in args.configs.split(",") if c.strip()]
  if not args.smoke and (not names or set(names) - set(CONFIGS)):
    parser.error(f"--configs={args.configs}: choose from {','.join(CONFIGS)}")
  args.shapes = SMOKE if args.smoke else {n: CONFIGS[n] for n in names}
  args.repeats = args.repeats or (SMOKE_REPEATS if args.smoke else 5)
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  if "tarflow" in systems:
    if not args.tarflow or not os.path.isfile(args.tarflow):
      parser.error(f"--tarflow={args.tarflow}: give the path of apple/ml-tarflow's "
                   f"transformer_flow.py (or set FARMER_TARFLOW), or run --systems=farmer_jax")
    if not args.torch_python or not os.access(args.torch_python, os.X_OK):
      parser.error(f"--torch_python={args.torch_python}: give a Python interpreter that has "
                   f"torch (or set FARMER_TORCH_PYTHON), or run --systems=farmer_jax")
    args.tarflow = os.path.abspath(args.tarflow)
  return args


def main(argv=None) -> dict | None:
  args = parse_args(argv)
  if args.worker:
    serve(args)
    return None
  from farmer_jax import metrics
  start = time.perf_counter()
  workers = start_workers(args.systems, args)
  try:
    configs = {name: measure_config(name, shape, workers, args.repeats, args.pause)
               for name, shape in args.shapes.items()}
  finally:
    for worker in workers.values():
      worker.close()
  result = {"benchmark": "peer_tarflow", "systems": args.systems, "repeats": args.repeats,
            "order": "A B, B A, ... per figure; medians; one untimed first call each",
            "pause_s": args.pause,
            "smoke": args.smoke, "guidance_w": GUIDANCE_W, "torch_threads": args.torch_threads,
            "tarflow": args.tarflow if "tarflow" in args.systems else None,
            "configs": configs, "wall_s": round(time.perf_counter() - start, 1)}
  bad = [f"{name}.{s}.{f}" for name, c in configs.items() for s, v in c["seconds"].items()
         for f, x in v.items() if not (math.isfinite(x) and x > 0)]
  if bad:
    result["status"] = f"non-positive or non-finite seconds: {bad}"
  metrics.print_json_line(result, args.out)
  return result


if __name__ == "__main__":
  main()
