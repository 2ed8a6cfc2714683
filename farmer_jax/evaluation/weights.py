"""Inception weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` -> Flax, without torch.

A `.pth` file is either a zip archive (torch >= 1.6: `<name>/data.pkl` plus one raw file per
storage under `<name>/data/`) or the older stream of pickles (magic number, protocol, system info,
the object, storage keys, then each storage as an int64 element count and its raw bytes). Both
are read here with `pickle` + `zipfile` + numpy: the pickle's references to torch functions are
resolved to small stand-ins that build numpy arrays. Nothing is downloaded.

    python -m farmer_jax.evaluation.weights pt_inception-2015-12-05-6726825d.pth inception_fid.npz

writes the converted variables as an `.npz` (keys "params/Mixed_5b/branch1x1/conv/kernel", ...);
`config.fid.inception_weights` takes either file.
"""
import collections
import functools
import io
import pickle
import struct
import sys
import zipfile

from etils import epath
import flax
import jax
import numpy as np

from farmer_jax.evaluation import inception

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
RANDOM = "random"
RANDOM_NOTE = "random weights: plumbing only, not comparable"


class WeightsNotFoundError(FileNotFoundError):
  pass


def missing_weights_error(path) -> WeightsNotFoundError:
  where = ("config.fid.inception_weights is not set" if not path
           else f"config.fid.inception_weights = {path!r} does not exist")
  return WeightsNotFoundError(
      f"{where}. FID, IS and precision/recall need the FID Inception weights (TF's "
      f"inception-2015-12-05 graph as ported by pytorch-fid); farmer_jax never downloads. Get "
      f"{WEIGHTS_FILE} once from\n    {WEIGHTS_URL}\n(or from pytorch-fid's cache, "
      f"~/.cache/torch/hub/checkpoints/), then pass "
      f"--config.fid.inception_weights=/path/to/{WEIGHTS_FILE}, or convert it once with "
      f"`python -m farmer_jax.evaluation.weights {WEIGHTS_FILE} inception_fid.npz` and pass the "
      f".npz. (--config.fid.inception_weights=random runs the plumbing with random weights; its "
      f"numbers mean nothing.)")


# ---------------------------------------------------------------------------------------------
# A torch-free reader of PyTorch's serialisation formats.
# ---------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
  """What a pickled `torch.FloatStorage` (etc.) stands for: only its element dtype matters."""

  def __init__(self, name: str):
    if name not in _STORAGE_DTYPES:
      raise ValueError(f"unsupported tensor storage type torch.{name} in the weights file")
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A storage named in the pickle; its bytes are filled in by the format's reader (in the legacy
  format they come after the pickle that refers to them)."""

  def __init__(self, kind: _StorageType):
    self.kind, self.array = kind, None


class _Tensor:
  """torch._utils._rebuild_tensor(_v2)'s arguments, made an array once the storage is read."""

  def __init__(self, storage: _Storage, offset: int, size, stride, *unused):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def array(self) -> np.ndarray:
    flat = self.storage.array
    if not self.size:
      return flat[self.offset].copy()
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size, strides=tuple(s * flat.itemsize for s in self.stride))
    return np.array(view)


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): _Tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _Tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, *unused: data,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
  """Resolves only what a state dict of dense tensors needs. Pickles can run code: any other
  global is an error, never an import."""

  def __init__(self, file):
    super().__init__(file)
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a weights file")

  def persistent_load(self, pid):
    # ("storage", storage type, key, location, element count[, view metadata (legacy)])
    if not (isinstance(pid, tuple) and pid[0] == "storage") or (len(pid) > 5 and pid[5]):
      raise pickle.UnpicklingError(f"unsupported storage reference {pid!r} in a weights file")
    return self.storages.setdefault(str(pid[2]), _Storage(pid[1]))


def _read_zip(path: str, data: io.BytesIO):
  with zipfile.ZipFile(data) as z:
    pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise ValueError(f"{path}: a zip .pth holds one data.pkl, found {pkl}")
    root = pkl[0][:-len("data.pkl")]
    order = "<"
    if f"{root}byteorder" in z.namelist() and z.read(f"{root}byteorder").strip() == b"big":
      order = ">"
    unpickler = _Unpickler(io.BytesIO(z.read(pkl[0])))
    obj = unpickler.load()
    for key, storage in unpickler.storages.items():
      storage.array = np.frombuffer(z.read(f"{root}data/{key}"),
                                    storage.kind.dtype.newbyteorder(order))
  return obj


def _read_legacy(path: str, f: io.BytesIO):
  """torch.save(..., _use_new_zipfile_serialization=False), the format of torch < 1.6."""
  try:
    magic, _, sys_info = (pickle.load(f) for _ in range(3))
  except Exception as e:
    raise ValueError(f"{path} is neither a zip .pth nor a legacy torch.save file") from e
  if magic != _LEGACY_MAGIC:
    raise ValueError(f"{path} is neither a zip .pth nor a legacy torch.save file")
  order = "<" if sys_info.get("little_endian", True) else ">"
  unpickler = _Unpickler(f)
  obj = unpickler.load()
  for key in pickle.load(f):   # each storage: int64 element count, then its raw bytes
    storage = unpickler.storages[str(key)]
    (numel,) = struct.unpack(order + "q", f.read(8))
    dtype = storage.kind.dtype.newbyteorder(order)
    storage.array = np.frombuffer(f.read(numel * dtype.itemsize), dtype)
  return obj


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict file (zip or legacy format; local, gs://, or any path etils.epath reads)
  -> {name: numpy array}, without torch."""
  data = io.BytesIO(epath.Path(path).read_bytes())
  is_zip = zipfile.is_zipfile(data)
  data.seek(0)
  state = _read_zip(path, data) if is_zip else _read_legacy(path, data)
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
  return {k: v.array() if isinstance(v, _Tensor) else np.asarray(v) for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# State dict -> Flax variables.
# ---------------------------------------------------------------------------------------------

# (torch module, torch leaf) -> (Flax collection, Flax leaf)
_LEAF_NAMES = {
    ("conv", "weight"): ("params", "kernel"),
    ("bn", "weight"): ("params", "scale"),
    ("bn", "bias"): ("params", "bias"),
    ("bn", "running_mean"): ("batch_stats", "mean"),
    ("bn", "running_var"): ("batch_stats", "var"),
    ("fc", "weight"): ("params", "kernel"),
    ("fc", "bias"): ("params", "bias"),
}


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict[str, jax.ShapeDtypeStruct]:
  return flax.traverse_util.flatten_dict(inception.variable_shapes(), sep="/")


def _checked(flat: dict[str, np.ndarray], source: str, unused=()) -> dict:
  """Flat {"params/Mixed_5b/branch1x1/conv/kernel": array, ...} -> nested variables, after checking
  that every variable of FIDInceptionV3 is there with its shape and nothing else is."""
  expected = _expected_shapes()
  unused = list(unused) + sorted(set(flat) - set(expected))
  missing = sorted(set(expected) - set(flat))
  if unused or missing:
    raise ValueError(f"{source} is not the FID Inception network's weights: unused "
                     f"{unused[:6]} ({len(unused)} in all), missing {missing[:6]} "
                     f"({len(missing)} in all)")
  for path, value in flat.items():
    if value.shape != expected[path].shape:
      raise ValueError(f"{source}: {path} has shape {value.shape}, the network needs "
                       f"{expected[path].shape}")
  return flax.traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()},
                                           sep="/")


def convert_state_dict(state_dict: dict[str, np.ndarray], source: str = "the state dict") -> dict:
  """pytorch-fid's FID Inception state dict -> {"params", "batch_stats"} of FIDInceptionV3.

  Names map one to one (`Mixed_5b.branch1x1.conv.weight` -> params/Mixed_5b/branch1x1/conv/kernel);
  conv kernels go from OIHW to HWIO, the fc matrix is transposed. BN's `num_batches_tracked`
  counters are dropped; any other tensor left over, or variable left empty, is an error.
  """
  flat, unused = {}, []
  for name, value in state_dict.items():
    *modules, leaf = name.split(".")
    if leaf == "num_batches_tracked":
      continue
    key = (modules[-1] if modules else "", leaf)
    if key not in _LEAF_NAMES:
      unused.append(name)
      continue
    collection, flax_leaf = _LEAF_NAMES[key]
    value = np.asarray(value)
    if key == ("conv", "weight"):
      value = value.transpose(2, 3, 1, 0)     # OIHW -> HWIO
    elif key == ("fc", "weight"):
      value = value.T                         # [out, in] -> [in, out]
    flat["/".join([collection, *modules, flax_leaf])] = value
  return _checked(flat, source, unused)


def save_npz(path: str, variables: dict) -> None:
  flat = flax.traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def load_variables(spec: str | None, *, seed: int = 0) -> dict:
  """`config.fid.inception_weights` -> Flax variables {"params", "batch_stats"}: a .pth (converted
  on the fly), a converted .npz, or "random" (plumbing checks only)."""
  if spec == RANDOM:
    return inception.random_variables(seed)
  if not spec or not epath.Path(spec).exists():
    raise missing_weights_error(spec)
  if spec.endswith(".npz"):
    with np.load(io.BytesIO(epath.Path(spec).read_bytes())) as z:
      return _checked({k: z[k] for k in z.files}, spec)
  return convert_state_dict(read_state_dict(spec), spec)


def main(argv):
  if len(argv) != 3:
    sys.exit(f"usage: python -m farmer_jax.evaluation.weights {WEIGHTS_FILE} OUT.npz")
  save_npz(argv[2], convert_state_dict(read_state_dict(argv[1])))
  print(f"wrote {argv[2]}")


if __name__ == "__main__":
  main(sys.argv)
