"""Smoke runs of benchmarks. accelerator.py: it runs on CPU in one process, reports every figure
it promises, and imports neither TensorFlow, tensorflow-datasets nor clu (the GPU machines it is
meant for have none of them). peer_tarflow.py: farmer_jax's side alone always; side by side with
PyTorch TARFlow where FARMER_TORCH_PYTHON (a Python with torch) and FARMER_TARFLOW (ml-tarflow's
transformer_flow.py) are set."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_benchmark_smoke_runs_without_tensorflow():
  code = ("import sys, runpy; sys.argv = ['accelerator.py', '--smoke']; "
          "runpy.run_path('benchmarks/accelerator.py', run_name='__main__'); "
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'clu') if m in sys.modules]; "
          "assert not bad, bad")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["backend"] == "cpu" and "timings only" in result["note"]
  for attention in ("einsum", "dot_product"):
    step = result["train"][f"tiny/{attention}"]
    assert step["loss_finite"] and step["step_s"] > 0 and step["tflops_per_device"] > 0
    assert step["plan_peak_gib"] > 0
  sampling = result["sampling"]["tiny/batch4"]
  assert sampling["exact_s_per_image"] > 0 and sampling["student_s_per_image"] > 0
  assert result["inception"]["images_per_s"] > 0


PEER_FIGURES = ("train", "forward", "sample_unguided", "sample_guided")


def run_peer_tarflow(*flags) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "benchmarks/peer_tarflow.py", "--smoke", *flags], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert "status" not in result, result["status"]
  return result


def positive_finite(x) -> bool:
  return isinstance(x, float) and math.isfinite(x) and x > 0


def check_system_figures(config: dict, system: str, repeats: int) -> None:
  for figure in PEER_FIGURES:
    assert positive_finite(config["seconds"][system][figure]), (system, figure)
    assert positive_finite(config["first_call_s"][system][figure]), (system, figure)
    runs = config["all_seconds"][system][figure]
    assert len(runs) == repeats and all(positive_finite(x) for x in runs), (system, figure)
    assert config["cores_used"][system][figure] >= 0, (system, figure)
    assert figure in config["other_processes_cores"][system]
  assert positive_finite(config["train_gflops"][system])
  assert positive_finite(config["train_flops_per_step"][system])


def test_peer_tarflow_farmer_jax_side_alone():
  result = run_peer_tarflow("--systems=farmer_jax")
  assert result["systems"] == ["farmer_jax"] and result["smoke"]
  config = result["configs"]["smoke"]
  assert set(config["seconds"]) == {"farmer_jax"} and "ratios" not in config
  check_system_figures(config, "farmer_jax", result["repeats"])
  params = config["params"]["farmer_jax"]
  assert params["flow"] > 0 and params["prior"] > 0
  assert params["flow"] + params["prior"] == params["total"]
  assert config["shape"]["tokens"] == 16 and config["shape"]["token_dim"] == 12


def test_peer_tarflow_stops_when_the_flows_differ_by_more_than_one_percent():
  spec = importlib.util.spec_from_file_location(
      "peer_tarflow", os.path.join(REPO, "benchmarks", "peer_tarflow.py"))
  peer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer)
  params = {"farmer_jax": {"total": 1_100, "flow": 1_009, "prior": 91}, "tarflow": {"total": 1_000}}
  peer.check_params(params)
  assert math.isclose(params["flow_rel_diff"], 0.009)
  assert math.isclose(params["total_rel_diff"], 0.1)
  params["farmer_jax"]["flow"] = 1_011
  with pytest.raises(SystemExit, match="outside 1%"):
    peer.check_params(params)


def test_peer_tarflow_side_by_side_smoke():
  torch_python, tarflow = os.environ.get("FARMER_TORCH_PYTHON"), os.environ.get("FARMER_TARFLOW")
  if not (torch_python and os.access(torch_python, os.X_OK) and tarflow
          and os.path.isfile(tarflow)):
    pytest.skip("no TARFlow to compare with: set FARMER_TORCH_PYTHON to a Python that has torch "
                "and FARMER_TARFLOW to apple/ml-tarflow's transformer_flow.py")
  result = run_peer_tarflow(f"--torch_python={torch_python}", f"--tarflow={tarflow}")
  assert result["systems"] == ["farmer_jax", "tarflow"]
  config = result["configs"]["smoke"]
  for system in result["systems"]:
    check_system_figures(config, system, result["repeats"])
  assert set(config["ratios"]) == set(PEER_FIGURES)
  assert all(positive_finite(v) for v in config["ratios"].values())
  params = config["params"]
  assert params["tarflow"]["total"] > 0 and abs(params["flow_rel_diff"]) <= 0.01
  assert config["workers"]["tarflow"]["threads"] == result["torch_threads"]


def test_layer_cpu_times_every_piece_on_both_sides():
  """benchmarks/layer_cpu.py --smoke: two workers (this checkout with and without an XLA flag),
  interleaved; every piece of both configs timed on both sides, and their ratio reported."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "benchmarks/layer_cpu.py", "--smoke",
                        "--compare_xla_flags=--xla_cpu_enable_fast_min_max=false"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout)
  assert result["other_xla_flags"] == "--xla_cpu_enable_fast_min_max=false"
  for side in ("this", "other"):
    for config in ("C64", "C256"):
      pieces = result["median_s"][side][config]
      assert set(pieces) == {"train_step", "layer", "layer_forward", "attention", "mlp",
                             "layer_norm"}
      assert all(positive_finite(s) for s in pieces.values()), (side, config, pieces)
  ratios = result["ratio_this_over_other"]["C256"]
  assert all(math.isclose(ratios[p], result["median_s"]["this"]["C256"][p]
                          / result["median_s"]["other"]["C256"][p]) for p in ratios)
