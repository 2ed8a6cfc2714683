r"""FARMER-1.1B on ImageNet 256x256 (paper Table 1): AF 28 blocks x 4 layers at width 768, AR prior
12 layers at width 768; 828M + 295M parameters at patch 16.

Launch (data prepared with tfds in DATA, see docs/model.md#data):

    python -m farmer_jax.main --config=configs/imagenet256_1p1b.py:16 --workdir=gs://BUCKET/farmer_1p1b_p16 \
        --config.data.data_dir=DATA

Distillation of the AF inverse (SPEC sec. 6) into <workdir>/distill, after training: the same
command with `:16,distill` (or `--config.phase=distill`).

`:16` or `:8` picks the patch size (paper FID with CFG: 5.40 at p16, 5.02 at p8; unguided 23.07 and
19.76). Sampling defaults are the paper's Table 6 resampling-CFG settings for that patch.
"""
import ml_collections

from farmer_jax import config_base

SAMPLERS = {   # paper, Table 6
    16: config_base.table6_sampler(t_pi=1.0, t_sigma=0.9, t_pi_v=0.2, t_sigma_v=0.9, t_s=1.1, w=2.5),
    8: config_base.table6_sampler(t_pi=1.0, t_sigma=1.0, t_pi_v=0.2, t_sigma_v=0.9, t_s=1.1, w=2.0),
}


def get_config(arg: str = "16") -> ml_collections.ConfigDict:
  arg, phase = config_base.split_phase(arg)
  patch = int(arg or 16)
  c = config_base.imagenet256_config(patch)
  c.phase = phase
  c.model.update(af_blocks=28, af_layers=4, af_width=768, prior_layers=12, prior_width=768)
  c.sample.update(SAMPLERS[patch])
  return c
