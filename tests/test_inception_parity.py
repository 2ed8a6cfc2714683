"""Our Flax FID Inception equals pytorch-fid's InceptionV3 (FID blocks) with the same weights.

Needs torch, torchvision and pytorch-fid (several GB), so it is kept out of CI: deselected by
default (pytest.ini) and skipped where they are absent. Run it in a venv that has them:

    pip install torch torchvision pytorch-fid && pip install -e '.[test]'
    python -m pytest -m parity tests/test_inception_parity.py -n 0 -s

pytorch-fid's network is built from its own FID block classes without loading the published
weights, every weight and BN statistic is randomised (seeded), the state dict is saved as a .pth
in both of torch's formats and read back by our torch-free converter. Both networks then see the
same images end to end (resize to 299 and normalisation included).
"""
import jax
import numpy as np
import pytest

pytestmark = pytest.mark.parity

torch = pytest.importorskip("torch", reason="parity test needs torch + torchvision + pytorch-fid")
pytest.importorskip("torchvision", reason="parity test needs torchvision")
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception",
                                            reason="parity test needs pytorch-fid")

from farmer_jax.evaluation import inception, weights  # noqa: E402


def random_fid_inception():
  """pytorch-fid's FID InceptionV3 (as fid_inception_v3 builds it, minus the download) with
  seeded random weights and BN statistics, in eval mode."""
  m = pytorch_fid_inception
  net = m._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = m.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = m.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = m.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = m.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = m.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = m.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = m.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = m.FIDInceptionE_1(1280)
  net.Mixed_7c = m.FIDInceptionE_2(2048)
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, t in net.state_dict().items():
      if not t.is_floating_point():
        continue
      shape, leaf = t.shape, name.rsplit(".", 1)[-1]
      if name.endswith("conv.weight"):          # He init keeps activations O(1) through 94 layers
        fan_in = shape[1] * shape[2] * shape[3]
        t.copy_(torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif leaf in ("weight",) and name.startswith("fc"):
        t.copy_(torch.randn(shape, generator=g) / shape[1] ** 0.5)
      elif leaf == "weight" or leaf == "running_var":
        t.copy_(0.5 + torch.rand(shape, generator=g))
      else:                                     # BN bias, running mean, fc bias
        t.copy_(0.1 * torch.randn(shape, generator=g))
  return net.eval()


@pytest.fixture(scope="module")
def torch_model_and_pth(tmp_path_factory):
  net = random_fid_inception()
  tmp = tmp_path_factory.mktemp("pth")
  paths = {"zip": str(tmp / "zip.pth"), "legacy": str(tmp / "legacy.pth")}
  torch.save(net.state_dict(), paths["zip"])
  torch.save(net.state_dict(), paths["legacy"], _use_new_zipfile_serialization=False)
  # pytorch-fid's wrapper (resize to 299, [0, 1] -> [-1, 1], blocks up to the final avg pool)
  # around our random network instead of the downloaded one.
  original = pytorch_fid_inception.fid_inception_v3
  pytorch_fid_inception.fid_inception_v3 = lambda: net
  try:
    wrapper = pytorch_fid_inception.InceptionV3([3]).eval()
  finally:
    pytorch_fid_inception.fid_inception_v3 = original
  return net, wrapper, paths


def test_both_pth_formats_convert_to_the_same_variables(torch_model_and_pth):
  net, _, paths = torch_model_and_pth
  a = weights.load_variables(paths["zip"])
  b = weights.load_variables(paths["legacy"])
  jax.tree.map(np.testing.assert_array_equal, a, b)
  kernel = net.state_dict()["Mixed_6b.branch7x7_2.conv.weight"].numpy()    # [O, I, 1, 7]
  np.testing.assert_array_equal(a["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                kernel.transpose(2, 3, 1, 0))


@pytest.mark.parametrize("size", [64, 331])    # upsampled / downsampled to 299
def test_flax_inception_equals_pytorch_fid(torch_model_and_pth, size):
  net, wrapper, paths = torch_model_and_pth
  images = np.random.default_rng(size).random((3, size, size, 3), dtype=np.float32)   # [0, 1]
  with torch.no_grad():
    pool3_t = wrapper(torch.from_numpy(images).permute(0, 3, 1, 2))[0][:, :, 0, 0]
    logits_t = net.fc(pool3_t)
  variables = weights.load_variables(paths["zip"])
  model = inception.FIDInceptionV3(preprocess="pytorch_fid")
  out = jax.jit(model.apply)(variables, images * 255.0)
  pool3_diff = float(np.max(np.abs(np.asarray(out["pool3"]) - pool3_t.numpy())))
  logits_diff = float(np.max(np.abs(np.asarray(out["logits"]) - logits_t.numpy())))
  scale = (float(pool3_t.abs().max()), float(logits_t.abs().max()))
  print(f"\ninput {size}px: max |pool3 diff| {pool3_diff:.3g}, max |logits diff| "
        f"{logits_diff:.3g} (max |pool3| {scale[0]:.3g}, max |logits| {scale[1]:.3g})")
  assert pool3_diff < 1e-4 and logits_diff < 1e-4
  assert float(pool3_t.std()) > 1e-2      # the features are not degenerate
