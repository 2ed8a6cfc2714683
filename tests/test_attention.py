"""Attention implementations (`model.attention`): `dot_product` (XLA's implementation on CPU)
computes what `einsum` (the reference) computes, in the layer (forward and gradients; causal,
bidirectional, KV-cached; float32 and bfloat16) and in the whole model (loss, KV-cached sampler);
`auto` is `einsum` on CPU; and a change of implementation is not a model change."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from farmer_jax import config_check, rundir, sample
from farmer_jax.models import farmer, layers

CPU_IMPLEMENTATIONS = ("dot_product", "auto")


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
  np.testing.assert_allclose(got, ref, rtol=1e-5)
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
  zeros = jnp.zeros((2, 10, 4, 16))
  for name, sizes in (("einsum", (1, 3, 6)), (impl, (1, 3, 6)), (impl, (10,))):
    cache, outs, index = (zeros, zeros), [], 0
    for size in sizes:
      out, cache = attention(name).apply({"params": params}, x[:, index:index + size], cache,
                                         index)
      outs.append(out)
      index += size
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


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


def test_auto_is_einsum_on_cpu_and_bad_names_are_refused():
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
