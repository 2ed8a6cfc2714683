r"""FARMER-556M on ImageNet 64x64, unconditional, likelihood training (paper: 2.61 bits/dim, TARFlow
2.99): AF 16 blocks x 4 layers, AR prior 12 layers, patch 2.

Launch (tfds `downsampled_imagenet/64x64` prepared in DATA, see docs/model.md#data):

    python -m farmer_jax.main --config=configs/imagenet64_556m.py --workdir=gs://BUCKET/farmer_in64 \
        --config.data.data_dir=DATA

Then `configs/imagenet64_556m.py:distill` distils the AF inverse (SPEC sec. 6) into <workdir>/distill.

Paper numbers: 16 x 4 AF, 12 AR layers, patch 2, 556M parameters (Table 1 / supplement). Ours, as
the paper gives no widths or split: width 768 for both (553.8M parameters, within 0.4% of 556M),
no channel split (d_I = d = 12: every channel of a 2x2x3 patch gets its own informative GMM; the
shared redundant head exists for generation quality, and at d = 12 there is little to split off),
a single class slot (unconditional: the null class only), no generation noise (likelihood run).
"""
import ml_collections

from farmer_jax import config_base


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  arg, phase = config_base.split_phase(arg)
  if arg:
    raise ValueError(f"configs/imagenet64_556m.py takes no argument but 'distill', got {arg!r}")
  c = config_base.base_config()
  c.phase = phase
  c.data.update(name="downsampled_imagenet/64x64", image_size=64, channels=3, num_levels=256,
                num_classes=0, hflip=False, eval_split="validation")
  c.model.update(
      patch_size=2,                      # paper: 1024 tokens of 12
      af_blocks=16, af_layers=4,         # paper
      prior_layers=12,                   # paper
      af_width=768, prior_width=768,     # ours (paper: not given) -> 553.8M parameters
      d_informative=12,                  # ours: no split at d = 12
      class_repeat=1,                    # ours: unconditional
      dtype="bfloat16",                  # ours: bf16 compute, float32 params and flow math
      attention="auto",                  # cuDNN's fused attention on GPU
      scan_layers=True, remat="dots_no_batch",  # ours: memory at 1024 tokens
  )
  # Likelihood training: bpd is measured on the data itself, so no generation noise (SPEC sec. 1).
  # Paper: 320 epochs is the ImageNet 256 schedule; ours reuses it here. Batch size is ours.
  c.train.update(batch_size=256, num_steps=320 * 1_281_167 // 256, noise_max=0.0, noise_min=0.0,
                 checkpoint_every=5000)
  c.eval.update(batch_size=256, every=50_000)
  c.distill.update(num_steps=60 * 1_281_167 // 256, checkpoint_every=5000, eval_every=50_000)
  c.sample.update(per_class=64, batch_size=64)   # unconditional: one grid of 64
  return c
