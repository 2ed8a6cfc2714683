"""Test setup: 8 fake CPU devices (before JAX initialises its backends), quiet TensorFlow, an empty
tfds data dir, and, since CPU compilation is most of the suite's time: one persistent compilation
cache for the session (many tests build the same tiny trainer), shared with the subprocesses tests
start, and cheaper XLA CPU compiles.

Every temporary file of the session (the compilation cache, the tfds data dirs, what libraries
and subprocesses put in the temp dir) lives in one directory that is removed when the session
ends: a run leaves nothing in /tmp but pytest's own tmp_path folders (kept for the last 3 runs).
"""
import atexit
import os
import shutil
import tempfile

if "FARMER_JAX_TEST_TMPDIR" not in os.environ:   # the session's first process (xdist: the
  # controller; its workers and subprocesses inherit the variables below).
  os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())   # tmp_path stays there
  _session_tmp = tempfile.mkdtemp(prefix="farmer_jax_tests_")
  atexit.register(shutil.rmtree, _session_tmp, ignore_errors=True)
  os.environ["FARMER_JAX_TEST_TMPDIR"] = os.environ["TMPDIR"] = tempfile.tempdir = _session_tmp
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_cache_")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The embedded data sets prepare themselves on first use in the tfds data dir: tests (and the
# subprocesses they start) get a fresh one, never the user's ~/tensorflow_datasets.
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="tfds_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Tests run tiny models: XLA's CPU compile time dominates, and skipping LLVM's costly optimisation
# passes cuts it by about 40% (measured on the tiny trainer) for slower but still short runs.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


# Test files, heaviest first by their summed durations on the 2-core CI machine. pytest.ini's
# --no-loadscope-reorder makes xdist hand whole files to the two workers in this order, so the long
# ones start first and the short ones fill the gaps (ordered by test count instead, a worker sat
# idle for about a minute at the end).
HEAVIEST_FIRST = ("test_train.py", "test_sharding.py", "test_distill.py", "test_models.py",
                  "test_multiprocess.py", "test_sampling.py", "test_remote_workdir.py",
                  "test_rundir.py", "test_benchmarks.py", "test_jacobi.py", "test_afm.py", "test_configs.py",
                  "test_attention.py", "test_fid.py",
                  "test_launch.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))
