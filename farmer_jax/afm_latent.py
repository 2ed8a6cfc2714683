"""AFM target (b): FARMER's informative latents z^I (SPEC sec. 7, `afm.target = "farmer_latent"`).

A trained FARMER workdir fixes the space. Its AF (EMA weights) maps a real image to latents
z [N, d] in natural token order; G learns the informative channels, standardised per channel and
laid out on the token grid, so that G and D are the same image transformers as for pixels:

    encode:  x (dequantised + N(0, train.noise_min^2))  --AF-->  z [N, d]  ->  z^I = z[:, :d_I]
             -> (z^I - mean) / std  ->  [g, g, d_I]      (g = image_size / model.patch_size)
    sample:  eps [g, g, d_I]  --G-->  standardised z^I  ->  z^I  (one pass)
             z^R ~ FARMER's shared redundant GMM G_{N+1} after one parallel causal prior pass
                   over z^I (`Prior.complete`; config.sample's guidance applies to this head)
             x = the distilled student (one parallel pass per block) or the exact AF inverse
                   (`sample.inverse`: sequential, or (Gauss-Seidel-)Jacobi to a tolerance)

so a whole image takes a few parallel passes and no token-by-token loop. mean / std [d_I] are
measured once, over `afm.stats_batches` training batches of `afm.batch_size` (pooled over tokens
and images), and kept in <workdir>/afm/latent_stats.json with the FARMER checkpoint they belong to.

Which FARMER: `afm.farmer_workdir` (default: the one recorded in <workdir>/afm/farmer.json, else
--workdir) at `afm.farmer_step`. The decoder follows
`sample.decoder`: "auto" takes the student in <farmer workdir>/distill when there is one, and then
the FARMER step is the one the student was distilled from. The choice is recorded in
<workdir>/afm/farmer.json; a resumed run with another FARMER is refused.
"""
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from farmer_jax import distill, input_pipeline, rundir, sample, sharding, train
from farmer_jax.models import farmer, flow

def to_grid(z_BxNxI: jax.Array, grid: int) -> jax.Array:
  """Tokens in natural (row-major patch) order -> their spatial layout [B, g, g, d_I]."""
  return z_BxNxI.reshape(z_BxNxI.shape[0], grid, grid, z_BxNxI.shape[-1])


def from_grid(x_BxGxGxI: jax.Array) -> jax.Array:
  """Inverse of `to_grid`: [B, g, g, d_I] -> [B, N, d_I]."""
  return x_BxGxGxI.reshape(x_BxGxGxI.shape[0], -1, x_BxGxGxI.shape[-1])


class FarmerLatentTarget:
  """The frozen FARMER pieces (AF, prior, optional student) and the standardisation of z^I.

  `params` (a pytree passed to the jitted AFM functions, sharded as `param_shardings`):
  {"farmer": FARMER's EMA params, "student": the student's (or absent), "mean", "std": [d_I]}.
  """
  name = "farmer_latent"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, devices=None):
    a = config.afm
    self.config = config
    self.run = rundir.RunDir(workdir).afm
    recorded = rundir.read_json(self.run.farmer)
    farmer_dir = str(rundir.as_path(a.farmer_workdir or (recorded or {}).get("workdir")
                                    or workdir))
    self.use_student = rundir.decoder(config, farmer_dir) == "student"   # decodes alone
    load_student = self.use_student or sample.wants_student(config.sample)   # or starts Jacobi

    def check_recorded(step):   # before any weights are read where the step is known
      if recorded and (recorded["workdir"], recorded["step"]) != (farmer_dir, step):
        raise ValueError(
            f"the AFM in {self.run} was trained on the latents of {recorded['workdir']} "
            f"step {recorded['step']}, not {farmer_dir} step {step}; use a new --workdir or "
            f"remove {self.run} to start over")

    if load_student:
      dist, state, student_state, info = distill.restore_student(config, farmer_dir)
      self.trainer = dist.trainer
      self.student = dist.student
      student_params = dist.student_params(student_state)
      student_shardings = dist.state_shardings.ema_params
      del student_state
      if a.farmer_step is not None and a.farmer_step != info["step"]:
        raise ValueError(
            f"config.afm.farmer_step = {a.farmer_step}, but the student in "
            f"{rundir.RunDir(farmer_dir).distill} was distilled from step {info['step']}; leave it "
            f"unset or set --config.sample.decoder=exact")
    else:
      self.trainer = train.Trainer(config, devices)
      self.student = None
      state, info = distill.restore_frozen(
          config, self.trainer, farmer_dir, a.farmer_step or (recorded or {}).get("step"),
          what="FARMER", workdir_field="afm.farmer_workdir", step_field="afm.farmer_step",
          check_step=check_recorded)
    check_recorded(info["step"])
    self.model_config = c = self.trainer.model_config
    self.parallel = sample.parallel_inverse(config.sample, c)
    info["decoder"] = self.decoder = sample.decoder_name(self.use_student, self.parallel)
    self.info = info
    self.model = self.trainer.model
    self.grid = c.image_size // c.patch_size
    self.shape = (self.grid, self.grid, c.d_informative)
    self.data_noise = config.train.noise_min
    self.sampler = sample.sampler_config(config.sample)
    self.mesh = self.trainer.mesh
    repl = sharding.replicated(self.mesh)
    self.params = {"farmer": self.trainer.eval_params(state)}
    self.param_shardings = {"farmer": getattr(self.trainer.state_shardings,
                                              self.trainer.eval_field)}
    del state
    if load_student:
      self.params["student"] = student_params
      self.param_shardings["student"] = student_shardings
    self.param_shardings.update(mean=repl, std=repl)
    # One AF forward per real image (encoding) on top of G and D.
    self.flops_per_example = farmer.forward_flops_per_example(c)["af"]

  # -- the maps G's space <-> images (traced inside the jitted AFM step and sampler) ------------

  def latents(self, params, batch: dict, key: jax.Array) -> jax.Array:
    """Real images -> unstandardised z^I on the grid [B, g, g, d_I]."""
    k_deq, k_noise = jax.random.split(key)
    x = train.dequantize(batch["image"], self.model_config.num_levels, k_deq)
    x = x + self.data_noise * jax.random.normal(k_noise, x.shape, jnp.float32)
    z = self.model.apply({"params": params["farmer"]}, x, batch["label"],
                         method=farmer.Farmer.encode)
    return to_grid(z[..., :self.model_config.d_informative], self.grid)

  def encode(self, params, batch: dict, key: jax.Array) -> jax.Array:
    """Real images -> standardised z^I [B, g, g, d_I]: what D sees as real."""
    return (self.latents(params, batch, key) - params["mean"]) / params["std"]

  def decode(self, params, x_BxGxGxI: jax.Array, labels_B: jax.Array, key: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    """G's output -> (images [B, H, W, C] not clipped, AF passes per block [n] of the Jacobi
    inverse, else [0]): z^I, z^R from the shared GMM, the decoder."""
    p = {"params": params["farmer"]}
    z_inf = from_grid(x_BxGxGxI * params["std"] + params["mean"])
    labels_B = self.model.apply(p, labels_B, method=farmer.Farmer.sample_labels)
    z = self.model.apply(p, key, z_inf, labels_B, self.sampler,
                         method=farmer.Farmer.complete_latents)
    no_passes = jnp.zeros((0,), jnp.int32)
    if self.parallel is not None:
      return sample.decode_parallel(self.model, params["farmer"], z, labels_B, self.parallel,
                                    self.student, params.get("student"))
    if not self.use_student:
      return self.model.apply(p, z, labels_B, method=farmer.Farmer.decode), no_passes
    c = self.model_config
    x = self.student.apply({"params": params["student"]}, z, labels_B,
                           method=flow.Flow.student_inverse)
    return farmer.unpatchify(x, c.patch_size, c.image_size, c.channels), no_passes

  # -- standardisation ------------------------------------------------------------------------

  def prepare(self, rules, batch_size: int, seed: int, create: bool) -> None:
    """Sets params["mean"] / ["std"] from <workdir>/afm/latent_stats.json; with `create`, measures
    and writes them first when the file is missing (and records farmer.json)."""
    path = self.run.latent_stats
    stats = rundir.read_json(path)
    if stats is None:
      if not create:
        raise FileNotFoundError(f"no {path}: train the AFM first (python -m farmer_jax.main "
                                f"--config=configs/afm_farmer_latent.py --workdir=...)")
      stats = self._measure(rules, batch_size, seed)
      stats.update(farmer=self.info)
      rundir.write_json(path, stats)
    elif (stats["farmer"]["workdir"], stats["farmer"]["step"]) != (self.info["workdir"],
                                                                   self.info["step"]):
      raise ValueError(f"{path} belongs to {stats['farmer']}, not {self.info}; remove "
                       f"{self.run} to start over")
    if create and rundir.read_json(self.run.farmer) != self.info:
      rundir.write_json(self.run.farmer, self.info)
    repl = sharding.replicated(self.mesh)
    for k in ("mean", "std"):
      self.params[k] = jax.device_put(np.asarray(stats[k], np.float32), repl)

  def _measure(self, rules, batch_size: int, seed: int) -> dict:
    """Per-channel mean and std of z^I over `afm.stats_batches` training batches (float64 sums)."""
    num_batches = self.config.afm.stats_batches
    data = input_pipeline.train_iterator(self.config.data, global_batch_size=batch_size,
                                         seed=seed + 7)
    base = jax.random.key(seed + 7)

    def moments(params, batch, key):
      z = self.latents(params, batch, key).reshape(-1, self.shape[-1])
      return jnp.sum(z, 0), jnp.sum(jnp.square(z), 0), z.shape[0]

    fn = jax.jit(sharding.with_rules(rules, moments),
                 in_shardings=({"farmer": self.param_shardings["farmer"]},
                               sharding.batch_sharding(self.mesh, rules), None))
    total = np.zeros((2, self.shape[-1]), np.float64)
    count = 0
    for i in range(num_batches):
      batch = sharding.to_global(next(data), self.mesh, rules)
      s1, s2, n = jax.device_get(fn({"farmer": self.params["farmer"]}, batch,
                                    jax.random.fold_in(base, i)))
      total += np.stack([s1, s2]).astype(np.float64)
      count += int(n)
    mean = total[0] / count
    std = np.sqrt(np.maximum(total[1] / count - mean ** 2, 1e-12))
    logging.info("z^I statistics over %d images x %d tokens: mean %s, std %s",
                 num_batches * batch_size, self.grid ** 2, np.round(mean, 3), np.round(std, 3))
    return {"mean": mean.tolist(), "std": std.tolist(), "num_images": num_batches * batch_size,
            "num_tokens": self.grid ** 2}
