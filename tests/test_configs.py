"""Experiment configs: they validate, carry the paper's numbers, and size the model as the paper does."""
import importlib

import jax
import pytest

from farmer_jax import config_base, config_check, plan


@pytest.mark.parametrize("name,patch,w,t_pi_v", [
    ("imagenet256_1p1b", "16", 2.5, 0.2), ("imagenet256_1p1b", "8", 2.0, 0.2),
    ("imagenet256_1p9b", "16", 3.5, 0.2), ("imagenet256_1p9b", "8", 1.5, 0.1)])
def test_imagenet_configs_validate_with_table6_sampling(name, patch, w, t_pi_v):
  c = importlib.import_module(f"configs.{name}").get_config(patch)
  mc = config_check.validate(c)
  assert (c.sample.guidance, c.sample.w, c.sample.t_pi_v, c.sample.t_s) == ("resample", w, t_pi_v, 1.1)
  assert (c.sample.num_cond, c.sample.num_uncond) == (5, 5)
  assert mc.num_tokens == {"16": 256, "8": 1024}[patch]
  assert mc.token_dim == {"16": 768, "8": 192}[patch]
  assert mc.d_informative == config_base.IMAGENET256_D_INFORMATIVE[int(patch)]


def test_every_field_without_a_default_must_be_set():
  c = config_base.base_config()
  with pytest.raises(ValueError, match=r"config\.train\.batch_size"):
    config_check.validate(c)


def count(name, arg=""):
  module = importlib.import_module(f"configs.{name}")
  return plan.count_params(config_check.validate(module.get_config(arg) if arg else module.get_config()))


@pytest.mark.parametrize("name,arg,paper", [
    # Paper Table 1 / supplement, (count, relative tolerance). 1.1B p16 is given per part (AF
    # 828M, AR 295M) and matched closely; 1.9B: only the total is asserted (see
    # configs/imagenet256_1p9b.py for why its 1.4B / 498M split does not follow from the widths).
    ("imagenet256_1p1b", "16", {"params_af": (828e6, 0.03), "params_prior": (295e6, 0.01),
                                "params_total": (1.1e9, 0.05)}),
    ("imagenet256_1p9b", "16", {"params_af": (1.4e9, 0.05), "params_total": (1.9e9, 0.05)}),
    ("imagenet64_556m", "", {"params_total": (556e6, 0.05)}),
])
def test_plan_parameter_counts_match_the_paper(name, arg, paper):
  counts = count(name, arg)      # jax.eval_shape: no parameter is allocated
  for key, (value, rtol) in paper.items():
    assert abs(counts[key] / value - 1) < rtol, (key, counts[key], value)


def test_plan_compiles_the_sharded_step_and_its_flops_agree_with_xla():
  c = importlib.import_module("configs.digits").get_config("tiny")
  c.sharding.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
  result = plan.plan(c, devices=jax.devices(), device_memory_gib=1.0, device_kind="H100")
  mem = result["memory"]
  assert mem["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert 0 < mem["peak_gib"] < 1.0 and mem["fits"]
  # XLA counts every op of the partitioned program (8 devices); ours counts matmuls only.
  xla_total = mem["xla_flops_per_device"] * 8
  assert 0.8 < result["train_flops_per_step"] / xla_total < 1.2
  assert result["ideal_step_s"] == pytest.approx(result["train_flops_per_step"] / (8 * 989e12))


def test_plan_reports_a_step_the_compiler_refuses_for_memory(monkeypatch):
  """The TPU compiler refuses a step larger than its HBM (RESOURCE_EXHAUSTED): the plan says it
  does not fit, with the compiler's line, instead of failing. Other compile errors still raise."""
  c = importlib.import_module("configs.digits").get_config("tiny")
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (96.61G) exceeds available HBM (95.74G).")

  def refuse(self, *args, **kwargs):
    raise jax.errors.JaxRuntimeError(message)

  monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
  mem = plan.plan(c, devices=jax.devices()[:1])["memory"]
  assert mem["fits"] is False and mem["compile_error"] == message
  assert mem["attention"] == "einsum" and "peak_gib" not in mem
  monkeypatch.setattr(jax.stages.Lowered, "compile", lambda *a, **k: (_ for _ in ()).throw(
      jax.errors.JaxRuntimeError("INTERNAL: something else")))
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    plan.plan(c, devices=jax.devices()[:1])


def test_mnist_tiny_trains_evaluates_and_samples_on_mnist5k(tmp_path):
  """configs/mnist.py:tiny end to end on the real mnist5k images: the test bpd is over the 1000
  test images at 256 levels, and the sample grid has one image per class."""
  import json

  import numpy as np

  from farmer_jax import train
  c = importlib.import_module("configs.mnist").get_config("tiny")
  mc = config_check.validate(c)
  assert (mc.num_tokens, mc.token_dim) == (49, 16)
  train.train_and_evaluate(c, str(tmp_path))
  metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  assert (metrics["dataset"], metrics["num_examples"], metrics["step"]) == ("mnist5k", 1000, 10)
  assert 1.0 < metrics["bpd"] < 9.0          # 8 bpd is a uniform guess over 256 levels
  samples = np.load(tmp_path / "samples" / "samples_10.npz")
  assert samples["images"].shape == (10, 28, 28, 1) and int(samples["num_levels"]) == 256
  np.testing.assert_array_equal(np.sort(samples["labels"]), np.arange(10))


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_config_variants_and_phase(name):
  module = importlib.import_module(f"configs.{name}")
  assert module.get_config("").phase == "train"
  assert module.get_config("tiny,distill").phase == "distill"
  assert (module.get_config("distill").model.af_width == module.get_config().model.af_width
          != module.get_config("tiny").model.af_width)
  with pytest.raises(ValueError, match=rf"configs/{name}\.py: unknown variant 'huge'.*'tiny'"):
    module.get_config("huge,distill")


def test_digits_wide_variant_is_the_default_schedule_on_a_wider_model():
  from configs import digits  # noqa: PLC0415
  default, wide = digits.get_config(), digits.get_config("wide")
  assert (wide.model.af_width, wide.model.prior_width) == (96, 96) != (default.model.af_width,
                                                                      default.model.prior_width)
  assert wide.train.weight_decay > default.train.weight_decay
  assert wide.train.num_steps == default.train.num_steps
  assert wide.sample.to_dict() == default.sample.to_dict()
  assert digits.get_config("wide,distill").phase == "distill"
  config_check.validate(wide)


def test_mnist_samples_variant_is_the_default_model_trained_with_noise():
  from configs import mnist  # noqa: PLC0415
  default, samples = mnist.get_config(), mnist.get_config("samples")
  assert samples.model.to_dict() == default.model.to_dict()
  # Longer: the samples variant is not held to the default's 30 minutes.
  assert samples.train.num_steps > default.train.num_steps
  assert (default.train.noise_max, default.train.noise_min, default.sample.denoise) == (0, 0, False)
  assert samples.train.noise_max == samples.train.noise_min > 0 and samples.sample.denoise
  config_check.validate(samples)
