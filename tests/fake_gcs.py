"""An in-memory stand-in for Google Cloud Storage (gs:// paths) inside one test process.

Orbax reaches GCS two ways: directories and small metadata files go through `etils.epath`, array
data through TensorStore's native `gcs` kvstore driver, which speaks the GCS JSON API over HTTP.
`fake_gcs()` serves both from one dict, `bucket/name -> object` (fsspec MemoryFiles that are never
changed once stored, each with a generation number), guarded by one lock:

* epath: made to use its fsspec backend for gs:// (TensorFlow's GCS filesystem, its default when
  TensorFlow is installed, cannot be pointed elsewhere), with an fsspec memory filesystem
  registered for "gs" and "gcs" whose keys are `bucket/name`. Writes appear on close, as uploads
  do on GCS. Empty directories (mkdir) live in fsspec's `pseudo_dirs` only: they are not objects,
  so TensorStore never lists them.
* TensorStore: TENSORSTORE_GCS_HTTP_URL points it at a local `ThreadingHTTPServer` implementing
  the part of the JSON API it uses: media and metadata reads (Range, ifGenerationMatch /
  ifGenerationNotMatch), listing (prefix, startOffset/endOffset, pages), media uploads, deletes.
* Orbax asks google-cloud-storage whether a bucket has a hierarchical namespace; the fake says no.
"""
import contextlib
import io
import itertools
import json
import os
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from fsspec.registry import _registry as _fsspec_registry  # patched, so that exit unregisters

# Process-wide, so that TensorStore caches never see a (key, generation) pair reused across fakes.
_generations = itertools.count(time.time_ns() // 1000)
_PAGE_SIZE = 1000


class _Store(dict):
  """`bucket/name -> MemoryFile`; every assignment is a new object generation."""

  def __init__(self):
    super().__init__()
    self.lock = threading.RLock()

  def __setitem__(self, key, value):
    with self.lock:
      value.generation = next(_generations)
      super().__setitem__(key, value)

  def __delitem__(self, key):
    with self.lock:
      super().__delitem__(key)


class _Upload(io.BytesIO):
  """A file opened for writing: the object appears (atomically) when it is closed."""

  def __init__(self, store, key):
    super().__init__()
    self._store, self._key = store, key

  def close(self):
    if not self.closed:
      self._store[self._key] = MemoryFile(None, self._key, self.getvalue())
    super().close()


class _GCSMemoryFileSystem(MemoryFileSystem):
  """fsspec memory filesystem for gs:// URLs; a fresh subclass (own store) per `fake_gcs()`."""
  protocol = ("gs", "gcs")
  root_marker = ""

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.strip("/")

  def _open(self, path, mode="rb", **kwargs):
    key = self._strip_protocol(path)
    with self.store.lock:
      if mode == "rb":
        if key not in self.store:
          raise IsADirectoryError(key) if self.isdir(key) else FileNotFoundError(key)
        return io.BytesIO(self.store[key].getvalue())  # a snapshot: readers share nothing
      if mode in ("wb", "xb"):
        if mode == "xb" and key in self.store:
          raise FileExistsError(key)
        return _Upload(self.store, key)
    raise ValueError(f"unsupported mode for gs:// (objects are immutable): {mode!r}")


def _locked(method):
  def wrapper(self, *args, **kwargs):
    with self.store.lock:
      return method(self, *args, **kwargs)
  return wrapper


# Compound operations (check-then-act, or iterating pseudo_dirs) run under the store's lock.
for _name in ("ls", "info", "find", "mkdir", "makedirs", "rmdir", "cp_file", "rm", "mv"):
  setattr(_GCSMemoryFileSystem, _name, _locked(getattr(MemoryFileSystem, _name)))


class _JSONAPIHandler(BaseHTTPRequestHandler):
  """The GCS JSON API subset that TensorStore's `gcs` kvstore driver uses."""
  protocol_version = "HTTP/1.1"
  store: _Store  # set on the per-fake subclass
  log: list

  def log_message(self, *args):  # keep test output quiet
    pass

  def _reply(self, code, body=b"", headers=()):
    if isinstance(body, dict):
      body, headers = json.dumps(body).encode(), [("Content-Type", "application/json"), *headers]
    self.send_response(code)
    for name, value in headers:
      self.send_header(name, value)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _error(self, code, message):
    self._reply(code, {"error": {"code": code, "message": message}})

  def _route(self):
    url = urllib.parse.urlsplit(self.path)
    query = dict(urllib.parse.parse_qsl(url.query))
    self.log.append((self.command, url.path, tuple(sorted(query))))
    parts = [urllib.parse.unquote(p) for p in url.path.split("/")]
    return parts, query

  @staticmethod
  def _precondition_error(query, obj, read=False):
    """The status for failed ifGeneration(Not)Match conditions (0 stands for "no object")."""
    generation = obj.generation if obj is not None else 0
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
      return 412
    if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
      return 304 if read else 412  # on a read: "not modified", the caller's copy is current
    return None

  @staticmethod
  def _metadata(bucket, name, obj):
    return {"kind": "storage#object", "bucket": bucket, "name": name, "size": str(obj.size),
            "generation": str(obj.generation), "metageneration": "1",
            "updated": obj.modified.isoformat().replace("+00:00", "Z")}

  def do_GET(self):
    parts, query = self._route()
    if parts[1:4] != ["storage", "v1", "b"] or len(parts) < 6 or parts[5] != "o":
      return self._error(400, f"unsupported request {self.path}")
    bucket = parts[4]
    if len(parts) == 6:
      return self._list(bucket, query)
    name = "/".join(parts[6:])
    with self.store.lock:
      obj = self.store.get(f"{bucket}/{name}")
    if obj is None:
      return self._error(404, f"No such object: {bucket}/{name}")
    if code := self._precondition_error(query, obj, read=True):
      return self._reply(304) if code == 304 else self._error(412, "Precondition Failed")
    if query.get("alt") != "media":
      return self._reply(200, self._metadata(bucket, name, obj))
    data = obj.getvalue()
    headers = [("x-goog-generation", str(obj.generation)), ("x-goog-metageneration", "1"),
               ("Content-Type", "application/octet-stream")]
    spec = self.headers.get("Range")
    if not spec:
      return self._reply(200, data, headers)
    start, _, end = spec.removeprefix("bytes=").partition("-")
    if not start:  # suffix range: the last `end` bytes
      start, end = max(0, len(data) - int(end)), ""
    start, end = int(start), min(int(end or len(data) - 1), len(data) - 1)
    if start >= len(data):
      return self._reply(416, b"", [("Content-Range", f"bytes */{len(data)}")])
    headers.append(("Content-Range", f"bytes {start}-{end}/{len(data)}"))
    return self._reply(206, data[start:end + 1], headers)

  def _list(self, bucket, query):
    prefix = f"{bucket}/{query.get('prefix', '')}"
    lower = max(query.get("pageToken", ""), query.get("startOffset", ""))
    upper = query.get("endOffset")
    with self.store.lock:
      names = sorted(k.removeprefix(f"{bucket}/") for k in self.store if k.startswith(prefix))
      items = [(n, self.store[f"{bucket}/{n}"]) for n in names
               if n >= lower and (upper is None or n < upper)]
    body = {"kind": "storage#objects"}
    if items:
      body["items"] = [self._metadata(bucket, n, o) for n, o in items[:_PAGE_SIZE]]
    if len(items) > _PAGE_SIZE:
      body["nextPageToken"] = items[_PAGE_SIZE][0]
    self._reply(200, body)

  def do_POST(self):
    parts, query = self._route()
    data = self.rfile.read(int(self.headers["Content-Length"]))  # TensorStore never chunks
    if parts[1:4] != ["upload", "storage", "v1"] or query.get("uploadType") != "media":
      return self._error(400, f"unsupported request {self.path}")
    bucket, name = parts[5], query["name"]
    key = f"{bucket}/{name}"
    with self.store.lock:
      if self._precondition_error(query, self.store.get(key)):
        return self._error(412, "Precondition Failed")
      self.store[key] = obj = MemoryFile(None, key, data)
    self._reply(200, self._metadata(bucket, name, obj))

  def do_DELETE(self):
    parts, query = self._route()
    if parts[1:4] != ["storage", "v1", "b"] or len(parts) < 7:
      return self._error(400, f"unsupported request {self.path}")
    bucket, name = parts[4], "/".join(parts[6:])
    key = f"{bucket}/{name}"
    with self.store.lock:
      obj = self.store.get(key)
      if obj is None:
        return self._error(404, f"No such object: {key}")
      if self._precondition_error(query, obj):
        return self._error(412, "Precondition Failed")
      del self.store[key]
    self._reply(204)


class FakeGCS:
  """What `fake_gcs()` yields: the shared store, seen as GCS objects."""

  def __init__(self, fs, url, requests):
    self.fs = fs  # the fsspec filesystem behind epath's gs:// paths
    self.url = url  # the JSON API endpoint TensorStore uses
    self.requests = requests  # (method, url path, sorted query keys) of each HTTP request

  def list_objects(self, prefix="gs://"):
    """Sorted `gs://bucket/name` URLs of all objects whose URL starts with `prefix`."""
    with self.fs.store.lock:
      return sorted(u for u in (f"gs://{k}" for k in self.fs.store) if u.startswith(prefix))

  def read_bytes(self, path):
    """The content of the object at `path` (gs://bucket/name)."""
    with self.fs.store.lock:
      return self.fs.store[self.fs._strip_protocol(path)].getvalue()


def _setenv(stack, name, value):
  old = os.environ.get(name)
  os.environ[name] = value
  stack.callback(lambda: os.environ.pop(name) if old is None else os.environ.update({name: old}))


@contextlib.contextmanager
def fake_gcs():
  """Serves gs:// from memory for epath, fsspec and TensorStore until the block exits."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=import-outside-toplevel
  store, requests = _Store(), []
  fs_cls = type("FakeGCSFileSystem", (_GCSMemoryFileSystem,), {"store": store, "pseudo_dirs": [""]})
  handler = type("Handler", (_JSONAPIHandler,), {"store": store, "log": requests})
  server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
  server.daemon_threads = True
  url = f"http://127.0.0.1:{server.server_address[1]}"
  # pylint: disable-next=protected-access
  clear_epath_cache = epath_backend.fsspec_backend._get_filesystem.cache_clear
  with contextlib.ExitStack() as stack:
    stack.callback(server.server_close)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    stack.callback(server.shutdown)
    _setenv(stack, "TENSORSTORE_GCS_HTTP_URL", url)  # read at each kvstore open, not once
    # epath: the fsspec backend for gs:// (`_is_tf_installed` is cached: EPATH_USE_TF set now
    # would be ignored after a first use, and would stick if it were the first).
    stack.enter_context(mock.patch.object(gpath, "_is_tf_installed", lambda: False))
    stack.enter_context(mock.patch.dict(_fsspec_registry, {"gs": fs_cls, "gcs": fs_cls}))
    stack.enter_context(mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled",
                                          lambda path: False))
    stack.callback(clear_epath_cache)  # epath caches the filesystem it got for "gcs"
    clear_epath_cache()
    yield FakeGCS(fs_cls(), url, requests)
