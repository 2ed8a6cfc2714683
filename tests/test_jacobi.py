"""The parallel AF inverse (models/flow.py `inverse_parallel`, sample.inverse): Jacobi and
Gauss-Seidel-Jacobi against the sequential inverse, the iteration cap, the config's checks, and
the sharded sampler. The trained-model checks (equality, the student's start) are in
test_distill.py, which trains and distils the tiny digits model once."""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from farmer_jax import config_check, modes, sample, sharding, train
from farmer_jax.models import farmer, flow
from test_models import init_flow, make_flow, perturb

N = 10   # tokens: 3 and 4 segments do not divide it, so the last segment is padded


def inverses(f, params, z, labels, spec):
  seq = f.apply({"params": params}, z, labels, method=flow.Flow.inverse)
  par, passes = jax.jit(lambda p, z: f.apply({"params": p}, z, labels, spec,
                                             method=flow.Flow.inverse_parallel))(params, z)
  return seq, par, np.asarray(passes)


@pytest.mark.parametrize("start_token,num_classes", [(True, 0), (False, 0), (True, 5)])
@pytest.mark.parametrize("spec", [
    flow.ParallelInverse("jacobi"),
    flow.ParallelInverse("gs_jacobi", (3,), init="z"),
    flow.ParallelInverse("gs_jacobi", (4, 1, 2)),   # one count per block, block 0 first
    flow.ParallelInverse("strided", (3,)),
    flow.ParallelInverse("strided", (4, 1, 2), init="z"),
])
def test_zero_tolerance_equals_the_sequential_inverse(start_token, num_classes, spec):
  """Tolerance 0 runs every segment to its float32 fixed point: the sequential inverse to
  round-off, in at most N passes per block (N - 1 without a start token: token 0 is fixed)."""
  f = make_flow(start_token=start_token, num_classes=num_classes, num_tokens=N)
  labels = jnp.array([1, 4]) if num_classes else None
  params, x = init_flow(f, labels=labels)
  z, _ = f.apply({"params": params}, x, labels)
  seq, par, passes = inverses(f, params, z, labels, spec)
  assert float(jnp.max(jnp.abs(par - seq))) < 2e-5
  assert float(jnp.max(jnp.abs(par - x))) < 2e-5
  positions = N if start_token else N - 1
  assert passes.shape == (3,) and passes.min() >= 1 and passes.max() <= positions, passes
  assert float(jnp.max(jnp.abs(z - x))) > 1e-2   # the blocks really transform


def test_one_token_segments_are_the_sequential_inverse_itself():
  """N segments of one token: one pass each, the sequential inverse's own steps, to the bit."""
  f = make_flow(num_tokens=N)
  params, x = init_flow(f)
  z, _ = f.apply({"params": params}, x)
  seq, par, passes = inverses(f, params, z, None, flow.ParallelInverse("gs_jacobi", (N,), 0.5))
  np.testing.assert_array_equal(par, seq)
  np.testing.assert_array_equal(passes, [N] * 3)


@pytest.mark.parametrize("start_token", [True, False])
@pytest.mark.parametrize("tolerance", [0.0, 1e-3, 1e-1])
@pytest.mark.parametrize("cap", [0, 4])
def test_k_passes_make_the_first_k_tokens_exact_whatever_the_tolerance(start_token, tolerance,
                                                                        cap):
  """The triangular structure: after k passes of one block the tokens it emitted at positions < k
  are exact, from any start and whatever stopped it (tolerance or cap); at the cap of N passes the
  whole block is. Checked on one unflipped block, started from z."""
  f = make_flow(start_token=start_token, num_tokens=N, num_blocks=1)
  params, x = init_flow(f)
  z, _ = f.apply({"params": params}, x)
  spec = flow.ParallelInverse("jacobi", tolerance=tolerance, max_iterations=cap)
  seq, par, passes = inverses(f, params, z, None, spec)
  k = int(passes[0])
  first = 0 if start_token else 1
  positions = N - first
  assert 1 <= k <= (cap or positions)
  if tolerance == 0:
    assert k == (cap or positions)   # never stops early: the last token moves at the last pass
  exact = first + k                  # token 0 passes unchanged without a start token
  np.testing.assert_allclose(par[:, :exact], seq[:, :exact], atol=2e-5)
  if k == positions:
    np.testing.assert_allclose(par, seq, atol=2e-5)
  elif tolerance == 0:
    assert float(jnp.max(jnp.abs(par[:, exact:] - seq[:, exact:]))) > 1e-4   # the cap did stop it


@pytest.mark.parametrize("start_token", [True, False])
@pytest.mark.parametrize("cap", [1, 2])
def test_k_sweeps_make_the_first_k_runs_exact(start_token, cap):
  """Strided sweeps: a sweep decodes each run's own chain in order, so sweep k leaves runs < k
  exact whatever their reads across boundaries were; the runs after them are not yet (the cap
  stopped them). 3 runs of a 10-token block: 4, 4, 2 positions (3, 3, 3 without a start token)."""
  f = make_flow(start_token=start_token, num_tokens=N, num_blocks=1)
  params, x = init_flow(f)
  z, _ = f.apply({"params": params}, x)
  spec = flow.ParallelInverse("strided", (3,), tolerance=0.0, max_iterations=cap)
  seq, par, sweeps = inverses(f, params, z, None, spec)
  first = 0 if start_token else 1
  seg = -(-(N - first) // 3)
  np.testing.assert_array_equal(sweeps, [cap])
  exact = first + cap * seg
  np.testing.assert_allclose(par[:, :exact], seq[:, :exact], atol=2e-5)
  assert float(jnp.max(jnp.abs(par[:, exact:] - seq[:, exact:]))) > 1e-4


def test_strided_sweeps_are_bounded_by_the_run_count():
  """At tolerance 0 the sweeps stop at the run count, where they are exact; one run is the
  sequential inverse in one sweep (its steps are the sequential steps)."""
  f = make_flow(num_tokens=N, num_blocks=2)
  params, x = init_flow(f)
  z, _ = f.apply({"params": params}, x)
  for runs in (1, 2, 5, N):
    seq, par, sweeps = inverses(f, params, z, None, flow.ParallelInverse("strided", (runs,)))
    assert 1 <= sweeps.max() <= runs and sweeps.min() >= 1, (runs, sweeps)
    np.testing.assert_allclose(par, seq, atol=2e-5)
  _, _, sweeps = inverses(f, params, z, None, flow.ParallelInverse("strided", (1,)))
  np.testing.assert_array_equal(sweeps, [1, 1])


def test_strided_needs_fewer_sweeps_than_jacobi_passes():
  """At the same tolerance a strided sweep, which solves each run's chain, does the work of
  several Jacobi passes: fewer sweeps than passes, and as close to the sequential inverse."""
  f = make_flow(num_tokens=16, num_blocks=2, width=64, depth=2)
  params, x = init_flow(f)
  z, _ = f.apply({"params": params}, x)
  seq, jac, passes = inverses(f, params, z, None, flow.ParallelInverse("jacobi", tolerance=1e-3))
  _, strided, sweeps = inverses(f, params, z, None,
                                flow.ParallelInverse("strided", (4,), tolerance=1e-3))
  assert sweeps.sum() < passes.sum(), (sweeps, passes)
  assert float(jnp.max(jnp.abs(strided - seq))) < 1e-3


def test_looser_tolerance_takes_fewer_passes_and_stays_close():
  f = make_flow(num_tokens=N, num_blocks=2)
  params, x = init_flow(f)
  z, _ = f.apply({"params": params}, x)
  runs = {tol: inverses(f, params, z, None, flow.ParallelInverse("jacobi", tolerance=tol))
          for tol in (0.0, 1e-2)}
  (seq, exact, p_exact), (_, loose, p_loose) = runs[0.0], runs[1e-2]
  assert p_loose.sum() < p_exact.sum(), (p_loose, p_exact)
  assert float(jnp.max(jnp.abs(loose - seq))) < 0.1


def tiny_config(**sample_fields):
  c = digits.get_config("tiny")
  c.sample.update(sample_fields)
  return c


@pytest.mark.parametrize("fields,field", [
    (dict(inverse="newton"), "sample.inverse"),
    (dict(jacobi_tolerance=-1e-3), "sample.jacobi_tolerance"),
    (dict(jacobi_max_iterations=-2), "sample.jacobi_max_iterations"),
    (dict(jacobi_segments="0"), "sample.jacobi_segments"),
    (dict(jacobi_segments="17"), "sample.jacobi_segments"),      # 16 tokens
    (dict(jacobi_segments="4,4,4"), "sample.jacobi_segments"),   # 2 blocks in :tiny
    (dict(jacobi_segments="four"), "sample.jacobi_segments"),
    (dict(jacobi_init="zeros"), "sample.jacobi_init"),
    (dict(inverse="jacobi", decoder="student"), "sample.inverse"),
])
def test_bad_settings_name_their_field(fields, field):
  with pytest.raises(config_check.ConfigError, match=f"config.{field} ="):
    config_check.validate(tiny_config(**fields))


def test_a_student_start_without_a_student_says_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match="jacobi_init=previous"):
    modes.sample(tiny_config(inverse="jacobi", jacobi_init="student"), str(tmp_path))


def test_settings_parse_to_the_flow_spec():
  c = tiny_config(inverse="gs_jacobi", jacobi_segments="4,2", jacobi_tolerance=1e-4,
                  jacobi_max_iterations=3, jacobi_init="student")
  mc = config_check.validate(c)
  spec = sample.parallel_inverse(c.sample, mc)
  assert spec == flow.ParallelInverse("gs_jacobi", (4, 2), 1e-4, 3, "student")
  assert [spec.block_segments(t) for t in range(2)] == [4, 2]
  assert sample.wants_student(c.sample) and sample.decoder_name(True, spec) == "gs_jacobi"
  # jacobi is one segment per block; without a student the start falls back to the input.
  c.sample.inverse = "jacobi"
  spec = sample.parallel_inverse(c.sample, mc, has_student=False)
  assert spec.segments == (1,) and spec.init == "previous"
  c.sample.inverse = "strided"
  assert sample.parallel_inverse(c.sample, mc).segments == (4, 2)
  c.sample.inverse = "sequential"
  assert sample.parallel_inverse(c.sample, mc) is None and not sample.wants_student(c.sample)
  assert sample.decoder_name(False, None) == "exact" and sample.decoder_name(True, None) == "student"


@pytest.mark.parametrize("inverse", ["gs_jacobi", "strided"])
def test_sharded_parallel_sampler_equals_one_device(inverse):
  """The Jacobi sampler with the batch split over 8 devices (the convergence test is then a
  max over shards) draws and decodes what it does on one device, the same latents as the
  sequential sampler for the same key."""
  c = tiny_config(inverse=inverse, jacobi_segments="2", jacobi_tolerance=0.0, batch_size=8)
  c.model.update(af_width=64, prior_width=64, head_dim=32)
  mc = farmer.ModelConfig.from_config(c)
  model = farmer.Farmer(mc)
  images = jnp.zeros((1, 8, 8, 1))
  params = perturb(model.init(jax.random.key(0), images, jnp.zeros((1,), jnp.int32))["params"],
                   jax.random.key(1))
  spec = sample.parallel_inverse(c.sample, mc)
  labels = np.arange(8, dtype=np.int32)
  kwargs = dict(batch_size=8, sampler=sample.sampler_config(c.sample), progress=False,
                as_float=True)
  passes_one = []
  one = sample.generate(model, params, labels, jax.random.key(3), parallel=spec,
                        passes=passes_one, **kwargs)
  seq = sample.generate(model, params, labels, jax.random.key(3), **kwargs)
  trainer = train.Trainer(c)
  assert trainer.mesh.shape["data"] == 8
  passes_mesh = []
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    mesh = sample.generate(model, params, labels, jax.random.key(3), parallel=spec,
                           passes=passes_mesh, out_sharding=sharding.replicated(trainer.mesh),
                           **kwargs)
  # Shards of 1 image reduce in another order than a batch of 8: float32 rounding, carried through
  # the inverse's exponentiated scales, reaches 1.5e-5; a sharding error (a wrong shard or a
  # convergence test that is not the max over shards) moves values by orders more, or the passes.
  np.testing.assert_allclose(mesh, one, atol=1e-4)
  np.testing.assert_array_equal(passes_mesh, passes_one)
  np.testing.assert_allclose(one, seq, atol=1e-4)
  assert float(np.std(one)) > 0.05


def test_inverse_benchmark_reports_every_figure():
  """benchmarks/sampling.py --inverses on a 4-token model: every figure it documents, and the
  tolerance-0 variant on the sequential decode's levels."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
  import sampling  # noqa: PLC0415
  r = sampling.bench_inverses(4, 64, 2, [0.0], [], reps=2, budget_s=0.0, strided=[2])
  assert r["sequential_s_per_img"] > 0 and r["pass_s_per_img"] > 0 and r["break_even_passes"] > 0
  assert sorted(r["variants"]) == ["jacobi_tol0", "jacobi_z_tol0", "strided2_tol0"]
  for name, v in r["variants"].items():
    assert v["s_per_img"] > 0 and v["speedup"] > 0
    assert len(v["passes"]) == 4 and max(v["passes"]) <= (2 if v["method"] == "strided" else 4)
    # a strided sweep covers every token once, after one full pass
    assert v["work"] == [p + (v["method"] == "strided") for p in v["passes"]], name
    assert v["same_level_fraction"] == 1.0 and v["max_abs_diff"] < 1e-4
