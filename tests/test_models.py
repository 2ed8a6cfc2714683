"""Model math: identity at init, invertibility, causality, logdet, GMM densities, loss parts, bpd."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from farmer_jax.models import farmer, flow, gmm
import jaxprs


def tiny_config(**overrides) -> farmer.ModelConfig:
  base = dict(image_size=8, channels=1, num_classes=3, num_levels=17, patch_size=2, af_blocks=3,
              af_layers=1, af_width=64, prior_layers=1, prior_width=64, d_informative=2,
              class_repeat=2, k_informative=3, k_redundant=4)
  base.update(overrides)
  c = farmer.ModelConfig(**base)
  c.validate()
  return c


def perturb(params, key, std=0.05):
  """Adds noise to every parameter so that no block is the identity any more."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([p + std * jax.random.normal(k, p.shape, p.dtype)
                            for p, k in zip(leaves, keys)])


def make_flow(**kw):
  args = dict(token_dim=4, num_tokens=6, num_blocks=3, width=64, depth=1)
  args.update(kw)
  return flow.Flow(**args)


def init_flow(f, key=0, perturbed=True, batch=2, labels=None):
  x = jax.random.normal(jax.random.key(key + 100), (batch, f.num_tokens, f.token_dim))
  params = f.init(jax.random.key(key), x, labels)["params"]
  if perturbed:
    params = perturb(params, jax.random.key(key + 1))
  return params, x


def images_and_labels(c: farmer.ModelConfig, batch=3, key=0):
  x = jax.random.uniform(jax.random.key(key), (batch, c.image_size, c.image_size, c.channels),
                         minval=-1.0, maxval=1.0)
  return x, jnp.arange(batch, dtype=jnp.int32) % max(c.num_classes, 1)


# ------------------------------------------------------------------ patchify

def test_patchify_layout_and_roundtrip():
  img = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  x = farmer.patchify(img, 4)
  chex.assert_shape(x, (2, 4, 48))
  # Token 1 is the top-right patch, flattened (row, col, channel).
  np.testing.assert_array_equal(x[0, 1], img[0, 0:4, 4:8, :].reshape(-1))
  np.testing.assert_array_equal(farmer.unpatchify(x, 4, 8, 3), img)


# ------------------------------------------------------------------ flow

@pytest.mark.parametrize("start_token", [True, False])
def test_every_block_is_identity_at_init(start_token):
  f = make_flow(start_token=start_token, num_blocks=4)
  params, x = init_flow(f, perturbed=False)
  for t in range(f.num_blocks):
    z, logdet = f.apply({"params": params}, x, method=lambda m, x: m.blocks[t](x))
    np.testing.assert_array_equal(z, x)
    np.testing.assert_array_equal(logdet, 0.0)


@pytest.mark.parametrize("start_token,num_classes", [(True, 0), (False, 0), (True, 5)])
def test_inverse_reproduces_input_on_perturbed_flow(start_token, num_classes):
  f = make_flow(start_token=start_token, num_classes=num_classes)
  labels = jnp.array([1, 4]) if num_classes else None
  params, x = init_flow(f, labels=labels)
  z, logdet = f.apply({"params": params}, x, labels)
  assert float(jnp.max(jnp.abs(z - x))) > 1e-2, "perturbed flow should not be the identity"
  assert float(jnp.max(jnp.abs(logdet))) > 1e-3
  x_rec = f.apply({"params": params}, z, labels, method=flow.Flow.inverse)
  assert float(jnp.max(jnp.abs(x_rec - x))) < 1e-4


@pytest.mark.parametrize("start_token", [True, False])
def test_each_block_is_strictly_causal_in_its_processing_order(start_token):
  f = make_flow(start_token=start_token, num_blocks=2, num_tokens=5, token_dim=3)
  params, x = init_flow(f, batch=1)
  n, d = f.num_tokens, f.token_dim
  for t in range(2):
    block_fn = lambda v: f.apply({"params": params}, v.reshape(1, n, d),
                                 method=lambda m, x: m.blocks[t](x))[0].reshape(-1)
    jac = np.asarray(jax.jacfwd(block_fn)(x.reshape(-1))).reshape(n, d, n, d)
    order = np.arange(n)[::-1] if t % 2 else np.arange(n)   # block 1 processes reversed
    jac = jac[order][:, :, order]                           # rows/cols in processing order
    for i in range(n):
      for j in range(n):
        blk = jac[i, :, j, :]
        if j > i:
          np.testing.assert_array_equal(blk, 0.0, err_msg=f"block {t}: z_{i} depends on x_{j}")
        elif j == i:   # each token's own map is elementwise: a diagonal block
          np.testing.assert_allclose(blk - np.diag(np.diag(blk)), 0.0, atol=1e-7)
    # Not vacuous: some below-diagonal dependence exists.
    assert np.abs(jac[n - 1, :, 0, :]).max() > 1e-4


@pytest.mark.parametrize("start_token", [True, False])
def test_total_logdet_matches_slogdet_of_jacobian(start_token):
  f = make_flow(start_token=start_token, num_blocks=3, num_tokens=6, token_dim=4)
  params, x = init_flow(f, batch=1, key=3)
  n, d = f.num_tokens, f.token_dim
  fn = lambda v: f.apply({"params": params}, v.reshape(1, n, d))[0].reshape(-1)
  sign, expected = jnp.linalg.slogdet(jax.jacfwd(fn)(x.reshape(-1)))
  _, logdet = f.apply({"params": params}, x)
  assert float(sign) > 0
  assert abs(float(expected)) > 1e-2, "the test needs a non-volume-preserving flow"
  np.testing.assert_allclose(float(logdet[0]), float(expected), rtol=1e-3)


def test_soft_clip_bounds_log_scale():
  a = jnp.array([-100.0, -1.0, 0.0, 1e-3, 100.0])
  out = flow.soft_clip(a, 4.0)
  assert float(jnp.max(jnp.abs(out))) <= 4.0 and abs(float(out[1]) + math.tanh(0.25) * 4) < 1e-6
  np.testing.assert_allclose(out[3], 1e-3, rtol=1e-5)   # ~identity near 0
  np.testing.assert_array_equal(flow.soft_clip(a, 0.0), a)


def test_bfloat16_compute_keeps_float32_flow_math():
  f32, b16 = make_flow(), make_flow(dtype=jnp.bfloat16)
  params, x = init_flow(f32)
  z32, logdet32 = f32.apply({"params": params}, x)
  z, logdet = b16.apply({"params": params}, x)
  assert z.dtype == jnp.float32 and logdet.dtype == jnp.float32
  # Only the network is rounded to bf16; the affine step is float32, so z stays near the f32 result.
  np.testing.assert_allclose(z, z32, atol=0.05, rtol=0.05)
  np.testing.assert_allclose(logdet, logdet32, rtol=0.05, atol=0.05)
  # XLA may keep more precision inside fused loops than op by op, so the bf16 network's forward and
  # inverse differ at bf16 noise level; the reconstruction error is bounded by that, not exact.
  x_rec = b16.apply({"params": params}, z, method=flow.Flow.inverse)
  assert float(jnp.max(jnp.abs(x_rec - x))) < 0.1


# ------------------------------------------------------------------ GMM

def test_gmm_log_prob_matches_scipy():
  rng = np.random.default_rng(0)
  k, d, b = 5, 3, 7
  logits = rng.normal(size=(b, k)).astype(np.float32)
  means = rng.normal(size=(b, k, d)).astype(np.float32)
  scales = rng.uniform(0.3, 2.0, size=(b, k, d)).astype(np.float32)
  x = rng.normal(size=(b, d)).astype(np.float32)
  ours = np.asarray(gmm.log_prob(jnp.asarray(x), logits, means, scales))
  ref = np.empty(b)
  for n in range(b):
    comp = [stats.multivariate_normal(means[n, j].astype(np.float64),
                                      np.diag(scales[n, j].astype(np.float64) ** 2)).logpdf(x[n])
            for j in range(k)]
    ref[n] = special.logsumexp(np.array(comp) + logits[n] - special.logsumexp(logits[n]))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_gmm_unpack_squareplus_and_floor():
  k, d = 2, 3
  raw = jnp.concatenate([jnp.array([0.5, -0.5]), jnp.arange(6.0), jnp.array([-1e4] * 6)])
  logits, means, scales = gmm.unpack(raw, k, d, scale_floor=1e-6)
  chex.assert_shape([logits, means, scales], [(2,), (2, 3), (2, 3)])
  np.testing.assert_array_equal(means, jnp.arange(6.0).reshape(2, 3))
  assert float(jnp.min(scales)) >= np.float32(1e-6)   # squareplus(-1e4) underflows; the floor holds
  np.testing.assert_allclose(gmm.squareplus(jnp.array([0.0, 3.0])), [1.0, (3 + 13 ** 0.5) / 2])


def test_gmm_sample_temperature_and_scale_moments():
  logits = jnp.log(jnp.array([0.8, 0.2]))
  means = jnp.array([[-5.0], [5.0]])
  scales = jnp.array([[1.0], [1.0]])
  draw = lambda t, s: gmm.sample(jax.random.key(0), jnp.broadcast_to(logits, (20000, 2)),
                                 means, scales, temperature=t, scale=s)
  x = np.asarray(draw(1.0, 1.0))[:, 0]
  assert abs((x > 0).mean() - 0.2) < 0.02
  assert abs(x[x > 0].std() - 1.0) < 0.05
  hot = np.asarray(draw(100.0, 0.5))[:, 0]
  assert abs((hot > 0).mean() - 0.5) < 0.03          # T flattens the mixture weights
  assert abs(hot[hot > 0].std() - 0.5) < 0.03         # s shrinks the within-component spread


# ------------------------------------------------------------------ whole model

def test_loss_equals_sum_of_parts_and_bpd_formula():
  c = tiny_config()
  m = farmer.Farmer(c)
  x, y = images_and_labels(c)
  params = perturb(m.init(jax.random.key(0), x, y)["params"], jax.random.key(1))
  out = jax.jit(lambda p: m.apply({"params": p}, x, y))(params)
  np.testing.assert_allclose(out["nll"], out["nll_informative"] + out["nll_redundant"] - out["logdet"],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["bpd"], out["nll"] / math.log(2) + math.log2(17 / 2), rtol=1e-6)
  # Parts recomputed independently: flow logdet and prior terms, per dimension.
  z, logdet = jax.jit(lambda p: m.apply({"params": p}, farmer.patchify(x, 2), y,
                                        method=lambda mm, v, l: mm.flow(v, l)))(params)
  np.testing.assert_allclose(out["logdet"], logdet / c.num_dims, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out["z"], z, atol=1e-6)
  assert np.all(np.abs(np.asarray(out["nll_redundant"])) > 0)


def test_identity_flow_with_standard_normal_prior_gives_closed_form_bpd():
  for redundant_model in ("gmm", "normal"):
    c = tiny_config(redundant_model=redundant_model)
    m = farmer.Farmer(c)
    x, y = images_and_labels(c, batch=4)
    params = m.init(jax.random.key(0), x, y)["params"]   # flow: identity at init
    # Zero heads: logits 0, means 0, scales squareplus(0) = 1 -> every mixture is N(0, I).
    prior = dict(params["prior"])
    for head in ("head_informative", "head_redundant"):
      if head in prior:
        prior[head] = jax.tree.map(jnp.zeros_like, prior[head])
    params = {**params, "prior": prior}
    out = m.apply({"params": params}, x, y)
    xs = np.asarray(x, np.float64).reshape(4, -1)
    nll = 0.5 * np.mean(xs ** 2, axis=1) + 0.5 * math.log(2 * math.pi)
    expected = nll / math.log(2) + math.log2(c.num_levels / 2)
    np.testing.assert_allclose(out["bpd"], expected, rtol=1e-5)
    np.testing.assert_array_equal(out["logdet"], 0.0)


def test_prior_with_one_component_and_no_split_is_an_affine_af_block():
  """SPEC sec. 3 / paper sec. 9.1: K = 1, d_I = d -> log p(z) = log N(u; 0, I) + log|du/dz| with
  u_i = (z_i - mu(z_<i)) / sigma(z_<i), an autoregressive affine map."""
  c = tiny_config(k_informative=1, d_informative=4, af_blocks=0)
  m = farmer.Farmer(c)
  n, d = c.num_tokens, c.token_dim
  z = jax.random.normal(jax.random.key(5), (1, n, d))
  y = jnp.array([1])
  params = perturb(m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), y)["params"], jax.random.key(2))

  def as_flow(v):
    def inner(mm, z):
      logits, means, scales = mm.prior.informative_gmm(mm.prior.hidden(z, y)[:, :-1])
      return (z - means[:, :, 0]) / scales[:, :, 0]
    return m.apply({"params": params}, v.reshape(1, n, d), method=inner).reshape(-1)

  jac = np.asarray(jax.jacfwd(as_flow)(z.reshape(-1)), np.float64).reshape(n, d, n, d)
  for i in range(n):
    np.testing.assert_array_equal(jac[i, :, i + 1:, :], 0.0)   # autoregressive
  _, logabsdet = np.linalg.slogdet(jac.reshape(n * d, n * d))
  u = np.asarray(as_flow(z.reshape(-1)), np.float64)
  expected = stats.norm.logpdf(u).sum() + logabsdet
  log_p_inf, log_p_red = m.apply({"params": params}, z, y, method=lambda mm, z, y: mm.prior(z, y))
  np.testing.assert_allclose(float(log_p_inf[0]), expected, rtol=1e-4)
  assert float(log_p_red[0]) == 0.0


def test_prior_is_causal_and_redundant_head_sees_all_informative_tokens():
  c = tiny_config()
  m = farmer.Farmer(c)
  y = jnp.array([0])
  params = perturb(m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), y)["params"], jax.random.key(3))
  z = jax.random.normal(jax.random.key(1), (1, c.num_tokens, c.d_informative))
  hidden = lambda v: m.apply({"params": params}, v, y, method=lambda mm, v, y: mm.prior.hidden(v, y))
  h0, h1 = hidden(z), hidden(z.at[:, -1].add(1.0))
  chex.assert_shape(h0, (1, c.num_tokens + 1, c.prior_width))
  np.testing.assert_array_equal(h0[:, :-1], h1[:, :-1])      # G_1..G_N ignore the last token
  assert float(jnp.max(jnp.abs(h0[:, -1] - h1[:, -1]))) > 1e-4  # G_{N+1} sees it


@pytest.mark.parametrize("blocks,final_perm,expected", [(1, True, True), (2, True, False),
                                                         (3, True, True), (2, False, True),
                                                         (3, False, False)])
def test_final_permutation_reads_opposite_to_last_block(blocks, final_perm, expected):
  m = farmer.Farmer(tiny_config(af_blocks=blocks, final_permutation=final_perm))
  assert m.prior_reads_reversed == expected


def test_label_dropout_uses_null_class():
  c = tiny_config(label_dropout=0.5)
  m = farmer.Farmer(c)
  x, y = images_and_labels(c, batch=64)
  params = perturb(m.init(jax.random.key(0), x, y)["params"], jax.random.key(1))
  nll = jax.jit(lambda labels, train: m.apply({"params": params}, x, labels, train=train,
                                              rngs={"dropout": jax.random.key(2)})["nll"],
                static_argnums=1)
  null, cond, drop = nll(jnp.full_like(y, c.num_classes), False), nll(y, False), nll(y, True)
  is_null = np.isclose(drop, null, atol=1e-6)
  assert np.all(is_null | np.isclose(drop, cond, atol=1e-6))
  assert 16 < is_null.sum() < 48


def test_sample_shapes_range_and_decode_inverts():
  c = tiny_config()
  m = farmer.Farmer(c)
  x, y = images_and_labels(c)
  params = perturb(m.init(jax.random.key(0), x, y)["params"], jax.random.key(1))
  imgs = jax.jit(lambda k: m.apply({"params": params}, k, y, method=farmer.Farmer.sample))(
      jax.random.key(4))
  chex.assert_shape(imgs, x.shape)
  assert float(jnp.max(jnp.abs(imgs))) <= 1.0
  z = m.apply({"params": params}, x, y)["z"]
  np.testing.assert_allclose(m.apply({"params": params}, z, y, method=farmer.Farmer.decode), x,
                             atol=1e-4)


def test_bfloat16_networks_keep_the_flow_math_and_the_loss_in_float32():
  """model.dtype = bfloat16: in the model's forward pass the Transformers' matmuls take bfloat16
  inputs from float32 parameters, while the affine steps and logdet (z, logdet), the GMM
  log-probabilities and the loss stay float32; a real train step on it gives a finite float32
  loss."""
  from configs import digits  # noqa: PLC0415
  from farmer_jax import input_pipeline, train  # noqa: PLC0415
  c = digits.get_config("tiny")
  c.model.dtype = "bfloat16"
  trainer = train.Trainer(c, jax.devices()[:1])
  batch = next(input_pipeline.train_iterator(c.data, global_batch_size=c.train.batch_size,
                                             seed=0))
  x = train.dequantize(jnp.asarray(batch["image"]), 17, jax.random.key(0))
  with jax.set_mesh(trainer.mesh):
    state = trainer.init()
    apply = lambda p: trainer.model.apply({"params": p}, x, jnp.asarray(batch["label"]))
    out = apply(state.params)
    for name in ("nll", "bpd", "nll_informative", "nll_redundant", "logdet", "z"):
      assert out[name].dtype == jnp.float32, name
    in_dtypes = [v.aval.dtype for e in jaxprs.equations(jax.make_jaxpr(apply)(state.params).jaxpr)
                 if e.primitive.name == "dot_general" for v in e.invars]
    assert in_dtypes.count(jnp.bfloat16) > len(in_dtypes) // 2, in_dtypes
    # The gradient's products take bfloat16 operands as well (accumulating in float32), never a
    # float32 cotangent against a bfloat16 operand.
    grad_jaxpr = jax.make_jaxpr(jax.grad(lambda p: apply(p)["nll"].mean()))(state.params).jaxpr
    dots = [e for e in jaxprs.equations(grad_jaxpr) if e.primitive.name == "dot_general"]
    mixed = [e for e in dots if len({v.aval.dtype for v in e.invars}) > 1]
    low = [e for e in dots if e.invars[0].aval.dtype == jnp.bfloat16]
    forward_low = in_dtypes.count(jnp.bfloat16) // 2
    # The forward products again, and at least one gradient product for each.
    assert not mixed and len(low) >= 2 * forward_low, (len(mixed), len(low), forward_low)
    assert all(e.params["preferred_element_type"] == jnp.float32 for e in low)
    new, scalars = trainer.train_step(state, trainer.batch_to_global(batch), jax.random.key(1))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new.params))
  assert scalars["loss"].dtype == jnp.float32 and np.isfinite(float(scalars["loss"]))
