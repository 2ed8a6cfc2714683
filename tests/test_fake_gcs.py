"""`fake_gcs()`: gs:// through epath and through Orbax (TensorStore's gcs driver) share one
in-memory store, and nothing reaches the local disk."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath

from fake_gcs import fake_gcs


def test_epath_on_fake_gcs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  backend = epath.Path("gs://bkt/dir")._backend  # TensorFlow's where it is installed
  with fake_gcs() as gcs:
    root = epath.Path("gs://bkt/dir")
    assert not root.exists()
    root.mkdir(parents=True)
    assert root.exists() and root.is_dir() and list(root.iterdir()) == []
    (root / "sub").mkdir()
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01")
    assert (root / "a.txt").read_text() == "alpha" and (root / "a.txt").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["a.txt", "sub"]
    assert sorted(map(str, root.glob("*.txt"))) == ["gs://bkt/dir/a.txt"]
    with pytest.raises(FileNotFoundError):
      (root / "missing").read_text()
    # An implicit directory: it exists because an object lies under it.
    (root / "implicit" / "c.txt").write_text("gamma")
    assert (root / "implicit").is_dir()

    (root / "a.txt").rename(root / "renamed.txt")
    assert not (root / "a.txt").exists() and (root / "renamed.txt").read_text() == "alpha"
    (root / "sub").rename(root / "moved")
    assert not (root / "sub").exists() and (root / "moved" / "b.bin").read_bytes() == b"\x00\x01"
    assert gcs.read_bytes("gs://bkt/dir/renamed.txt") == b"alpha"
    assert gcs.list_objects("gs://bkt/") == [
        "gs://bkt/dir/implicit/c.txt", "gs://bkt/dir/moved/b.bin", "gs://bkt/dir/renamed.txt"]

    (root / "renamed.txt").unlink()
    root.rmtree()
    assert not root.exists() and gcs.list_objects() == []
  assert list(tmp_path.iterdir()) == []
  assert epath.Path("gs://bkt/dir")._backend is backend  # the patch is undone


def test_orbax_checkpoints_on_fake_gcs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def state(step):
    return {"w": jax.device_put(jnp.arange(16, dtype=jnp.float32) * step, sharding),
            "b": {"c": jax.device_put(jnp.full((3,), step, jnp.int32), replicated)}}

  with fake_gcs() as gcs:
    # As farmer_jax.checkpoint.Checkpointer configures it.
    options = ocp.CheckpointManagerOptions(max_to_keep=3, create=True,
                                           enable_async_checkpointing=True)
    manager = ocp.CheckpointManager("gs://bkt/run/checkpoints", options=options)
    for step in (1, 2):
      assert manager.save(step, args=ocp.args.StandardSave(state(step)))
    manager.wait_until_finished()
    assert manager.latest_step() == 2 and list(manager.all_steps()) == [1, 2]

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            state(0))
    restored = manager.restore(2, args=ocp.args.StandardRestore(abstract))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state(2))):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      assert got.sharding == want.sharding
    manager.close()

    # A fresh manager (a resumed run) sees the same steps through epath's listing.
    resumed = ocp.CheckpointManager("gs://bkt/run/checkpoints")
    assert resumed.all_steps() == [1, 2]
    resumed.close()
    # TensorStore wrote the OCDBT manifest over HTTP; epath sees the same object.
    manifest = epath.Path("gs://bkt/run/checkpoints/2/default/manifest.ocdbt")
    assert manifest.read_bytes() == gcs.read_bytes(str(manifest))
    names = gcs.list_objects("gs://bkt/run/checkpoints/")
    assert any(n.startswith("gs://bkt/run/checkpoints/2/") for n in names)
    assert gcs.list_objects() == names  # nothing outside the checkpoint directory
    kinds = {(method, path.split("/")[1]) for method, path, _ in gcs.requests}
    assert ("POST", "upload") in kinds and ("GET", "storage") in kinds  # TensorStore went via HTTP
  assert list(tmp_path.iterdir()) == []


def test_tensorstore_json_api_semantics():
  """What Orbax's saves rely on: generations, conditional writes, reads, ranges, listing, delete."""
  with fake_gcs() as gcs:
    kv = ts.KvStore.open({"driver": "gcs", "bucket": "bkt", "path": "p/"}).result()
    stamp = kv.write("k", b"v1").result()
    other = b"\x00" + (123).to_bytes(8, "little")  # a generation that is not the current one
    assert kv.write("k", b"v2", if_equal=other).result().generation == b""  # 412
    assert kv.write("k", b"v3", if_equal=stamp.generation).result().generation != b""
    assert kv.read("k").result().value == b"v3"
    assert kv.read("k", byte_range=slice(1, 2)).result().value == b"3"  # 206
    current = kv.read("k").result().stamp.generation
    assert kv.read("k", if_not_equal=current).result().state == "unspecified"  # 304
    assert kv.read("missing").result().state == "missing"  # 404
    epath.Path("gs://bkt/p/d/e.txt").write_text("from epath")
    assert kv.read("d/e.txt").result().value == b"from epath"
    assert sorted(kv.list().result()) == [b"d/e.txt", b"k"]
    kv.delete_range(ts.KvStore.KeyRange("k", "l")).result()
    assert gcs.list_objects() == ["gs://bkt/p/d/e.txt"]
