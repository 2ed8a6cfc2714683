"""Sample-quality evaluation: scores against plain numpy/scipy, the resize against TensorFlow's op,
the weights converter's mapping, and --mode=fid end to end on a tiny digits run.

The Inception network here has random weights and a 75-px input (the smallest it takes) to keep
CI fast: these tests judge the plumbing, never the numbers. Parity with pytorch-fid's network is
tests/test_inception_parity.py (needs torch; out of CI).
"""
import glob
import json
import os

import flax
import jax
import numpy as np
import pytest
import scipy.linalg

from configs import digits
from farmer_jax import config_check, datasets, rundir, sample, sharding, train
from farmer_jax.evaluation import fid_mode, inception, scores, weights

# ------------------------------------------------------------------ scores vs plain numpy / scipy


def scipy_fid(mu1, s1, mu2, s2):
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)


@pytest.mark.parametrize("n", [200, 20])    # more / fewer samples than dimensions
def test_frechet_distance_equals_scipy_sqrtm(n):
  rng = np.random.default_rng(n)
  d = 32
  a, b = rng.normal(size=(n, d)), rng.normal(size=(150, d)) @ rng.normal(size=(d, d)) * 0.5
  (mu1, s1), (mu2, s2) = scores.statistics(a), scores.statistics(b + 0.3)
  np.testing.assert_allclose(mu1, a.mean(0))
  np.testing.assert_allclose(s1, (a - a.mean(0)).T @ (a - a.mean(0)) / (n - 1))
  expected = scipy_fid(mu1, s1, mu2, s2)
  assert scores.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
  assert scores.frechet_distance_of_features(a, mu2, s2) == pytest.approx(expected, rel=1e-6)
  # sqrt of the rounding noise of zero eigenvalues: ~1e-8 of the trace, not exactly 0.
  assert abs(scores.frechet_distance_of_features(a, mu1, s1)) < 1e-6 * np.trace(s1)


def test_inception_score_equals_numpy():
  logits = np.random.default_rng(1).normal(size=(53, 1008)) * 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  per_split = []
  for i in range(5):
    part = p[i * 53 // 5:(i + 1) * 53 // 5]
    kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1)
    per_split.append(np.exp(kl.mean()))
  mean, std = scores.inception_score(logits, splits=5)
  assert mean == pytest.approx(np.mean(per_split), rel=1e-10)
  assert std == pytest.approx(np.std(per_split), rel=1e-8)
  assert scores.inception_score(np.zeros((10, 1008)), splits=2)[0] == pytest.approx(1.0)


def numpy_precision_recall(s, r, k):
  dist = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
  radii_s, radii_r = np.sort(dist(s, s), 1)[:, k], np.sort(dist(r, r), 1)[:, k]
  d_sr = dist(s, r)
  precision = (d_sr <= radii_r[None, :]).any(1).mean()
  recall = (d_sr.T <= radii_s[None, :]).any(1).mean()
  return radii_s, precision, recall


@pytest.mark.parametrize("block", [16, 10_000])   # several padded blocks / one block
def test_precision_recall_equals_numpy(block):
  rng = np.random.default_rng(2)
  s = rng.normal(size=(37, 8)).astype(np.float32)
  r = (rng.normal(size=(29, 8)) * 0.6 + 0.5).astype(np.float32)
  radii, precision, recall = numpy_precision_recall(s.astype(np.float64), r.astype(np.float64), 3)
  np.testing.assert_allclose(scores.manifold_radii(s, 3, block), radii, rtol=1e-4)
  assert scores.precision_recall(s, r, 3, block) == pytest.approx((precision, recall), abs=1e-12)
  assert 0 < precision < 1 and 0 < recall < 1


# ------------------------------------------------------------------ input resize vs TensorFlow


@pytest.mark.parametrize("mode,half_pixel", [("adm", False), ("pytorch_fid", True)])
def test_resize_equals_tensorflow_bilinear(mode, half_pixel):
  """adm: TF's ResizeBilinear as the 2015 graph runs it (no half-pixel centres); pytorch_fid:
  half-pixel centres, which is also torch's align_corners=False (no antialiasing either way)."""
  tf = pytest.importorskip("tensorflow")
  x = np.random.default_rng(3).random((2, 9, 13, 3), dtype=np.float32) * 255
  for size in (5, 16):   # shrink and enlarge
    expected = tf.raw_ops.ResizeBilinear(images=x, size=[size, size], align_corners=False,
                                         half_pixel_centers=half_pixel).numpy()
    got = np.asarray(inception.preprocess(x, size, mode))
    got = (got * 128 + 128) if mode == "adm" else (got + 1) / 2 * 255
    np.testing.assert_allclose(got, expected, atol=2e-3)


# ------------------------------------------------------------------ weights converter


def as_torch_state_dict(variables):
  """Flax variables -> pytorch-fid's names and layouts (what its .pth holds)."""
  torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}
  out = {}
  for (_, *modules, leaf), v in flax.traverse_util.flatten_dict(variables).items():
    v = np.asarray(v)
    if leaf == "kernel":
      v = v.T if modules == ["fc"] else v.transpose(3, 2, 0, 1)   # -> [out, in] / OIHW
    out[".".join([*modules, torch_leaf[leaf]])] = v
  out["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.int64(7)
  return out


def test_converter_maps_every_tensor_and_rejects_other_networks(tmp_path):
  variables = inception.random_variables(1)
  state = as_torch_state_dict(variables)
  assert sum(k.endswith("conv.weight") for k in state) == 94    # InceptionV3's conv layers
  converted = weights.convert_state_dict(state)
  jax.tree.map(np.testing.assert_array_equal, converted, variables)
  weights.save_npz(str(tmp_path / "w.npz"), converted)
  jax.tree.map(np.testing.assert_array_equal, weights.load_variables(str(tmp_path / "w.npz")),
               variables)
  with pytest.raises(ValueError, match="unused.*AuxLogits"):
    weights.convert_state_dict({**state, "AuxLogits.conv0.conv.weight": np.zeros((1, 1, 1, 1))})
  state.pop("Mixed_7c.branch_pool.bn.running_var")
  with pytest.raises(ValueError, match="missing.*Mixed_7c/branch_pool/bn/var"):
    weights.convert_state_dict(state)


def test_missing_weights_say_where_to_get_them(tmp_path):
  for spec in (None, str(tmp_path / "nope.pth")):
    with pytest.raises(weights.WeightsNotFoundError,
                       match=r"(?s)pt_inception-2015-12-05-6726825d\.pth.*github\.com/mseitzer"):
      weights.load_variables(spec)


# ------------------------------------------------------------------ features and --mode=fid

# Shared by the tests below so that the Inception network compiles once per session: 8 fake
# devices, global batch 24 (3 per device), 75 px.
def fid_config(workdir_config=None):
  c = workdir_config or digits.get_config("tiny")
  c.fid.update(inception_weights="random", reference="tfds:test", num_reference=24,
               num_samples=24, batch_size=24, resize=75, is_splits=4)
  return c


@pytest.fixture(scope="module")
def extractor():
  c = fid_config()
  mesh = sharding.make_mesh(c.sharding.mesh)
  rules = sharding.rules_from_config(c.sharding.rules)
  return fid_mode.FeatureExtractor(weights.load_variables("random"), mesh, rules, c.fid), mesh


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(extractor):
  features, mesh = extractor
  images = datasets.load_split("digits", "test")[0][:24]          # levels 0..16, one batch
  rng = np.random.default_rng(4)
  with jax.set_mesh(mesh):
    clean = features.from_array(images, 17, "clean")["pool3"]
    stats = scores.statistics(clean)
    fids = [scores.frechet_distance_of_features(clean, *stats)]
    for noise_levels in (1.0, 3.0):
      noisy = np.clip(np.round(images + rng.normal(size=images.shape) * noise_levels), 0, 16)
      noisy = features.from_array(noisy.astype(np.uint8), 17, "noisy")["pool3"]
      fids.append(scores.frechet_distance_of_features(noisy, *stats))
  assert abs(fids[0]) < 1e-4 * fids[1]
  assert 0 < fids[1] < fids[2]


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  """A checkpoint of the tiny digits model at initialisation (step 0): training it would only
  cost CI time, and the plumbing is the same."""
  workdir = str(tmp_path_factory.mktemp("fid_digits_tiny"))
  c = digits.get_config("tiny")
  c.sample.update(guidance="none", batch_size=24)     # one small sampler compilation
  trainer = train.Trainer(c)
  rundir.check_config(c, rundir.RunDir(workdir))
  ckpt = rundir.Checkpointer(workdir)
  ckpt.save(0, trainer.init())
  ckpt.close()
  return workdir, c


def test_fid_mode_end_to_end_writes_json_and_adm_samples(tiny_workdir):
  workdir, c = tiny_workdir
  result = fid_mode.evaluate_fid(fid_config(c), workdir)
  [path] = glob.glob(os.path.join(workdir, "eval", "fid_0_*.json"))   # tag: what made them
  assert os.path.basename(path).startswith("fid_0_exact_none_s0_")
  with open(path) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(result))
  assert written["num_samples"] == 24 and written["num_reference"] == 24 and written["step"] == 0
  assert np.isfinite(written["fid"]) and written["fid"] > 0
  assert 0 <= written["precision"] <= 1 and 0 <= written["recall"] <= 1
  assert written["inception_score"] >= 1.0 and written["warning"] == weights.RANDOM_NOTE
  assert written["reference"] == "tfds:test" and written["sample"]["guidance"] == "none"
  npz = np.load(written["samples_npz"])
  assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (24, 8, 8, 3)
  np.testing.assert_array_equal(npz["arr_0"][..., :1], sample.levels_to_uint8(npz["images"], 17))
  np.testing.assert_array_equal(npz["labels"], np.arange(24) % 10)

  # The same samples read back from their npz, against the same 24 test digits as an ADM-format
  # reference batch (arr_0 only, so its statistics come from its images).
  test_images = datasets.load_split("digits", "test")[0][:24]
  ref = os.path.join(workdir, "ref.npz")
  np.savez(ref, arr_0=sample.to_rgb_uint8(test_images, 17))
  again = fid_config(c)
  again.fid.update(samples=written["samples_npz"], reference=ref)
  second = fid_mode.evaluate_fid(again, workdir)
  assert second["sample"] is None and second["num_samples"] == 24
  assert second["reference_stats"].startswith("features of arr_0")
  # arr_0 rounds levels to 0..255 integers, so the reference features differ a little.
  assert second["fid"] == pytest.approx(written["fid"], rel=0.05)
  # Nothing was replaced: the first run's files are still there, next to the second's.
  assert len(glob.glob(os.path.join(workdir, "eval", "fid_0_*.json"))) == 2
  with open(path) as f:
    assert json.load(f) == written


def test_fid_mode_fails_before_sampling_without_weights_or_reference(tiny_workdir):
  workdir, c = tiny_workdir
  before = sorted(os.listdir(workdir))
  bad = fid_config(c)
  bad.fid.inception_weights = None
  with pytest.raises(weights.WeightsNotFoundError):
    fid_mode.evaluate_fid(bad, workdir)
  bad = fid_config(c)
  bad.fid.reference = os.path.join(workdir, "missing.npz")
  with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz"):
    fid_mode.evaluate_fid(bad, workdir)
  assert sorted(os.listdir(workdir)) == before


@pytest.mark.parametrize("field,value", [("resize", 50), ("preprocess", "tf"), ("pr_k", 0),
                                         ("reference", "test"), ("precision", "bf16")])
def test_invalid_fid_config_names_the_field(field, value):
  c = fid_config()
  c.fid[field] = value
  with pytest.raises(ValueError, match=rf"config\.fid\.{field}"):
    config_check.validate(c)


def test_fid_mode_with_the_jacobi_inverse_records_its_passes(tiny_workdir):
  workdir, c = tiny_workdir
  jacobi = fid_config(c.copy_and_resolve_references())
  jacobi.sample.inverse = "jacobi"
  jacobi.fid.update(samples=None, reference="tfds:test", save_samples=False)
  result = fid_mode.evaluate_fid(jacobi, workdir)
  assert result["decoder"] == "jacobi" and np.isfinite(result["fid"])
  # At initialisation every AF block is the identity: the first pass from its input moves nothing.
  assert result["inverse_passes_per_block"] == [1.0, 1.0]
