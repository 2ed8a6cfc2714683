r"""Where a CPU train step's time goes, one Transformer layer at a time, and two checkouts side by side.

    python benchmarks/layer_cpu.py --out=layer_cpu.json
    python benchmarks/layer_cpu.py --compare=/path/to/other/farmer_jax/checkout --out=layer_cpu.json
    python benchmarks/layer_cpu.py --compare_xla_flags=--xla_cpu_use_onednn=true  # this checkout,
                                                                  # with and without XLA flags

For each config (`C64`: batch 64, 64 tokens, width 128; `C256`: batch 64, 256 tokens, width 256,
the two configs of benchmarks/peer_tarflow.py) it times forward + backward of the output's product
with a fixed cotangent (compile excluded): one causal `TransformerLayer`, its `Attention`, its
`MLP` and one layer norm, and the layer's forward alone; and the project's whole train step on that
config (`train_step`: 4 blocks of such layers, the smallest prior, AdamW and EMA, as
benchmarks/peer_tarflow.py builds it). With `--compare` (another checkout) or `--compare_xla_flags` (flags
added to XLA_FLAGS), each side runs in its own long-lived worker process (the same script, imported
from that checkout) and the calls interleave A/B/B/A; the JSON gives both medians and their ratio
(this / other). Synthetic inputs (timing only).
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {   # batch, tokens, width
    "C64": (64, 64, 128),
    "C256": (64, 256, 256),
}
PIECES = ("train_step", "layer", "layer_forward", "attention", "mlp", "layer_norm")


def build(config: str, smoke: bool):
  """{piece: a zero-argument function that runs it once and waits for the result}."""
  import jax
  import jax.numpy as jnp
  from farmer_jax.models import layers

  batch, tokens, width = (2, 16, 64) if smoke else CONFIGS[config]
  x = jax.random.normal(jax.random.key(0), (batch, tokens, width))
  modules = {
      "layer": layers.TransformerLayer(width, 64, 4, True),
      "attention": layers.Attention(width, 64, True),
      "mlp": layers.MLP(width, 4),
      "layer_norm": layers.layer_norm(jnp.float32, "ln"),
  }
  out = lambda y: y[0] if isinstance(y, tuple) else y
  # A fixed cotangent: the backward pass starts from it, with no elementwise work of its own.
  cotangent = jax.random.normal(jax.random.key(2), x.shape)
  fns = {}
  for name, module in modules.items():
    params = module.init(jax.random.key(1), x)

    def loss(p, x, module=module):
      return jnp.vdot(out(module.apply(p, x)), cotangent)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    fns[name] = lambda grad=grad, params=params: jax.block_until_ready(grad(params, x))
    if name == "layer":
      forward = jax.jit(lambda p, x, module=module: out(module.apply(p, x)))
      fns["layer_forward"] = lambda params=params: jax.block_until_ready(forward(params, x))
  # The project's whole train step (AdamW, EMA, prior) at the same config, as peer_tarflow.py
  # builds it: what the parts add up to.
  spec = importlib.util.spec_from_file_location(
      "peer_tarflow", os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_tarflow.py"))
  peer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer)
  shape = (peer.SMOKE["smoke"] if smoke else peer.CONFIGS[config])
  _, figures = peer.farmer_jax_system(shape, None)
  fns["train_step"] = figures["train"]
  for fn in fns.values():   # compile and warm up
    fn()
    fn()
  return fns


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def worker(smoke: bool) -> None:
  """Line protocol on stdin / stdout: 'CONFIG PIECE' -> seconds of one call."""
  fns = {c: build(c, smoke) for c in CONFIGS}
  print("ready", flush=True)
  for line in sys.stdin:
    config, piece = line.split()
    print(f"{timed(fns[config][piece]):.6f}", flush=True)


class Worker:
  def __init__(self, checkout: str, smoke: bool, xla_flags: str = ""):
    env = dict(os.environ, PYTHONPATH=checkout)
    if xla_flags:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker"] + (["--smoke"] if smoke else []),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=checkout)
    line = self.proc.stdout.readline().strip()
    if line != "ready":
      raise RuntimeError(f"worker for {checkout} failed to start (see its stderr above)")

  def time(self, config: str, piece: str) -> float:
    self.proc.stdin.write(f"{config} {piece}\n")
    self.proc.stdin.flush()
    return float(self.proc.stdout.readline())

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--compare", default=None, help="another checkout to time side by side")
  parser.add_argument("--compare_xla_flags", default="",
                      help="XLA_FLAGS added on the other side (default: this checkout)")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repeats")
  parser.add_argument("--out", default=None)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args.smoke)
  repeats = 2 if args.smoke else args.repeats
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  checkouts = {"this": here}
  compare = bool(args.compare or args.compare_xla_flags)
  if compare:
    checkouts["other"] = os.path.abspath(args.compare or here)
  workers = {name: Worker(path, args.smoke, args.compare_xla_flags if name == "other" else "")
             for name, path in checkouts.items()}
  order = list(workers)
  times = {name: {c: {p: [] for p in PIECES} for c in CONFIGS} for name in workers}
  for r in range(repeats):
    for config in CONFIGS:
      for piece in PIECES:
        for name in (order if r % 2 == 0 else order[::-1]):   # A/B, then B/A
          times[name][config][piece].append(workers[name].time(config, piece))
  for w in workers.values():
    w.close()
  result = {"benchmark": "layer_cpu", "synthetic_inputs": True, "smoke": args.smoke,
            "repeats": repeats, "cpu_count": os.cpu_count(),
            "configs": {c: dict(zip(("batch", "tokens", "width"), CONFIGS[c])) for c in CONFIGS},
            "checkouts": checkouts, "other_xla_flags": args.compare_xla_flags,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "median_s": {}}
  for name in workers:
    result["median_s"][name] = {c: {p: statistics.median(v) for p, v in pieces.items()}
                                for c, pieces in times[name].items()}
  if compare:
    this, other = result["median_s"]["this"], result["median_s"]["other"]
    result["ratio_this_over_other"] = {c: {p: this[c][p] / other[c][p] for p in PIECES}
                                       for c in CONFIGS}
  from farmer_jax import metrics  # noqa: PLC0415 (JAX, only to print)
  metrics.print_json_line(result, args.out)


if __name__ == "__main__":
  main()
