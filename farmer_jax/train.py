"""The FARMER trainer, in sections: state, steps, Trainer, entry (`train_and_evaluate`), and the
step loop every phase reuses (`run_steps`).

Everything it writes under the workdir goes through farmer_jax/rundir/, which documents the
layout: checkpoints, train_log.jsonl, eval/metrics.json and history.jsonl, samples, TensorBoard.
"""
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from farmer_jax import config_check, input_pipeline, metrics, preemption, rundir, sample, sharding
from farmer_jax.models import farmer, layers

# ---------------------------------------------------------------------------------------------
# Train state, optimiser, schedules.
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  # First step whose loss or gradients were not finite (-1: none). Its update is discarded, so the
  # parameters stay finite and checkpointable; unless train.skip_nonfinite, so is every later one
  # and the host stops the run.
  nonfinite_step: jax.Array

  @classmethod
  def create(cls, params, tx) -> "TrainState":
    """Step 0: `params`, their EMA equal to them, `tx`'s fresh optimiser state."""
    return cls(step=jnp.int32(0), params=params, ema_params=params, opt_state=tx.init(params),
               nonfinite_step=jnp.int32(-1))


def eval_state(step, params) -> TrainState:
  """A state that holds only weights to evaluate or sample with (`params` = `ema_params`, no
  optimiser state), for the functions that take a TrainState."""
  return TrainState(step=step, params=params, ema_params=params, opt_state=None,
                    nonfinite_step=jnp.int32(-1))


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, cosine decay to `min_learning_rate` (SPEC sec. 8)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=max(t.num_steps, t.warmup_steps + 1), end_value=t.min_learning_rate)


def noise_schedule(t: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """Generation noise std, cosine from `noise_max` to `noise_min` over training (SPEC sec. 1)."""
  frac = jnp.clip(step / t.num_steps, 0.0, 1.0)
  return t.noise_min + (t.noise_max - t.noise_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  chain.append(optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2,
                           weight_decay=t.weight_decay))
  return optax.chain(*chain)


def dequantize(images_uint8: jax.Array, num_levels: int, key: jax.Array) -> jax.Array:
  """x = (v + u) / L * 2 - 1, u ~ U(0, 1) per value (SPEC sec. 1). -> float32 in [-1, 1]."""
  u = jax.random.uniform(key, images_uint8.shape, jnp.float32)
  return (images_uint8.astype(jnp.float32) + u) / num_levels * 2.0 - 1.0


def init_state(model: farmer.Farmer, tx, seed: int, boxed: bool = False) -> TrainState:
  """Fresh state. `boxed=True` keeps flax's logical-axis boxes on parameters (and, through
  tx.init, on the optimiser moments): for `jax.eval_shape`, to read every leaf's sharding."""
  c = model.config
  images = jnp.zeros((1, c.image_size, c.image_size, c.channels), jnp.float32)
  labels = jnp.zeros((1,), jnp.int32)
  params = model.init({"params": jax.random.key(seed), "dropout": jax.random.key(0)},
                      images, labels)["params"]
  return TrainState.create(params if boxed else sharding.unbox(params), tx)


# ---------------------------------------------------------------------------------------------
# Steps (jitted in `Trainer`).
# ---------------------------------------------------------------------------------------------


# Per-example model outputs logged as batch means next to the loss.
_LOSS_PARTS = ("bpd", "nll_informative", "nll_redundant", "logdet")


def train_step(state: TrainState, batch: dict, base_key: jax.Array, *, model: farmer.Farmer,
               tx, config: ml_collections.ConfigDict):
  t = config.train
  k_deq, k_noise, k_drop = jax.random.split(jax.random.fold_in(base_key, state.step), 3)
  x = dequantize(batch["image"], model.config.num_levels, k_deq)
  sigma = noise_schedule(t, state.step)
  x = x + sigma * jax.random.normal(k_noise, x.shape, jnp.float32)

  def loss_fn(params, x, labels, k_drop):
    out = model.apply({"params": params}, x, labels, train=True, rngs={"dropout": k_drop})
    loss = jnp.mean(out["nll"])
    if t.latent_norm_penalty > 0:
      loss = loss + t.latent_norm_penalty * jnp.mean(jnp.square(out["z"]))
    parts = {k: jnp.mean(out[k]) for k in _LOSS_PARTS}
    return loss, parts

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  accum = t.grad_accum_steps
  if accum == 1:
    (loss, parts), grads = grad_fn(state.params, x, batch["label"], k_drop)
  else:
    # Micro-batch i takes rows i, i + A, i + 2A, ...: every device keeps its own rows (a reshape of
    # contiguous blocks would move data between devices). Sums of means / A = the full-batch mean.
    def split(a):
      a = a.reshape((a.shape[0] // accum, accum) + a.shape[1:]).swapaxes(0, 1)
      return layers.constrain(a, None, layers.ACT_BATCH, *([None] * (a.ndim - 2)))

    def micro(acc, inputs):
      i, x_i, labels_i = inputs
      (loss_i, parts_i), grads_i = grad_fn(state.params, x_i, labels_i,
                                           jax.random.fold_in(k_drop, i))
      return jax.tree.map(lambda a, b: a + b / accum, acc, (loss_i, parts_i, grads_i)), None

    zeros = (jnp.float32(0), {k: jnp.float32(0) for k in _LOSS_PARTS},
             jax.tree.map(jnp.zeros_like, state.params))
    (loss, parts, grads), _ = jax.lax.scan(
        micro, zeros, (jnp.arange(accum), split(x), split(batch["label"])))
  new_state, scalars = apply_gradients(state, grads, loss, tx=tx, t=t)
  return new_state, {"loss": loss, **parts, **scalars, "noise_sigma": sigma}


def apply_gradients(state: TrainState, grads, loss: jax.Array, *, tx,
                    t: ml_collections.ConfigDict) -> tuple[TrainState, dict]:
  """One optimiser step with EMA (decay warmed up as min(ema_decay, (1 + k) / (10 + k))) and the
  non-finite guard: a step whose loss, gradients or update is not finite changes nothing.

  `t` is the optimiser's config section (`config.train`, or `config.distill` for the student).
  Returns the new state and the scalars grad_norm, learning_rate, skipped.
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
  decay = jnp.minimum(t.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)

  nonfinite_step = jnp.where((~finite) & (state.nonfinite_step < 0), state.step,
                             state.nonfinite_step)
  apply = finite & (t.skip_nonfinite | (nonfinite_step < 0))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                         ema_params=keep(ema, state.ema_params),
                         opt_state=keep(opt_state, state.opt_state), nonfinite_step=nonfinite_step)
  return new_state, {"grad_norm": grad_norm, "learning_rate": learning_rate_schedule(t)(state.step),
                     "skipped": (~finite).astype(jnp.float32)}


def eval_step(params, batch: dict, key: jax.Array, *, model: farmer.Farmer):
  """Sums of nll / bpd over the real (unmasked) examples of a batch; uniform dequantisation only."""
  x = dequantize(batch["image"], model.config.num_levels, key)
  out = model.apply({"params": params}, x, batch["label"])
  mask = batch["mask"].astype(jnp.float32)
  return {"bpd_sum": jnp.sum(out["bpd"] * mask), "nll_sum": jnp.sum(out["nll"] * mask),
          "count": jnp.sum(mask)}


# ---------------------------------------------------------------------------------------------
# Trainer: mesh, shardings, jitted steps, restore.
# ---------------------------------------------------------------------------------------------


class Trainer:
  """Holds the model, the mesh and the jitted steps for one config.

  Every traced function runs under the config's logical-axis rules (`self.rules`); calls must be
  made inside `jax.set_mesh(self.mesh)` (the entry points below do), so the model's sharding
  annotations bind to this mesh.
  """

  def __init__(self, config: ml_collections.ConfigDict, devices=None):
    self.config = config
    self.model_config = config_check.validate(config)
    self.model = farmer.Farmer(self.model_config)
    self.tx = make_optimizer(config.train)
    self.mesh, self.rules = sharding.mesh_and_rules(config.sharding, devices)
    for field in ("train.batch_size", "eval.batch_size"):
      section, name = field.split(".")
      sharding.check_batch_size(config[section][name], self.mesh, self.rules, f"config.{field}")
    micro = config.train.batch_size // config.train.grad_accum_steps
    sharding.check_batch_size(micro, self.mesh, self.rules,
                              "config.train.batch_size / config.train.grad_accum_steps")
    repl = sharding.replicated(self.mesh)
    data = sharding.batch_sharding(self.mesh, self.rules)
    with_rules = self.with_rules
    self.state_shardings, self.abstract_state, self.init = sharding.sharded_state(
        lambda: init_state(self.model, self.tx, config.seed, boxed=True),
        lambda: init_state(self.model, self.tx, config.seed), self.mesh, self.rules)
    self.train_step = jax.jit(
        with_rules(lambda s, b, k: train_step(s, b, k, model=self.model, tx=self.tx,
                                              config=config)),
        in_shardings=(self.state_shardings, data, repl),
        out_shardings=(self.state_shardings, repl), donate_argnums=(0,))
    self.eval_step = jax.jit(with_rules(lambda p, b, k: eval_step(p, b, k, model=self.model)),
                             in_shardings=(self.state_shardings.params, data, repl),
                             out_shardings=repl)
    self.flops_per_step = (farmer.train_flops_per_example(self.model_config)
                           * config.train.batch_size)
    self.device_kind = self.mesh.devices.flat[0].device_kind

  def with_rules(self, fn):
    """fn traced under this config's logical-axis rules."""
    return sharding.with_rules(self.rules, fn)

  def batch_to_global(self, local_batch: dict) -> dict:
    return sharding.to_global(local_batch, self.mesh, self.rules)

  def abstract_batch(self, batch_size: int) -> dict:
    """ShapeDtypeStructs of a global training batch (for ahead-of-time lowering)."""
    c = self.model_config
    data = sharding.batch_sharding(self.mesh, self.rules)
    return {"image": jax.ShapeDtypeStruct((batch_size, c.image_size, c.image_size, c.channels),
                                          jnp.uint8, sharding=data),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=data)}

  @property
  def eval_field(self) -> str:
    """The TrainState field that evaluates and samples: the EMA unless train.ema_decay is 0."""
    return "ema_params" if self.config.train.ema_decay > 0 else "params"

  def eval_params(self, state: TrainState):
    return getattr(state, self.eval_field)

  def restore_eval_state(self, ckpt: rundir.Checkpointer, step: int | None) -> TrainState:
    """Step `step` (None: the newest intact one) of `ckpt` for evaluation, sampling or as a frozen
    teacher: only its step and eval params are read (`params` and `ema_params` both hold them, no
    optimiser state)."""
    fields = ckpt.restore(self.abstract_state, step, fields=("step", self.eval_field))
    return eval_state(fields["step"], fields[self.eval_field])

  def evaluate(self, state: TrainState, run: rundir.RunDir, writer=None, *,
               mode: str = "train") -> dict:
    """Test-split bpd with uniform dequantisation (fixed seed) -> eval/metrics.json and a line of
    eval/history.jsonl (one per step, mode and params). `run`: a RunDir or a workdir path."""
    config, step, run = self.config, int(state.step), rundir.RunDir(run)
    params = self.eval_params(state)
    key = jax.random.key(config.eval.dequant_seed)
    totals = {"bpd_sum": 0.0, "nll_sum": 0.0, "count": 0.0}
    for i, batch in enumerate(input_pipeline.eval_iterator(
        config.data, global_batch_size=config.eval.batch_size)):
      sums = self.eval_step(params, self.batch_to_global(batch), jax.random.fold_in(key, i))
      for k, v in jax.device_get(sums).items():
        totals[k] += float(v)
    n = totals["count"]
    result = {"step": step, "split": config.data.eval_split, "dataset": config.data.name,
              "bpd": totals["bpd_sum"] / n, "nll_nats_per_dim": totals["nll_sum"] / n,
              "num_examples": int(n), "params": "ema" if config.train.ema_decay > 0 else "raw",
              "mode": mode}
    logging.info("eval step %d: %s bpd %.4f over %d examples", step, result["split"],
                 result["bpd"], n)
    rundir.write_json(run.metrics, result)
    rundir.append_jsonl(run.history, result, key=("step", "mode", "params"))
    if writer is not None:
      writer.write_scalars(step, {"eval/bpd": result["bpd"]})
    return result

  def sample(self, state: TrainState, run: rundir.RunDir, writer=None, *, student=None,
             tag: str = "", parallel=None) -> str:
    """Samples `per_class` images of each chosen class with the config's sampler -> one grid row per
    class in samples/samples_<step>[_<tag>].png and .npz; returns the npz path. An existing file of
    that name (the same step and settings) is kept, not redrawn. `student`: (Flow, params) of a
    distilled student that decodes instead of the exact inverse; `parallel` (flow.ParallelInverse):
    the exact inverse by (Gauss-Seidel-)Jacobi, started from `student` where given. `run`: a
    RunDir or a path."""
    s, c, step = self.config.sample, self.model_config, int(state.step)
    info = {"step": step, "decoder": sample.decoder_name(student is not None, parallel),
            "seed": s.seed, "sample": s.to_dict()}
    return sample.sample_grid(
        rundir.RunDir(run), step,
        lambda labels: self.generate(state, labels, student=student, parallel=parallel),
        classes=sample.parse_classes(s.classes, c.num_classes), per_class=s.per_class,
        num_levels=c.num_levels, tag=tag, info=info, requested=bool(tag), writer=writer)

  def generate(self, state: TrainState, labels: np.ndarray, student=None, parallel=None,
               passes: list | None = None) -> np.ndarray:
    """One image per label with the config's sampler -> uint8 [N, H, W, C] on every process.
    `student`: (Flow, params) of a distilled student that decodes instead of the exact inverse;
    `parallel`, `passes`: the (Gauss-Seidel-)Jacobi inverse as in `sample.generate`."""
    s = self.config.sample
    sampler = sample.sampler_config(s)
    logging.info("sampling %d images: %s", len(labels), sampler)
    with nn.logical_axis_rules(self.rules):   # sampling batches split over the mesh too
      return sample.generate(
          self.model, self.eval_params(state), labels, jax.random.key(s.seed),
          batch_size=s.batch_size, sampler=sampler,
          denoise_sigma=self.config.train.noise_min if s.denoise else 0.0,
          out_sharding=sharding.replicated(self.mesh), student=student, parallel=parallel,
          passes=passes)


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
  pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_steps: int | None = None) -> TrainState:
  """Trains (resuming from the latest checkpoint in `workdir`), evaluates and samples.

  `stop_after_steps` ends this run early after that many steps (a checkpoint is written), as a
  preemption would; rerunning continues to `config.train.num_steps`.
  """
  with rundir.hold(workdir) as run, preemption.handle_signals():
    trainer = Trainer(config)
    t = config.train
    rundir.check_config(config, run)
    ckpt = rundir.Checkpointer(run, max_to_keep=t.keep_checkpoints)
    state = trainer.init() if ckpt.latest_step() is None else ckpt.restore(trainer.abstract_state)
    start = int(state.step)
    if start > 0:
      logging.info("resumed from checkpoint at step %d of %d (%s)", start, t.num_steps,
                   ckpt.directory)
    else:
      logging.info("starting from scratch: %d steps, %s parameters; checkpoints in %s",
                   t.num_steps, f"{sum(a.size for a in jax.tree.leaves(state.params)):,}",
                   ckpt.directory)
    end, writer, data = loop_inputs(config, run, start, t.num_steps, stop_after_steps,
                                    t.batch_size)
    base_key = jax.random.key(config.seed + 1)
    with jax.set_mesh(trainer.mesh):
      state, preempted = run_steps(
          state, lambda s: trainer.train_step(s, trainer.batch_to_global(next(data)), base_key),
          start=start, end=end, t=t, ckpt=ckpt, run=run, writer=writer,
          flops_per_step=trainer.flops_per_step, num_devices=trainer.mesh.size,
          device_kind=trainer.device_kind, eval_every=config.eval.every,
          eval_fn=lambda s: trainer.evaluate(s, run, writer))

      def final(state):
        trainer.evaluate(state, run, writer)
        trainer.sample(state, run, writer, parallel=sample.parallel_inverse(
            config.sample, trainer.model_config, has_student=False))
      return finish_run(state, preempted, t.num_steps, ckpt, writer, final)


def loop_inputs(config: ml_collections.ConfigDict, run: rundir.RunDir, start: int, num_steps: int,
                stop_after_steps: int | None, batch_size: int):
  """What a phase's step loop reads when it starts at `start`: the step this run ends at, its
  TensorBoard writer and the training batches, continuing where the checkpoint left the data
  stream. -> (end, writer, batch iterator)."""
  end = num_steps if stop_after_steps is None else min(num_steps, start + stop_after_steps)
  data = input_pipeline.train_iterator(config.data, global_batch_size=batch_size,
                                       seed=config.seed, start_step=start)
  return end, metrics.create_writer(run, start), data


def finish_run(state, preempted: bool, num_steps: int, ckpt: rundir.Checkpointer, writer,
               final_fn):
  """After `run_steps`, in every phase: on preemption only close the checkpointer (the saved step
  is where the rerun resumes); otherwise wait for the saves, run `final_fn(state)` (evaluation,
  samples) when the run reached `num_steps`, flush the logs and close. Returns `state`."""
  if not preempted:
    ckpt.wait()
    if preemption.received():
      logging.warning("%s during the last steps: step %d is saved; the end-of-run evaluation and "
                      "samples are left to the rerun", preemption.signal_name(), int(state.step))
    elif int(state.step) >= num_steps:
      final_fn(state)
  writer.close()
  ckpt.close()
  return state


def run_steps(state: TrainState, step_fn, *, start: int, end: int, t: ml_collections.ConfigDict,
              ckpt: rundir.Checkpointer, run: rundir.RunDir, writer, flops_per_step: float,
              num_devices: int, device_kind: str, eval_every: int | None = None,
              eval_fn=None, section: str = "train") -> tuple[TrainState, bool]:
  """The step loop every phase shares (FARMER training, distillation, AFM): steps start+1 .. end.

  `step_fn(state) -> (state, scalars)` runs one jitted step on the next batch. Every
  `t.log_every` steps the scalars' means, steps/s, ETA, TFLOP/s and MFU go to the console,
  TensorBoard and `run.train_log` (JSON lines; the lines of steps after `start`, which a resumed
  run replays, are dropped first); every `t.checkpoint_every` steps, at `end` and on SIGTERM /
  SIGINT (farmer_jax/preemption.py) the state is saved. A non-finite step stops the run
  (NonFiniteLossError) unless `t.skip_nonfinite` (`t` is `config.<section>`). `eval_fn(state)`
  runs every `eval_every` steps before the last. Returns (state, preempted): on a signal the
  checkpoint is saved and the loop returns early.
  """
  progress = metrics.Progress(start, t.num_steps)
  pending: list[dict] = []
  rundir.truncate_log(run.train_log, start)

  def check_finite():
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0 and not t.skip_nonfinite:
      ckpt.wait()
      raise NonFiniteLossError(
          f"non-finite loss or gradients at step {bad}; training stopped, the last checkpoint "
          f"(step {ckpt.latest_step()}) holds finite parameters. Lower "
          f"config.{section}.learning_rate or set config.{section}.skip_nonfinite=True to skip "
          f"such steps.")

  if preemption.received():   # during the set-up: the restored (or fresh) state needs no save
    logging.warning("%s before the first step: nothing new to save; exiting. Rerun the same "
                    "command to resume from step %d.", preemption.signal_name(), start)
    return state, True
  if end > start:
    logging.info("compiling the %s step; the first step includes it (a minute at ImageNet "
                 "scale)", section)
  first = time.perf_counter()
  with preemption.handle_signals():
    for step in range(start + 1, end + 1):
      state, scalars = step_fn(state)
      if step == start + 1:
        rundir.started()
        jax.block_until_ready(scalars)
        logging.info("step %d done in %.1f s, compilation included", step,
                     time.perf_counter() - first)
      pending.append(scalars)
      done = step == end
      if step % t.log_every == 0 or done:
        check_finite()
        rundir.check_held()
        summary = metrics.mean_of(pending)
        summary.update(progress.update(step))
        summary.update(metrics.throughput(summary["steps_per_sec"], flops_per_step, num_devices,
                                          device_kind))
        pending = []
        writer.write_scalars(step, summary)
        rundir.append_jsonl(run.train_log, {"step": step, **summary})
        logging.info(metrics.format_scalars(step, t.num_steps, summary))
      preempted = preemption.reached(step, ckpt)
      if step % t.checkpoint_every == 0 or done or preempted:
        check_finite()
        ckpt.save(step, state)
        if preempted:
          ckpt.wait()
          writer.flush()
          logging.warning("%s: checkpoint of step %d saved in %s; exiting. Rerun the same command "
                          "to resume from step %d.", preemption.signal_name() or "preemption",
                          step, ckpt.directory, step)
          return state, True
        writer.flush()
      if eval_every and eval_fn is not None and step % eval_every == 0 and step != t.num_steps:
        eval_fn(state)
  return state, False


def restore_latest(config, workdir) -> tuple[Trainer, TrainState]:
  """The Trainer of `config` and the latest intact checkpoint of `workdir`, its eval weights only
  (evaluate, sample, fid modes)."""
  trainer = Trainer(config)
  run = rundir.RunDir(workdir)
  ckpt = rundir.latest_checkpointer(run, "", f"train first with python -m farmer_jax.main "
                                    f"--config=... --workdir={workdir}")
  rundir.check_config(config, run, record=False)
  state = trainer.restore_eval_state(ckpt, None)
  ckpt.close()
  return trainer, state
