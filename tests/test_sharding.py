"""Sharded training on 8 fake CPU devices: meshes from the config, logical rules, fsdp/tensor
parallelism against one device, resharding restores, scanned and rematerialised layers, gradient
accumulation, and the plan's numbers."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from farmer_jax import config_check, input_pipeline, rundir, sharding, train
from farmer_jax.models import farmer


def small_config(**mesh):
  c = digits.get_config("tiny")
  # Widths that every mesh axis below divides, so that parameters really are split.
  c.model.update(af_width=64, prior_width=64, head_dim=32, label_dropout=0.0)
  c.train.update(batch_size=16, learning_rate=1e-3, warmup_steps=0, ema_decay=0.9)
  c.sharding.mesh = mesh or {"data": -1, "fsdp": 1, "tensor": 1}
  return c


def first_batch(c):
  return next(input_pipeline.train_iterator(c.data, global_batch_size=c.train.batch_size, seed=0))


def run_steps(c, devices, num_steps=2):
  """(losses, params as numpy, trainer) after num_steps train steps on `devices`."""
  trainer = train.Trainer(c, devices=devices)
  data = input_pipeline.train_iterator(c.data, global_batch_size=c.train.batch_size, seed=0)
  losses = []
  with jax.set_mesh(trainer.mesh):
    state = trainer.init()
    for _ in range(num_steps):
      state, scalars = trainer.train_step(state, trainer.batch_to_global(next(data)),
                                          jax.random.key(3))
      losses.append(float(scalars["loss"]))
  return losses, jax.device_get(state.params), trainer, state


def max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def assert_params_close(a, b, lr):
  diffs = np.concatenate([np.abs(np.asarray(x) - np.asarray(y)).ravel()
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])
  assert diffs.max() < 0.1 * lr, diffs.max()
  assert np.mean(diffs > 1e-6) < 1e-3, np.mean(diffs > 1e-6)


def test_mesh_shape_resolves_minus_one_and_rejects_bad_sizes():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2,
                                                                          "tensor": 2}
  with pytest.raises(ValueError, match="config.sharding.mesh"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="do not divide"):
    sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)
  with pytest.raises(ValueError, match="has 4 devices but there are 8"):
    sharding.mesh_shape({"data": 2, "fsdp": 2}, 8)


def test_bad_rules_and_batch_sizes_fail_naming_the_field():
  c = small_config(data=2, fsdp=2, tensor=2)
  c.sharding.rules = (("act_batch", ("data", "model")),)
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    train.Trainer(c)
  c = small_config(data=-1, fsdp=1, tensor=1)
  c.train.batch_size = 12      # 8 batch shards
  with pytest.raises(ValueError, match=r"config\.train\.batch_size = 12"):
    train.Trainer(c)
  c = small_config(data=-1, fsdp=1, tensor=1)
  c.train.grad_accum_steps = 4   # 16 / 4 = 4 rows per micro-batch < 8 shards
  with pytest.raises(ValueError, match="grad_accum_steps"):
    train.Trainer(c)


@pytest.fixture(scope="module")
def one_device_run():
  return run_steps(small_config(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@pytest.fixture(scope="module")
def mesh_run():
  return run_steps(small_config(data=2, fsdp=2, tensor=2), jax.devices())


def test_step_on_data_fsdp_tensor_mesh_equals_one_device(one_device_run, mesh_run):
  """Same losses and parameters after two AdamW steps.

  Tolerance: float32 sums run in a different order when split over devices, and Adam divides each
  gradient by its own magnitude, so a near-zero gradient component can move its update by a
  fraction of the learning rate. Hence: every parameter within 0.1 x lr, and 99.9% within 1e-6.
  """
  loss1, params1, _, _ = one_device_run
  loss8, params8, trainer, state = mesh_run
  assert trainer.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  assert loss8[1] != loss8[0]        # the parameters did move
  assert_params_close(params8, params1, trainer.config.train.learning_rate)
  # The MLP kernels really are split 4 ways (fsdp x tensor) across the 8 devices.
  up = state.params["prior"]["transformer"]["layer_0"]["mlp"]["up"]["kernel"]
  assert up.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert up.addressable_shards[0].data.shape == (32, 128)


def test_large_parameters_are_sharded_under_fsdp():
  """No parameter (or Adam moment) of 4096+ values is fully replicated on an 8-way fsdp mesh."""
  c = digits.get_config("default")
  c.sharding.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
  trainer = train.Trainer(c)        # abstract state only: nothing is allocated here
  state = trainer.abstract_state
  big = [(jax.tree_util.keystr(p), leaf) for p, leaf in
         jax.tree_util.tree_flatten_with_path((state.params, state.opt_state))[0]
         if leaf.size >= 4096]
  assert len(big) > 20
  replicated = [name for name, leaf in big if leaf.sharding.is_fully_replicated]
  assert not replicated, replicated
  per_device = sum(np.prod(leaf.sharding.shard_shape(leaf.shape)) for _, leaf in big)
  assert per_device * 8 == sum(leaf.size for _, leaf in big)


def test_checkpoint_from_one_mesh_restores_under_another(tmp_path, mesh_run):
  _, params_a, _, state_a = mesh_run
  ckpt = rundir.Checkpointer(str(tmp_path))
  ckpt.save(2, state_a)
  ckpt.close()

  trainer_b = train.Trainer(small_config(data=1, fsdp=4, tensor=2))
  restored = rundir.Checkpointer(str(tmp_path), read_only=True).restore(trainer_b.abstract_state)
  assert int(restored.step) == 2
  assert max_abs_diff(jax.device_get(restored.params), params_a) == 0.0
  assert max_abs_diff(jax.device_get(restored.opt_state), jax.device_get(state_a.opt_state)) == 0.0
  kernel = restored.params["flow"]["block_0"]["transformer"]["layer_0"]["mlp"]["up"]["kernel"]
  assert dict(kernel.sharding.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert kernel.addressable_shards[0].data.shape == (16, 128)


def test_gradient_accumulation_equals_the_full_batch(one_device_run):
  """4 micro-batches of 4 on a 2-device mesh against the whole batch of 16 on one device."""
  loss1, params1, _, _ = one_device_run
  c4 = small_config(data=2, fsdp=1, tensor=1)
  c4.train.grad_accum_steps = 4
  loss4, params4, _, _ = run_steps(c4, jax.devices()[:2])
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
  assert_params_close(params4, params1, c4.train.learning_rate)


def stack_layers(params):
  """Unscanned parameters (layer_0, layer_1, ...) -> the scanned layout (`layers`, stacked)."""
  if not isinstance(params, dict):
    return params
  keys = sorted(k for k in params if k.startswith("layer_"))
  out = {k: stack_layers(v) for k, v in params.items() if not k.startswith("layer_")}
  if keys:
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in keys])
  return out


def test_scanned_and_rematerialised_layers_compute_the_same_function():
  c = small_config()
  c.model.update(af_layers=2, prior_layers=2)
  mc = config_check.validate(c)
  batch = first_batch(c)
  x = train.dequantize(batch["image"], mc.num_levels, jax.random.key(0))
  plain = farmer.Farmer(mc)
  params = sharding.unbox(plain.init({"params": jax.random.key(1)}, x, batch["label"])["params"])
  # Non-zero AF heads, so that the flow is not the identity.
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(2), p.shape), params)

  def loss_and_grads(model, p):
    loss_fn = lambda p: jnp.mean(model.apply({"params": p}, x, batch["label"])["nll"])
    return jax.jit(jax.value_and_grad(loss_fn))(p)

  loss, grads = loss_and_grads(plain, params)
  # Scanned with a remat policy (the ImageNet configs' path); remat wraps the same layer class
  # with or without the scan.
  for scan, remat in ((True, "dots"),):
    variant = farmer.Farmer(dataclasses.replace(mc, scan_layers=scan, remat=remat))
    p = stack_layers(params) if scan else params
    loss_v, grads_v = loss_and_grads(variant, p)
    np.testing.assert_allclose(loss_v, loss, rtol=1e-6)
    assert max_abs_diff(grads_v, stack_layers(grads) if scan else grads) < 1e-5

  # KV-cached sampling with stacked caches draws the same images.
  scanned = farmer.Farmer(dataclasses.replace(mc, scan_layers=True))
  labels = jnp.arange(4) % 10
  draw = lambda model, p: jax.jit(lambda p: model.apply(
      {"params": p}, jax.random.key(5), labels, method=farmer.Farmer.sample))(p)
  a, b = draw(plain, params), draw(scanned, stack_layers(params))
  assert float(jnp.max(jnp.abs(a - b))) < 1e-4
