"""Adversarial Flow Models (SPEC sec. 7): a one-step generator trained with a relativistic GAN loss
plus an optimal-transport term, no distillation.

    G(eps, c): eps ~ N(0, I) of the data's shape -> a sample, one pass
    D(x, c):   a logit per image (a CLS token read by a linear layer); D never sees eps

Both are transformers of equal size over patch tokens with adaLN class conditioning (every layer's
LayerNorm scale and shift and the residual gates come from the class embedding). Per step, G then
D are updated (alternating, one jitted step):

    G loss  softplus(-(D(G(eps)) - D(x)))  +  lambda_ot * mean_b ||G(eps) - eps||^2 / n
    D loss  softplus(-(D(x) - D(G(eps))))
            + r_weight * (mean R1 + mean R2),  R = ((D(y) - D(y + e * nu)) / e)^2, nu ~ N(0, I),
              on the first r_fraction of the batch, y = x (R1) and y = G(eps) (R2)
            + center_weight * mean (D(x) + D(G(eps)))^2

n is the number of values per sample; lambda_ot falls on a cosine from lambda_ot_max to
lambda_ot_min over the run; AdamW (0, 0.9), weight decay 0.01, constant lr 1e-4, G EMA (SPEC
sec. 7). The finite difference squared estimates (grad D . nu)^2, whose mean over nu is the R1/R2
penalty ||grad D||^2 without a double backward pass.

`afm.grad_norm` (ours, off by default; the AFM summary does not describe its sec. 3.4 scheme): the
gradient of the adversarial G loss at G's output is rescaled per example to unit RMS per value
(/ batch size, as a batch mean), so that its size does not follow D's logit scale; the OT term's
gradient is unchanged.

Target space (a): pixels of `config.data` in [-1, 1] (uniformly dequantised). The workdir holds
checkpoints/ (the AFMState), config.json, train_log.jsonl (g_loss, d_loss, their parts, lambda_ot,
grad norms, steps/s) and samples/samples_<step>.npz + .png from the G EMA every `afm.eval_every`
steps and at the end (`config.sample.per_class` images of each class; benchmarks/afm_digits.py
judges them). Entry: `train_and_evaluate(config, workdir)` with `config.phase = "afm"`.
"""
import functools

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from farmer_jax import config_check, preemption, rundir, sample, sharding, train
from farmer_jax.models import layers
from farmer_jax.models.afm_nets import Discriminator, Generator, NetConfig

TrainState = train.TrainState


# ---------------------------------------------------------------------------------------------
# Losses (pure functions of a discriminator `d_fn(x, labels) -> logits [B]`).
# ---------------------------------------------------------------------------------------------


def lambda_ot_schedule(a: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """Cosine from `lambda_ot_max` at step 0 to `lambda_ot_min` at `num_steps` (SPEC sec. 7)."""
  frac = jnp.clip(step / a.num_steps, 0.0, 1.0)
  return a.lambda_ot_min + (a.lambda_ot_max - a.lambda_ot_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def relativistic(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
  """softplus(-(a - b)) per example: the loss of the side that wants a above b."""
  return jax.nn.softplus(-(logits_a - logits_b))


def transport_cost(x_fake: jax.Array, eps: jax.Array) -> jax.Array:
  """||G(eps) - eps||^2 / n per example [B], n the values per sample."""
  return jnp.mean(jnp.square(x_fake - eps).reshape(x_fake.shape[0], -1), axis=1)


def num_penalised(batch: int, r_fraction: float) -> int:
  return max(1, int(round(r_fraction * batch)))


def finite_difference_penalty(logits_y: jax.Array, logits_perturbed: jax.Array,
                              e: float) -> jax.Array:
  """((D(y) - D(y + e * nu)) / e)^2 per example."""
  return jnp.square((logits_y - logits_perturbed) / e)


@jax.custom_vjp
def unit_rms_gradient(x_BxHxWxC: jax.Array) -> jax.Array:
  """Identity whose backward pass rescales each example's cotangent to unit RMS / batch size."""
  return x_BxHxWxC


def _unit_rms_fwd(x):
  return x, None


def _unit_rms_bwd(_, g):
  rms = jnp.sqrt(jnp.mean(jnp.square(g).reshape(g.shape[0], -1), axis=1) + 1e-20)
  return (g / (rms.reshape((-1,) + (1,) * (g.ndim - 1)) * g.shape[0]),)


unit_rms_gradient.defvjp(_unit_rms_fwd, _unit_rms_bwd)


def generator_loss(d_fn, x_fake: jax.Array, eps: jax.Array, x_real: jax.Array,
                   labels_B: jax.Array, lambda_ot: jax.Array, grad_norm: bool = False):
  """-> (loss, parts): mean relativistic loss of the fakes against the reals + lambda_ot * OT."""
  b = x_fake.shape[0]
  adv_in = unit_rms_gradient(x_fake) if grad_norm else x_fake
  logits = d_fn(jnp.concatenate([adv_in, jax.lax.stop_gradient(x_real)]),
                jnp.concatenate([labels_B, labels_B]))
  adv = jnp.mean(relativistic(logits[:b], logits[b:]))
  ot = jnp.mean(transport_cost(x_fake, eps))
  return adv + lambda_ot * ot, {"g_adv": adv, "ot": ot}


def discriminator_loss(d_fn, x_real: jax.Array, x_fake: jax.Array, labels_B: jax.Array,
                       key: jax.Array, a: ml_collections.ConfigDict):
  """-> (loss, parts). One D call on [reals, fakes, perturbed reals, perturbed fakes]."""
  b = x_real.shape[0]
  k = num_penalised(b, a.r_fraction)
  nu = jax.random.normal(key, (2 * k,) + x_real.shape[1:], x_real.dtype)
  perturbed = jnp.concatenate([x_real[:k], x_fake[:k]]) + a.r_eps * nu
  logits = d_fn(jnp.concatenate([x_real, x_fake, perturbed]),
                jnp.concatenate([labels_B, labels_B, labels_B[:k], labels_B[:k]]))
  real, fake, pert = logits[:b], logits[b:2 * b], logits[2 * b:]
  adv = jnp.mean(relativistic(real, fake))
  r1 = jnp.mean(finite_difference_penalty(real[:k], pert[:k], a.r_eps))
  r2 = jnp.mean(finite_difference_penalty(fake[:k], pert[k:], a.r_eps))
  center = jnp.mean(jnp.square(real + fake))
  loss = adv + a.r_weight * (r1 + r2) + a.center_weight * center
  return loss, {"d_adv": adv, "r1": r1, "r2": r2, "logit_center": center,
                "logit_real": jnp.mean(real), "logit_fake": jnp.mean(fake)}


# ---------------------------------------------------------------------------------------------
# State and step.
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class AFMState:
  """G and D each a `train.TrainState` (params, EMA, AdamW state, non-finite guard), so that both
  go through `train.apply_gradients`; D's EMA is kept equal to its params (decay 0)."""
  step: jax.Array
  g: TrainState
  d: TrainState
  nonfinite_step: jax.Array   # the first of g's and d's (-1: none), what `train.run_steps` reads


def init_state(gen: Generator, disc: Discriminator, tx, seed: int,
               boxed: bool = False) -> AFMState:
  n = gen.net
  x = jnp.zeros((1, n.image_size, n.image_size, n.channels), jnp.float32)
  y = jnp.zeros((1,), jnp.int32)
  k_g, k_d = jax.random.split(jax.random.key(seed))
  g_params, d_params = gen.init(k_g, x, y)["params"], disc.init(k_d, x, y)["params"]
  if not boxed:
    g_params, d_params = sharding.unbox(g_params), sharding.unbox(d_params)
  return AFMState(step=jnp.int32(0), g=TrainState.create(g_params, tx), d=TrainState.create(d_params, tx),
                  nonfinite_step=jnp.int32(-1))


def without_ema(a: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """D's optimiser section: config.afm with ema_decay 0."""
  section = ml_collections.ConfigDict(a.to_dict())
  section.ema_decay = 0.0
  return section


class PixelTarget:
  """Target space (a): the images of config.data in [-1, 1], uniformly dequantised."""
  name = "pixels"
  params = None               # nothing frozen to pass to the jitted functions
  param_shardings = None
  flops_per_example = 0.0

  def __init__(self, config: ml_collections.ConfigDict):
    data = config.data
    self.shape = (data.image_size, data.image_size, data.channels)
    self.num_levels = data.num_levels
    self.use_student = False

  def encode(self, params, batch: dict, key: jax.Array) -> jax.Array:
    return train.dequantize(batch["image"], self.num_levels, key)

  def decode(self, params, x: jax.Array, labels_B: jax.Array, key: jax.Array):
    """-> (x, no AF passes [0]): the pixels are the images."""
    return x, jnp.zeros((0,), jnp.int32)


def afm_step(state: AFMState, batch: dict, base_key: jax.Array, target_params=None, *,
             gen: Generator, disc: Discriminator, tx, a: ml_collections.ConfigDict,
             a_d: ml_collections.ConfigDict, target):
  """G update against the current D, then D update against the new G's samples (same eps).
  `target.encode(target_params, batch, key)` gives the reals (pixels, or FARMER's z^I)."""
  k_deq, k_eps, k_r = jax.random.split(jax.random.fold_in(base_key, state.step), 3)
  x_real = target.encode(target_params, batch, k_deq)
  labels = batch["label"]
  eps = jax.random.normal(k_eps, x_real.shape, jnp.float32)
  lambda_ot = lambda_ot_schedule(a, state.step)
  d_fn = lambda d_params: lambda x, y: disc.apply({"params": d_params}, x, y)

  def g_loss_fn(g_params):
    x_fake = gen.apply({"params": g_params}, eps, labels)
    return generator_loss(d_fn(state.d.params), x_fake, eps, x_real, labels, lambda_ot,
                          a.grad_norm)

  (g_loss, g_parts), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(state.g.params)
  g, g_scalars = train.apply_gradients(state.g, g_grads, g_loss, tx=tx, t=a)
  x_fake = jax.lax.stop_gradient(gen.apply({"params": g.params}, eps, labels))
  (d_loss, d_parts), d_grads = jax.value_and_grad(
      lambda p: discriminator_loss(d_fn(p), x_real, x_fake, labels, k_r, a), has_aux=True)(
          state.d.params)
  d, d_scalars = train.apply_gradients(state.d, d_grads, d_loss, tx=tx, t=a_d)
  # The first non-finite step of either network (-1: none).
  steps = jnp.stack([g.nonfinite_step, d.nonfinite_step])
  nonfinite = jnp.min(jnp.where(steps >= 0, steps, jnp.iinfo(jnp.int32).max))
  nonfinite = jnp.where(nonfinite == jnp.iinfo(jnp.int32).max, -1, nonfinite)
  scalars = {"g_loss": g_loss, "d_loss": d_loss, **g_parts, **d_parts, "lambda_ot": lambda_ot,
             "g_grad_norm": g_scalars["grad_norm"], "d_grad_norm": d_scalars["grad_norm"],
             "learning_rate": g_scalars["learning_rate"],
             "skipped": jnp.maximum(g_scalars["skipped"], d_scalars["skipped"])}
  return AFMState(step=state.step + 1, g=g, d=d, nonfinite_step=nonfinite), scalars


# ---------------------------------------------------------------------------------------------
# AFMTrainer: mesh, shardings, jitted init / step / sampler.
# ---------------------------------------------------------------------------------------------


def output_dir(config: ml_collections.ConfigDict, workdir: str) -> rundir.RunDir:
  """Where the AFM run lives: --workdir for pixels, <workdir>/afm on FARMER's latents."""
  run = rundir.RunDir(workdir)
  return run.afm if config.afm.target == "farmer_latent" else run


def make_target(config: ml_collections.ConfigDict, workdir: str | None, devices=None):
  """The target space of `config.afm.target`; FARMER's latents load the FARMER of `workdir`."""
  if config.afm.target == "pixels":
    return PixelTarget(config)
  if workdir is None:
    raise ValueError("afm.target = 'farmer_latent' needs the FARMER workdir")
  from farmer_jax import afm_latent  # noqa: PLC0415
  return afm_latent.FarmerLatentTarget(config, workdir, devices)


# AFM fields that fix the parameters' shapes: a resumed run must keep them.
_AFM_IDENTITY = ("target", "patch_size", "width", "depth", "head_dim", "mlp_ratio")


class AFMTrainer:
  """The AFM counterpart of `train.Trainer` (same mesh, rules and sharding helpers). `workdir`:
  the FARMER workdir whose latents are the target (afm.target = "farmer_latent" only)."""

  def __init__(self, config: ml_collections.ConfigDict, devices=None, workdir: str | None = None):
    if config.get("phase") != "afm":
      raise ValueError(f"config.phase = {config.get('phase')!r}: the AFM trainer needs "
                       f"phase='afm' (configs/afm_digits.py sets it)")
    config_check.validate(config)
    self.config, a = config, config.afm
    self.target = make_target(config, workdir, devices)
    self.net = NetConfig.from_config(config, self.target.shape)
    self.gen, self.disc = Generator(self.net), Discriminator(self.net)
    self.tx = train.make_optimizer(a)
    self.mesh, self.rules = sharding.mesh_and_rules(config.sharding, devices)
    for field, size in (("config.afm.batch_size", a.batch_size),
                        ("config.sample.batch_size", config.sample.batch_size)):
      sharding.check_batch_size(size, self.mesh, self.rules, field)
    repl = sharding.replicated(self.mesh)
    data = sharding.batch_sharding(self.mesh, self.rules)
    self.state_shardings, self.abstract_state, self.init = sharding.sharded_state(
        lambda: init_state(self.gen, self.disc, self.tx, config.seed, True),
        lambda: init_state(self.gen, self.disc, self.tx, config.seed), self.mesh, self.rules)
    target_shardings = self.target.param_shardings
    step = functools.partial(afm_step, gen=self.gen, disc=self.disc, tx=self.tx, a=a,
                             a_d=without_ema(a), target=self.target)
    self.step = jax.jit(self.with_rules(step),
                        in_shardings=(self.state_shardings, data, repl, target_shardings),
                        out_shardings=(self.state_shardings, repl), donate_argnums=(0,))
    n = self.net
    noise_shape = (config.sample.batch_size, n.image_size, n.image_size, n.channels)

    def generate_batch(g_params, target_params, key, labels_B):
      """eps -> G -> (on FARMER's latents: z^R and the decoder) -> (images in [-1, 1], AF passes
      per block [n] of a Jacobi inverse, else [0])."""
      eps = layers.constrain(jax.random.normal(key, noise_shape, jnp.float32), layers.ACT_BATCH)
      labels_B = layers.constrain(labels_B, layers.ACT_BATCH)   # the batch splits over the mesh
      x = self.gen.apply({"params": g_params}, eps, labels_B)
      images, passes_n = self.target.decode(target_params, x, labels_B, jax.random.fold_in(key, 1))
      return jnp.clip(images, -1.0, 1.0), passes_n

    self.generate_batch = jax.jit(self.with_rules(generate_batch),
                                  in_shardings=(self.state_shardings.g.ema_params,
                                                target_shardings, repl, repl),
                                  out_shardings=repl)
    # Approximate: 2 FLOPs per parameter per token per pass (attention scores left out). G step:
    # G forward + backward (3 passes), D on fakes and reals (6); D step: G forward (1), D forward
    # and backward on 2 + 2 r_fraction batches (3 each).
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    p_g, p_d = count(self.abstract_state.g.params), count(self.abstract_state.d.params)
    tokens = self.net.num_tokens
    self.flops_per_step = a.batch_size * (
        2 * tokens * (4 * p_g + (6 + 3 * (2 + 2 * a.r_fraction)) * p_d)
        + self.target.flops_per_example)
    self.device_kind = self.mesh.devices.flat[0].device_kind

  def with_rules(self, fn):
    return sharding.with_rules(self.rules, fn)

  def generate(self, g_params, labels: np.ndarray, key: jax.Array) -> np.ndarray:
    """One image per label, float32 in [-1, 1] [N, H, W, C], in batches of sample.batch_size
    (on FARMER's latents: decoded to images)."""
    bs, out = self.config.sample.batch_size, []
    for start in range(0, len(labels), bs):
      chunk = labels[start:start + bs]
      y = np.pad(chunk, (0, bs - len(chunk)), mode="edge").astype(np.int32)
      images, passes_n = jax.device_get(self.generate_batch(
          g_params, self.target.params, jax.random.fold_in(key, start), jnp.asarray(y)))
      if passes_n.size:
        logging.info("%s inverse, images %d-%d: AF passes per block (block 0 first) %s",
                     self.decoder, start, start + len(chunk) - 1, passes_n.tolist())
      out.append(np.asarray(images)[:len(chunk)])
    return np.concatenate(out)

  @property
  def decoder(self) -> str:
    """What decodes FARMER's latents (sample.decoder_name); "exact" for pixels (unused)."""
    return getattr(self.target, "decoder", "exact")

  def sample(self, state: AFMState, run: rundir.RunDir, writer=None, tag: str | None = None
             ) -> str:
    """`sample.per_class` images of each chosen class from the G EMA (fixed noise: sample.seed)
    -> samples/samples_<step>[_<tag>].npz and .png, one grid row per class; returns the npz path.
    The tag defaults to "student" where the student decodes FARMER's latents. An existing file
    of that name (the same step and settings) is kept."""
    s, num_levels, step = self.config.sample, self.config.data.num_levels, int(state.step)
    requested = tag is not None
    if tag is None:
      tag = "student" if self.target.use_student else ""
    info = {"step": step, "target": self.config.afm.target, "seed": s.seed,
            "sample": s.to_dict(),
            "decoder": self.decoder if self.config.afm.target == "farmer_latent" else None}
    return sample.sample_grid(
        run, step,
        lambda labels: sample.quantize(
            self.generate(state.g.ema_params, labels, jax.random.key(s.seed)), num_levels),
        classes=sample.parse_classes(s.classes, self.net.num_classes), per_class=s.per_class,
        num_levels=num_levels, tag=tag, info=info, requested=requested, writer=writer)


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_steps: int | None = None) -> AFMState:
  """Trains G and D (resuming from the latest checkpoint), sampling every `afm.eval_every` steps
  and at the end; in `workdir`, or <workdir>/afm on FARMER's latents (whose statistics are
  measured first). `stop_after_steps` as in `train.train_and_evaluate`."""
  config_check.validate(config)
  a = config.afm
  with rundir.hold(workdir), preemption.handle_signals():
    run = output_dir(config, workdir)
    # Before any weights are read: a resumed run must keep its data, model and AFM sizes.
    rundir.check_config(config, run, extra=(("afm", _AFM_IDENTITY),))
    trainer = AFMTrainer(config, workdir=workdir)
    ckpt = rundir.Checkpointer(run, max_to_keep=a.keep_checkpoints)
    with jax.set_mesh(trainer.mesh):
      if a.target == "farmer_latent":
        trainer.target.prepare(trainer.rules, a.batch_size, config.seed, create=True)
      if ckpt.latest_step() is None:
        state = trainer.init()
        logging.info("AFM on %s from scratch: %d steps of batch %d; G %s, D %s parameters; "
                     "checkpoints in %s", a.target, a.num_steps, a.batch_size,
                     f"{sum(x.size for x in jax.tree.leaves(state.g.params)):,}",
                     f"{sum(x.size for x in jax.tree.leaves(state.d.params)):,}", ckpt.directory)
      else:
        state = ckpt.restore(trainer.abstract_state)
        logging.info("resumed AFM from checkpoint at step %d of %d", int(state.step), a.num_steps)
      start = int(state.step)
      end, writer, data = train.loop_inputs(config, run, start, a.num_steps, stop_after_steps,
                                            a.batch_size)
      base_key = jax.random.key(config.seed + 3)
      to_global = lambda b: sharding.to_global(b, trainer.mesh, trainer.rules)
      state, preempted = train.run_steps(
          state, lambda s: trainer.step(s, to_global(next(data)), base_key, trainer.target.params),
          start=start, end=end, t=a, ckpt=ckpt, run=run, writer=writer,
          flops_per_step=trainer.flops_per_step, num_devices=trainer.mesh.size,
          device_kind=trainer.device_kind, eval_every=a.eval_every,
          eval_fn=lambda s: trainer.sample(s, run, writer), section="afm")
      return train.finish_run(state, preempted, a.num_steps, ckpt, writer,
                              lambda s: trainer.sample(s, run, writer))


def restore_latest(config: ml_collections.ConfigDict, workdir: str) -> tuple[AFMTrainer, AFMState]:
  """The trainer (its target ready) and the latest AFM checkpoint of `workdir`."""
  trainer = AFMTrainer(config, workdir=workdir)
  run = output_dir(config, workdir)
  if config.afm.target == "farmer_latent":
    trainer.target.prepare(trainer.rules, config.afm.batch_size, config.seed, create=False)
  config_file = ("configs/afm_farmer_latent.py" if config.afm.target == "farmer_latent"
                 else "configs/afm_digits.py")
  ckpt = rundir.latest_checkpointer(run, "AFM ", f"train first with python -m farmer_jax.main "
                                    f"--config={config_file} --workdir={workdir}")
  rundir.check_config(config, run, record=False, extra=(("afm", _AFM_IDENTITY),))
  state = ckpt.restore(trainer.abstract_state)
  ckpt.close()
  return trainer, state


def sample_latest(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=sample with phase=afm: samples_<step>_<tag>.npz and .png from the latest G EMA
  (in <workdir>/afm/samples on FARMER's latents)."""
  with rundir.hold(workdir):
    trainer, state = restore_latest(config, workdir)
    tag = rundir.sample_tag(config.sample, trainer.decoder)
    with jax.set_mesh(trainer.mesh):
      return trainer.sample(state, output_dir(config, workdir), tag=tag)
