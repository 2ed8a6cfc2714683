"""launch/: the TPU and SLURM scripts parse, print and run the right commands (gcloud, srun and
scontrol replaced by recording fakes); the Colab notebook runs headless on CPU from top to bottom."""
import base64
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SCRIPT = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM_SCRIPT = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
NOTEBOOK = os.path.join(REPO, "launch", "colab.ipynb")


def pinned_jax_version() -> str:
  with open(os.path.join(REPO, "setup.py")) as f:
    return re.search(r'"jax==([^"]+)"', f.read()).group(1)


def fake_commands(tmp_path, names, body):
  """A bin dir whose `names` are shell scripts logging their argv (one JSON list a line) to
  <tmp>/calls.log, then running `body`; put first on PATH so the real tools are never reached."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  log = tmp_path / "calls.log"
  for name in names:
    path = bin_dir / name
    path.write_text(
        "#!/usr/bin/env bash\n"
        f'{sys.executable} -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' {name} "$@"'
        f" >> {shlex.quote(str(log))}\n" + body)
    path.chmod(0o755)
  return str(bin_dir), log


def logged_calls(log):
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# The scripts' settings: taken from the test, never from the environment pytest runs in.
SETTINGS = {"TPU_NAME", "ZONE", "WORKDIR", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROJECT", "CONFIG",
            "REPO_URL", "GIT_REF", "SPOT", "PREEMPTIBLE", "DETACH", "DRY_RUN", "REPO", "VENV", "PYTHON",
            "CUDA_EXTRA", "GPUS_PER_NODE"}


def script_env(env, path_first=None):
  full_env = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("SLURM_")}
  full_env.update(env)
  if path_first:
    full_env["PATH"] = path_first + os.pathsep + full_env["PATH"]
  return full_env


def run_script(script, env, *args, path_first=None):
  return subprocess.run(["bash", script, *args], env=script_env(env, path_first),
                        capture_output=True, text=True, timeout=60)


def command_value(argv):
  """The value of the --command=... word of a gcloud ssh argv."""
  return next(w.split("=", 1)[1] for w in argv if w.startswith("--command="))


# ---- both scripts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [TPU_SCRIPT, SLURM_SCRIPT])
def test_scripts_parse_and_print_usage(script):
  subprocess.run(["bash", "-n", script], check=True)
  out = subprocess.run(["bash", script, "-h"], capture_output=True, text=True, check=True).stdout
  assert "Usage:" in out and "DRY_RUN=1" in out and "resume" in out
  with open(script) as f:
    assert "set -euo pipefail" in f.read()


# ---- TPU pod --------------------------------------------------------------------------------------

TPU_ENV = {"TPU_NAME": "farmer-test", "ZONE": "us-east5-a", "PROJECT": "my-proj",
           "WORKDIR": "gs://bucket/farmer_run"}


def test_tpu_dry_run_prints_every_command_and_runs_none(tmp_path):
  bin_dir, log = fake_commands(tmp_path, ["gcloud"], "exit 97\n")
  r = run_script(TPU_SCRIPT, {**TPU_ENV, "DRY_RUN": "1"}, "--spot", "--type=v5p-512",
                 "--config=configs/imagenet256_1p9b.py:16", "--",
                 "--config.data.data_dir=gs://bucket/tfds", path_first=bin_dir)
  assert r.returncode == 0, r.stderr
  assert logged_calls(log) == []                        # nothing ran
  lines = [shlex.split(line) for line in r.stdout.splitlines()]
  gcloud = [argv for argv in lines if argv[0] == "gcloud"]
  verbs = [argv[4] for argv in gcloud]
  assert verbs == ["describe", "create", "scp", "ssh", "describe", "ssh"], verbs
  create = gcloud[1]
  for piece in ("farmer-test", "--zone=us-east5-a", "--project=my-proj", "--accelerator-type=v5p-512",
                "--version=v2-alpha-tpuv5", "--spot"):
    assert piece in create, (piece, create)
  install, train = command_value(gcloud[3]), command_value(gcloud[5])
  assert all("--worker=all" in argv for argv in (gcloud[2], gcloud[3], gcloud[5]))
  assert f'"jax[tpu]=={pinned_jax_version()}"' in install and "install" in install and "-e ." in install
  assert ("python -m farmer_jax.main --config=configs/imagenet256_1p9b.py:16 "
          "--workdir=gs://bucket/farmer_run --config.data.data_dir=gs://bucket/tfds") in train
  assert "JAX_COORDINATOR_ADDRESS=" in train           # what makes main.py start jax.distributed
  for remote in (install, train):                       # what the workers get is valid bash
    subprocess.run(["bash", "-n", "-c", remote], check=True)
  assert "resumes" in open(TPU_SCRIPT).read().split("set -euo pipefail")[0]


@pytest.mark.parametrize("args, env, message", [
    ([], {"WORKDIR": ""}, "WORKDIR"),
    ([], {"WORKDIR": "/local/dir"}, "gs://"),
    (["--config=configs/nope.py"], {}, "not found"),
    (["--bogus"], {}, "unknown argument"),
    (["--type=v9x-8"], {}, "RUNTIME_VERSION"),
])
def test_tpu_bad_arguments_fail_with_a_message(args, env, message):
  r = run_script(TPU_SCRIPT, {**TPU_ENV, "DRY_RUN": "1", **env}, *args)
  assert r.returncode == 2 and message in r.stderr and r.stdout == "", (r.stdout, r.stderr)


@pytest.mark.parametrize("state, expected_verbs", [
    ("", ["describe", "create", "scp", "ssh", "describe", "ssh"]),       # absent: create
    ("READY", ["describe", "scp", "ssh", "describe", "ssh"]),             # reuse
    ("PREEMPTED", ["describe", "delete", "create", "scp", "ssh", "describe", "ssh"]),
])
def test_tpu_real_run_against_fake_gcloud(tmp_path, state, expected_verbs):
  # The fake answers describe like gcloud: the state, worker 0's IP, or "not found" (exit 1).
  body = ('case "$*" in\n'
          f'  *"describe"*"value(state)"*) [ -n "{state}" ] && echo "{state}" || exit 1 ;;\n'
          '  *"describe"*"ipAddress"*) echo 10.1.2.3 ;;\n'
          f'  *" scp "*) cp "$5" {tmp_path}/shipped.tar.gz ;;\n'
          'esac\n')
  bin_dir, log = fake_commands(tmp_path, ["gcloud"], body)
  r = run_script(TPU_SCRIPT, {**TPU_ENV, "TMPDIR": str(tmp_path)}, path_first=bin_dir)
  assert r.returncode == 0, r.stderr
  calls = logged_calls(log)
  assert [argv[4] for argv in calls] == expected_verbs
  scp = calls[expected_verbs.index("scp")]
  tarball = scp[5]
  assert tarball.startswith(str(tmp_path)) and not os.path.exists(tarball)   # shipped, cleaned up
  with tarfile.open(tmp_path / "shipped.tar.gz") as tar:
    shipped = set(tar.getnames())
  # The working tree as it is: tracked files and new, not yet committed ones; no venv, no runs.
  assert {"setup.py", "farmer_jax/main.py", "configs/digits.py", "launch/tpu_pod.sh",
          "tests/test_launch.py"} <= shipped
  assert not [n for n in shipped if n.startswith((".venv/", "runs/", ".git/"))]
  train = command_value(calls[-1])
  assert "export JAX_COORDINATOR_ADDRESS=10.1.2.3:8482;" in train and "nohup " in train


def test_tpu_busy_guard_sees_a_run_but_not_itself(tmp_path):
  """The remote guard refuses while the launcher's `python -m farmer_jax.main` runs, and does not
  mistake its own bash command line (which names farmer_jax.main) for a run. (Only the launcher's
  venv counts, so other farmer_jax runs on this machine do not disturb the test.)"""
  r = run_script(TPU_SCRIPT, {**TPU_ENV, "DRY_RUN": "1"})
  install = command_value([argv for argv in map(shlex.split, r.stdout.splitlines())
                           if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]][0])
  guard = re.search(r"if pgrep .*? fi", install).group(0)
  assert subprocess.run(["bash", "-c", guard + "; echo free"], capture_output=True).returncode == 0
  pkg = tmp_path / "farmer_jax"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "main.py").write_text("import time\ntime.sleep(30)\n")
  (tmp_path / "farmer_venv").symlink_to(sys.prefix)   # as launched: ~/farmer_venv/bin/python
  busy = subprocess.Popen([str(tmp_path / "farmer_venv" / "bin" / "python"), "-m", "farmer_jax.main"],
                          cwd=tmp_path)
  try:
    time.sleep(0.5)
    r = subprocess.run(["bash", "-c", guard + "; echo free"], capture_output=True, text=True)
    assert r.returncode == 1 and "still running" in r.stderr
  finally:
    busy.kill()
    busy.wait()


def test_tpu_run_command_works_on_a_worker_and_reports_an_early_death(tmp_path):
  """The exact command the workers get, run here in a fake home whose ~/farmer_jax holds a
  farmer_jax.main that logs its arguments and fails at once: the arguments arrive intact (quoting)
  and the command fails showing the log, instead of reporting a started run."""
  extra = ["--config.sample.classes=3,5", "--config.note=it's a test"]
  r = run_script(TPU_SCRIPT, {**TPU_ENV, "DRY_RUN": "1"}, "--config=configs/digits.py:tiny", "--",
                 *extra)
  train = command_value(shlex.split(r.stdout.splitlines()[-1]))
  home = tmp_path / "home"
  (home / "farmer_jax" / "farmer_jax").mkdir(parents=True)
  (home / "farmer_jax" / "farmer_jax" / "__init__.py").write_text("")
  (home / "farmer_jax" / "farmer_jax" / "main.py").write_text(
      "import json, sys\nprint('ARGV', json.dumps(sys.argv[1:]))\nsys.exit('fake failure')\n")
  (home / "farmer_venv").symlink_to(sys.prefix)
  worker = subprocess.run(["bash", "-c", train], env={**os.environ, "HOME": str(home)},
                          capture_output=True, text=True, timeout=60)
  assert worker.returncode == 1
  assert "the run exited at once" in worker.stderr and "fake failure" in worker.stderr
  argv_line = next(l for l in (home / "farmer_jax_train.log").read_text().splitlines()
                   if l.startswith("ARGV "))
  assert json.loads(argv_line[5:]) == ["--config=configs/digits.py:tiny",
                                       "--workdir=gs://bucket/farmer_run", *extra]


# ---- SLURM ----------------------------------------------------------------------------------------

def test_slurm_script_header():
  with open(SLURM_SCRIPT) as f:
    sbatch = {line.split()[1].split("=")[0] for line in f if line.startswith("#SBATCH ")}
  assert {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--time", "--requeue"} <= sbatch


def test_slurm_dry_run_prints_install_and_srun(tmp_path):
  bin_dir, log = fake_commands(tmp_path, ["srun", "scontrol"], "exit 97\n")
  env = {"DRY_RUN": "1", "CONFIG": "configs/digits.py:tiny", "WORKDIR": "/shared/runs/farmer",
         "VENV": "/shared/venv", "SLURM_GPUS_ON_NODE": "4"}
  r = run_script(SLURM_SCRIPT, env, "--config.train.num_steps=7", path_first=bin_dir)
  assert r.returncode == 0, r.stderr
  assert logged_calls(log) == []
  lines = [shlex.split(line) for line in r.stdout.splitlines()]
  install = next(argv for argv in lines if argv[:3] == ["/shared/venv/bin/pip", "install", "-q"]
                 and "-e" in argv)
  assert install[-2:] == [REPO, f"jax[cuda12]=={pinned_jax_version()}"]
  assert ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"] in lines
  srun = lines[-1]
  assert srun[0] == "srun" and "--ntasks-per-node=1" in srun
  assert " ".join(srun).endswith(
      "/shared/venv/bin/python -m farmer_jax.main --config=configs/digits.py:tiny "
      "--workdir=/shared/runs/farmer --config.train.num_steps=7")


def install_stamp() -> str:
  """What slurm_gpu.sbatch writes into the venv after installing: a matching one skips the install."""
  with open(os.path.join(REPO, "setup.py"), "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  return f"jax[cuda12]=={pinned_jax_version()} {digest}\n"


def test_slurm_time_limit_signal_checkpoints_and_requeues(tmp_path):
  """Runs the batch script for real with fake srun/scontrol: USR1 (the --signal before the time
  limit) forwards SIGTERM to srun, then the job requeues itself."""
  venv = tmp_path / "venv"
  venv.mkdir()
  (venv / ".farmer_jax_installed").write_text(install_stamp())
  events = tmp_path / "events"
  body = ('if [ "$(basename "$0")" = srun ]; then\n'
          f'  echo "devices=$JAX_LOCAL_DEVICE_IDS" >> {events}\n'
          # a checkpoint takes a moment: the requeue must wait for it
          f'  trap \'kill $nap; echo TERM >> {events}; sleep 1; echo saved >> {events}; exit 0\' TERM\n'
          '  sleep 30 & nap=$!; wait $nap\n'
          f'else echo "$(basename "$0") $*" >> {events}\n'
          'fi\n')
  bin_dir, log = fake_commands(tmp_path, ["srun", "scontrol"], body)
  env = script_env({"SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "2", "SLURM_SUBMIT_DIR": REPO,
                    "VENV": str(venv), "WORKDIR": str(tmp_path / "w"), "CONFIG": "configs/digits.py"},
                   path_first=bin_dir)
  job = subprocess.Popen(["bash", SLURM_SCRIPT], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 20
    while not (events.exists() and "devices" in events.read_text()) and time.time() < deadline:
      time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=20)
  finally:
    job.kill()
  assert job.returncode == 0, err
  assert events.read_text().splitlines() == ["devices=0,1", "TERM", "saved", "scontrol requeue 4242"]
  calls = logged_calls(log)
  assert calls[0][0] == "srun" and calls[0][-2:] == ["--config=configs/digits.py",
                                                     f"--workdir={tmp_path / 'w'}"]
  assert calls[1] == ["scontrol", "requeue", "4242"]


def test_slurm_without_signal_passes_the_exit_status_and_does_not_requeue(tmp_path):
  venv = tmp_path / "venv"
  venv.mkdir()
  (venv / ".farmer_jax_installed").write_text(install_stamp())
  bin_dir, log = fake_commands(tmp_path, ["srun", "scontrol"], "exit 3\n")
  r = run_script(SLURM_SCRIPT, {"SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": REPO, "VENV": str(venv),
                                "WORKDIR": str(tmp_path / "w")}, path_first=bin_dir)
  assert r.returncode == 3
  assert [argv[0] for argv in logged_calls(log)] == ["srun"]   # no reinstall, no requeue


# ---- Colab notebook -------------------------------------------------------------------------------

NUM_STEPS = 4   # tiny config: one compilation each for train, eval and sampling dominates the time


def test_notebook_is_clean_nbformat4():
  nbformat = pytest.importorskip("nbformat", reason="nbformat not installed: pip install -e '.[test]'")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.outputs == [] and c.execution_count is None for c in code)
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1 and 'CONFIG = "configs/digits.py"' in tagged[0].source
  assert "NUM_STEPS = None" in tagged[0].source and "REPO_URL" in code[0].source


def test_notebook_runs_headless_on_cpu(tmp_path):
  nbformat = pytest.importorskip("nbformat", reason="nbformat not installed: pip install -e '.[test]'")
  nbclient = pytest.importorskip("nbclient", reason="nbclient not installed: pip install -e '.[test]'")
  if importlib.util.find_spec("ipykernel") is None:
    pytest.skip("ipykernel not installed: pip install -e '.[test]'")
  from jupyter_client import KernelManager
  from jupyter_client.kernelspec import KernelSpecManager

  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / "run"
  params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  params.source = (f'CONFIG = "configs/digits.py"; CONFIG_ARG = "tiny"; '
                   f"WORKDIR = {str(workdir)!r}; NUM_STEPS = {NUM_STEPS}")
  nb.cells.append(nbformat.v4.new_code_cell("import sys; print('PREFIX', sys.prefix)"))

  # A kernel spec running this interpreter, so the notebook sees this venv (not whatever
  # "python3" kernel is installed on the machine); CPU only, quiet TensorFlow.
  spec_dir = tmp_path / "kernels" / "farmer_test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "farmer_jax test", "language": "python",
      "env": {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}}))
  km = KernelManager(kernel_name="farmer_test",
                     kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir.parent)]))
  client = nbclient.NotebookClient(nb, km=km, timeout=300, allow_errors=False,
                                   resources={"metadata": {"path": REPO}})
  client.execute()   # raises CellExecutionError naming the cell if any cell fails

  def text_of(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  assert text_of(code[-1]).split() == ["PREFIX", sys.prefix]        # ran in this venv
  assert f"repository root: {REPO}" in text_of(code[0])               # install skipped, cwd = repo

  with open(workdir / "eval" / "metrics.json") as f:
    m = json.load(f)
  assert m["step"] == NUM_STEPS and m["split"] == "test" and math.isfinite(m["bpd"])
  assert 0.5 < m["bpd"] < 10.0
  train_log = next(text_of(c) for c in code if "train_and_evaluate" in c.source)
  assert f"step {NUM_STEPS}/{NUM_STEPS}" in train_log and "test bpd" in train_log   # logs visible
  assert f"test bits/dim {m['bpd']:.4f}" in "".join(text_of(c) for c in code)

  png = workdir / "samples" / f"samples_{NUM_STEPS}.png"
  shown = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(shown) == 1
  assert base64.b64decode(shown[0]["data"]["image/png"]) == png.read_bytes()
