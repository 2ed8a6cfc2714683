"""One-step distillation of the AF inverse (SPEC sec. 6, the paper's Algorithm 2).

The exact inverse of an AF block is sequential over its N tokens. The student g_t of teacher block
f_t is the same network with bidirectional attention, initialised with f_t's weights, that maps
Z^t to Z^{t-1} in one parallel pass with the teacher's affine form (models/flow.py):

    teacher chain  Z^0 = x (patchified real image),  Z^t = f_t(Z^{t-1}),  t = 1 .. n   (frozen)
    noisy start    Z~^n = Z^n + s * eps,  s ~ U(0, distill.noise_max = 0.3) per image
    student chain  Z~^{t-1} = g_t(Z~^t),  t = n .. 1   (each block on the previous block's output)
    loss           L = (1/n) sum_t L_t,   L_t = mean over batch, tokens, channels (Z~^{t-1} - Z^{t-1})^2

L_t is the per-element mean (ours; the paper writes ||.||^2, the same up to the constant B*N*d).
Gradients flow through the whole student chain. The AR prior is untouched: sampling draws z from
it as before and decodes with the student (`sample.decoder`).

`distill_and_evaluate(config, workdir)` is the entry (`--config.phase=distill`, or a config
argument ending in `,distill`). The frozen teacher is the latest checkpoint of --workdir, or
`distill.teacher_workdir` / `distill.teacher_step`. Everything of the student lives in
<workdir>/distill/:

  checkpoints/<step>/          Orbax checkpoints of the student state (resumed like training)
  teacher.json                 {"workdir", "step"} of the teacher it was distilled from
  config.json                  the config of the first run (model and data must stay the same)
  train_log.jsonl              loss, mse_image (block 1: pixel space), mse_top (block n), ...
  eval/metrics.json            latest evaluation (below), eval/history.jsonl: one line each
  eval/decode_<step>_{exact,student}.png   the same prior latents decoded both ways
  samples/samples_<step>.npz   student-decoded samples with the config's sampler, and the PNG

Evaluation (every `distill.eval_every` steps and at the end): on the test split, the loss from the
exact Z^n (`mse_clean`) and from a noisy start (`mse_noisy`), and the mean abs pixel error of the
student's whole decode of the teacher's Z^n (`image_mae`); on `distill.eval_samples` latents from
the prior (the config's sampler), the mean abs difference between the student's and the exact
inverse's images in [-1, 1] (`decode_mae`) and in intensity levels (`decode_mae_levels`).
"""
import functools

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from farmer_jax import config_check, input_pipeline, preemption, rundir, sample, sharding, train
from farmer_jax.models import farmer, flow

TrainState = train.TrainState


# ---------------------------------------------------------------------------------------------
# The loss (Algorithm 2) and the step.
# ---------------------------------------------------------------------------------------------


def block_errors(student_chain: list[jax.Array], teacher_chain: list[jax.Array]) -> jax.Array:
  """Per-block, per-example MSE [n, B]: row t-1 is mean_{tokens, channels} (Z~^{t-1} - Z^{t-1})^2.

  student_chain: [Z~^{n-1}, ..., Z~^0] (`Flow.student_chain`), teacher_chain: [Z^0, ..., Z^n]
  (`Flow.forward_chain`), every entry [B, N, d].
  """
  n = len(teacher_chain) - 1
  if len(student_chain) != n:
    raise ValueError(f"student chain has {len(student_chain)} outputs, teacher chain {n} blocks")
  return jnp.stack([jnp.mean(jnp.square(student_chain[n - t] - teacher_chain[t - 1]), axis=(1, 2))
                    for t in range(1, n + 1)])


def blockwise_mse(student_chain: list[jax.Array],
                  teacher_chain: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Algorithm 2's loss: (L = mean_t L_t, [L_1, ..., L_n]) with L_t the MSE of block t's output."""
  per_block = jnp.mean(block_errors(student_chain, teacher_chain), axis=1)
  return jnp.mean(per_block), per_block


def chain_loss(student_params, z_start_BxNxD: jax.Array, teacher_chain: list[jax.Array],
               labels_B: jax.Array, *, student: flow.Flow) -> tuple[jax.Array, jax.Array]:
  """The student's reversed chain from Z~^n = z_start against the teacher's chain [Z^0 .. Z^n]:
  `blockwise_mse` of Algorithm 2 -> (loss, per-block [n])."""
  outs = student.apply({"params": student_params}, z_start_BxNxD, labels_B,
                       method=flow.Flow.student_chain)
  return blockwise_mse(outs, teacher_chain)


def noisy_start(z_BxNxD: jax.Array, key: jax.Array, noise_max: float) -> tuple[jax.Array, jax.Array]:
  """Z^n + s * eps with s ~ U(0, noise_max) per example -> (Z~^n [B, N, d], s [B])."""
  k_s, k_eps = jax.random.split(key)
  s_B = jax.random.uniform(k_s, z_BxNxD.shape[:1], jnp.float32, 0.0, noise_max)
  return z_BxNxD + s_B[:, None, None] * jax.random.normal(k_eps, z_BxNxD.shape), s_B


def teacher_images(batch: dict, key: jax.Array, c: farmer.ModelConfig, data_noise: float):
  """Real images -> the teacher's input x [B, N, d]: dequantised, plus N(0, data_noise^2) noise
  (the generation noise the teacher ended training with), patchified."""
  k_deq, k_noise = jax.random.split(key)
  x = train.dequantize(batch["image"], c.num_levels, k_deq)
  x = x + data_noise * jax.random.normal(k_noise, x.shape, jnp.float32)
  return farmer.patchify(x, c.patch_size)


def distill_step(state: TrainState, teacher_params, batch: dict, base_key: jax.Array, *,
                 teacher: flow.Flow, student: flow.Flow, tx, config: ml_collections.ConfigDict,
                 model_config: farmer.ModelConfig, data_noise: float):
  d = config.distill
  k_data, k_start = jax.random.split(jax.random.fold_in(base_key, state.step))
  x_BxNxD = teacher_images(batch, k_data, model_config, data_noise)
  labels_B = batch["label"]
  chain = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, x_BxNxD, labels_B,
                                              method=flow.Flow.forward_chain))
  z_start, s_B = noisy_start(chain[-1], k_start, d.noise_max)
  (loss, per_block), grads = jax.value_and_grad(chain_loss, has_aux=True)(
      state.params, z_start, chain, labels_B, student=student)
  new_state, scalars = train.apply_gradients(state, grads, loss, tx=tx, t=d)
  return new_state, {"loss": loss, "mse_image": per_block[0], "mse_top": per_block[-1],
                     "start_noise": jnp.mean(s_B), **scalars}


def eval_step(student_params, teacher_params, batch: dict, key: jax.Array, *, teacher: flow.Flow,
              student: flow.Flow, noise_max: float, model_config: farmer.ModelConfig):
  """Sums over the real (unmasked) test examples: loss from the exact and from a noisy start, and
  the mean abs error of the student's decode in pixels. Uniform dequantisation only."""
  k_data, k_start = jax.random.split(key)
  x_BxNxD = teacher_images(batch, k_data, model_config, 0.0)
  labels_B = batch["label"]
  chain = teacher.apply({"params": teacher_params}, x_BxNxD, labels_B,
                        method=flow.Flow.forward_chain)
  run = lambda z: student.apply({"params": student_params}, z, labels_B,
                                method=flow.Flow.student_chain)
  clean = run(chain[-1])
  noisy = run(noisy_start(chain[-1], k_start, noise_max)[0])
  mask = batch["mask"].astype(jnp.float32)
  masked_sum = lambda v_B: jnp.sum(v_B * mask)
  return {"mse_clean": masked_sum(jnp.mean(block_errors(clean, chain), axis=0)),
          "mse_noisy": masked_sum(jnp.mean(block_errors(noisy, chain), axis=0)),
          "image_mae": masked_sum(jnp.mean(jnp.abs(clean[-1] - x_BxNxD), axis=(1, 2))),
          "count": jnp.sum(mask)}


# ---------------------------------------------------------------------------------------------
# Distiller: the teacher's mesh and shardings, the student's state and jitted steps.
# ---------------------------------------------------------------------------------------------


class Distiller:
  """The FARMER `train.Trainer` of the config (model, mesh, rules, teacher restore target) plus
  the student: its state shardings (those of the teacher's AF parameters: the same tree), a jitted
  init from the teacher's AF parameters, and the jitted distillation and evaluation steps."""

  def __init__(self, config: ml_collections.ConfigDict, devices=None):
    config_check.validate_distill(config)
    self.config = config
    self.trainer = trainer = train.Trainer(config, devices)
    c, d = trainer.model_config, config.distill
    self.batch_size = d.batch_size or config.train.batch_size
    sharding.check_batch_size(self.batch_size, trainer.mesh, trainer.rules,
                              "config.distill.batch_size (None: train.batch_size)")
    self.data_noise = config.train.noise_min if d.data_noise is None else d.data_noise
    self.teacher = farmer.make_flow(c)
    self.student = farmer.make_flow(c, causal=False)
    self.tx = train.make_optimizer(d)
    repl = sharding.replicated(trainer.mesh)
    data = sharding.batch_sharding(trainer.mesh, trainer.rules)
    self.flow_shardings = trainer.state_shardings.params["flow"]
    self.state_shardings, self.abstract_state, self.init = sharding.sharded_state(
        self._boxed_state, self._state_from_teacher, trainer.mesh, trainer.rules,
        in_shardings=(self.flow_shardings,))
    step = functools.partial(distill_step, teacher=self.teacher, student=self.student, tx=self.tx,
                             config=config, model_config=c, data_noise=self.data_noise)
    self.step = jax.jit(trainer.with_rules(step),
                        in_shardings=(self.state_shardings, self.flow_shardings, data, repl),
                        out_shardings=(self.state_shardings, repl), donate_argnums=(0,))
    evaluate = functools.partial(eval_step, teacher=self.teacher, student=self.student,
                                 noise_max=d.noise_max, model_config=c)
    self.eval_step = jax.jit(trainer.with_rules(evaluate),
                             in_shardings=(self.state_shardings.params, self.flow_shardings, data,
                                           repl), out_shardings=repl)
    # Teacher forward (1 AF pass) + student forward and backward (3 AF passes) per example.
    self.flops_per_step = 4 * farmer.forward_flops_per_example(c)["af"] * self.batch_size

  @property
  def mesh(self):
    return self.trainer.mesh

  def _boxed_state(self) -> TrainState:
    c = self.trainer.model_config
    x = jnp.zeros((1, c.num_tokens, c.token_dim), jnp.float32)
    params = self.student.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32))["params"]
    return self._state_from_teacher(params)

  def _state_from_teacher(self, flow_params) -> TrainState:
    """Step 0: the student's parameters (and EMA) are the teacher AF's."""
    return TrainState.create(flow_params, self.tx)

  def student_params(self, state: TrainState):
    """The parameters that decode: the EMA (equal to the raw ones when distill.ema_decay = 0)."""
    return state.ema_params

  def split_losses(self, state: TrainState, teacher_flow_params) -> dict:
    """Test-split means (fixed dequantisation and start-noise keys): mse_clean, mse_noisy,
    image_mae; and num_examples."""
    config = self.config
    key = jax.random.key(config.eval.dequant_seed)
    totals = {}
    for i, batch in enumerate(input_pipeline.eval_iterator(
        config.data, global_batch_size=config.eval.batch_size)):
      sums = self.eval_step(self.student_params(state), teacher_flow_params,
                            self.trainer.batch_to_global(batch), jax.random.fold_in(key, i))
      for k, v in jax.device_get(sums).items():
        totals[k] = totals.get(k, 0.0) + float(v)
    n = totals.pop("count")
    return {"num_examples": int(n), **{k: v / n for k, v in totals.items()}}

  def evaluate(self, state: TrainState, teacher_params, run: rundir.RunDir, writer=None, *,
               mode: str = "train") -> dict:
    """Test-split losses and image error, and exact-vs-student decodes of the same prior latents;
    writes eval/metrics.json, a line of eval/history.jsonl and the two decode grids."""
    step = int(state.step)
    result = {"step": step, "split": self.config.data.eval_split,
              **self.split_losses(state, teacher_params["flow"])}
    result.update(self.compare_decodes(state, teacher_params, run, step), mode=mode)
    logging.info("distill eval step %d: %s", step,
                 ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)))
    rundir.write_json(run.metrics, result)
    rundir.append_jsonl(run.history, result, key=("step", "mode"))
    if writer is not None:
      writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()
                                  if isinstance(v, float)})
    return result

  def compare_decodes(self, state: TrainState, teacher_params, run: rundir.RunDir, step: int
                      ) -> dict:
    """`distill.eval_samples` latents from the prior (config's sampler, fixed seed) decoded by the
    exact inverse and by the student: mean / max abs difference in [-1, 1] and in levels."""
    s, c = self.config.sample, self.trainer.model_config
    classes = sample.parse_classes("all", c.num_classes)
    labels = np.resize(classes, self.config.distill.eval_samples).astype(np.int32)
    kwargs = dict(batch_size=s.batch_size, sampler=sample.sampler_config(s), progress=False,
                  out_sharding=sharding.replicated(self.mesh), as_float=True)
    key = jax.random.key(s.seed + 1)
    with nn.logical_axis_rules(self.trainer.rules):
      exact = sample.generate(self.trainer.model, teacher_params, labels, key, **kwargs)
      student = sample.generate(self.trainer.model, teacher_params, labels, key,
                                student=(self.student, self.student_params(state)), **kwargs)
    levels = lambda im: sample.quantize(im, c.num_levels).astype(np.int32)
    level_diff = np.abs(levels(student) - levels(exact))
    order = np.argsort(labels, kind="stable")   # one grid row per class
    rows = len(classes) if c.num_classes else 1
    for name, images in (("exact", exact), ("student", student)):
      sample.save_grid_png(run.eval_dir / f"decode_{step}_{name}.png",
                           sample.quantize(images[order], c.num_levels), c.num_levels, rows)
    return {"decode_mae": float(np.mean(np.abs(student - exact))),
            "decode_max_abs": float(np.max(np.abs(student - exact))),
            "decode_mae_levels": float(np.mean(level_diff)),
            "decode_same_level_fraction": float(np.mean(level_diff == 0)),
            "decode_samples": int(len(labels))}


# ---------------------------------------------------------------------------------------------
# Teacher and student restore.
# ---------------------------------------------------------------------------------------------


def restore_frozen(config, trainer: train.Trainer, workdir, step: int | None, *, what: str,
                   workdir_field: str, step_field: str, check_step=None
                   ) -> tuple[TrainState, dict]:
  """A trained FARMER used frozen (distillation's teacher, AFM's latent space): step `step`
  (None: the latest) of `workdir`, its step and eval weights only, after checking the config
  against the workdir's. `check_step(step)` may refuse the step first. Clear errors name
  `workdir_field` / `step_field`. -> (state, {"workdir", "step"})."""
  run = rundir.RunDir(workdir)
  ckpt = rundir.Checkpointer(run, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(
        f"no {what} checkpoint in {ckpt.directory}: train FARMER first (python -m "
        f"farmer_jax.main --config=... --workdir={workdir}), or point config.{workdir_field} at "
        f"a trained workdir")
  if check_step is not None:
    check_step(steps[-1] if step is None else step)
  if step is not None and step not in steps:
    raise FileNotFoundError(f"config.{step_field} = {step}: no such checkpoint in "
                            f"{ckpt.directory} (available: {steps})")
  rundir.check_config(config, run, record=False)
  state = trainer.restore_eval_state(ckpt, step)
  if check_step is not None and step is None and int(state.step) != steps[-1]:
    check_step(int(state.step))   # the newest checkpoint was damaged: an earlier one restored
  ckpt.close()
  return state, {"workdir": str(run), "step": int(state.step)}


def restore_teacher(config: ml_collections.ConfigDict, workdir: str,
                    trainer: train.Trainer) -> tuple[TrainState, dict]:
  """The frozen teacher (its step and eval weights only: `Trainer.restore_eval_state`) and
  {"workdir", "step"}: `distill.teacher_workdir` (default
  `workdir`) at `distill.teacher_step` (default: the step recorded when this student started, else
  the latest). Clear errors for a missing checkpoint, another config, or another teacher than
  the one an existing student was distilled from."""
  d, run = config.distill, rundir.RunDir(workdir).distill
  recorded = rundir.read_json(run.teacher)
  teacher_dir = str(rundir.as_path(d.teacher_workdir or (recorded or {}).get("workdir")
                                   or workdir))

  def check_step(step):
    if recorded and (recorded["workdir"], recorded["step"]) != (teacher_dir, step):
      raise ValueError(
          f"the student in {run} was distilled from {recorded['workdir']} step "
          f"{recorded['step']}, not {teacher_dir} step {step}; use a new --workdir or remove "
          f"{run} to start over")

  return restore_frozen(config, trainer, teacher_dir,
                              d.teacher_step or (recorded or {}).get("step"), what="teacher",
                              workdir_field="distill.teacher_workdir",
                              step_field="distill.teacher_step", check_step=check_step)


def restore_student(config, workdir: str) -> tuple[Distiller, TrainState, TrainState, dict]:
  """(distiller, teacher state, student state, teacher info) of a distilled workdir."""
  rundir.require_student(workdir)
  dist = Distiller(config)
  teacher_state, info = restore_teacher(config, workdir, dist.trainer)
  run = rundir.RunDir(workdir).distill
  rundir.check_config(config, run, record=False)
  ckpt = rundir.Checkpointer(run, read_only=True)
  student_state = ckpt.restore(dist.abstract_state)
  ckpt.close()
  return dist, teacher_state, student_state, info


def sample_with_student(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=sample with the student: the prior of the teacher checkpoint it was distilled from,
  the student's decode (or, with `sample.inverse` parallel, the exact inverse iterated from the
  student's) -> <workdir>/samples/samples_<teacher step>_<tag>.npz and .png."""
  with rundir.hold(workdir) as run:
    dist, teacher_state, student_state, info = restore_student(config, workdir)
    parallel = sample.parallel_inverse(config.sample, dist.trainer.model_config)
    logging.info("decoding with %s the distilled student (step %d) of teacher step %d",
                 "the exact inverse by %s, started from" % parallel.method if parallel else "",
                 int(student_state.step), info["step"])
    tag = rundir.sample_tag(config.sample, sample.decoder_name(True, parallel),
                            {"student_step": int(student_state.step)})
    with jax.set_mesh(dist.mesh):
      return dist.trainer.sample(teacher_state, run, tag=tag, student=(
          dist.student, dist.student_params(student_state)), parallel=parallel)


def evaluate_latest(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=evaluate with phase=distill: the student's evaluation -> <workdir>/distill/eval/."""
  with rundir.hold(workdir) as run:
    dist, teacher_state, student_state, _ = restore_student(config, workdir)
    with jax.set_mesh(dist.mesh):
      return dist.evaluate(student_state, dist.trainer.eval_params(teacher_state), run.distill,
                           mode="evaluate")


# ---------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------


def distill_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                         stop_after_steps: int | None = None) -> TrainState:
  """Distils the AF inverse of the teacher into <workdir>/distill (resuming from its latest
  checkpoint), evaluates and samples with the student. `stop_after_steps` as in training."""
  with rundir.hold(workdir) as top, preemption.handle_signals():
    dist = Distiller(config)
    d, run = config.distill, top.distill
    with jax.set_mesh(dist.mesh):
      teacher_state, info = restore_teacher(config, workdir, dist.trainer)
      teacher_params = dist.trainer.eval_params(teacher_state)
      rundir.check_config(config, run)
      if rundir.read_json(run.teacher) != info:
        rundir.write_json(run.teacher, info)
      ckpt = rundir.Checkpointer(run, max_to_keep=d.keep_checkpoints)
      if ckpt.latest_step() is None:
        state = dist.init(teacher_params["flow"])
        logging.info("distilling teacher %s step %d: %d steps of batch %d, student initialised "
                     "with the teacher AF's %s parameters; checkpoints in %s", info["workdir"],
                     info["step"], d.num_steps, dist.batch_size,
                     f"{sum(a.size for a in jax.tree.leaves(state.params)):,}", ckpt.directory)
      else:
        state = ckpt.restore(dist.abstract_state)
        logging.info("resumed distillation from checkpoint at step %d of %d", int(state.step),
                     d.num_steps)
      start = int(state.step)
      end, writer, data = train.loop_inputs(config, run, start, d.num_steps, stop_after_steps,
                                            dist.batch_size)
      base_key = jax.random.key(config.seed + 2)
      state, preempted = train.run_steps(
          state, lambda s: dist.step(s, teacher_params["flow"],
                                     dist.trainer.batch_to_global(next(data)), base_key),
          start=start, end=end, t=d, ckpt=ckpt, run=run, writer=writer,
          flops_per_step=dist.flops_per_step, num_devices=dist.mesh.size,
          device_kind=dist.trainer.device_kind, eval_every=d.eval_every,
          eval_fn=lambda s: dist.evaluate(s, teacher_params, run, writer), section="distill")

      def final(state):
        dist.evaluate(state, teacher_params, run, writer)
        dist.trainer.sample(train.eval_state(state.step, teacher_params), run, writer,
                            student=(dist.student, dist.student_params(state)))
      return train.finish_run(state, preempted, d.num_steps, ckpt, writer, final)
