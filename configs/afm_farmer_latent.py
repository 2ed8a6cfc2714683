r"""Adversarial Flow Models on FARMER's informative latents z^I (SPEC sec. 7, farmer_jax/afm_latent.py):
a one-step generator eps -> z^I, then z^R from FARMER's shared redundant GMM (one prior pass) and
the distilled AF inverse: a FARMER sampler with no token-by-token loop.

Launch on a trained (and preferably distilled) FARMER workdir; the AFM lives in <workdir>/afm:

    python -m farmer_jax.main --config=configs/digits.py --workdir=runs/digits            # FARMER
    python -m farmer_jax.main --config=configs/digits.py:distill --workdir=runs/digits    # student
    python -m farmer_jax.main --config=configs/afm_farmer_latent.py --workdir=runs/digits # AFM
    python -m farmer_jax.main --config=configs/afm_farmer_latent.py --workdir=runs/digits --mode=sample

and the comparison with FARMER's own sampler (class accuracy, speed):

    python benchmarks/afm.py --workdir=runs/digits

Variants, `--config=configs/afm_farmer_latent.py:VARIANT`:
    default           on configs/digits.py's FARMER (4x4 tokens, d_I of 4 channels): G and D of
                      2 adaLN layers at width 64 over the 4x4xd_I grid of standardised z^I, one
                      token per latent token (afm.patch_size 1); samples every 500 steps. 10,000
                      steps took 25 minutes on 2 CPU cores and reached class accuracy 0.940 on a
                      digits FARMER with d_I = 2 (docs/afm.md);
    tiny              configs/digits.py:tiny's FARMER, a few steps, for tests;
    imagenet256_1p9b  on configs/imagenet256_1p9b.py:16's FARMER (d_I = 128 of 768, 16x16 tokens):
                      G and D of the paper's XL size (28 layers at width 1152) over 256 tokens of
                      128, as AFM's XL/2 over SD-VAE's 32x32x4. Launch:

      python -m farmer_jax.main --config=configs/afm_farmer_latent.py:imagenet256_1p9b \
          --workdir=gs://BUCKET/farmer_1p9b_p16 --config.data.data_dir=DATA

The FARMER is --workdir (or --config.afm.farmer_workdir=...); its model section must be this
config's (checked against its config.json). `sample.decoder` picks the decoder: the student of
<FARMER workdir>/distill when there is one (auto), or the exact inverse. config.sample's guidance
settings apply to the redundant GMM draw; G itself is class-conditional, unguided.
"""
import ml_collections

from configs import digits, imagenet256_1p9b

VARIANTS = ("default", "tiny", "imagenet256_1p9b")


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  arg = arg or "default"
  if arg not in VARIANTS:
    raise ValueError(f"configs/afm_farmer_latent.py: unknown variant {arg!r}; use one of "
                     f"{VARIANTS}")
  if arg == "imagenet256_1p9b":
    c = imagenet256_1p9b.get_config("16")
    c.phase = "afm"
    c.afm.update(
        target="farmer_latent", patch_size=1,
        width=1152, depth=28, head_dim=64,   # AFM XL (ours: head_dim 64 of its 16 heads x 72)
        batch_size=256,                      # ours (FARMER's batch)
        num_steps=400_000,                   # ours: the AFM summary gives no schedule
        stats_batches=200,                   # 51,200 images for the per-channel mean / std
        checkpoint_every=5000, eval_every=50_000,
    )
    return c
  c = digits.get_config("tiny" if arg == "tiny" else "default")
  c.phase = "afm"
  c.afm.update(
      target="farmer_latent", patch_size=1, width=64, depth=2, head_dim=32,
      batch_size=64, num_steps=10_000,
      learning_rate=2e-4, min_learning_rate=2e-4,   # ours, as configs/afm_digits.py
      ema_decay=0.999,
      stats_batches=20,          # 1280 images (the training split is 1437)
      log_every=100, checkpoint_every=1000, eval_every=500,
  )
  c.sample.update(per_class=50, batch_size=100)   # 500 samples per evaluation
  if arg == "tiny":
    c.afm.update(batch_size=16, num_steps=4, width=32, depth=1, head_dim=16, log_every=2,
                 checkpoint_every=2, eval_every=100, stats_batches=2)
    c.sample.update(per_class=2, batch_size=16)   # 8 batch shards on the tests' 8 CPU devices
  return c
