"""Attention implementations (`model.attention`): `dot_product` (XLA's implementation on CPU) and
`splash` (the TPU kernel in Pallas' interpreter, and its fallback) compute what `einsum` (the
reference) computes, in the layer (forward and gradients; causal, bidirectional, KV-cached; float32
and bfloat16), sharded over a mesh, and in the whole model (loss, KV-cached sampler); the einsum's
blocked causal pass equals the dense square; `auto` follows the platform compiled for; and a
change of implementation is not a model change."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import jaxprs
from configs import digits
from farmer_jax import config_base, config_check, rundir, sample, sharding
from farmer_jax.models import farmer, layers

# splash at these lengths is its dot_product fallback; its kernel is tested at 128 / 256 below.
CPU_IMPLEMENTATIONS = ("dot_product", "splash", "auto")


def attention(impl, causal=True):
  return layers.Attention(width=64, head_dim=16, causal=causal, attention=impl)


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("causal", [True, False])
def test_layer_forward_and_gradients_equal_einsum(impl, causal):
  x = jax.random.normal(jax.random.key(0), (3, 10, 64))
  params = attention("einsum", causal).init(jax.random.key(1), x)["params"]

  def loss(p, x, impl):
    out, _ = attention(impl, causal).apply({"params": p}, x)
    return jnp.sum(jnp.sin(out)), out

  (ref, out_ref), grads_ref = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      params, x, "einsum")
  (got, out_got), grads_got = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      params, x, impl)
  np.testing.assert_allclose(out_got, out_ref, atol=1e-5)
  # The loss sums 1920 terms that agree to 1e-5 each; the float32 sum of -0.37 moves by 1.2e-5
  # between machines (their kernels sum in different orders), so it is compared in absolute terms.
  np.testing.assert_allclose(got, ref, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), grads_got, grads_ref)
  if causal:   # token 0 sees only itself: a change of the last token leaves it as it was
    moved = x.at[:, -1].add(1.0)
    out_moved, _ = attention(impl).apply({"params": params}, moved)
    np.testing.assert_allclose(out_moved[:, 0], out_got[:, 0], atol=1e-6)


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
def test_kv_cached_decoding_equals_einsum_and_the_full_pass(impl):
  """Chunks of 1, 3 and 6 tokens written into a preallocated cache at their positions, and one
  chunk of all 10 (the cache's whole length, at index 0)."""
  x = jax.random.normal(jax.random.key(2), (2, 10, 64))
  layer = attention("einsum")
  params = layer.init(jax.random.key(3), x)["params"]
  full, _ = layer.apply({"params": params}, x)
  zeros = jnp.zeros((2, 4, 10, 16))
  for name, sizes in (("einsum", (1, 3, 6)), (impl, (1, 3, 6)), (impl, (10,))):
    cache, outs, index = (zeros, zeros), [], 0
    for size in sizes:
      out, cache = attention(name).apply({"params": params}, x[:, index:index + size], cache,
                                         index)
      outs.append(out)
      index += size
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("impl", ("einsum",) + CPU_IMPLEMENTATIONS)
def test_decoding_at_an_array_of_positions(impl):
  """`index` as positions [T] (one per run, as strided sweeps decode): with the cache filled up
  to and including the largest position, queries at scattered positions give the full pass's rows
  there; decoding every position one run-step at a time in strided order (runs of 5 positions,
  step j decodes positions j and 5 + j) from an empty cache leaves the cache and the last run's
  outputs of the full pass, and an earlier cache entry left at zero changes the answer."""
  x = jax.random.normal(jax.random.key(4), (2, 10, 64))
  layer = attention(impl)
  params = attention("einsum").init(jax.random.key(5), x)["params"]
  full, _ = layer.apply({"params": params}, x)
  zeros = jnp.zeros((2, 4, 10, 16))
  _, filled = layer.apply({"params": params}, x, (zeros, zeros), 0)
  positions = jnp.array([7, 2, 9, 0])
  out, cache = layer.apply({"params": params}, x[:, positions], filled, positions)
  np.testing.assert_allclose(out, full[:, positions], atol=1e-5)
  np.testing.assert_allclose(cache[0], filled[0], atol=1e-6)

  cache, outs = (zeros, zeros), []
  for j in range(5):
    step = jnp.array([j, 5 + j])
    out, cache = layer.apply({"params": params}, x[:, step], cache, step)
    outs.append(out)
  np.testing.assert_allclose(cache[0], filled[0], atol=1e-6)
  np.testing.assert_allclose(cache[1], filled[1], atol=1e-6)
  first_run = jnp.stack([o[:, 0] for o in outs], axis=1)
  np.testing.assert_allclose(first_run, full[:, :5], atol=1e-5)   # it reads only its own run
  second_run = jnp.stack([o[:, 1] for o in outs], axis=1)          # it read zeros for run 0's
  assert float(jnp.max(jnp.abs(second_run[:, :4] - full[:, 5:9]))) > 1e-2  # later positions
  np.testing.assert_allclose(second_run[:, 4], full[:, 9], atol=1e-5)  # all written by then


def test_bfloat16_dot_product_agrees_with_einsum_to_bfloat16_precision():
  x = jax.random.normal(jax.random.key(8), (2, 12, 64))
  layer = lambda impl: layers.Attention(64, 16, True, jnp.bfloat16, impl)
  params = layer("einsum").init(jax.random.key(9), x)["params"]
  ref, _ = layer("einsum").apply({"params": params}, x)
  got, _ = layer("dot_product").apply({"params": params}, x)
  exact, _ = attention("einsum").apply({"params": params}, x)
  assert got.dtype == jnp.bfloat16
  # Both bfloat16 paths stay as close to the float32 result as bfloat16 allows, and to each other.
  for out in (ref, got):
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - exact))) < 0.1
  assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32)))) < 0.1


def qkv(seed, shape):
  return [jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(seed), 3)]


@pytest.mark.parametrize("causal,length", [(True, 256), (False, 256), (True, 150)])
def test_splash_kernel_forward_and_gradients_equal_einsum(causal, length):
  """The Pallas kernel itself (interpreted on CPU) at 256 tokens: two blocks of 128; a causal 150
  is padded to 256 at the end."""
  q, k, v = qkv(10, (2, 2, length, 64))
  pos = jnp.arange(length)

  def loss(q, k, v, impl):
    out = layers.attend(q, k, v, pos, causal, impl, jnp.float32)
    return jnp.sum(jnp.sin(out)), out

  grad = lambda impl: jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, impl)
  (ref, out_ref), grads_ref = grad("einsum")
  (got, out_got), grads_got = grad("splash")
  np.testing.assert_allclose(out_got, out_ref, atol=1e-5)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for a, b in zip(grads_got, grads_ref):
    np.testing.assert_allclose(a, b, atol=1e-4)
  if causal:   # the first query block does not see the second key block
    moved = layers.attend(q, k.at[:, :, 140].add(3.0), v, pos, True, "splash", jnp.float32)
    np.testing.assert_allclose(moved[:, :, :128], out_got[:, :, :128], atol=1e-6)
    assert float(jnp.max(jnp.abs(moved[:, :, 140:] - out_got[:, :, 140:]))) > 1e-3


def test_blocked_causal_einsum_equals_the_dense_square():
  """Query blocks against only their visible keys (a ragged last block: 150 = 2 x 64 + 22)."""
  q, k, v = qkv(11, (2, 3, 150, 16))
  pos = jnp.arange(150)
  dense = lambda q, k, v: layers._dense_core(q * 0.25, k, v, pos, True, jnp.float32)
  blocked = lambda q, k, v: layers.attend(q, k, v, pos, True, "einsum", jnp.float32)
  np.testing.assert_allclose(blocked(q, k, v), dense(q, k, v), atol=1e-6)
  g_ref = jax.grad(lambda *a: jnp.sum(jnp.sin(dense(*a))), argnums=(0, 1, 2))(q, k, v)
  g_got = jax.grad(lambda *a: jnp.sum(jnp.sin(blocked(*a))), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_splash_runs_per_shard_under_a_mesh():
  """Batch over data x fsdp, heads over tensor (the default rules): each device's kernel sees its
  own [b, h] block, and the result is the unsharded einsum's."""
  mesh, rules = sharding.mesh_and_rules(ml_collections.ConfigDict(
      {"mesh": {"data": 2, "fsdp": 2, "tensor": 2}, "rules": config_base.DEFAULT_RULES}))
  q, k, v = qkv(12, (4, 4, 128, 32))
  pos = jnp.arange(128)
  ref = layers.attend(q, k, v, pos, True, "einsum", jnp.float32)
  spec = sharding.logical_sharding(mesh, rules, (layers.ACT_BATCH, layers.ACT_HEADS))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    args = [jax.device_put(a, spec) for a in (q, k, v)]
    fn = jax.jit(lambda q, k, v: layers.attend(q, k, v, pos, True, "splash", jnp.float32))
    got = fn(*args)
    assert "shard_map" in str(fn.trace(*args).jaxpr)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_auto_follows_the_platform_and_bad_names_are_refused():
  assert layers.resolve_attention("auto") == "einsum"
  for platform, impl in (("gpu", "dot_product"), ("tpu", "splash"), ("cpu", "einsum")):
    with layers.compiling_for(platform):
      assert layers.resolve_attention("auto") == impl
  assert layers.resolve_attention("auto") == "einsum"
  c = digits.get_config("tiny")
  c.model.attention = "flash"
  with pytest.raises(config_check.ConfigError, match=r"config\.model\.attention = 'flash'"):
    config_check.validate(c)


@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
def test_the_model_loss_and_sampler_are_the_same_under_each(impl, tmp_path):
  c = digits.get_config("tiny")
  images = jax.random.uniform(jax.random.key(4), (4, 8, 8, 1), minval=-1.0, maxval=1.0)
  labels = jnp.arange(4) % 10
  ref_model = farmer.Farmer(config_check.validate(c))
  params = ref_model.init({"params": jax.random.key(5), "dropout": jax.random.key(6)}, images,
                          labels)["params"]
  params = jax.tree.map(lambda p: p + 0.02 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                        params)   # away from the identity initialisation of the AF heads
  c.model.attention = impl
  model = farmer.Farmer(config_check.validate(c))
  nll = lambda m: m.apply({"params": params}, images, labels)["nll"]
  np.testing.assert_allclose(nll(model), nll(ref_model), rtol=1e-5)
  draw = lambda m: sample.generate(m, params, np.arange(4, dtype=np.int32), jax.random.key(7),
                                   batch_size=4, progress=False, as_float=True)
  np.testing.assert_allclose(draw(model), draw(ref_model), atol=1e-4)
  # A workdir trained with einsum takes the other implementation: the same parameters.
  run = rundir.RunDir(tmp_path)
  rundir.check_config(digits.get_config("tiny"), run)
  rundir.check_config(c, run, record=False)


def test_the_model_loss_through_the_splash_kernel():
  """At 16x16 in patches of 2 the AF's causal pass (start token, 64 tokens, padded to one block
  of 128) runs the kernel, and so does the prior's (2 class tokens + 64, padded to 128). The
  loss and its gradients are einsum's."""
  c = digits.get_config("tiny")
  c.data.image_size = 16
  images = jax.random.uniform(jax.random.key(13), (2, 16, 16, 1), minval=-1.0, maxval=1.0)
  labels = jnp.array([3, 7])
  ref_model = farmer.Farmer(config_check.validate(c))
  params = ref_model.init({"params": jax.random.key(14), "dropout": jax.random.key(15)}, images,
                          labels)["params"]
  params = jax.tree.map(lambda p: p + 0.02 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                        params)
  c.model.attention = "splash"
  model = farmer.Farmer(config_check.validate(c))
  nll = lambda p, m: jnp.mean(m.apply({"params": p}, images, labels)["nll"])
  ref, g_ref = jax.value_and_grad(nll)(params, ref_model)
  got, g_got = jax.value_and_grad(nll)(params, model)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3), g_got, g_ref)
  jaxpr = str(jax.make_jaxpr(lambda p: nll(p, model))(params))
  assert "pallas_call" in jaxpr


@pytest.mark.parametrize("spec, a_shape, b_shape", [
    ("...k,kn->...n", (3, 5, 32), (32, 24)),          # Dense
    ("btw,chkw->cbhtk", (2, 6, 32), (3, 2, 16, 32)),   # the fused Q, K, V projection
    ("bhtk,hkw->btw", (2, 2, 6, 16), (2, 16, 32)),     # the output projection
    ("bhqk,bhsk->bhqs", (2, 2, 6, 16), (2, 2, 7, 16)),  # logits
    ("bhqs,bhsk->bhqk", (2, 2, 6, 7), (2, 2, 7, 16)),   # probabilities times values
])
def test_low_precision_products_accumulate_in_float32_forward_and_backward(spec, a_shape, b_shape):
  """einsum_f32 on bfloat16 operands: the product of the bfloat16 values accumulated in float32
  (as the float32 einsum of the same values), and gradients whose products take bfloat16
  operands too (what runs them on AMX on CPU) while matching the float32 gradients to bfloat16
  precision. Float32 operands are jnp.einsum exactly."""
  a = jax.random.normal(jax.random.key(0), a_shape)
  b = jax.random.normal(jax.random.key(1), b_shape)
  np.testing.assert_array_equal(layers.einsum_f32(spec, a, b), jnp.einsum(spec, a, b))
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  exact = jnp.einsum(spec, a16.astype(jnp.float32), b16.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  got = layers.einsum_f32(spec, a16, b16, jnp.float32)
  assert got.dtype == jnp.float32 and layers.einsum_f32(spec, a16, b16).dtype == jnp.bfloat16
  np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(jax.random.key(2), exact.shape)
  loss = lambda a, b, f: jnp.vdot(f(a, b), ct)
  grads = jax.grad(loss, argnums=(0, 1))(
      a16, b16, lambda a, b: layers.einsum_f32(spec, a, b, jnp.float32))
  want = jax.grad(loss, argnums=(0, 1))(
      a16.astype(jnp.float32), b16.astype(jnp.float32), lambda a, b: jnp.einsum(spec, a, b))
  for g, w, x in zip(grads, want, (a16, b16)):
    assert g.dtype == jnp.bfloat16 and g.shape == x.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2e-2, atol=2e-2 * float(
        jnp.abs(w).max()))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(
      a16, b16, lambda a, b: layers.einsum_f32(spec, a, b, jnp.float32))
  dots = [e for e in jaxprs.equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"
          and any(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
  assert len(dots) == 3   # the forward product and one per operand's gradient (the rest: vdot)
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  assert all(e.params["preferred_element_type"] == jnp.float32 for e in dots)


def test_dense_is_nn_dense_in_float32_and_adds_its_bias_in_float32():
  x = jax.random.normal(jax.random.key(0), (4, 5, 32))
  ours = layers.dense(24, (None, layers.EMBED), jnp.float32, "d",
                      bias_init=nn.initializers.normal(1.0))
  params = ours.init(jax.random.key(1), x)
  flax_dense = nn.Dense(24)
  assert jax.tree.map(jnp.shape, nn.unbox(params)) == jax.tree.map(
      jnp.shape, flax_dense.init(jax.random.key(1), x))
  np.testing.assert_allclose(ours.apply(params, x), flax_dense.apply(nn.unbox(params), x),
                             rtol=1e-6, atol=1e-6)
  b16 = layers.dense(24, (None, layers.EMBED), jnp.bfloat16, "d",
                     bias_init=nn.initializers.normal(1.0))
  out = b16.apply(params, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ours.apply(params, x), rtol=2e-2,
                             atol=5e-2)
  # A head (out_dtype float32) keeps the float32 accumulator: the exact product of the bfloat16
  # operands plus the float32 bias, not that sum rounded to bfloat16.
  head = layers.dense(24, (None, layers.EMBED), jnp.bfloat16, "d", out_dtype=jnp.float32)
  out = head.apply(params, x)
  p = nn.unbox(params)["params"]
  as_b16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
  exact = as_b16(x) @ as_b16(p["kernel"]) + np.asarray(p["bias"], np.float64)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)
  assert np.mean(np.asarray(out) != as_b16(out)) > 0.9      # not values bfloat16 can hold
