"""Every experiment config field, with its default and where the value comes from.

Experiment files in configs/ start from `base_config()` and override what differs. Fields set to
None here have no sensible default (model sizes, batch size, step count): a config that leaves one
unset fails validation naming it. Values marked "ours" are choices the paper does not make.
`placeholder(type)` fields are None by default and can still be set on the command line
(`--config.data.data_dir=DATA`; a plain None field cannot be overridden by ml_collections).
"""
import ml_collections
from ml_collections.config_dict import placeholder


class ConfigError(ValueError):
  """A config field that is unknown, of the wrong type, out of range or inconsistent (with the
  others, or with the devices): main.py prints the message as one line and exits 2."""


# Logical axis -> mesh axes (farmer_jax/sharding.py; the names are those of models/layers.py).
# Data parallelism over `data` and `fsdp`; parameters split over `fsdp` on their width (ZeRO-3
# style: gathered per layer in the forward and backward passes); Megatron-style `tensor`
# parallelism over attention heads, MLP hidden units and head outputs. Unlisted names (`head_dim`,
# `layers`, `classes`, `act_seq`, `act_embed`) stay whole.
DEFAULT_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("out", "tensor"),
)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                   # training: parameter init, data order, dropout and noise
  # train: FARMER on exact likelihood. distill: the one-step student of its AF inverse (SPEC
  # sec. 6, farmer_jax/distill.py), from the teacher in --workdir (or distill.teacher_workdir).
  c.phase = "train"

  c.data = dict(
      name=None,                 # digits | mnist5k (embedded: farmer_jax/datasets.py) | mnist |
                                 # cifar10 | imagenet2012 | downsampled_imagenet/64x64
      image_size=None,           # side of the square images, in pixels
      channels=3,
      num_levels=256,            # uint8 images (SPEC sec. 1)
      num_classes=0,             # 0: unconditional (the null class only)
      hflip=False,               # ours: on by default for ImageNet configs (SPEC sec. 1)
      data_dir=placeholder(str),  # tfds data_dir (None: ~/tensorflow_datasets)
      train_split="train",       # tfds split names
      eval_split="test",         # the test-bpd split
      shuffle_buffer=10_000,     # examples in the shuffle window (0: none)
  )

  c.model = dict(
      patch_size=None,           # p: the tokens are p x p x channels patches
      # Autoregressive flow (SPEC sec. 2).
      af_blocks=None,            # AF blocks, each a causal Transformer (0: the prior alone)
      af_layers=None,            # Transformer layers per AF block
      af_width=None,             # AF Transformer width
      head_dim=64,               # SPEC sec. 2
      mlp_ratio=4,               # SPEC sec. 2
      af_start_token=True,       # ours: transform token 1 too (paper leaves it unchanged: False)
      logscale_clip=4.0,         # ours: a = c * tanh(a_raw / c), SPEC sec. 2; 0 disables
      af_class_conditional=False,  # ours: FARMER's AF is unconditional
      # AR prior with GMM heads (SPEC sec. 3).
      prior_layers=None,         # layers of the AR prior Transformer
      prior_width=None,          # AR prior Transformer width
      d_informative=None,        # paper: 128 of 768 at patch 16; d_I = d means no split
      class_repeat=64,           # paper: class embedding x 64 (FID 49.29 -> 45.34)
      k_informative=64,          # paper
      k_redundant=200,           # paper (ablations: 1024)
      redundant_model="gmm",     # gmm (FARMER) | normal (JetFormer's N(0, I) baseline)
      redundant_head_width=0,    # ours: > 0 feeds that head a Linear(prior_width -> this)
      label_dropout=0.1,         # ours, as TARFlow / JetFormer
      final_permutation=True,    # paper: prior reads opposite to the last AF block (44.56)
      scale_floor=1e-6,          # ours: squareplus floor, SPEC sec. 3
      dtype="float32",           # compute dtype; flow math is float32 regardless
      attention="einsum",        # ours: einsum (the reference; CPU) | dot_product (cuDNN's fused
                                 # kernel on GPU where it serves, else XLA's) | splash (TPU's Pallas
                                 # kernel) | auto (einsum on CPU, dot_product on GPU, splash on
                                 # TPU); a kernel, not a model (models/layers.py)
      scan_layers=False,         # ours: nn.scan over layers (stacked params; fast compiles at depth)
      remat="none",              # ours: none | full | dots | dots_no_batch (layers.REMAT_POLICIES)
  )

  c.train = dict(
      batch_size=None,           # global: over all devices and processes
      num_steps=None,            # optimiser steps of the whole run (the cosine schedule's end)
      learning_rate=1e-4,        # paper, SPEC sec. 8
      min_learning_rate=1e-6,    # paper: cosine to 1e-6
      warmup_steps=5000,         # paper
      b1=0.9, b2=0.95,           # paper
      weight_decay=0.03,         # paper
      grad_clip=1.0,             # ours
      ema_decay=0.9999,          # ours
      noise_max=0.1,             # SPEC sec. 1: generation noise, cosine 0.1 -> 0.005
      noise_min=0.005,           # (likelihood runs set both to 0)
      latent_norm_penalty=0.0,   # ours, off by default (SPEC sec. 4)
      grad_accum_steps=1,        # ours: micro-batches per step (batch_size / this per pass)
      skip_nonfinite=False,      # ours: False stops at a non-finite loss, True skips that step
      log_every=100,             # steps between console / TensorBoard scalar lines
      checkpoint_every=1000,     # steps between checkpoints (SIGTERM also saves one)
      keep_checkpoints=3,        # the newest this many are kept
  )

  c.distill = dict(
      # The frozen teacher: the latest checkpoint of --workdir unless set. The student, its
      # checkpoints, logs and evaluations live in <workdir>/distill/.
      teacher_workdir=placeholder(str),
      teacher_step=placeholder(int),  # None: the latest (on resume: the step the student started from)
      batch_size=placeholder(int),  # None: train.batch_size
      num_steps=placeholder(int),  # paper: 60 extra epochs
      noise_max=0.3,             # paper: noisy start Z^n + s * eps, s ~ U(0, noise_max)
      data_noise=placeholder(float),  # ours: std of the Gaussian noise on the teacher's input images;
                                 # None: train.noise_min (the noise the teacher ended training on)
      # Optimiser of the student (ours: the paper gives none for this phase).
      learning_rate=1e-4,
      min_learning_rate=1e-6,
      warmup_steps=1000,
      b1=0.9, b2=0.95,
      weight_decay=0.0,          # ours: no pull away from the teacher's weights
      grad_clip=1.0,             # global-norm clip (0: off)
      ema_decay=0.9999,          # EMA of the student's weights (0: off)
      skip_nonfinite=False,      # as train.skip_nonfinite
      log_every=100,             # as the train fields of the same names
      checkpoint_every=1000,
      keep_checkpoints=3,
      eval_every=10_000,         # also at the end
      eval_samples=64,           # prior latents decoded by teacher and student at each evaluation
  )

  # Adversarial Flow Models (SPEC sec. 7, farmer_jax/afm.py): a one-step generator G(eps, c) and a
  # discriminator D(x, c), transformers over patch tokens, used with phase="afm".
  c.afm = dict(
      # What G generates: "pixels" of config.data, or "farmer_latent": the informative latents
      # z^I of the trained FARMER workdir (config.model must be its model), standardised per
      # channel, tokens in their spatial grid; sampled images get z^R from FARMER's shared GMM and
      # are decoded by its distilled student or exact inverse (sample.decoder). farmer_latent
      # keeps its checkpoints, logs and samples in <workdir>/afm (farmer_jax/afm_latent.py).
      target="pixels",
      farmer_workdir=placeholder(str),  # farmer_latent: the FARMER workdir (None: the recorded one, else --workdir)
      farmer_step=placeholder(int),  # its checkpoint (None: the student's teacher step, else latest)
      stats_batches=20,          # ours: batches of batch_size whose latents give mean / std
      batch_size=placeholder(int),  # global; set by phase=afm configs
      num_steps=placeholder(int),
      patch_size=placeholder(int),  # of pixels, or of FARMER's token grid (farmer_latent)
      width=placeholder(int),    # G and D: equal size (paper)
      depth=placeholder(int),    # Transformer layers of G and of D
      head_dim=64,               # as model.head_dim
      mlp_ratio=4,               # as model.mlp_ratio
      learning_rate=1e-4,        # paper (SPEC sec. 7), constant
      min_learning_rate=1e-4,    # = learning_rate: no decay (paper)
      warmup_steps=0,            # ours
      b1=0.0, b2=0.9,            # paper
      weight_decay=0.01,         # paper
      grad_clip=0.0,             # ours: off
      ema_decay=0.9999,          # paper: G EMA
      lambda_ot_max=0.2,         # paper: OT weight, cosine 0.2 -> 0.005 over the run
      lambda_ot_min=0.005,       # paper: its end value
      r_fraction=0.25,           # paper: finite-difference R1 / R2 on 25% of the batch
      r_eps=0.01,                # paper: e
      r_weight=0.25,             # paper
      center_weight=0.01,        # paper: logit centering 0.01 * (D(x) + D(G(z)))^2
      grad_norm=False,           # ours: unit-RMS adversarial gradient at G's output (afm.py)
      skip_nonfinite=False,      # as train.skip_nonfinite
      log_every=100,             # as the train fields of the same names
      checkpoint_every=1000,
      keep_checkpoints=3,
      eval_every=1000,           # samples_<step>.npz + PNG from the G EMA (also at the end)
  )

  c.sharding = dict(
      # Mesh axes in device order (the last varies fastest: keep `tensor` last); -1 takes the rest.
      mesh=dict(data=-1, fsdp=1, tensor=1),
      rules=DEFAULT_RULES,       # logical axis -> mesh axes (DEFAULT_RULES above)
  )

  c.eval = dict(
      batch_size=None,           # global; test-split bpd batch
      every=10_000,              # also always at the end of training
      dequant_seed=0,            # of the test images' dequantisation noise: comparable bpd
  )

  c.sample = dict(
      per_class=10,              # one grid row per class
      classes="all",             # or comma-separated ids, e.g. "3,5"
      batch_size=64,             # fixed batch: one compilation, any number of samples
      seed=0,                    # of the sample noise (part of the file tag)
      # Prior sampling (SPEC sec. 5; names follow the paper's Table 6).
      guidance="none",           # none | resample (Algorithm 1) | naive (JetFormer/GIVT)
      w=0.0,                     # guidance weight (resample and naive)
      temperature=1.0,           # informative head: logits / T  (unguided and naive)
      scale=1.0,                 # informative head: std * s
      temperature_redundant=1.0,  # redundant head: logits / T
      scale_redundant=1.0,       # redundant head: std * s
      num_cond=5, num_uncond=5,  # s_c / s_u (paper: 5 / 5)
      t_pi=1.0, t_sigma=1.0,     # proposal temperatures
      t_pi_v=1.0, t_sigma_v=1.0, # temperatures of the densities in the weights
      t_s=1.0,                   # T_s on the log-weights
      ts_mode="multiply",        # ours: log-weights * T_s ("divide": / T_s); the paper is ambiguous
      weight_all_by_w=False,     # the appendix's variant: all candidates weighted by w
      redundant_pool=64,         # ours: pool for the shared redundant GMM, resampled N times
      naive_max_tries=32,        # naive: rejection-sampling proposals, then the best ratio wins
      denoise=False,             # TARFlow-style score step with sigma = train.noise_min
      decoder="auto",            # exact (the AF inverse of `inverse`) | student (distilled, one
                                 # pass per block) | auto: the student when <workdir>/distill has
                                 # one and `inverse` is sequential, else exact
      # The exact AF inverse (ours; docs/jacobi.md). sequential: KV-cached, one token per step;
      # jacobi: every token of a block at once, one causal pass per iteration, until converged;
      # gs_jacobi: the tokens in `jacobi_segments` runs taken in order, Jacobi inside each;
      # strided: sequential inside the runs, Jacobi across them (one token of every run a step).
      inverse="sequential",
      jacobi_tolerance=1e-3,     # a segment stops when no value of x moved more than this in its
                                 # last pass ([-1, 1] pixel units; 0: to the float32 fixed point)
      jacobi_max_iterations=0,   # passes per segment at most; 0: the segment's length (exact);
                                 # strided: sweeps per block at most; 0: the segment count (exact)
      jacobi_segments="1",       # gs_jacobi, strided: segments per AF block, one count ("4") or
                                 # one per block, block 0 (next to the pixels) first ("1,1,1,4")
      jacobi_init="previous",    # start of block t: z (the latent the prior drew) | previous
                                 # (its input, the block inverted before it) | student (the
                                 # distilled student's pass on that input; needs <workdir>/distill)
      name="",                   # --mode=sample / fid file tag (samples_<step>_<name>.npz); empty:
                                 # decoder, guidance, seed and a hash of these settings
  )

  # --mode=fid: FID, Inception Score, precision/recall (farmer_jax/evaluation/). The protocol of
  # ADM's evaluator (Dhariwal & Nichol 2021), which the ImageNet-256 results are reported with.
  c.fid = dict(
      num_samples=50_000,        # ADM / paper: FID-50K; drawn with config.sample's settings
      batch_size=200,            # ours: Inception batch (fixed: one compilation), over the mesh
      # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (TF's FID Inception graph), or the .npz
      # `python -m farmer_jax.evaluation.weights` converts it to; "random": plumbing checks only.
      inception_weights=placeholder(str),
      # ADM's reference batch .npz (arr_0: uint8 NHWC images, and/or mu / sigma), or
      # "tfds:<split>" of config.data (the embedded digits too).
      reference=placeholder(str),
      num_reference=0,           # ours: use the first N reference images (0: all)
      samples=placeholder(str),  # ours: evaluate this samples .npz instead of sampling
      save_samples=True,         # ours: write samples/fid_samples_<step>.npz (arr_0 for ADM)
      resize=299,                # ADM / pytorch-fid: bilinear resize to 299 (>= 75 for tests only)
      preprocess="adm",          # adm: TF graph's resize + (x-128)/128 | pytorch_fid: torch's
      precision="highest",       # ours: float32 convolutions ("default": TF32/bf16 passes allowed)
      is_splits=10,              # Salimans et al. 2016; ADM: 5000-sample splits (10 at 50K)
      pr_k=3,                    # ADM (Kynkaanniemi et al. 2019): k-th nearest neighbour
      pr_batch_size=10_000,      # ADM: 10000-row distance blocks
  )
  return c


# ImageNet 256 (SPEC sec. 8-9). Patch 16: 256 tokens of 768; patch 8: 1024 tokens of 192.
IMAGENET256_D_INFORMATIVE = {
    16: 128,   # paper
    8: 32,     # ours: the paper gives no split for patch 8; we keep its informative share, 1/6 of d
}


def imagenet256_config(patch: int) -> ml_collections.ConfigDict:
  """Data, optimiser and schedule shared by the ImageNet 256 configs; sizes are set by the caller."""
  if patch not in IMAGENET256_D_INFORMATIVE:
    raise ValueError(f"patch must be 16 or 8 (the paper's), got {patch}")
  c = base_config()
  c.data.update(name="imagenet2012", image_size=256, channels=3, num_levels=256,
                num_classes=1000, hflip=True, eval_split="validation")
  c.model.update(patch_size=patch, d_informative=IMAGENET256_D_INFORMATIVE[patch],
                 dtype="bfloat16",        # ours: bf16 compute, float32 params and flow math
                 attention="auto")        # cuDNN's fused attention on GPU, splash on TPU
  # Paper: 320 epochs of 1,281,167 images. Batch size is not given (ours: 256).
  c.train.update(batch_size=256, num_steps=320 * 1_281_167 // 256, checkpoint_every=5000)
  # Distillation (--config.phase=distill): paper 60 extra epochs.
  c.distill.update(num_steps=60 * 1_281_167 // 256, checkpoint_every=5000, eval_every=50_000)
  c.eval.update(batch_size=256, every=50_000)
  c.sample.update(batch_size=64, per_class=1)
  return c


def table6_sampler(**settings) -> dict:
  """Resampling-CFG settings in the names of the paper's Table 6 (T_pi, T_sigma, s_c/s_u, T_pi_v,
  T_sigma_v, T_s, w)."""
  return dict(guidance="resample", num_cond=5, num_uncond=5, **settings)


PHASES = ("train", "distill", "afm")


def split_phase(arg: str) -> tuple[str, str]:
  """A config argument such as "16,distill" or "tiny,distill" -> ("16", "distill").

  Every config in configs/ accepts a trailing `,distill` (or just `distill`) that selects the
  distillation phase; the same as `--config.phase=distill`.
  """
  parts = [p.strip() for p in str(arg).split(",") if p.strip()]
  phase = "train"
  if parts and parts[-1] in PHASES:
    phase = parts.pop()
  return ",".join(parts), phase


def split_variant(arg: str, variants: tuple[str, ...], where: str) -> tuple[str, str]:
  """A config argument "VARIANT[,PHASE]" -> (variant, phase) for a config file with named
  variants; `variants[0]` when none is given. An unknown variant raises ValueError naming `where`
  (the config file) and the choices."""
  variant, phase = split_phase(arg)
  variant = variant or variants[0]
  if variant not in variants:
    raise ValueError(f"{where}: unknown variant {variant!r}; use one of "
                     f"{', '.join(map(repr, variants))}, optionally followed by ',distill'.")
  return variant, phase
