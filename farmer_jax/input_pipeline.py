"""Per-host input: tfds image sets -> uint8 batches for this process.

One path for every data set: the embedded ones (`digits`, `mnist5k`: tfds builders in
`farmer_jax.datasets` that prepare themselves from installed packages, no download) and the
downloaded ones (ImageNet, CIFAR-10, ...) are read, split per process, shuffled, resumed and padded
for evaluation by the same code. Images come out in their native levels (0..16 for digits, 0..255
for the others; `datasets.num_levels`) as uint8 `image_BxHxWxC` with int32 `label_B`; the trainer
dequantises (SPEC sec. 1). The train stream is a pure function of (data config, seed, step,
process), so resuming at step s replays exactly the batches an uninterrupted run would have seen
from its s-th batch on.

TensorFlow and tfds are imported only when data is read: modes that read none (plan, fields, the
accelerator benchmark on a machine without TensorFlow) never need them.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Iterator

import jax
import numpy as np

# digits and mnist5k are the embedded sets of farmer_jax/datasets.py.
SUPPORTED_NAMES = ("digits", "mnist5k", "mnist", "cifar10", "imagenet2012",
                   "downsampled_imagenet/64x64")


class DatasetNotPreparedError(ValueError):
  """A tfds dataset has no prepared files in the configured data_dir (nothing is downloaded)."""


# ---------------------------------------------------------------------------------------------
# Common checks.
# ---------------------------------------------------------------------------------------------


def _processes(process_index, process_count) -> tuple[int, int]:
  p = jax.process_index() if process_index is None else int(process_index)
  n = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= p < n:
    raise ValueError(f"process_index={p} must lie in [0, process_count={n}).")
  return p, n


def _local_batch(global_batch_size: int, process_count: int, field: str) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"{field}={global_batch_size} must be a positive multiple of the number of "
                     f"processes ({process_count}); every host loads an equal share.")
  return global_batch_size // process_count


def _check_name(data) -> None:
  if data.name not in SUPPORTED_NAMES:
    raise ValueError(f"config.data.name={data.name!r} is not supported; use one of "
                     f"{', '.join(SUPPORTED_NAMES)}.")


def _check_levels(data, levels: int) -> None:
  # The trainer dequantises with num_levels; a wrong value silently shifts every reported bpd.
  if data.num_levels != levels:
    raise ValueError(f"config.data.num_levels={data.num_levels} but {data.name} images have "
                     f"{levels} levels; set config.data.num_levels={levels}.")


def _padded_batches(image, label, b: int, num_batches: int) -> Iterator[dict]:
  """Yields exactly num_batches batches of b; padding rows are zero with mask False."""
  for i in range(num_batches):
    img, lab = image[i * b:(i + 1) * b], label[i * b:(i + 1) * b]
    pad = b - len(lab)
    yield {"image": np.concatenate([img, np.zeros((pad,) + img.shape[1:], img.dtype)]),
           "label": np.concatenate([lab, np.zeros(pad, np.int32)]),
           "mask": np.arange(b) < len(lab)}


# ---------------------------------------------------------------------------------------------
# tfds sets: per-epoch tf.data pipelines with seeded file order and buffer shuffle.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _tf():
  import tensorflow as tf
  # The accelerators belong to JAX: TF must not reserve GPU memory for a CPU-only input pipeline.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised by the caller; its device choice stands
    pass
  return tf


def _builder(data):
  from farmer_jax import datasets  # imports tfds: only when data is read
  _tf()
  return datasets.builder(data.name, data.data_dir)


def _not_prepared(data) -> DatasetNotPreparedError:
  root = data.data_dir or "~/tensorflow_datasets"
  msg = (f"tfds dataset {data.name!r} is not prepared in data_dir={root!r} (config.data.data_dir);"
         f" farmer_jax never downloads. Prepare it once with\n"
         f"    tfds build {data.name} --data_dir={root}\n"
         f"or, without the CLI (which needs apache-beam in tfds 4.9),\n"
         f"    python -c \"import tensorflow_datasets as tfds; "
         f"tfds.builder('{data.name}', data_dir='{root}').download_and_prepare()\"")
  if data.name == "imagenet2012":
    msg += (f"\nImageNet cannot be downloaded by tfds: first put ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar in {root}/downloads/manual/.")
  return DatasetNotPreparedError(msg)


def _as_dataset(data, builder, split, *, shuffle_seed: int | None):
  """Serialized-image tf.data.Dataset of `split` (no decoding yet, so skipping is cheap)."""
  import tensorflow_datasets as tfds
  tf = _tf()
  options = tf.data.Options()
  options.deterministic = True          # parallel interleave/map must not reorder examples
  read_config = tfds.ReadConfig(options=options, shuffle_seed=shuffle_seed,
                                try_autocache=False)  # pipelines are rebuilt every epoch
  try:
    return builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                              read_config=read_config,
                              decoders={"image": tfds.decode.SkipDecoding()})
  except AssertionError as e:  # tfds signals missing data with an assert, not a typed error
    if not builder.is_prepared():
      raise _not_prepared(data) from e
    raise


def _check_tfds(data, builder) -> bool:
  """Checks config against the dataset's features; returns whether labels are yielded."""
  from farmer_jax import datasets
  _check_levels(data, datasets.num_levels(data.name))
  features = builder.info.features
  native = features["image"].shape                    # (H, W, C); H, W None if they vary
  if native[-1] != data.channels:
    raise ValueError(f"config.data.channels={data.channels} but {data.name} images have "
                     f"{native[-1]} channels; set config.data.channels={native[-1]}.")
  if "label" in features:
    k = features["label"].num_classes
    if data.num_classes not in (0, k):
      raise ValueError(f"config.data.num_classes={data.num_classes} but {data.name} has {k} "
                       f"classes; use {k} (or 0 to train unconditionally).")
    return data.num_classes > 0
  if data.num_classes > 1:
    raise ValueError(f"{data.name} has no labels: set config.data.num_classes=0.")
  return False


def _decode_fn(data, *, with_label: bool, flip_seed: int | None, process: tuple[int, int]):
  """(stream index, serialized example) -> {'image': uint8 [S, S, C], 'label': int32 []}.

  Images whose size differs from S = data.image_size get their shorter side resized to S
  (bilinear, antialiased) and are centre-cropped to S x S; images already S x S are untouched,
  so their values stay exactly the stored levels.
  """
  tf = _tf()
  s, c = data.image_size, data.channels
  p, n_proc = process

  def resize_crop(img):
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    scale = s / tf.cast(tf.minimum(h, w), tf.float32)
    nh = tf.maximum(s, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
    nw = tf.maximum(s, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
    img = tf.image.resize(img, [nh, nw], method="bilinear", antialias=True)
    img = tf.image.crop_to_bounding_box(img, (nh - s) // 2, (nw - s) // 2, s, s)
    return tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)

  def fn(index, ex):
    img = tf.io.decode_image(ex["image"], channels=c, expand_animations=False)
    same = tf.logical_and(tf.shape(img)[0] == s, tf.shape(img)[1] == s)
    img = tf.cond(same, lambda: img, lambda: resize_crop(img))
    img = tf.ensure_shape(img, [s, s, c])
    if flip_seed is not None:
      # Stateless: the flip depends on (seed, process, stream index) only, never on TF's state.
      key = tf.stack([tf.constant(flip_seed, tf.int64), index * n_proc + p])
      img = tf.image.stateless_random_flip_left_right(img, seed=key)
    label = tf.cast(ex["label"], tf.int32) if with_label else tf.constant(0, tf.int32)
    return {"image": img, "label": label}

  # Traced once and reused: the training stream builds a map per epoch, and retracing this
  # function there cost more CPU than decoding a small data set's epoch (docs/cpu.md).
  return tf.function(fn, autograph=False)


def _epoch_seed(seed: int, epoch: int, salt: int) -> int:
  return int(np.random.SeedSequence([seed, epoch, salt]).generate_state(1)[0] >> 1)


def _tfds_train(data, global_batch_size, seed, start_step, p, n_proc) -> Iterator[dict]:
  """Endless stream of this process's share, epoch by epoch.

  Epoch e reads this process's `split_for_jax_process` slice (equal sizes: the remainder of the
  split is dropped) with a file order and shuffle buffer seeded by (seed, e). Examples run as one
  stream across epochs; local step s takes stream positions s*b .. (s+1)*b-1 (b = B / P), so a
  batch may span two epochs. Resuming at step s starts at epoch s*b // n and `skip`s s*b % n
  serialized records before any image is decoded: a resume costs reading (not decoding) at most
  one epoch of records, and yields exactly the batches of an uninterrupted run.
  """
  import tensorflow_datasets as tfds
  tf = _tf()
  builder = _builder(data)
  split = tfds.split_for_jax_process(data.train_split, process_index=p, process_count=n_proc,
                                     drop_remainder=True)

  def epoch_ds(e):
    ds = _as_dataset(data, builder, split, shuffle_seed=_epoch_seed(seed, e, 0))
    if data.shuffle_buffer > 0:
      # Op-level seed only: deterministic as long as nobody sets TF's global seed (we never do).
      ds = ds.shuffle(data.shuffle_buffer, seed=_epoch_seed(seed, e, 1),
                      reshuffle_each_iteration=False)
    return ds

  first = epoch_ds(0)   # raises DatasetNotPreparedError now, not at the first next()
  with_label = _check_tfds(data, builder)
  n = int(first.cardinality())
  if n < 0:  # tfds asserts cardinality, so this only guards a future tfds change
    n = builder.info.splits[split].num_examples
  if n <= 0:
    raise ValueError(f"{data.name}:{data.train_split} has no examples for process {p} of "
                     f"{n_proc} (config.data.train_split).")
  decode = _decode_fn(data, with_label=with_label, process=(p, n_proc),
                      flip_seed=_epoch_seed(seed, 0, 2) if data.hflip else None)
  b = global_batch_size // n_proc

  def gen():
    epoch, offset = divmod(start_step * b, n)
    carry = None  # decoded tail (< b examples) of the previous epoch, heads the next batch
    for e in itertools.count(epoch):
      ds = (first if e == 0 else epoch_ds(e)).skip(offset if e == epoch else 0)
      ds = ds.enumerate(start=e * n + (offset if e == epoch else 0))
      ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
      if carry is not None:
        ds = tf.data.Dataset.from_tensor_slices(carry).concatenate(ds)
      ds = ds.batch(b).prefetch(tf.data.AUTOTUNE)
      carry = None
      for batch in tfds.as_numpy(ds):
        if len(batch["label"]) < b:   # only an epoch's last batch can be short
          carry = batch
        else:
          yield batch

  return gen()


def _tfds_eval(data, global_batch_size, p, n_proc) -> Iterator[dict]:
  import tensorflow_datasets as tfds
  tf = _tf()
  builder = _builder(data)
  total = num_eval_examples(data)
  with_label = _check_tfds(data, builder)
  split = tfds.split_for_jax_process(data.eval_split, process_index=p, process_count=n_proc)
  ds = _as_dataset(data, builder, split, shuffle_seed=None)
  b = global_batch_size // n_proc
  # Every host runs as many batches as the largest share needs; tfds.even_splits gives the
  # first hosts one example more. max() with the local count covers tfds.testing.mock_data,
  # which ignores splits and gives every host the whole mock set.
  num_batches = max(math.ceil(math.ceil(total / n_proc) / b), math.ceil(int(ds.cardinality()) / b))
  decode = _decode_fn(data, with_label=with_label, flip_seed=None, process=(p, n_proc))
  ds = ds.enumerate().map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(b).prefetch(tf.data.AUTOTUNE)

  def gen():
    done = 0
    for batch in tfds.as_numpy(ds):
      done += 1
      yield from _padded_batches(batch["image"], batch["label"], b, 1)
    empty = np.zeros((0, data.image_size, data.image_size, data.channels), np.uint8)
    yield from _padded_batches(empty, np.zeros(0, np.int32), b, num_batches - done)

  return gen()


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------


def train_iterator(data, *, global_batch_size: int, seed: int, start_step: int = 0,
                   process_index: int | None = None,
                   process_count: int | None = None) -> Iterator[dict]:
  """Endless training batches for this process.

  Yields {'image': uint8 [B/P, H, W, C] in native levels, 'label': int32 [B/P]}, B the global
  batch size and P the process count. The batch at step s depends only on (data config, seed, s,
  process): `train_iterator(..., start_step=s)` yields what an uninterrupted iterator yields as
  its s-th batch (0-based) onwards. A resume reads (without decoding) at most one epoch of this
  host's records, see `_tfds_train`.
  process_index / process_count default to jax.process_index() / jax.process_count().
  """
  _check_name(data)
  p, n_proc = _processes(process_index, process_count)
  _local_batch(global_batch_size, n_proc, "config.train.batch_size")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  return _tfds_train(data, global_batch_size, seed, start_step, p, n_proc)


def eval_iterator(data, *, global_batch_size: int, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict]:
  """One pass over data.eval_split for this process, in stored order, no flips.

  Yields {'image': uint8 [B/P, H, W, C], 'label': int32 [B/P], 'mask': bool [B/P]}; padding rows
  (zeros) have mask False. Every process yields the same number of batches (trailing fully
  masked ones where its share is smaller), so multi-host eval steps stay in lockstep. Over all
  processes the unmasked rows are each eval example exactly once.
  """
  _check_name(data)
  p, n_proc = _processes(process_index, process_count)
  _local_batch(global_batch_size, n_proc, "config.eval.batch_size")
  return _tfds_eval(data, global_batch_size, p, n_proc)


def num_examples(data, split: str) -> int:
  """Number of examples in `split` of the data set (all processes together)."""
  _check_name(data)
  builder = _builder(data)
  # The dataset's own cardinality (no reading) is what the iterators read; under mock_data it
  # differs from builder.info, which then knows no splits at all.
  return int(_as_dataset(data, builder, split, shuffle_seed=None).cardinality())


def num_eval_examples(data) -> int:
  """Number of examples in data.eval_split (all processes together)."""
  return num_examples(data, data.eval_split)
