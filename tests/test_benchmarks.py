"""Smoke runs of benchmarks. accelerator.py: it runs on CPU in one process, reports every figure
it promises, and imports neither TensorFlow, tensorflow-datasets nor clu (the GPU machines it is
meant for have none of them). peer_tarflow.py: farmer_jax's side alone always; side by side with
PyTorch TARFlow where FARMER_TORCH_PYTHON (a Python with torch) and FARMER_TARFLOW (ml-tarflow's
transformer_flow.py) are set. gmm_baseline.py and the sample judge (digits_guidance.py, without a
model) on digits. machine_speed.py and input_pipeline.py (digits' training stream)."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
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


def load_benchmark(name: str):
  path = os.path.join(REPO, "benchmarks", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_gmm_baseline_pca_family_is_a_density_in_the_full_space(capsys):
  """One mixture component with the diagonal complement is the full-covariance Gaussian in any
  rotation: equal bits/dim for every k, which a missing Jacobian or a mis-scaled complement would
  break. Every row is reported and the best is the minimum."""
  gmm = load_benchmark("gmm_baseline")
  result = gmm.main(["--dataset=digits", "--components=1", "--pca_dims=5,30",
                     "--pca_components=1,2", "--reg_covar=1e-3"])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
  assert result["dataset"] == "digits" and result["num_levels"] == 17 and result["dims"] == 64
  (full,) = result["full"]
  assert len(result["pca"]) == 2 * 2 * 2
  for row in result["pca"]:
    assert math.isfinite(row["test_bpd"]) and math.isfinite(row["train_bpd"])
    if row["components"] == 1 and row["complement"] == "diagonal":
      assert abs(row["test_bpd"] - full["test_bpd"]) < 2e-4, (row, full)
  rows = [full, *result["pca"]]
  assert result["best"]["test_bpd"] == min(r["test_bpd"] for r in rows)
  assert result["best"]["test_bpd"] < math.log2(17)       # better than uniform over the levels


def test_judge_baseline_only_on_digits(tmp_path, capsys):
  """The sample judge without a model: the real test split scores the judge's accuracy and a
  distance to train near the floor; the per-class GMM samples are levels of the set and score high
  accuracy at a larger distance; uniform noise scores chance and a far larger distance. Over two
  seeds the GMM's figures are the means of two different draws."""
  judge = load_benchmark("digits_guidance")
  out_file = tmp_path / "judge.json"
  result = judge.main(["--baseline_only", "--per_class=20", "--seeds=2", f"--out={out_file}"])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
  assert json.loads(out_file.read_text()) == result
  assert result["dataset"] == "digits" and result["results"] == {} and result["step"] is None
  assert 0.5 < result["pca"]["explained_variance"] < 1.0
  test_ref, gmm_ref = result["references"]["test_split"], result["references"]["gmm_per_class"]
  assert test_ref["class_accuracy"] == round(result["judge_test_accuracy"], 4) > 0.95
  assert gmm_ref["class_accuracy"] > 0.9 and gmm_ref["num_images"] == 200
  assert result["seeds"] == 2 and len(gmm_ref["per_seed"]) == 2
  for f in ("class_accuracy", "pixel_fd", "pca_fd"):
    draws = [r[f] for r in gmm_ref["per_seed"]]
    assert gmm_ref[f] == pytest.approx(np.mean(draws), abs=1e-4), f
    assert gmm_ref[f + "_std"] == pytest.approx(np.std(draws), abs=1e-4), f
  assert gmm_ref["per_seed"][0]["pixel_fd"] != gmm_ref["per_seed"][1]["pixel_fd"]
  for fd in ("pixel_fd", "pca_fd"):
    assert 0 < test_ref[fd] < gmm_ref[fd], fd

  images, labels = judge.gmm_per_class_samples("digits", 7, 3)
  assert images.shape == (70, 8, 8, 1) and images.dtype == np.uint8 and images.max() <= 16
  assert np.array_equal(labels, np.repeat(np.arange(10), 7))
  j = judge.Judge("digits", 20)
  to_itself = j.distances(j.test)
  assert to_itself["pixel_fd"] < 1e-6 and to_itself["pca_fd"] < 1e-6
  assert to_itself["pixel_mean_term"] < 1e-6
  assert to_itself["pixel_variance"] == pytest.approx(np.trace(np.cov(j.test, rowvar=False)),
                                                      abs=1e-4)
  for r in (test_ref, gmm_ref):   # the FD is its mean term plus a non-negative covariance term
    assert 0 < r["pixel_mean_term"] <= r["pixel_fd"] and r["pixel_variance"] > 0
  noise = np.random.default_rng(0).integers(0, 17, (200, 8, 8, 1))
  noisy = j(noise, np.repeat(np.arange(10), 20))
  assert noisy["class_accuracy"] < 0.3
  assert noisy["pixel_fd"] > 10 * gmm_ref["pixel_fd"] and noisy["pca_fd"] > 10 * gmm_ref["pca_fd"]
  assert noisy["pixel_mean_term"] > 10 * gmm_ref["pixel_mean_term"]


def test_judge_settings_from_names_config_and_extra():
  judge = load_benchmark("digits_guidance")
  from configs import digits  # noqa: PLC0415
  from farmer_jax import sample  # noqa: PLC0415
  config = digits.get_config()
  extra = {"mine": {"guidance": "resample", "w": 2.0, "t_sigma": 0.9, "denoise": True}}
  settings = judge.sampler_settings(["resample_w3", "config", "mine"], extra, config)
  assert list(settings) == ["resample_w3", "config", "mine"]
  assert settings["resample_w3"] == (judge.SETTINGS["resample_w3"], False)
  assert settings["config"] == (sample.sampler_config(config.sample), config.sample.denoise)
  mine, denoise = settings["mine"]
  assert (mine.guidance, mine.w, mine.t_sigma, mine.t_s, denoise) == ("resample", 2.0, 0.9, 1.0,
                                                                      True)
  with pytest.raises(ValueError, match="unknown setting"):
    judge.sampler_settings(["no_such_setting"], {}, config)
  with pytest.raises(ValueError, match="w"):
    judge.sampler_settings(["bad"], {"bad": {"guidance": "resample", "w": -1.0}}, config)


def test_judge_rebuilds_the_model_a_workdir_recorded(tmp_path):
  """A run trained with overrides is judged with them: config.json's model, data and train fields
  win over --config's; the sampler and the fields it does not record (or does not know) stay
  --config's; no config.json, no change."""
  judge = load_benchmark("digits_guidance")
  from configs import digits  # noqa: PLC0415
  from farmer_jax import rundir  # noqa: PLC0415
  trained = digits.get_config()
  trained.model.d_informative = 4
  trained.sample.w = 5.0
  run = rundir.RunDir(str(tmp_path))
  rundir.check_config(trained, run)
  recorded = json.loads(run.config.read_text())
  del recorded["train"]["num_steps"]
  recorded["model"]["a_field_of_another_version"] = 1
  run.config.write_text(json.dumps(recorded))

  config = judge.with_recorded(digits.get_config("tiny"), str(tmp_path))
  assert config.model.d_informative == 4 and config.sample.w == digits.get_config("tiny").sample.w
  assert config.model.af_width == trained.model.af_width != digits.get_config("tiny").model.af_width
  assert config.train.num_steps == digits.get_config("tiny").train.num_steps
  assert "a_field_of_another_version" not in config.model
  untouched = judge.with_recorded(digits.get_config(), str(tmp_path / "no_run"))
  assert untouched.model.d_informative == digits.get_config().model.d_informative


def test_judge_samples_a_trained_workdir_over_seeds(tmp_path):
  """The judge samples a trained run's checkpoint: per seed its own key (different samples, hence
  different figures), the means and spreads over them, seed 0's grid in <workdir>/guidance."""
  judge = load_benchmark("digits_guidance")
  from configs import digits  # noqa: PLC0415
  from farmer_jax import train  # noqa: PLC0415
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(digits.get_config("tiny"), workdir, stop_after_steps=3)
  result = judge.main(["--config=configs/digits.py:tiny", f"--workdir={workdir}", "--per_class=3",
                       "--seeds=2", "--settings=unguided_T1_s1,config", "--gmm_components=0"])
  assert result["step"] == 3 and result["seeds"] == 2
  assert "gmm_per_class" not in result["references"]
  assert list(result["results"]) == ["unguided_T1_s1", "config"]
  for name, r in result["results"].items():
    assert r["num_images"] == 30 and len(r["per_seed"]) == 2, name
    assert r["per_seed"][0] != r["per_seed"][1], name
    for f in ("class_accuracy", "pixel_fd", "pca_fd"):
      assert r[f] == pytest.approx(np.mean([s[f] for s in r["per_seed"]]), abs=1e-4), (name, f)
    assert r["grid"] == os.path.join(workdir, "guidance", f"{name}.png"), name
    assert os.path.getsize(r["grid"]) > 0, name
  assert result["results"]["config"]["sampler"]["guidance"] == "resample"
  # A second judge of the same setting writes its grid beside the first one, not over it.
  first = open(result["results"]["config"]["grid"], "rb").read()
  again = judge.main(["--config=configs/digits.py:tiny", f"--workdir={workdir}", "--per_class=3",
                      "--settings=config", "--gmm_components=0"])
  assert again["results"]["config"]["grid"] == os.path.join(workdir, "guidance", "config-2.png")
  assert open(result["results"]["config"]["grid"], "rb").read() == first


def test_machine_speed_reports_the_median_and_best_matmul_rate(tmp_path, capsys):
  speed = load_benchmark("machine_speed")
  out_file = tmp_path / "speed.json"
  result = speed.main(["--size=256", "--repeats=3", f"--out={out_file}"])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
  assert json.loads(out_file.read_text()) == result
  assert len(result["per_call"]) == 3 and min(result["per_call"]) > 0
  assert result["matmul_gflops"] == pytest.approx(np.median(result["per_call"]), abs=0.06)
  assert result["matmul_gflops_best"] == max(result["per_call"]) >= result["matmul_gflops"]
  assert result["size"] == 256 and result["cores_allowed"] >= 1
  with pytest.raises(SystemExit) as e:
    speed.main(["--repeats=0"])
  assert e.value.code == 2
  with_jax = speed.main(["--size=128", "--repeats=2", "--jax"])
  assert set(with_jax["jax_matmul_gflops"]) == set(speed.JAX_PRODUCTS)
  assert min(with_jax["jax_matmul_gflops"].values()) > 0


def test_input_pipeline_benchmark_times_batches_across_epochs(tmp_path, capsys):
  bench = load_benchmark("input_pipeline")
  out_file = tmp_path / "pipeline.json"
  # digits:tiny at batch 24 (--set) of 1437 training images: 100 batches cross an epoch boundary.
  result = bench.main(["--config=configs/digits.py:tiny", "--set", "train.batch_size=24",
                       "--batches=100", f"--out={out_file}"])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
  assert json.loads(out_file.read_text()) == result
  assert result["dataset"] == "digits" and result["batch_shape"] == [24, 8, 8, 1]
  assert result["train_examples"] == 1437
  assert result["epochs_timed"] == pytest.approx(100 * 24 / 1437, abs=0.01)
  assert result["cpu_ms_per_batch"] > 0 and result["wall_ms_per_batch"] > 0
  assert result["batches_per_s"] == pytest.approx(1e3 / result["wall_ms_per_batch"], rel=0.05)
  with pytest.raises(SystemExit) as e:
    bench.main(["--config=configs/digits.py:tiny", "--batches=0"])
  assert e.value.code == 2
