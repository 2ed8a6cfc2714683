r"""Adversarial Flow Models (SPEC sec. 7, farmer_jax/afm.py) on the pixels of the embedded digits.

Launch (from the repository root):

    python -m farmer_jax.main --config=configs/afm_digits.py --workdir=runs/afm_digits

and the class-accuracy curve of its samples (the digits SVC judge of benchmarks/digits_guidance.py):

    python benchmarks/afm_digits.py --workdir=runs/afm_digits

Variants, `--config=configs/afm_digits.py:VARIANT`:
    default  G and D of 2 adaLN layers at width 64 (0.16M and 0.15M parameters), 8x8x1 images as
             16 tokens of 2x2 pixels; samples every 500 steps. 6000 steps took 26 minutes on 2
             shared CPU cores and reached class accuracy 0.962 (docs/afm.md);
    no_ot    the same with lambda_ot = 0, to measure what the OT term does (SPEC sec. 7 expects
             divergence; on digits it did not: 0.958);
    tiny     a few steps of a very small model, for tests.
Paper values (AdamW (0, 0.9), wd 0.01, lr 1e-4, lambda_ot 0.2 -> 0.005, R1/R2 and centering
weights) are config_base's `afm` defaults; what is set here is ours for this data set.
"""
import ml_collections

from configs import digits


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  arg = arg or "default"
  if arg not in ("default", "no_ot", "tiny"):
    raise ValueError(f"configs/afm_digits.py: unknown variant {arg!r}; use 'default', 'no_ot' "
                     f"or 'tiny'")
  c = digits.get_config("tiny" if arg == "tiny" else "default")
  c.phase = "afm"
  c.afm.update(
      batch_size=64, num_steps=6000, patch_size=2, width=64, depth=2, head_dim=32,
      learning_rate=2e-4, min_learning_rate=2e-4,   # ours: 2x the paper's for a short run
      ema_decay=0.999,           # ours: the paper's 0.9999 averages over more steps than we run
      log_every=100, checkpoint_every=1000, eval_every=500,
  )
  c.sample.update(per_class=50, batch_size=100)   # 500 samples per evaluation
  if arg == "no_ot":
    c.afm.update(lambda_ot_max=0.0, lambda_ot_min=0.0)
  if arg == "tiny":
    c.afm.update(batch_size=16, num_steps=4, width=32, depth=1, head_dim=16, log_every=2,
                 checkpoint_every=2, eval_every=100)   # samples at the end only
    c.sample.update(per_class=2, batch_size=16)
  return c
