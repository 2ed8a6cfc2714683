"""benchmarks/accelerator.py's smoke variant: it runs on CPU in one process, reports every figure
it promises, and imports neither TensorFlow, tensorflow-datasets nor clu (the GPU machines it is
meant for have none of them)."""
import json
import os
import subprocess
import sys

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
