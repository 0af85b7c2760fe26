"""save_memory / load_memory round trips and their checks (sharded loading: test_sharded)."""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

import resmem_jax as rm
from resmem_jax import persistence


def _memory(task="classification", fingerprint="fp-1"):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 5)).astype(np.float32)
  if task == "classification":
    y, z = rng.integers(0, 3, 64), rng.normal(size=(64, 3)).astype(np.float32)
  else:
    y, z = rng.normal(size=(2, 64, 2)).astype(np.float32)
  return rm.build_memory(x, y, z, task=task, temperature=2.0, fingerprint=fingerprint)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_round_trip(tmp_path, task):
  mem = _memory(task)
  path = rm.save_memory(tmp_path / "mem", mem)
  loaded = rm.load_memory(path, task=task, dim=5, fingerprint="fp-1")
  assert loaded.meta == mem.meta
  for name in ("keys", "residuals", "outputs", "targets"):
    got, want = getattr(loaded, name), getattr(mem, name)
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(got, want, err_msg=name)
  q = np.asarray(mem.keys[:7]) + 0.01
  out = np.asarray(mem.outputs[:7]).reshape((7,) + mem.meta.output_shape)
  np.testing.assert_array_equal(rm.predict(loaded, q, out, k=3, sigma=0.5),
                                rm.predict(mem, q, out, k=3, sigma=0.5))


def test_load_checks_expectations(tmp_path):
  path = rm.save_memory(tmp_path / "mem", _memory())
  with pytest.raises(ValueError, match="task='classification', got task='regression'"):
    rm.load_memory(path, task="regression")
  with pytest.raises(ValueError, match="dim=5, got dim=6"):
    rm.load_memory(path, dim=6)
  with pytest.raises(ValueError, match="n_outputs=3, got n_outputs=10"):
    rm.load_memory(path, n_outputs=10)
  with pytest.raises(ValueError, match="fingerprint='fp-1', got fingerprint='fp-2'"):
    rm.load_memory(path, fingerprint="fp-2")
  loaded = rm.load_memory(path)
  with pytest.raises(ValueError, match="fingerprint='fp-2'"):
    rm.predict(loaded, np.zeros((1, 5), np.float32), np.zeros((1, 3), np.float32), k=1,
               sigma=1.0, fingerprint="fp-2")
  with pytest.raises(ValueError, match="dimension D=5"):
    rm.predict(loaded, np.zeros((1, 4), np.float32), np.zeros((1, 3), np.float32), k=1,
               sigma=1.0)


def test_save_refuses_to_overwrite_and_load_refuses_foreign_dirs(tmp_path):
  mem = _memory()
  path = rm.save_memory(tmp_path / "mem", mem)
  with pytest.raises(ValueError, match="already exists"):
    rm.save_memory(path, mem)
  rm.save_memory(path, _memory(fingerprint="fp-new"), overwrite=True)
  assert rm.load_memory(path).meta.fingerprint == "fp-new"
  with pytest.raises(ValueError, match="directory written by rm.save_memory"):
    rm.load_memory(tmp_path / "missing")
  (tmp_path / "foreign").mkdir()
  with pytest.raises(ValueError, match="does not hold a saved rm.Memory"):
    rm.load_memory(tmp_path / "foreign")
  with pytest.raises(TypeError, match="mem must be a rm.Memory"):
    rm.save_memory(tmp_path / "x", {"keys": 1})
  with pytest.raises(ValueError, match="splits rows"):
    rm.load_memory(path, sharding="data")


def test_overwrite_replaces_only_a_saved_memory(tmp_path):
  mem = _memory()
  results = tmp_path / "my_experiment"
  results.mkdir()
  (results / "results.csv").write_text("precious\n")
  with pytest.raises(ValueError, match="path is a directory without one"):
    rm.save_memory(results, mem, overwrite=True)
  assert (results / "results.csv").read_text() == "precious\n"
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(ValueError, match="already exists"):
    rm.save_memory(afile, mem)
  with pytest.raises(ValueError, match="path is a file"):
    rm.save_memory(afile, mem, overwrite=True)
  assert afile.read_text() == "x"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "my_experiment"]


def test_overwrite_leaves_only_the_new_memory(tmp_path):
  path = rm.save_memory(tmp_path / "mem", _memory(fingerprint="old"))
  assert rm.save_memory(path, _memory(fingerprint="new"), overwrite=True) == path
  assert rm.load_memory(path).meta.fingerprint == "new"
  assert [p.name for p in tmp_path.iterdir()] == ["mem"]  # no temporary or old copies


class _SaveThenFail(ocp.Checkpointer):
  """Writes the whole checkpoint, then fails (as a full disk or a preemption would)."""

  def save(self, *args, **kwargs):
    super().save(*args, **kwargs)
    raise OSError("disk full")


@pytest.mark.parametrize("failure", ["array_deleted", "after_writing"])
def test_failed_overwrite_keeps_the_old_memory(tmp_path, monkeypatch, failure):
  path = rm.save_memory(tmp_path / "mem", _memory(fingerprint="old"))
  new = _memory(fingerprint="new")
  if failure == "array_deleted":
    new.keys.delete()  # Orbax fails while writing the arrays.
    error = RuntimeError
  else:
    monkeypatch.setattr(persistence, "_checkpointer",
                        lambda: _SaveThenFail(ocp.CompositeCheckpointHandler()))
    error = OSError
  with pytest.raises(error):
    rm.save_memory(path, new, overwrite=True)
  assert rm.load_memory(path).meta.fingerprint == "old"
  assert [p.name for p in tmp_path.iterdir()] == ["mem"]  # the partial save is gone
  with pytest.raises(error):
    rm.save_memory(tmp_path / "fresh", new)
  assert [p.name for p in tmp_path.iterdir()] == ["mem"]


def test_arrays_keep_their_dtypes(tmp_path):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16)
  mem = rm.build_memory(x, rng.integers(0, 3, 8), rng.normal(size=(8, 3)).astype(np.float32))
  mem = mem._replace(residuals=mem.residuals.astype(jnp.bfloat16))  # half the memory
  loaded = rm.load_memory(rm.save_memory(tmp_path / "mem", mem))
  assert loaded.meta == mem.meta
  for name in ("keys", "residuals", "outputs", "targets"):
    got, want = getattr(loaded, name), getattr(mem, name)
    assert (got.dtype, got.shape) == (want.dtype, want.shape), name
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_float64_memory_needs_x64_to_load(tmp_path):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(8, 4)) * 1e-9 + 1.0  # rows float32 cannot tell apart
  jax.config.update("jax_enable_x64", True)
  try:
    mem = rm.build_memory(x, rng.integers(0, 3, 8), rng.normal(size=(8, 3)))
    assert mem.keys.dtype == jnp.float64
    path = rm.save_memory(tmp_path / "mem", mem)
    loaded = rm.load_memory(path)
    assert loaded.keys.dtype == jnp.float64
    np.testing.assert_array_equal(loaded.keys, x)
  finally:
    jax.config.update("jax_enable_x64", False)
  with pytest.raises(ValueError, match="stores keys as float64.*jax_enable_x64"):
    rm.load_memory(path)


@pytest.mark.parametrize("task,output_shape", [
    ("classification", (3,)), ("regression", (2,)), ("regression", ())])
def test_loads_format_version_1(tmp_path, task, output_shape):
  if task == "classification":
    mem = _memory()
  else:  # regression targets shaped (N,) + output_shape
    rng = np.random.default_rng(1)
    y, z = rng.normal(size=(2, 64) + output_shape).astype(np.float32)
    mem = rm.build_memory(rng.normal(size=(64, 5)).astype(np.float32), y, z,
                          task="regression")
  path = rm.save_memory(tmp_path / "mem", mem)
  meta_file = tmp_path / "mem" / "meta" / "metadata"
  raw = json.loads(meta_file.read_text())
  del raw["arrays"]  # what version 1 wrote
  meta_file.write_text(json.dumps(dict(raw, format_version=1)))
  loaded = rm.load_memory(path)
  assert loaded.meta == mem.meta
  for name in ("keys", "residuals", "outputs", "targets"):
    got, want = getattr(loaded, name), getattr(mem, name)
    assert (got.shape, got.dtype) == (want.shape, want.dtype), name
    np.testing.assert_array_equal(got, want, err_msg=name)
  meta_file.write_text(json.dumps(dict(raw, format_version=99)))
  with pytest.raises(ValueError, match="format_version=99"):
    rm.load_memory(path)


def test_save_refuses_arrays_that_disagree_with_meta(tmp_path):
  mem = _memory()
  cases = [
      (mem._replace(keys=mem.keys[:, :2]), r"mem.keys must be shaped \(64, 5\)"),
      (mem._replace(residuals=mem.residuals[:10]), r"mem.residuals must be shaped \(64, 3\)"),
      (mem._replace(targets=mem.targets.astype(jnp.float32)), "mem.targets must have an integer"),
      (mem._replace(keys=mem.keys.astype(jnp.bfloat16)), "mem.keys.dtype must be"),
  ]
  for bad, message in cases:
    with pytest.raises(ValueError, match=message):
      rm.save_memory(tmp_path / "mem", bad)
  assert not list(tmp_path.iterdir())


def test_paths_expand_home_and_keep_cloud_urls(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  assert rm.save_memory("~/mem", _memory()) == str(tmp_path / "mem")
  assert rm.load_memory("~/mem").meta.fingerprint == "fp-1"
  monkeypatch.chdir(tmp_path)
  assert rm.load_memory("mem").size == 64  # relative to the working directory
  assert os.fspath(persistence._resolve("gs://bucket/memory")) == "gs://bucket/memory"


@pytest.mark.parametrize("edit,message", [
    (lambda raw: raw.update(temperature=-1.0), "temperature must be finite and > 0"),
    (lambda raw: raw.update(task="ranking"), "task must be one of"),
    (lambda raw: raw.pop("task"), r"unreadable metadata \(KeyError: 'task'\)"),
    (lambda raw: raw.pop("fingerprint"), "unreadable metadata"),
    (lambda raw: raw.update(output_shape=[4]), "output_shape must be one of"),
    (lambda raw: raw.update(dtype="floaty"), "mem.keys.dtype must be mem.meta.dtype='floaty'"),
    # Orbax casts to the dtype asked for: labels to uint8 wrapped at 256, keys and
    # residuals lost precision, all silently.
    (lambda raw: raw["arrays"]["keys"].update(dtype="float16"),
     r"keys is stored as float32\[64, 5\], the metadata says float16\[64, 5\]"),
    (lambda raw: (raw["arrays"]["keys"].update(dtype="float16"), raw.update(dtype="float16")),
     "keys is stored as float32"),
    (lambda raw: raw["arrays"]["residuals"].update(dtype="bfloat16"),
     "residuals is stored as float32"),
    (lambda raw: raw["arrays"]["targets"].update(dtype="uint8"), "targets is stored as int32"),
    # Sizes the arrays do not have: the memory would contradict itself (and pass
    # load_memory(dim=4)).
    (lambda raw: raw.update(dim=4), "disagrees with its metadata"),
    (lambda raw: raw.update(n_outputs=4, output_shape=[4]), "disagrees with its metadata"),
    (lambda raw: (raw["arrays"]["keys"].update(shape=[64, 4]), raw.update(dim=4)),
     r"keys is stored as float32\[64, 5\], the metadata says float32\[64, 4\]"),
    (lambda raw: raw.update(size=63), "size=63 but the arrays hold N=64"),
    (lambda raw: raw.update(format_version=True), "format_version=True"),
    (lambda raw: raw.update(format_version=2.0), "format_version=2.0"),
    # JSON true and 5.0 used to pass through float() and int() as 1.0 and 5.
    (lambda raw: raw.update(temperature=True), "temperature must be a float"),
    (lambda raw: raw.update(dim=5.0), "dim must be an int"),
    (lambda raw: raw.update(output_shape=[True]), r"output_shape\[0\] must be an int"),
    (lambda raw: raw.update(dtype=32), "dtype must be a str"),
])
def test_load_refuses_metadata_that_is_edited_or_corrupt(tmp_path, edit, message):
  """Hand-edited or damaged metadata raises ValueError naming the field, instead of
  a KeyError, or a memory that predicts with T clamped to the one-hot limit."""
  path = rm.save_memory(tmp_path / "mem", _memory())
  meta_file = tmp_path / "mem" / "meta" / "metadata"
  raw = json.loads(meta_file.read_text())
  edit(raw)
  meta_file.write_text(json.dumps(raw))
  with pytest.raises(ValueError, match=message):
    rm.load_memory(path)


@pytest.mark.parametrize("task,name,value,message", [
    ("classification", "residuals", np.nan,
     r"mem.residuals must be finite, got mem.residuals\[5, 1\]=nan"),
    ("classification", "keys", np.inf, r"mem.keys must be finite"),
    ("classification", "targets", 3, r"mem.targets must be labels in \[0, C=3\), got "
                                     r"labels from 0 to 3"),
    ("classification", "targets", -1, r"mem.targets must be .* from -1 to 2"),
    ("regression", "targets", -np.inf, r"mem.targets must be finite"),
])
def test_load_refuses_damaged_values(tmp_path, task, name, value, message):
  """predict checks a memory's shapes, not its N x (D + 2C) values; a memory damaged
  on disk (or saved from a hand-edited one) is caught once, when it is loaded."""
  mem = _memory(task)
  arr = np.array(getattr(mem, name))
  arr[(5, 1)[:arr.ndim]] = value
  path = rm.save_memory(tmp_path / "mem", mem._replace(**{name: jnp.asarray(arr)}))
  with pytest.raises(ValueError, match="is damaged: " + message):
    rm.load_memory(path)


def test_saves_numpy_scalars_in_meta_as_json_numbers(tmp_path):
  """check_meta accepts NumPy scalars, so save_memory must write them (it raised
  'Object of type float32 is not JSON serializable' from Orbax's save thread)."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  mem = _memory()  # T = 2
  meta = dataclasses.replace(mem.meta, temperature=np.float32(2.0), dim=np.int64(5),
                             n_outputs=np.int32(3), output_shape=(np.int64(3),))
  loaded = rm.load_memory(rm.save_memory(tmp_path / "mem", mem._replace(meta=meta)))
  assert loaded.meta == mem.meta
  assert type(loaded.meta.temperature) is float and type(loaded.meta.dim) is int


def test_load_refuses_a_memory_without_its_arrays(tmp_path):
  path = rm.save_memory(tmp_path / "mem", _memory())
  shutil.rmtree(tmp_path / "mem" / "arrays")
  with pytest.raises(ValueError, match="is incomplete"):
    rm.load_memory(path)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failed_rename_into_place_keeps_the_old_memory_and_no_copy(tmp_path, monkeypatch,
                                                                     overwrite):
  """The new memory is written beside `path` and renamed into place; when that rename
  fails, the old memory (if any) is back at `path`, and neither the old one moved aside
  nor the new copy is left behind."""
  path = tmp_path / "mem"
  if overwrite:
    rm.save_memory(path, _memory(fingerprint="old"))
  cls = type(epath.Path(tmp_path))
  real_rename = cls.rename

  def rename(self, target):
    if re.fullmatch(r"mem\.tmp-[0-9a-f]+", self.name):  # the finished memory, into place
      raise OSError("rename failed")
    return real_rename(self, target)

  monkeypatch.setattr(cls, "rename", rename)
  with pytest.raises(OSError, match="rename failed"):
    rm.save_memory(path, _memory(fingerprint="new"), overwrite=overwrite)
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == (["mem"] if overwrite else [])
  if overwrite:
    assert rm.load_memory(path).meta.fingerprint == "old"


def test_overwrite_refuses_a_directory_whose_metadata_is_not_a_memorys(tmp_path):
  """Another Orbax checkpoint with a "meta" item (no format_version) is not a saved
  memory: overwrite=True must not delete it, nor the files beside it."""
  other = tmp_path / "train_ckpt"
  (other / "meta").mkdir(parents=True)
  (other / "meta" / "metadata").write_text(json.dumps({"step": 3}))
  (other / "precious.txt").write_text("keep me")
  with pytest.raises(ValueError, match="path is a directory without one"):
    rm.save_memory(other, _memory(), overwrite=True)
  assert (other / "precious.txt").read_text() == "keep me"


def test_load_places_every_array_with_the_given_row_sharding(tmp_path):
  mem = _memory()
  path = rm.save_memory(tmp_path / "mem", mem)
  mesh = jax.make_mesh((1,), ("data",))
  loaded = rm.load_memory(path, sharding=NamedSharding(mesh, P("data")))
  for name in ("keys", "residuals", "outputs", "targets"):
    sharding = getattr(loaded, name).sharding
    assert isinstance(sharding, NamedSharding), (name, sharding)
    assert sharding.mesh == mesh and sharding.spec[0] == "data", (name, sharding)
    np.testing.assert_array_equal(getattr(loaded, name), getattr(mem, name))
