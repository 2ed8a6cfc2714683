"""Adversarial Flow Models (farmer_jax/afm.py, SPEC sec. 7): every loss term against a hand
computation, the finite-difference R1 against autodiff, lambda_ot = 0, gradient normalisation,
the EMA, resume, sampling and config errors."""
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import signals
from configs import afm_digits, afm_farmer_latent
from farmer_jax import afm, config_check, rundir, sharding
from farmer_jax.models import afm_nets

A = ml_collections.ConfigDict(dict(r_fraction=0.25, r_eps=0.01, r_weight=0.25, center_weight=0.01,
                                   num_steps=100, lambda_ot_max=0.2, lambda_ot_min=0.005))
W = np.array([0.5, -1.0, 2.0, 0.25], np.float32)   # a linear toy D on [B, 2, 2, 1] images


def linear_d(x, labels):
  return x.reshape(x.shape[0], -1) @ W + 0.1 * labels


def softplus(v):
  return np.log1p(np.exp(v))


def images(seed, b=4):
  return np.asarray(jax.random.normal(jax.random.key(seed), (b, 2, 2, 1)))


def test_lambda_ot_cosine_schedule():
  lam = lambda s: float(afm.lambda_ot_schedule(A, jnp.float32(s)))
  np.testing.assert_allclose([lam(0), lam(50), lam(100), lam(200)],
                             [0.2, (0.2 + 0.005) / 2, 0.005, 0.005], rtol=1e-6)


def test_discriminator_loss_terms_hand_computed():
  x_real, x_fake, labels = images(0), images(1), np.array([0, 1, 2, 3], np.int32)
  key = jax.random.key(7)
  loss, parts = afm.discriminator_loss(linear_d, x_real, x_fake, labels, key, A)
  d = lambda x, y: x.reshape(len(x), -1) @ W + 0.1 * y
  real, fake = d(x_real, labels), d(x_fake, labels)
  # B = 4, r_fraction 0.25: one example each for R1 and R2, with the loss's own noise draw.
  nu = np.asarray(jax.random.normal(key, (2, 2, 2, 1)))
  r1 = ((real[0] - d(x_real[:1] + 0.01 * nu[:1], labels[:1])[0]) / 0.01) ** 2
  r2 = ((fake[0] - d(x_fake[:1] + 0.01 * nu[1:], labels[:1])[0]) / 0.01) ** 2
  # A linear D's finite difference is exact: (w . nu)^2.
  np.testing.assert_allclose([r1, r2], [(nu[0].ravel() @ W) ** 2, (nu[1].ravel() @ W) ** 2],
                             rtol=1e-3)
  adv = np.mean(softplus(-(real - fake)))
  center = np.mean((real + fake) ** 2)
  np.testing.assert_allclose(parts["d_adv"], adv, rtol=1e-5)
  np.testing.assert_allclose(parts["r1"], r1, rtol=1e-3)
  np.testing.assert_allclose(parts["r2"], r2, rtol=1e-3)
  np.testing.assert_allclose(parts["logit_center"], center, rtol=1e-5)
  np.testing.assert_allclose(loss, adv + 0.25 * (r1 + r2) + 0.01 * center, rtol=1e-3)


def test_generator_loss_terms_hand_computed():
  x_fake, eps, x_real = images(1), images(2), images(0)
  labels = np.array([3, 1, 0, 2], np.int32)
  loss, parts = afm.generator_loss(linear_d, x_fake, eps, x_real, labels, jnp.float32(0.2))
  d = lambda x: x.reshape(4, -1) @ W + 0.1 * labels
  adv = np.mean(softplus(-(d(x_fake) - d(x_real))))
  ot = np.mean(np.sum((x_fake - eps).reshape(4, -1) ** 2, axis=1) / 4)   # n = 4 values
  np.testing.assert_allclose([parts["g_adv"], parts["ot"], loss], [adv, ot, adv + 0.2 * ot],
                             rtol=1e-5)


def smooth_d(x, labels):
  """A nonlinear toy D: 4 -> 8 tanh units -> 1."""
  w1 = jax.random.normal(jax.random.key(11), (4, 8))
  return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ jnp.linspace(-1, 1, 8) + 0 * labels


def test_finite_difference_r1_matches_autodiff():
  x, y = images(3, b=1), np.zeros((1,), np.int32)
  grad = jax.grad(lambda v: smooth_d(v, y)[0])(x).ravel()
  nus = jax.random.normal(jax.random.key(5), (4096, 2, 2, 1))
  e = 1e-3
  fd = afm.finite_difference_penalty(smooth_d(x, y)[0],
                                     smooth_d(x + e * nus, np.zeros(4096, np.int32)), e)
  # For each nu: the squared directional derivative (grad . nu)^2 ...
  exact = (np.asarray(nus).reshape(4096, -1) @ np.asarray(grad)) ** 2
  np.testing.assert_allclose(fd, exact, rtol=0.05, atol=1e-3)
  # ... whose mean over nu ~ N(0, I) is the R1 penalty ||grad D(x)||^2.
  np.testing.assert_allclose(np.mean(fd), np.sum(np.asarray(grad) ** 2), rtol=0.1)


@pytest.fixture(scope="module")
def tiny_nets():
  config = afm_digits.get_config("tiny")
  net = afm_nets.NetConfig.from_config(config)
  gen, disc = afm_nets.Generator(net), afm_nets.Discriminator(net)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  y = jnp.array([0, 1, 2, 3])
  g_params = jax.jit(gen.init)(jax.random.key(1), x, y)["params"]
  # Perturb G's zero-initialised output layers, so that G depends on its parameters everywhere.
  g_params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape),
                          g_params)
  d_params = jax.jit(disc.init)(jax.random.key(3), x, y)["params"]
  return gen, disc, g_params, d_params, x, y


def test_lambda_ot_zero_removes_the_ot_term_from_the_gradient(tiny_nets):
  gen, disc, g_params, d_params, eps, y = tiny_nets
  x_real = jax.random.normal(jax.random.key(4), eps.shape)
  d_fn = lambda x, labels: disc.apply({"params": d_params}, x, labels)

  @jax.jit
  def grads(lam):
    return jax.grad(lambda p: afm.generator_loss(d_fn, gen.apply({"params": p}, eps, y), eps,
                                                 x_real, y, lam)[0])(g_params)

  def adversarial_only(p):
    x_fake = gen.apply({"params": p}, eps, y)
    logits = d_fn(jnp.concatenate([x_fake, x_real]), jnp.concatenate([y, y]))
    return jnp.mean(jax.nn.softplus(-(logits[:4] - logits[4:])))

  flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)])
  adv = flat(jax.jit(jax.grad(adversarial_only))(g_params))
  np.testing.assert_allclose(flat(grads(jnp.float32(0.0))), adv, rtol=1e-5, atol=1e-8)
  assert np.max(np.abs(flat(grads(jnp.float32(0.2))) - adv)) > 1e-3   # the term is there at 0.2


def test_gradient_normalisation_unit_rms_per_example():
  x = images(5)
  scale = jnp.array([1.0, 10.0, 100.0, 1e-3])[:, None, None, None]
  g = jax.grad(lambda v: jnp.sum(scale * afm.unit_rms_gradient(v) ** 2))(x)
  rms = np.sqrt(np.mean(np.asarray(g).reshape(4, -1) ** 2, axis=1))
  np.testing.assert_allclose(rms, 1 / 4, rtol=1e-5)
  np.testing.assert_array_equal(afm.unit_rms_gradient(x), x)


def tiny_config(**afm_fields):
  c = afm_digits.get_config("tiny")
  c.afm.update(afm_fields)
  return c


def one_step(devices):
  trainer = afm.AFMTrainer(tiny_config(), devices)
  batch = {"image": np.random.RandomState(0).randint(0, 17, (16, 8, 8, 1)).astype(np.uint8),
           "label": np.arange(16, dtype=np.int32) % 10}
  with jax.set_mesh(trainer.mesh):
    state = trainer.init()
    g0 = jax.device_get(state.g.params)
    new, scalars = trainer.step(state, sharding.to_global(batch, trainer.mesh, trainer.rules),
                                jax.random.key(0), trainer.target.params)
  return g0, jax.device_get(new), jax.device_get(scalars)


def test_one_step_ema_state_and_sharding():
  # One device: the AFM step runs sharded over the 8 test devices in the resume test and the AFM
  # latent test; the sharded-vs-one-device equality of a step is asserted for the FARMER and
  # distillation steps, which share the sharding code.
  g0, new, scalars = one_step(jax.devices()[:1])
  assert int(new.step) == int(new.g.step) == int(new.d.step) == 1
  assert int(new.nonfinite_step) == -1
  # EMA decay at step 0: min(ema_decay, (1 + 0) / (10 + 0)) = 0.1 (train.apply_gradients).
  for e, p0, p1 in zip(jax.tree.leaves(new.g.ema_params), jax.tree.leaves(g0),
                       jax.tree.leaves(new.g.params)):
    np.testing.assert_allclose(e, 0.1 * p0 + 0.9 * np.asarray(p1), rtol=1e-5, atol=1e-7)
  assert any(np.max(np.abs(np.asarray(p1) - p0)) > 0
             for p0, p1 in zip(jax.tree.leaves(g0), jax.tree.leaves(new.g.params)))
  for e, p in zip(jax.tree.leaves(new.d.ema_params), jax.tree.leaves(new.d.params)):
    np.testing.assert_array_equal(e, p)   # D keeps no average
  np.testing.assert_allclose(scalars["lambda_ot"], 0.2)
  assert np.isfinite(float(scalars["g_loss"])) and np.isfinite(float(scalars["d_loss"]))


def test_resume_reproduces_the_uninterrupted_run_and_samples(tmp_path, monkeypatch):
  """Ctrl-C (SIGINT) during step 2 saves step 2 and returns; the rerun ends as the uninterrupted
  run."""
  config = tiny_config()
  whole = afm.train_and_evaluate(config, str(tmp_path / "whole"))
  part_dir = str(tmp_path / "resumed")
  with monkeypatch.context() as m:
    signals.signal_at_batch(m, signal.SIGINT, at=1)
    first = afm.train_and_evaluate(config, part_dir)
  assert int(first.step) == 2
  assert rundir.Checkpointer(part_dir, read_only=True).all_steps() == [2]
  resumed = afm.train_and_evaluate(config, part_dir)
  assert int(resumed.step) == config.afm.num_steps
  for a, b in zip(jax.tree.leaves((whole.g, whole.d)), jax.tree.leaves((resumed.g, resumed.d))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert rundir.Checkpointer(part_dir, read_only=True).latest_step() == config.afm.num_steps
  npz = afm.sample_latest(config, part_dir)
  with np.load(npz) as f:
    assert f["images"].shape == (20, 8, 8, 1) and f["images"].max() < 17
    np.testing.assert_array_equal(f["labels"], np.repeat(np.arange(10), 2))
  assert os.path.exists(npz.replace(".npz", ".png"))


@pytest.mark.parametrize("field,value,match", [
    ("r_fraction", 0.0, "config.afm.r_fraction = 0.0"),
    ("width", 40, "config.afm.width = 40: must be a multiple of afm.head_dim"),
    ("lambda_ot_min", 0.5, "config.afm.lambda_ot_min"),
    ("patch_size", 3, "config.afm.patch_size = 3: must divide data.image_size"),
    ("num_steps", None, "config.afm.num_steps = None"),
    ("target", "voxels", "config.afm.target = 'voxels': must be one of"),
])
def test_config_errors_name_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    afm.AFMTrainer(tiny_config(**{field: value}))


def test_trainer_needs_phase_afm():
  c = tiny_config()
  c.phase = "train"
  with pytest.raises(ValueError, match="config.phase = 'train'"):
    afm.AFMTrainer(c)


def test_imagenet_latent_variant_is_afm_xl_sized():
  """configs/afm_farmer_latent.py:imagenet256_1p9b validates, and its G over FARMER-1.9B's 16x16
  grid of 128 informative channels has the size of AFM's XL (DiT-XL: 675M parameters)."""
  c = afm_farmer_latent.get_config("imagenet256_1p9b")
  config_check.validate(c)
  net = afm_nets.NetConfig.from_config(c, (16, 16, c.model.d_informative))
  assert net.num_tokens == 256 and net.token_dim == 128
  shapes = jax.eval_shape(lambda: afm_nets.Generator(net).init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 128)), jnp.zeros((1,), jnp.int32)))
  count = sum(x.size for x in jax.tree.leaves(shapes))
  assert 0.95 * 675e6 < count < 1.05 * 675e6, count
