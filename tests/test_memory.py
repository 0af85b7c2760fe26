"""Memory construction: residuals against float64 NumPy, metadata, pytree behaviour, errors."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resmem_jax as rm


def _softmax64(z, t):
  z = np.asarray(z, np.float64) / t
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _data(n=40, d=6, c=4, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, c, n),
          (3 * rng.normal(size=(n, c))).astype(np.float32))


@pytest.mark.parametrize("temperature", [0.25, 1.0, 4.0])
def test_classification_residuals_match_numpy(temperature):
  _, y, z = _data()
  got = np.asarray(rm.residuals(y, z, task="classification", temperature=temperature))
  want = np.eye(z.shape[1])[y] - _softmax64(z, temperature)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got.sum(axis=1), 0.0, atol=1e-6)  # rows of onehot - softmax


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_logits_are_scored_in_float32(dtype):
  """A bfloat16 model's logits are taken as they are but scored in float32: softmax at
  bfloat16's 3 digits would be off by ~1e-3, and predict returns float32."""
  x, y, z = _data()
  z16 = jnp.asarray(z, dtype)
  want = _softmax64(np.asarray(z16, np.float64), 1.5)
  got = rm.base_prediction(z16, task="classification", temperature=1.5)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-6)
  res = rm.residuals(y, z16, task="classification", temperature=1.5)
  np.testing.assert_allclose(res, np.eye(z.shape[1])[y] - want, atol=1e-6)
  mem = rm.build_memory(x, y, z16, task="classification", temperature=1.5)
  np.testing.assert_allclose(mem.residuals, np.eye(z.shape[1])[y] - want, atol=1e-6)
  out = rm.predict(mem, x[:5], z16[:5], k=1, sigma=1.0)  # each query's own row
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.eye(z.shape[1])[y[:5]], atol=2e-6)


def test_regression_residuals_match_numpy():
  rng = np.random.default_rng(1)
  y, f = rng.normal(size=(2, 30, 3)).astype(np.float32)
  got = np.asarray(rm.residuals(y, f, task="regression"))
  np.testing.assert_allclose(got, y.astype(np.float64) - f, atol=1e-6)


def test_build_memory_classification_fields():
  x, y, z = _data()
  mem = rm.build_memory(x, y, z, task="classification", temperature=2.0, fingerprint="abc")
  assert mem.meta == rm.MemoryMeta(task="classification", temperature=2.0, dim=6, n_outputs=4,
                                   output_shape=(4,), dtype="float32", fingerprint="abc")
  assert mem.size == 40
  np.testing.assert_array_equal(mem.keys, x)
  np.testing.assert_array_equal(mem.targets, y)
  assert mem.targets.dtype == jnp.int32
  np.testing.assert_array_equal(mem.outputs, z)
  np.testing.assert_allclose(mem.residuals, np.eye(4)[y] - _softmax64(z, 2.0), atol=1e-6)


@pytest.mark.parametrize("shape", [(25,), (25, 3)])
def test_build_memory_regression_stores_rows(shape):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(25, 5)).astype(np.float32)
  y, f = rng.normal(size=(2,) + shape).astype(np.float32)
  mem = rm.build_memory(x, y, f, task="regression", temperature=3.0)
  assert mem.meta.temperature == 1.0  # regression has no temperature: T is not stored
  assert mem.meta.output_shape == shape[1:]
  assert mem.meta.n_outputs == (shape[1] if len(shape) == 2 else 1)
  assert mem.residuals.shape == (25, mem.meta.n_outputs)
  np.testing.assert_allclose(mem.residuals.reshape(shape), y.astype(np.float64) - f, atol=1e-6)


@pytest.mark.parametrize("temperature", [1e-40, 1e-300])
def test_tiny_temperature_gives_the_one_hot_limit(temperature):
  # Below float32's normal range T would flush to 0 (0 / 0 at the argmax): it is
  # clamped, and the result is the T -> 0 limit, onehot(y) - onehot(argmax z).
  x, y, z = _data()
  want = np.eye(z.shape[1])[y] - np.eye(z.shape[1])[z.argmax(axis=1)]
  np.testing.assert_array_equal(rm.residuals(y, z, temperature=temperature), want)
  mem = rm.build_memory(x, y, z, temperature=temperature)
  np.testing.assert_array_equal(mem.residuals, want)
  assert np.isfinite(np.asarray(rm.predict(mem, x[:3], z[:3], k=2, sigma=0.5))).all()


@pytest.mark.parametrize("temperature", [1e38, 1e300])
def test_huge_temperature_gives_the_uniform_limit(temperature):
  x, y, z = _data()
  want = np.eye(z.shape[1])[y] - 1 / z.shape[1]
  np.testing.assert_allclose(rm.build_memory(x, y, z, temperature=temperature).residuals,
                             want, atol=1e-6)
  z_inf = jnp.array([[1.0, 2.0, -jnp.inf]])
  np.testing.assert_allclose(rm.base_prediction(z_inf, task="classification",
                                                temperature=temperature), [[0.5, 0.5, 0]])


def test_tempered_softmax_handles_infinite_logits():
  z = jnp.array([[1.0, 2.0, -jnp.inf], [jnp.inf, jnp.inf, 0.0], [-jnp.inf, -jnp.inf, 0.0]])
  got = rm.base_prediction(z, task="classification", temperature=1e-40)
  np.testing.assert_array_equal(got, [[0, 1, 0], [0.5, 0.5, 0], [0, 0, 1]])


def test_build_memory_takes_a_concrete_0d_temperature():
  x, y, z = _data()
  for t in (jnp.float32(2.0), np.float32(2.0), np.array(2.0)):
    mem = rm.build_memory(x, y, z, temperature=t)
    assert mem.meta.temperature == 2.0 and type(mem.meta.temperature) is float
    np.testing.assert_allclose(mem.residuals, np.eye(4)[y] - _softmax64(z, 2.0), atol=1e-6)
  with pytest.raises(TypeError, match="temperature"):
    rm.build_memory(x, y, z, temperature=jnp.ones(2))


def test_row_sharded_embeddings_give_a_row_sharded_memory_on_one_device_mesh():
  x, y, z = _data()
  mesh = jax.make_mesh((1,), ("data",))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  mem = rm.build_memory(xs, y, z)  # labels and logits as NumPy
  for name in ("residuals", "outputs", "targets"):
    spec = getattr(mem, name).sharding.spec
    assert spec[0] == "data" and all(a is None for a in spec[1:]), (name, spec)
  np.testing.assert_array_equal(mem.residuals, rm.build_memory(x, y, z).residuals)


# Two CPU devices need their own process: the device count is fixed when JAX starts.
_SHARDED_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")
import jax, numpy as np, resmem_jax as rm
from jax.sharding import NamedSharding, PartitionSpec as P
assert jax.device_count() == 2, jax.devices()
mesh = jax.make_mesh((2,), ("data",))
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 4)).astype(np.float32)
for task, y, z in (("classification", rng.integers(0, 3, 16), rng.normal(size=(16, 3))),
                   ("regression", rng.normal(size=16).astype(np.float32),
                    rng.normal(size=16))):
  mem = rm.build_memory(jax.device_put(x, NamedSharding(mesh, P("data"))), y,
                        z.astype(np.float32), task=task)
  for name in ("keys", "residuals", "outputs", "targets"):
    arr = getattr(mem, name)
    assert len(arr.devices()) == 2, (task, name, arr.sharding)
    assert arr.sharding.spec[0] == "data", (task, name, arr.sharding)
    assert arr.addressable_shards[0].data.shape[0] == 8, (task, name, arr.sharding)
  ref = rm.build_memory(x, y, z.astype(np.float32), task=task)
  np.testing.assert_array_equal(mem.residuals, ref.residuals)
print("SHARDED MEMORY OK")
"""


def test_row_sharded_embeddings_give_a_row_sharded_memory_on_two_cpu_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=300)
  assert "SHARDED MEMORY OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_memory_is_a_pytree_with_static_meta():
  x, y, z = _data()
  mem = rm.build_memory(x, y, z, task="classification", temperature=1.0)
  leaves = jax.tree_util.tree_leaves(mem)
  assert len(leaves) == 4  # keys, residuals, outputs, targets; meta is static
  traces = []

  @jax.jit
  def total(m):
    traces.append(m.meta)
    return jnp.sum(m.residuals) * m.meta.temperature

  total(mem)
  total(mem._replace(residuals=mem.residuals + 1.0))  # new values: no retrace
  assert len(traces) == 1
  total(rm.build_memory(x, y, z, task="classification", temperature=3.0))  # new meta: retrace
  assert len(traces) == 2
  mapped = jax.tree_util.tree_map(lambda a: a[:5], mem)
  assert mapped.meta == mem.meta and mapped.keys.shape == (5, 6)


def test_labels_closed_over_by_an_outer_jit_are_still_checked():
  """Concrete labels under jit are checked on the spot, as concrete embeddings are."""
  x, y, z = _data()
  want = rm.build_memory(x, y, z, task="classification", temperature=1.0)
  got = jax.jit(lambda e: rm.build_memory(e, y, z, task="classification",
                                          temperature=1.0))(x)
  np.testing.assert_allclose(got.residuals, want.residuals, rtol=0, atol=1e-6)
  bad = y.copy()
  bad[3] = z.shape[1]
  with pytest.raises(ValueError, match=r"targets must be labels in \[0, C=4\)"):
    jax.jit(lambda e: rm.build_memory(e, bad, z, task="classification"))(x)


@pytest.mark.parametrize("bad", [np.iinfo(np.int64).min, 2**32 + 3, -2**32 + 1])
def test_int64_labels_beyond_int32_are_out_of_range_not_wrapped(bad):
  """With 64-bit mode off JAX narrows int64 to int32: the range check measured the
  wrapped labels, and -2^63 (a "no label" marker) was stored as class 0, 2^32 + 3 as 3."""
  x, y, z = _data()
  labels = y.astype(np.int64)
  labels[2] = bad
  match = rf"targets must be labels in \[0, C=4\), got labels from .*first targets\[2\]={bad}"
  with pytest.raises(ValueError, match=match):
    rm.build_memory(x, labels, z, task="classification")
  with pytest.raises(ValueError, match=match):
    rm.residuals(labels, z, task="classification")
  mem = rm.build_memory(x, y, z, task="classification")
  with pytest.raises(ValueError, match=match):
    rm.sweep(mem, x, z, labels, ks=(1,), sigmas=(1.0,))


def test_model_fingerprint_tracks_values_and_structure():
  params = {"dense": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}
  fp = rm.model_fingerprint(params)
  assert fp == rm.model_fingerprint(jax.tree_util.tree_map(jnp.asarray, params))
  changed = {"dense": {"kernel": params["dense"]["kernel"] * 2, "bias": params["dense"]["bias"]}}
  assert rm.model_fingerprint(changed) != fp
  assert rm.model_fingerprint({"other": params["dense"]}) != fp  # a key
  reshaped = {"dense": {"kernel": params["dense"]["kernel"].reshape(2, 3),
                        "bias": params["dense"]["bias"]}}
  assert rm.model_fingerprint(reshaped) != fp  # same bytes, another shape
  recast = {"dense": {"kernel": params["dense"]["kernel"].view(np.int32),
                      "bias": params["dense"]["bias"]}}
  assert rm.model_fingerprint(recast) != fp  # same bytes, another dtype
  extra = {"params": params, "batch_stats": {"mean": np.zeros(2, np.float32)}}
  assert rm.model_fingerprint(extra) != rm.model_fingerprint({"params": params})


def test_model_fingerprint_ignores_the_container_type():
  params = {"dense": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}
  assert rm.model_fingerprint(flax.core.freeze(params)) == rm.model_fingerprint(params)
  assert rm.model_fingerprint([np.ones(2)]) == rm.model_fingerprint((np.ones(2),))


# Builds a TrainState (static apply_fn and tx: functions whose addresses differ between
# processes) holding a FrozenDict of parameters, and prints its fingerprint.
_FINGERPRINT_SCRIPT = """
import numpy as np, optax, flax, resmem_jax as rm
from flax.training.train_state import TrainState
rng = np.random.default_rng(0)
params = flax.core.freeze({"dense": {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
                                     "bias": np.zeros(2, np.float32)}})
state = TrainState.create(apply_fn=lambda *args: None, params=params, tx=optax.sgd(0.1))
print(rm.model_fingerprint(state))
"""


def test_model_fingerprint_is_the_same_in_another_process():
  here = io.StringIO()
  with contextlib.redirect_stdout(here):
    exec(_FINGERPRINT_SCRIPT, {})  # pylint: disable=exec-used
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  other = subprocess.run([sys.executable, "-c", _FINGERPRINT_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
  assert other.stdout.strip() == here.getvalue().strip(), other.stderr


def _bad_build_cases():
  x, y, z = _data(n=10, d=3, c=4)
  xn = x.copy()
  xn[2, 1] = np.nan
  zi = z.copy()
  zi[3, 0] = np.inf
  yr, fr = np.zeros((2, 10), np.float32)
  return [
      # (kwargs, exception, fragment of the message)
      (dict(embeddings=x.astype(np.int32)), TypeError, "embeddings.dtype"),
      (dict(embeddings=x[0]), ValueError, "embeddings.shape=(3,)"),
      (dict(embeddings=x[:0], targets=y[:0], base_outputs=z[:0]), ValueError, "empty"),
      (dict(embeddings=xn), ValueError, "embeddings[2, 1]=nan"),
      (dict(base_outputs=zi), ValueError, "base_outputs[3, 0]=inf"),
      # float64 input JAX computes in float32: 1e39 would become inf there.
      (dict(base_outputs=np.where(np.arange(4) == 2, 1e39, z.astype(np.float64))),
       ValueError, "base_outputs must be finite in float32"),
      (dict(embeddings=np.where(np.arange(3) == 1, -1e39, x.astype(np.float64))),
       ValueError, "embeddings[0, 1]=-1e+39"),
      (dict(targets=y.astype(np.float32)), TypeError, "targets.dtype=float32"),
      (dict(targets=np.where(np.arange(10) == 7, 4, y)), ValueError, "targets[7]=4"),
      (dict(targets=np.where(np.arange(10) == 1, -1, y)), ValueError, "targets[1]=-1"),
      (dict(targets=y[:9]), ValueError, "targets.shape=(9,)"),
      (dict(base_outputs=z[:, :, None]), ValueError, "base_outputs.shape=(10, 4, 1)"),
      (dict(base_outputs=z[:, :0]), ValueError, "C >= 1"),
      (dict(temperature=0.0), ValueError, "temperature=0.0"),
      (dict(temperature=-1.0), ValueError, "temperature=-1.0"),
      (dict(temperature=float("nan")), ValueError, "temperature=nan"),
      (dict(task="ranking"), ValueError, "task='ranking'"),
      (dict(fingerprint=123), TypeError, "fingerprint=123"),
      (dict(task="regression", targets=yr, base_outputs=fr[:, None]), ValueError,
       "base_outputs.shape=(10, 1)"),
      (dict(task="regression", targets=y, base_outputs=fr), TypeError, "targets.dtype"),
      (dict(task="regression", targets=np.zeros((10, 0), np.float32),
            base_outputs=np.zeros((10, 0), np.float32)), ValueError, "M >= 1"),
      (dict(task="regression", targets=np.where(np.arange(10) == 4, np.nan, yr),
            base_outputs=fr), ValueError, "targets[4]=nan"),
  ], (x, y, z)


@pytest.mark.parametrize("case", range(len(_bad_build_cases()[0])))
def test_build_memory_rejects_bad_input(case):
  cases, (x, y, z) = _bad_build_cases()
  overrides, exc, fragment = cases[case]
  kwargs = dict(embeddings=x, targets=y, base_outputs=z, task="classification", temperature=1.0)
  kwargs.update(overrides)
  with pytest.raises(exc, match=None) as info:
    rm.build_memory(kwargs.pop("embeddings"), kwargs.pop("targets"),
                    kwargs.pop("base_outputs"), **kwargs)
  assert fragment in str(info.value), str(info.value)


def test_residuals_rejects_bad_input():
  _, y, z = _data(n=10, c=4)
  with pytest.raises(ValueError, match=r"targets\[0\]=9"):
    rm.residuals(np.where(np.arange(10) == 0, 9, y), z)
  with pytest.raises(ValueError, match="temperature=0"):
    rm.residuals(y, z, temperature=0)


def test_regression_residuals_that_overflow_float32_are_refused():
  """Finite float32 targets and outputs whose difference is beyond float32."""
  x = np.zeros((30, 4), np.float32)
  y, f = np.full(30, 3e38, np.float32), np.full(30, -3e38, np.float32)
  with pytest.raises(ValueError, match="targets - base_outputs must be finite in float32"):
    rm.build_memory(x, y, f, task="regression")
  with pytest.raises(ValueError, match="targets - base_outputs must be finite in float32"):
    rm.residuals(y, f, task="regression")


def test_64_bit_values_beyond_float32_are_refused():
  """With jax_enable_x64 on, float64 inputs pass as finite, but the memory computes in
  float32: a logit of 1e39 used to become inf and give residuals [1, -0.5, -0.5]."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(10, 3)), np.arange(10) % 3
  with jax.enable_x64(True):
    with pytest.raises(ValueError, match=r"base_outputs must lie within float32's range"):
      rm.build_memory(x, y, np.tile([[2e38, 1e39, 3e39]], (10, 1)))
    with pytest.raises(ValueError, match=r"targets must lie within float32's range"):
      rm.build_memory(x, np.full(10, 1e39), np.zeros(10), task="regression")
    with pytest.raises(ValueError, match=r"embeddings must lie within float32's range"):
      rm.build_memory(x * 1e39, y, np.zeros((10, 3)))
    mem = rm.build_memory(x, y, np.zeros((10, 3)))
    with pytest.raises(ValueError, match=r"base_outputs must lie within float32's range"):
      rm.predict(mem, x, np.full((10, 3), 1e39), k=2, sigma=1.0)


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -1.0, "mem.meta.temperature must be finite and > 0"),
    ("temperature", 0.0, "mem.meta.temperature must be finite and > 0"),
    ("task", "ranking", "mem.meta.task must be one of"),
    ("output_shape", (4,), "mem.meta.output_shape must be one of"),
    ("dim", 0, "mem.meta.dim must satisfy 1 <= mem.meta.dim"),
])
def test_a_meta_edited_to_invalid_values_is_refused(field, value, message):
  """`dataclasses.replace` on the meta can leave what `build_memory` never writes; a
  T <= 0 used to predict silently with T clamped to the one-hot limit."""
  _, y, z = _data(n=10, c=3)
  mem = rm.build_memory(np.zeros((10, 2), np.float32), y, z)
  bad = mem._replace(meta=dataclasses.replace(mem.meta, **{field: value}))
  with pytest.raises(ValueError, match=message):
    rm.predict(bad, np.zeros((2, 2), np.float32), np.zeros((2, 3), np.float32), k=2, sigma=1.0)


def test_non_finite_keys_of_a_hand_edited_memory_are_named_as_the_caller_knows_them():
  _, y, z = _data(n=10, c=3)
  mem = rm.build_memory(np.zeros((10, 2), np.float32), y, z)
  bad = mem._replace(keys=mem.keys.at[4, 1].set(jnp.nan))
  queries, base = np.zeros((2, 2), np.float32), np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match=r"mem.keys must be finite, got mem.keys\[4, 1\]=nan"):
    rm.predict(bad, queries, base, k=2, sigma=1.0)
  with pytest.raises(ValueError, match=r"mem.keys must be finite, got mem.keys\[4, 1\]=nan"):
    rm.sweep(bad, queries, base, np.zeros(2, np.int32), ks=(2,), sigmas=(1.0,))


def test_base_prediction_checks_task_and_temperature():
  z = jnp.array([[0.0, 1.0]])
  with pytest.raises(ValueError, match="task='clasification'"):
    rm.base_prediction(z, task="clasification")
  for t in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
      rm.base_prediction(z, task="classification", temperature=t)
  np.testing.assert_allclose(rm.base_prediction(z, task="classification", temperature=1.0),
                             [[0.26894142, 0.7310586]], rtol=1e-6)


def test_the_tuning_recipe_works_for_regression():
  """The README builds the final memory with `best["temperature"]`, which sweep gives
  as None for regression: build_memory refused it with a TypeError."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, 4)).astype(np.float32)
  y, f = rng.normal(size=(2, 30, 2)).astype(np.float32)
  best = rm.sweep(rm.build_memory(x, y, f, task="regression"), x[:10], f[:10], y[:10],
                  ks=(1, 3), sigmas=(1.0,)).best["resmem"]
  assert best["temperature"] is None
  mem = rm.build_memory(x, y, f, task="regression", temperature=best["temperature"])
  assert mem.meta == rm.build_memory(x, y, f, task="regression").meta
  with pytest.raises(TypeError, match="temperature=None"):
    rm.build_memory(x, rng.integers(0, 2, 30), f, temperature=None)


def test_real_valued_targets_without_a_task_say_to_pass_regression():
  x, _, z = _data()
  with pytest.raises(TypeError, match="task='classification' .*pass task='regression'"):
    rm.build_memory(x, np.linspace(0, 1, len(x)).astype(np.float32), z)
