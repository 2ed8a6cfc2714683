"""One-step distillation of the AF inverse (farmer_jax/distill.py, SPEC sec. 6): the student's
initialisation, the loss of Algorithm 2, a run that lowers it, resume, sampling, errors, sharding.
Also AFM on FARMER's latents (farmer_jax/afm_latent.py), which needs the same trained and
distilled workdir (kept in this file so that the workdir is trained once)."""
import json
import signal
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import signals
from configs import afm_farmer_latent, digits
from farmer_jax import (afm, afm_latent, config_check, distill, input_pipeline, modes, rundir,
                        sample, sharding, train)
from farmer_jax.models import farmer, flow


def tiny_distill(**distill_fields):
  c = digits.get_config("tiny,distill")
  c.distill.update(distill_fields)
  return c


# The teacher's step: configs/digits.py:tiny stopped one step early, which skips the final
# evaluation and sampling (their compilations are most of a tiny run's time).
TEACHER_STEP = digits.get_config("tiny").train.num_steps - 1


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A FARMER workdir trained with configs/digits.py:tiny (the teacher of every test here)."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  train.train_and_evaluate(digits.get_config("tiny"), workdir, stop_after_steps=TEACHER_STEP)
  return workdir


@pytest.fixture(scope="module")
def distilled(teacher_dir):
  """The tiny distillation run in the teacher's own workdir (student in <teacher>/distill)."""
  state = distill.distill_and_evaluate(tiny_distill(), teacher_dir)
  return teacher_dir, state


def perturbed(params, std: float, seed: int):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([p + std * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_blockwise_mse_hand_checked():
  # Teacher chain Z^0, Z^1, Z^2 (B = 1, N = 1, d = 2); the student chain is [Z~^1, Z~^0].
  teacher = [jnp.array([[[0.0, 0.0]]]), jnp.array([[[1.0, 1.0]]]), jnp.array([[[2.0, 2.0]]])]
  student = [jnp.array([[[1.0, 3.0]]]), jnp.array([[[1.0, -1.0]]])]
  loss, per_block = distill.blockwise_mse(student, teacher)
  # L_1 = mean((Z~^0 - Z^0)^2) = (1 + 1) / 2 = 1; L_2 = mean((Z~^1 - Z^1)^2) = (0 + 4) / 2 = 2.
  np.testing.assert_allclose(per_block, [1.0, 2.0])
  np.testing.assert_allclose(loss, 1.5)
  with pytest.raises(ValueError, match="student chain"):
    distill.blockwise_mse(student[:1], teacher)


def test_noisy_start_scale_is_uniform_per_example():
  z = jnp.ones((4096, 2, 3))
  z_tilde, s = distill.noisy_start(z, jax.random.key(0), 0.3)
  assert float(s.min()) >= 0.0 and float(s.max()) <= 0.3
  np.testing.assert_allclose(float(s.mean()), 0.15, atol=0.01)   # U(0, 0.3): mean 0.15
  # Each example's noise is s times a standard normal draw.
  eps = np.asarray((z_tilde - z) / s[:, None, None])
  np.testing.assert_allclose([eps.mean(), eps.std()], [0.0, 1.0], atol=0.02)


def test_chain_loss_equals_blocks_applied_one_by_one():
  """Algorithm 2's wiring by hand: teacher blocks f_1..f_n forward, the student g_n..g_1 each on
  the previous student output, L_t against the teacher's input of block t, averaged over t."""
  c = farmer.ModelConfig.from_config(digits.get_config("tiny"))
  teacher, student = farmer.make_flow(c), farmer.make_flow(c, causal=False)
  x = jax.random.normal(jax.random.key(1), (3, c.num_tokens, c.token_dim))
  labels = jnp.zeros((3,), jnp.int32)
  params = perturbed(teacher.init(jax.random.key(0), x, labels)["params"], 0.05, seed=2)
  student_params = perturbed(params, 0.05, seed=3)
  blocks = lambda causal: [flow.AffineBlock(c.token_dim, c.num_tokens, c.af_width, c.af_layers,
                                            flow.block_flips(t), head_dim=c.head_dim,
                                            causal=causal) for t in range(c.af_blocks)]
  chain = [np.asarray(x)]
  for t, block in enumerate(blocks(True)):
    chain.append(np.asarray(jax.jit(block.apply)({"params": params[f"block_{t}"]}, chain[-1])[0]))
  z_start = chain[-1] + 0.2 * np.asarray(jax.random.normal(jax.random.key(4), x.shape))
  expected, z = [], z_start
  for t, block in reversed(list(enumerate(blocks(False)))):
    invert = jax.jit(lambda p, z, block=block: block.apply(
        {"params": p}, z, method=flow.AffineBlock.student_inverse))
    z = np.asarray(invert(student_params[f"block_{t}"], z))
    expected.append(np.mean((z - chain[t]) ** 2))   # block t+1's student output vs Z^t
  teacher_chain = jax.jit(lambda p, x: teacher.apply({"params": p}, x, labels,
                                                     method=flow.Flow.forward_chain))(params, x)
  for got, want in zip(teacher_chain, chain):
    np.testing.assert_allclose(got, want, atol=1e-6)
  loss, per_block = jax.jit(lambda p, z, ch: distill.chain_loss(p, z, ch, labels,
                                                                student=student))(
      student_params, z_start, teacher_chain)
  np.testing.assert_allclose(per_block, expected[::-1], rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
  assert float(loss) > 0


def test_student_attention_is_bidirectional():
  c = farmer.ModelConfig.from_config(digits.get_config("tiny"))
  x = jax.random.normal(jax.random.key(1), (1, c.num_tokens, c.token_dim))
  block = lambda causal: flow.AffineBlock(c.token_dim, c.num_tokens, c.af_width, c.af_layers,
                                          False, head_dim=c.head_dim, causal=causal)
  params = perturbed(block(True).init(jax.random.key(0), x)["params"], 0.05, seed=1)

  def grad_first_token_wrt_last(causal):
    out = lambda x: block(causal).apply({"params": params}, x,
                                        method=flow.AffineBlock.student_inverse)[0, 0].sum()
    return float(jnp.abs(jax.jit(jax.grad(out))(x)[0, -2]).sum())

  assert grad_first_token_wrt_last(True) == 0.0     # the teacher's network: strictly causal
  assert grad_first_token_wrt_last(False) > 1e-6    # the student reads the whole sequence


def test_student_starts_as_the_teacher(teacher_dir):
  dist = distill.Distiller(tiny_distill())
  with jax.set_mesh(dist.mesh):
    teacher_state, info = distill.restore_teacher(tiny_distill(), teacher_dir, dist.trainer)
    teacher_flow = dist.trainer.eval_params(teacher_state)["flow"]
    state = dist.init(teacher_flow)
  assert info["step"] == TEACHER_STEP
  # Only the teacher's eval weights were read; they are the full checkpoint's.
  assert teacher_state.opt_state is None and int(teacher_state.step) == TEACHER_STEP
  full = rundir.Checkpointer(teacher_dir, read_only=True).restore(dist.trainer.abstract_state,
                                                                      TEACHER_STEP)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), teacher_flow,
               full.ema_params["flow"])
  assert int(state.step) == 0
  for got in (state.params, state.ema_params):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, teacher_flow)
  # The teacher trained: its AF heads are no longer the zero (identity) initialisation.
  assert float(jnp.abs(teacher_flow["block_0"]["head"]["kernel"]).max()) > 0


def test_distillation_lowers_loss_writes_outputs(distilled):
  workdir, state = distilled
  c = tiny_distill()
  out = str(rundir.RunDir(workdir).distill)
  assert int(state.step) == c.distill.num_steps
  with open(os.path.join(out, "teacher.json")) as f:
    assert json.load(f) == {"workdir": os.path.abspath(workdir), "step": TEACHER_STEP}
  log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
  assert [r["step"] for r in log] == list(range(5, c.distill.num_steps + 1, 5))
  assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in log)
  with open(os.path.join(out, "eval", "metrics.json")) as f:
    m = json.load(f)
  assert m["step"] == c.distill.num_steps and m["num_examples"] == 360
  assert m["decode_samples"] == c.distill.eval_samples
  assert 0 < m["decode_mae"] < 0.5 and m["mse_clean"] < m["mse_noisy"]
  for name in ("exact", "student"):
    assert os.path.exists(os.path.join(out, "eval", f"decode_{c.distill.num_steps}_{name}.png"))
  s = np.load(os.path.join(out, "samples", f"samples_{c.distill.num_steps}.npz"))
  assert s["images"].shape == (20, 8, 8, 1)

  # The same test-split losses (fixed keys) from the student at initialisation and now.
  dist = distill.Distiller(c)
  with jax.set_mesh(dist.mesh):
    teacher_state, _ = distill.restore_teacher(c, workdir, dist.trainer)
    teacher_flow = dist.trainer.eval_params(teacher_state)["flow"]
    before = dist.split_losses(dist.init(teacher_flow), teacher_flow)
    after = dist.split_losses(state, teacher_flow)
  np.testing.assert_allclose(after["mse_noisy"], m["mse_noisy"], rtol=1e-5)
  assert after["mse_noisy"] < 0.95 * before["mse_noisy"], (before, after)
  # The loss is on noisy inputs (Algorithm 2): 20 tiny steps need not lower the clean-input error
  # of a student that starts from the teacher, but it stays an order below the noisy one.
  assert after["mse_clean"] < 0.1 * after["mse_noisy"], (before, after)


def test_distillation_resumes_exactly(teacher_dir, distilled, tmp_path, monkeypatch):
  """SIGTERM during step 10 of 20 saves step 10 and returns; the rerun gives the same student as
  the uninterrupted run."""
  _, reference = distilled
  c = tiny_distill(teacher_workdir=teacher_dir)
  workdir = str(tmp_path)
  with monkeypatch.context() as m:
    signals.signal_at_batch(m, signal.SIGTERM, at=9)
    stopped = distill.distill_and_evaluate(c, workdir)
  assert int(stopped.step) == 10
  assert rundir.Checkpointer(str(rundir.RunDir(workdir).distill), read_only=True).all_steps() == [10]
  state = distill.distill_and_evaluate(c, workdir)
  assert int(state.step) == 20
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state.params, reference.params)
  # A student records its teacher: another teacher step is refused.
  with pytest.raises(ValueError, match="was distilled from"):
    distill.distill_and_evaluate(tiny_distill(teacher_workdir=teacher_dir, teacher_step=10),
                                 workdir)


def test_sample_mode_decodes_with_the_student(distilled):
  workdir, _ = distilled
  c = digits.get_config("tiny")
  student_npz = modes.sample(c, workdir)                # decoder "auto": student found
  assert os.path.basename(student_npz).startswith(f"samples_{TEACHER_STEP}_student_")
  c.sample.decoder = "exact"
  exact_npz = modes.sample(c, workdir)
  assert os.path.basename(exact_npz).startswith(f"samples_{TEACHER_STEP}_exact_")
  # The npz says what made it.
  info = json.loads(str(np.load(student_npz)["info"]))
  assert info["decoder"] == "student" and info["step"] == TEACHER_STEP
  assert info["sample"]["guidance"] == c.sample.guidance and info["seed"] == c.sample.seed
  student, exact = np.load(student_npz)["images"], np.load(exact_npz)["images"]
  # Same latents (same key) decoded two ways: close, and not the same function.
  diff = np.abs(student.astype(int) - exact.astype(int))
  assert diff.mean() < 1.0 and diff.max() > 0


def test_parallel_inverse_on_the_trained_model_and_the_student_start(distilled):
  """On the trained tiny teacher's prior latents: Jacobi and Gauss-Seidel-Jacobi at tolerance 0
  equal the sequential inverse to float32 round-off in at most N passes per block; with the same
  passes per block (1, 2, 3), starting each block from the distilled student's pass ends closer
  to the exact inverse than starting from z or from the block's own input. (Passes to a max-abs
  tolerance are a poorer measure on this 20-step model: they follow its worst pixels, where the
  20-step student is no better than z.)"""
  workdir, _ = distilled
  c = tiny_distill()
  dist, teacher_state, student_state, _ = distill.restore_student(c, workdir)
  model, params = dist.trainer.model, dist.trainer.eval_params(teacher_state)
  student_params = dist.student_params(student_state)
  labels = jnp.arange(20, dtype=jnp.int32) % 10
  n = model.config.num_tokens
  with jax.set_mesh(dist.mesh):
    z = jax.jit(lambda p, k: model.apply({"params": p}, k, labels,
                                         sample.sampler_config(c.sample),
                                         method=farmer.Farmer.sample_latents))(params, jax.random.key(0))
    seq = jax.jit(lambda p, z: model.apply({"params": p}, z, labels,
                                           method=farmer.Farmer.decode))(params, z)

    def parallel(spec):
      run = jax.jit(lambda p, sp, z: sample.decode_parallel(model, p, z, labels, spec,
                                                            dist.student, sp))
      images, passes = run(params, student_params, z)
      return images, np.asarray(passes)

    for spec in (flow.ParallelInverse("jacobi", init="student"),
                 flow.ParallelInverse("gs_jacobi", (4,), init="z")):
      images, passes = parallel(spec)
      assert float(jnp.max(jnp.abs(images - seq))) < 2e-5, spec
      assert passes.shape == (2,) and passes.max() <= n, (spec, passes)
    for tolerance in (1e-4, 1e-3):
      for init in ("z", "previous", "student"):
        images, passes = parallel(flow.ParallelInverse("jacobi", (1,), tolerance, 0, init))
        assert float(jnp.max(jnp.abs(images - seq))) < 10 * tolerance, (init, tolerance)
        assert passes.max() <= n, (init, tolerance, passes)
    for cap in (1, 2, 3):
      error = {}
      for init in ("z", "previous", "student"):
        images, passes = parallel(flow.ParallelInverse("jacobi", (1,), 0.0, cap, init))
        assert passes.tolist() == [cap, cap], (init, cap, passes)
        error[init] = float(jnp.mean(jnp.abs(images - seq)))
      assert error["student"] < 0.5 * error["z"], (cap, error)
      assert error["student"] < error["previous"], (cap, error)


def test_sample_mode_with_the_parallel_inverse(distilled):
  """--mode=sample with sample.inverse: "auto" no longer picks the student alone, the file tag
  and info name the inverse, jacobi_init='student' starts from the student, and the images are
  the exact decode's levels."""
  workdir, _ = distilled
  c = digits.get_config("tiny")
  c.sample.update(inverse="jacobi", jacobi_tolerance=0.0)
  jacobi_npz = modes.sample(c, workdir)
  assert os.path.basename(jacobi_npz).startswith(f"samples_{TEACHER_STEP}_jacobi_")
  c.sample.update(inverse="gs_jacobi", jacobi_segments="2", jacobi_tolerance=1e-3,
                  jacobi_init="student")
  gs_npz = modes.sample(c, workdir)
  assert os.path.basename(gs_npz).startswith(f"samples_{TEACHER_STEP}_gs_jacobi_")
  info = json.loads(str(np.load(gs_npz)["info"]))
  assert info["decoder"] == "gs_jacobi" and info["sample"]["jacobi_init"] == "student"
  c.sample.update(inverse="sequential", decoder="exact")
  exact = np.load(modes.sample(c, workdir))["images"].astype(int)
  for npz in (jacobi_npz, gs_npz):   # the same latents (same key), decoded to the same levels
    diff = np.abs(np.load(npz)["images"].astype(int) - exact)
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.99, npz


def test_clear_errors(teacher_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="no teacher checkpoint"):
    distill.distill_and_evaluate(tiny_distill(), str(tmp_path / "empty"))
  c = tiny_distill(teacher_workdir=teacher_dir)
  c.model.af_width = 64
  with pytest.raises(ValueError, match="config.model.af_width"):
    distill.distill_and_evaluate(c, str(tmp_path / "other"))
  with pytest.raises(FileNotFoundError, match="available"):
    distill.distill_and_evaluate(tiny_distill(teacher_workdir=teacher_dir, teacher_step=7),
                                 str(tmp_path / "other2"))
  c = digits.get_config("tiny")
  c.sample.decoder = "student"
  with pytest.raises(FileNotFoundError, match="no distilled student"):
    modes.sample(c, teacher_dir if not rundir.has_student(teacher_dir)
                 else str(tmp_path / "none"))
  with pytest.raises(ValueError, match="config.distill.noise_max"):
    config_check.validate(tiny_distill(noise_max=-1.0))
  with pytest.raises(ValueError, match="config.sample.decoder"):
    c.sample.decoder = "fast"
    config_check.validate(c)


def test_sharded_distill_step_matches_one_device(teacher_dir):
  """data 2 x fsdp 2 x tensor 2 against one device: the same losses and student parameters."""
  runs = {}
  for name, mesh, devices in (("one", dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                              ("sharded", dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])):
    c = tiny_distill()
    c.sharding.mesh = mesh
    dist = distill.Distiller(c, devices)
    with jax.set_mesh(dist.mesh):
      teacher_state, _ = distill.restore_teacher(c, teacher_dir, dist.trainer)
      teacher_flow = dist.trainer.eval_params(teacher_state)["flow"]
      state = dist.init(teacher_flow)
      batches = input_pipeline.train_iterator(c.data, global_batch_size=dist.batch_size, seed=0)
      losses = []
      for _ in range(2):
        state, scalars = dist.step(state, teacher_flow, dist.trainer.batch_to_global(next(batches)),
                                   jax.random.key(5))
        losses.append(float(scalars["loss"]))
    if name == "sharded":
      kernel = state.params["block_0"]["transformer"]["layer_0"]["mlp"]["up"]["kernel"]
      assert kernel.sharding.shard_shape(kernel.shape) != kernel.shape   # really split
    runs[name] = (losses, jax.device_get(state.params))
  np.testing.assert_allclose(runs["sharded"][0], runs["one"][0], rtol=1e-5)
  lr = tiny_distill().distill.learning_rate
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0.1 * lr),
               runs["sharded"][1], runs["one"][1])


# ------------------------------------------------------------------ AFM on FARMER's latents


def tiny_latent(**afm_fields):
  c = afm_farmer_latent.get_config("tiny")
  c.afm.update(afm_fields)
  return c


def test_afm_on_latents_trains_samples_guards_its_farmer_and_inverts(distilled, tmp_path):
  """A tiny AFM run on the distilled workdir's latents, its sample mode, the refusals, and the
  latent space: standardisation, grid layout and decode against encode."""
  workdir, _ = distilled
  out = str(tmp_path)
  c = tiny_latent(farmer_workdir=workdir)            # decoder auto: the student is there
  state = afm.train_and_evaluate(c, out)
  assert int(state.step) == c.afm.num_steps
  afm_dir = os.path.join(out, "afm")
  with open(os.path.join(afm_dir, "farmer.json")) as f:
    assert json.load(f)["decoder"] == "student"
  log = [json.loads(line) for line in open(os.path.join(afm_dir, "train_log.jsonl"))]
  assert [r["step"] for r in log] == [2, 4] and all(np.isfinite(r["g_loss"]) for r in log)
  student = np.load(os.path.join(afm_dir, "samples", "samples_4_student.npz"))
  assert student["images"].shape == (20, 8, 8, 1) and student["images"].std() > 0
  c.sample.decoder = "exact"   # the exact inverse decodes in the checks below
  # Refused before any weights are read:
  other_step = tiny_latent(farmer_workdir=workdir, farmer_step=10)
  other_step.sample.decoder = "exact"
  with pytest.raises(ValueError, match="trained on the latents of"):
    afm.train_and_evaluate(other_step, out)
  wider = tiny_latent(farmer_workdir=workdir, width=64)
  with pytest.raises(ValueError, match="config.afm.width = 64"):
    afm.train_and_evaluate(wider, out)
  with pytest.raises(ValueError, match="FARMER's token grid side"):
    config_check.validate(tiny_latent(patch_size=3))

  # The latent space itself, with the run's statistics (exact decoder).
  target = afm_latent.FarmerLatentTarget(c, out)
  assert target.shape == (4, 4, 2) and not target.use_student
  batch_size = c.afm.batch_size
  with jax.set_mesh(target.mesh):
    target.prepare(sharding.rules_from_config(c.sharding.rules), batch_size, c.seed, create=False)
    with open(os.path.join(afm_dir, "latent_stats.json")) as f:
      stats = json.load(f)
    assert stats["farmer"] == {"workdir": os.path.abspath(workdir), "step": TEACHER_STEP,
                               "decoder": "student"}
    assert stats["num_images"] == c.afm.stats_batches * batch_size
    # The statistics' own batches and keys, encoded: mean 0 and std 1 in every channel.
    data = input_pipeline.train_iterator(c.data, global_batch_size=batch_size, seed=c.seed + 7)
    encode = jax.jit(target.encode)
    batches = [next(data) for _ in range(c.afm.stats_batches)]
    xs = [encode(target.params, b, jax.random.fold_in(jax.random.key(c.seed + 7), i))
          for i, b in enumerate(batches)]
    flat = np.concatenate(xs).reshape(-1, 2)
    np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(flat.std(0), 1.0, atol=1e-4)
    assert np.abs(np.asarray(stats["mean"])).max() > 1e-3   # a real shift was removed
    # Decoding keeps z^I: the decoded images, encoded again (AF forward), give back G's input.
    labels = jnp.asarray(batches[0]["label"])
    images, passes = jax.jit(target.decode)(target.params, xs[0], labels, jax.random.key(4))
    assert passes.shape == (0,)   # the sequential inverse: no Jacobi passes
    z = target.model.apply({"params": target.params["farmer"]}, images, labels,
                           method=farmer.Farmer.encode)
    back = (afm_latent.to_grid(z[..., :2], 4) - target.params["mean"]) / target.params["std"]
    np.testing.assert_allclose(back, xs[0], atol=2e-3)
    # Token i of the natural order sits at grid row i // 4, column i % 4.
    np.testing.assert_array_equal(afm_latent.to_grid(z, 4)[:, 1, 2], z[:, 6])
    # The same decode by Jacobi started from the student (which loads it): the exact inverse at
    # tolerance 0, and the passes each AF block took.
    c.sample.update(inverse="jacobi", jacobi_init="student", jacobi_tolerance=0.0)
    jacobi = afm_latent.FarmerLatentTarget(c, out)
    assert jacobi.decoder == "jacobi" and "student" in jacobi.params and not jacobi.use_student
    jacobi.prepare(sharding.rules_from_config(c.sharding.rules), batch_size, c.seed, create=False)
    images_j, passes = jax.jit(jacobi.decode)(jacobi.params, xs[0], labels, jax.random.key(4))
    np.testing.assert_allclose(images_j, images, atol=2e-5)
    assert passes.shape == (2,) and 1 <= passes.min() and passes.max() <= 16, passes
