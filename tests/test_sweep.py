"""`sweep`: one search, every (k, sigma, T), baselines, all against float64 NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resmem_jax as rm
import importlib

predict_module = importlib.import_module("resmem_jax.predict")

KS, SIGMAS, TEMPS, LAMS = (1, 4, 9), (0.2, 1.5), (0.5, 2.0), (0.0, 0.3, 0.8)  # lam 0: DeepNet


def _softmax(z, t):
  z = np.asarray(z, np.float64) / t
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _neighbours(keys, queries, k_max, exclude=None):
  d = np.sqrt(((queries[:, None].astype(np.float64) - keys[None]) ** 2).sum(-1))
  if exclude is not None:
    d[np.arange(len(queries)), exclude] = np.inf
  idx = np.stack([np.lexsort((np.arange(len(keys)), row))[:k_max] for row in d])
  return np.take_along_axis(d, idx, axis=1), idx


def _weights(d, k, sigma):
  w = np.exp(-(d[:, :k] - d[:, :1]) / sigma)
  return w / w.sum(axis=1, keepdims=True)


def _cls_metrics(p, y):
  p_true = np.clip(p[np.arange(len(y)), y], 1e-7, 1.0)
  return (p.argmax(axis=1) == y).mean(), -np.log(p_true).mean()


@pytest.fixture(scope="module")
def cls_data():
  rng = np.random.default_rng(0)
  n, q, d, c = 150, 45, 6, 4
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, c, n)
  z = (2 * rng.normal(size=(n, c))).astype(np.float32)
  xq = rng.normal(size=(q, d)).astype(np.float32)
  yq = rng.integers(0, c, q)
  zq = (2 * rng.normal(size=(q, c))).astype(np.float32)
  return x, y, z, xq, yq, zq


def _numpy_table(x, y, z, xq, yq, zq, exclude=None):
  """Every method and setting of the classification sweep, in float64."""
  d, idx = _neighbours(x, xq, max(KS), exclude)
  onehot = np.eye(z.shape[1])[y]
  want = {}
  for t in TEMPS:
    base = _softmax(zq, t)
    res = onehot - _softmax(z, t)
    want[("deepnet", None, None, t, None)] = _cls_metrics(base, yq)
    for s in SIGMAS:
      for k in KS:
        w = _weights(d, k, s)
        p_knn = np.einsum("qk,qkc->qc", w, onehot[idx[:, :k]])
        want[("resmem", k, s, t, None)] = _cls_metrics(
            base + np.einsum("qk,qkc->qc", w, res[idx[:, :k]]), yq)
        want[("knn", k, s, None, None)] = _cls_metrics(p_knn, yq)
        for lam in LAMS:
          want[("knn_lm", k, s, t, lam)] = _cls_metrics(lam * p_knn + (1 - lam) * base, yq)
  return want


def _key(row):
  return (row["method"], row["k"], row["sigma"], row["temperature"], row["lam"])


def test_classification_table_matches_numpy(cls_data):
  x, y, z, xq, yq, zq = cls_data
  mem = rm.build_memory(x, y, z, task="classification", temperature=1.0)
  result = rm.sweep(mem, xq, zq, yq, ks=KS, sigmas=SIGMAS, temperatures=TEMPS, lams=LAMS)
  want = _numpy_table(x, y, z, xq, yq, zq)
  assert {_key(r) for r in result.table} == set(want)
  assert len(result.table) == len(want)
  for row in result.table:
    acc, ll = want[_key(row)]
    assert row["accuracy"] == pytest.approx(acc, abs=1e-12), row
    assert row["log_loss"] == pytest.approx(ll, rel=1e-5, abs=1e-5), row
  assert result.metric == "accuracy" and result.n_queries == len(xq)
  for method, best in result.best.items():
    rows = [r for r in result.table if r["method"] == method]
    assert best["accuracy"] == max(r["accuracy"] for r in rows)
    assert best["log_loss"] == min(r["log_loss"] for r in rows
                                   if r["accuracy"] == best["accuracy"])
  assert "resmem" in result.format(top=2)


def test_resmem_rows_equal_predict(cls_data):
  x, y, z, xq, yq, zq = cls_data
  mem = rm.build_memory(x, y, z, task="classification", temperature=1.0)
  result = rm.sweep(mem, xq, zq, yq, ks=KS, sigmas=SIGMAS, temperatures=TEMPS)
  for row in result.table:
    if row["method"] != "resmem":
      continue
    at_t = rm.build_memory(x, y, z, task="classification", temperature=row["temperature"])
    p = np.asarray(rm.predict(at_t, xq, zq, k=row["k"], sigma=row["sigma"]), np.float64)
    acc, ll = _cls_metrics(p, yq)
    assert row["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert row["log_loss"] == pytest.approx(ll, rel=1e-5, abs=1e-5)


def test_leave_one_out_and_parts(cls_data):
  x, y, z, _, _, _ = cls_data
  result = rm.sweep((x, y, z), x, z, y, ks=KS, sigmas=SIGMAS, temperatures=TEMPS, lams=LAMS,
                    exclude=np.arange(len(x)), task="classification")
  want = _numpy_table(x, y, z, x, y, z, exclude=np.arange(len(x)))
  for row in result.table:
    acc, ll = want[_key(row)]
    assert row["accuracy"] == pytest.approx(acc, abs=1e-12), row
    assert row["log_loss"] == pytest.approx(ll, rel=1e-5, abs=1e-5), row
  # Without leave-one-out, k = 1 memorizes the training set.
  memorized = rm.sweep((x, y, z), x, z, y, ks=(1,), sigmas=(1.0,))
  assert memorized.best["resmem"]["accuracy"] == 1.0
  assert memorized.best["knn"]["accuracy"] == 1.0


def test_searches_once(cls_data, monkeypatch):
  x, y, z, xq, yq, zq = cls_data
  mem = rm.build_memory(x, y, z)
  calls = []
  real = predict_module.knn_agreed

  def counting(queries, keys, k, **kwargs):
    calls.append(k)
    return real(queries, keys, k, **kwargs)

  monkeypatch.setattr(predict_module, "knn_agreed", counting)
  rm.sweep(mem, xq, zq, yq, ks=KS, sigmas=SIGMAS, temperatures=TEMPS)
  assert calls == [max(KS)]
  calls.clear()
  rm.sweep(mem, xq, zq, yq, ks=KS, sigmas=SIGMAS, query_chunk=20)  # streamed: 3 chunks
  assert calls == [max(KS)] * 3


@pytest.mark.parametrize("shape", [(), (2,)])
def test_regression_table_matches_numpy(shape):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(120, 3)).astype(np.float32)
  y, f = rng.normal(size=(2, 120) + shape).astype(np.float32)
  xq = rng.normal(size=(30, 3)).astype(np.float32)
  yq, fq = rng.normal(size=(2, 30) + shape).astype(np.float32)
  mem = rm.build_memory(x, y, f, task="regression")
  result = rm.sweep(mem, xq, fq, yq, ks=KS, sigmas=SIGMAS, lams=LAMS)
  d, idx = _neighbours(x, xq, max(KS))
  y2, f2 = y.reshape(120, -1).astype(np.float64), f.reshape(120, -1)
  yq2, fq2 = yq.reshape(30, -1).astype(np.float64), fq.reshape(30, -1)

  def mse(pred):
    return np.mean((pred - yq2) ** 2)

  want = {("deepnet", None, None, None, None): mse(fq2)}
  for s in SIGMAS:
    for k in KS:
      w = _weights(d, k, s)
      knn = np.einsum("qk,qkm->qm", w, y2[idx[:, :k]])
      want[("resmem", k, s, None, None)] = mse(fq2 + np.einsum("qk,qkm->qm", w,
                                                                 (y2 - f2)[idx[:, :k]]))
      want[("knn", k, s, None, None)] = mse(knn)
      for lam in LAMS:
        want[("knn_lm", k, s, None, lam)] = mse(lam * knn + (1 - lam) * fq2)
  assert {_key(r) for r in result.table} == set(want)
  for row in result.table:
    assert row["mse"] == pytest.approx(want[_key(row)], rel=1e-5, abs=1e-6), row
  assert result.metric == "mse"
  assert result.best["resmem"]["mse"] == min(r["mse"] for r in result.table
                                              if r["method"] == "resmem")


@pytest.mark.parametrize("overrides,exc,fragment", [
    (dict(ks=()), ValueError, "ks must be a non-empty sequence"),
    (dict(ks=5), ValueError, "ks=5"),
    (dict(ks=(1, 1)), ValueError, "must not repeat"),
    (dict(ks=(1, 151)), ValueError, "ks[1]=151"),
    (dict(ks=(0,)), ValueError, "ks[0]=0"),
    (dict(ks=(150,), exclude=np.arange(45)), ValueError, "N - 1 = 149"),
    (dict(sigmas=(1.0, -1.0)), ValueError, "sigmas[1]=-1.0"),
    (dict(temperatures=(0.0,)), ValueError, "temperatures[0]=0.0"),
    (dict(lams=(1.5,)), ValueError, "lams[0]=1.5"),
    (dict(targets=np.full(45, 4)), ValueError, "targets[0]=4"),
    (dict(targets=np.zeros(44, np.int64)), ValueError, "targets.shape=(44,)"),
    (dict(targets=np.zeros(45, np.float32)), TypeError, "targets.dtype"),
    (dict(mem_or_parts="memory"), TypeError, "mem_or_parts"),
    (dict(task="regression"), ValueError, "built for task='classification'"),
    (dict(embeddings=np.zeros((0, 6), np.float32), base_outputs=np.zeros((0, 4), np.float32),
          targets=np.zeros(0, np.int64)), ValueError, "at least one held-out point"),
])
def test_sweep_rejects_bad_input(cls_data, overrides, exc, fragment):
  x, y, z, xq, yq, zq = cls_data
  kwargs = dict(mem_or_parts=rm.build_memory(x, y, z), embeddings=xq, base_outputs=zq,
                targets=yq, ks=(1, 3), sigmas=(1.0,))
  kwargs.update(overrides)
  with pytest.raises(exc) as info:
    rm.sweep(kwargs.pop("mem_or_parts"), kwargs.pop("embeddings"), kwargs.pop("base_outputs"),
             kwargs.pop("targets"), **kwargs)
  assert fragment in str(info.value), str(info.value)


def test_regression_sweep_rejects_temperatures():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(20, 3)).astype(np.float32)
  y = rng.normal(size=20).astype(np.float32)
  mem = rm.build_memory(x, y, y, task="regression")
  with pytest.raises(ValueError, match="temperatures apply to classification only"):
    rm.sweep(mem, x, y, y, ks=(1,), sigmas=(1.0,), temperatures=(1.0,))


def test_regression_sweep_from_parts_rejects_temperatures_before_building(monkeypatch):
  """Building the memory compiles; a call that will be refused must not pay for it."""
  sweep_module = importlib.import_module("resmem_jax.sweep")
  def refuse(*args, **kwargs):
    raise AssertionError("the memory was built before the temperatures were checked")
  monkeypatch.setattr(sweep_module, "build_memory", refuse)
  x = np.zeros((20, 3), np.float32)
  y = np.zeros(20, np.float32)
  with pytest.raises(ValueError, match="temperatures apply to classification only"):
    rm.sweep((x, y, y), x, y, y, ks=(1,), sigmas=(1.0,), temperatures=(1.0,),
             task="regression")


def test_a_nan_score_counts_as_wrong_and_ranks_last():
  """A NaN compares False with everything, so it must not pass for a correct argmax."""
  sweep_module = importlib.import_module("resmem_jax.sweep")
  scores = np.array([[0.2, 0.7, 0.1], [np.nan] * 3, [0.1, np.nan, 0.3]], np.float32)
  correct, _ = sweep_module._correct_and_log_loss(scores, 1)
  np.testing.assert_array_equal(correct, [1.0, 0.0, 0.0])
  rows = [{"accuracy": 0.5, "log_loss": float("nan")}, {"accuracy": 0.5, "log_loss": 2.0}]
  assert min(rows, key=sweep_module._rank_key) is rows[1]
  assert min([{"mse": float("nan")}, {"mse": 3.0}], key=sweep_module._rank_key)["mse"] == 3.0
  inf = float("inf")  # NaN ranked level with inf, so the first of the two won
  assert min([{"mse": float("nan")}, {"mse": inf}], key=sweep_module._rank_key)["mse"] == inf
  rows = [{"accuracy": 0.5, "log_loss": float("nan")}, {"accuracy": 0.5, "log_loss": inf}]
  assert min(rows, key=sweep_module._rank_key) is rows[1]


def test_exact_ties_do_not_depend_on_grid_order(cls_data):
  """At k = 1 sigma and the kNN-LM's lam = 1 change nothing, so those rows tie exactly;
  the best row is the same whichever order the grids come in."""
  x, y, z, xq, yq, zq = cls_data
  mem = rm.build_memory(x, y, z, task="classification", temperature=1.0)
  bests = [rm.sweep(mem, xq, zq, yq, ks=(1,), sigmas=sigmas, temperatures=(1.0,),
                    lams=(1.0,)).best for sigmas in ((3.0, 0.5, 1.0), (1.0, 0.5, 3.0))]
  for method in ("resmem", "knn", "knn_lm"):
    assert bests[0][method] == bests[1][method]
    assert bests[0][method]["sigma"] == 0.5
  sweep_module = importlib.import_module("resmem_jax.sweep")
  # The smaller k first, then the smaller sigma (not the smallest sigma overall).
  rows = [{"mse": 1.0, "k": 8, "sigma": 0.5}, {"mse": 1.0, "k": 2, "sigma": 4.0},
          {"mse": 1.0, "k": 2, "sigma": 0.7}]
  assert min(rows, key=sweep_module._rank_key) is rows[2]
  assert min(rows[::-1], key=sweep_module._rank_key) is rows[2]


def test_a_tied_argmax_reads_as_the_first_class():
  """The predicted class is argmax p, the first of tied maxima (NumPy's rule): a tie
  between the true class and an earlier one is wrong, with a later one right. Ties are
  common at large sigma, where kNN weights are exactly 1/k."""
  sweep_module = importlib.import_module("resmem_jax.sweep")
  scores = np.array([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4], [0.25, 0.25, 0.5]], np.float32)
  correct, _ = sweep_module._correct_and_log_loss(scores, 1)
  np.testing.assert_array_equal(correct, (scores.argmax(1) == 1).astype(np.float32))
  np.testing.assert_array_equal(correct, [0.0, 1.0, 0.0])


def test_ks_in_any_order_give_the_same_table(cls_data):
  """The search must find max(ks) neighbours whatever order ks come in."""
  x, y, z, xq, yq, zq = cls_data
  mem = rm.build_memory(x, y, z, task="classification", temperature=1.0)
  tables = [{_key(r): r for r in rm.sweep(mem, xq, zq, yq, ks=ks, sigmas=SIGMAS,
                                          temperatures=(1.0,), lams=(0.5,)).table}
            for ks in ((1, 4, 9), (9, 1, 4))]
  assert tables[0] == tables[1]


def test_temperatures_default_to_the_memorys(cls_data):
  """Without `temperatures` the sweep scores at the memory's own T, as documented."""
  x, y, z, xq, yq, zq = cls_data
  mem = rm.build_memory(x, y, z, task="classification", temperature=2.0)
  result = rm.sweep(mem, xq, zq, yq, ks=KS, sigmas=SIGMAS, lams=LAMS)
  assert {r["temperature"] for r in result.table} == {2.0, None}  # None: plain kNN
  want = _numpy_table(x, y, z, xq, yq, zq)
  for row in result.table:
    acc, ll = want[_key(row)]
    assert row["accuracy"] == pytest.approx(acc, abs=1e-12), row
    assert row["log_loss"] == pytest.approx(ll, rel=1e-5, abs=1e-5), row


def test_regression_resmem_under_a_large_offset_equals_predict():
  """Targets and outputs near 1e6 with residuals near 0.05: ResMem scored as
  f + avg(y) - avg(f) rounded both averages at 1e6 and read 7x the error `predict`
  makes, below DeepNet at every setting."""
  rng = np.random.default_rng(0)
  x, xq = rng.normal(size=(400, 2)).astype(np.float32), rng.normal(size=(200, 2)).astype(np.float32)
  f = (1e6 + rng.normal(size=400)).astype(np.float32)
  fq = (1e6 + rng.normal(size=200)).astype(np.float32)
  y = (f + 0.05 * np.sin(3 * x[:, 0])).astype(np.float32)
  yq = (fq + 0.05 * np.sin(3 * xq[:, 0])).astype(np.float32)
  mem = rm.build_memory(x, y, f, task="regression")
  res = rm.sweep(mem, xq, fq, yq, ks=(1, 5, 20), sigmas=(0.05, 0.5))
  for row in res.table:
    if row["method"] == "resmem":
      pred = np.asarray(rm.predict(mem, xq, fq, k=row["k"], sigma=row["sigma"]), np.float64)
      assert row["mse"] == pytest.approx(np.mean((pred - yq) ** 2), rel=1e-4), row
  assert res.best["resmem"]["mse"] < res.best["deepnet"]["mse"] / 3


def test_regression_errors_beyond_float32_squares_are_summed():
  """Errors of 2e18 square to 4e36 (finite) but 256 of them overflowed the float32
  block sum; errors of 1e35 square to inf; and a padding row's 0 * inf made NaN."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(50, 3)).astype(np.float32)
  zeros = np.zeros(50, np.float32)
  mem = rm.build_memory(x, zeros, zeros, task="regression")
  xq = rng.normal(size=(300, 3)).astype(np.float32)
  for value in (2e18, 1e35):
    yq, fq = np.full(300, value, np.float32), np.zeros(300, np.float32)
    res = rm.sweep(mem, xq, fq, yq, ks=(1,), sigmas=(1.0,), lams=(0.5,))
    want = np.float64(np.float32(value)) ** 2
    assert res.best["deepnet"]["mse"] == pytest.approx(want, rel=1e-6)
    assert res.best["knn_lm"]["mse"] == pytest.approx(want, rel=1e-6)
  # 30 queries pad to a bucket of 32; the padding rows' errors are not NaN-poison.
  y = (3e19 * (1 + 0.01 * rng.normal(size=50))).astype(np.float32)
  mem = rm.build_memory(x, y, y, task="regression")
  yq = (3e19 * (1 + 0.01 * rng.normal(size=30))).astype(np.float32)
  res = rm.sweep(mem, xq[:30], yq, yq, ks=(1,), sigmas=(1.0,), lams=(0.5,))
  d, idx = _neighbours(x, xq[:30], 1)
  want = np.mean((y[idx[:, 0]].astype(np.float64) - yq) ** 2)
  assert res.best["knn"]["mse"] == pytest.approx(want, rel=1e-5)
  assert res.best["deepnet"]["mse"] == 0.0


def test_regression_errors_are_measured_whatever_the_largest_value_elsewhere():
  """One memory target of 1e22, far from every query, set a common unit for all errors:
  errors near 1 divided by it squared to 0, every MSE read 0 and the tie rule chose
  k = 1. Within one block, queries with errors near 1e-15 beside one near 1e15 (and an
  exact one) are summed at the block's largest power of 4: nothing is lost but the
  relative rounding of a float32 sum."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(50, 3)).astype(np.float32)
  y, f = rng.normal(size=(2, 50)).astype(np.float32)
  x[7] += 100.0
  y[7] = 1e22
  mem = rm.build_memory(x, y, f, task="regression")
  xq = rng.normal(size=(20, 3)).astype(np.float32)
  yq, fq = rng.normal(size=(2, 20)).astype(np.float32)
  res = rm.sweep(mem, xq, fq, yq, ks=(1, 5), sigmas=(0.3, 1.0), lams=(0.5,))
  d, idx = _neighbours(x, xq, 5)
  assert 7 not in idx
  assert res.best["deepnet"]["mse"] == pytest.approx(np.mean((fq - yq.astype(np.float64)) ** 2),
                                                     rel=1e-6)
  for row in res.table:
    if row["method"] == "resmem":
      pred = np.asarray(rm.predict(mem, xq, fq, k=row["k"], sigma=row["sigma"]), np.float64)
      assert row["mse"] == pytest.approx(np.mean((pred - yq) ** 2), rel=1e-5), row

  fq = np.zeros(20, np.float32)
  yq = np.float32(1e-15) * rng.normal(size=20).astype(np.float32)
  yq[3], yq[5] = 1e15, 0.0
  res = rm.sweep(mem, xq, fq, yq, ks=(1,), sigmas=(1.0,), lams=(0.5,))
  want = np.mean(yq.astype(np.float64) ** 2)
  assert res.best["deepnet"]["mse"] == pytest.approx(want, rel=1e-6)
  small = np.delete(np.arange(20), 3)
  res = rm.sweep(mem, xq[small], fq[small], yq[small], ks=(1,), sigmas=(1.0,), lams=(0.5,))
  want = np.mean(yq[small].astype(np.float64) ** 2)
  assert want < 1e-29
  assert res.best["deepnet"]["mse"] == pytest.approx(want, rel=1e-6)


def test_tiny_temperatures_and_sigmas_stay_finite(cls_data):
  x, y, z, xq, yq, zq = cls_data
  res = rm.sweep((x, y, z), xq, zq, yq, ks=KS, sigmas=(1e-40, 0.5), temperatures=(1e-12, 1.0))
  assert all(np.isfinite(row["log_loss"]) for row in res.table)
  # T -> 0 makes DeepNet the argmax of the logits; sigma -> 0 makes kNN the nearest label.
  deep = next(r for r in res.table if r["method"] == "deepnet" and r["temperature"] == 1e-12)
  assert deep["accuracy"] == pytest.approx((zq.argmax(axis=1) == yq).mean())
  nearest = y[_neighbours(x, xq, 1)[1][:, 0]]
  knn = next(r for r in res.table if r["method"] == "knn" and r["sigma"] == 1e-40 and r["k"] == 4)
  assert knn["accuracy"] == pytest.approx((nearest == yq).mean())


def test_large_chunk_sums_match_float64():
  """One chunk of 32768 queries: float32 sums over it drifted by ~1e-4 relative."""
  rng = np.random.default_rng(15)
  n, c, q = 64, 3, 32768
  x = rng.normal(size=(n, 2)).astype(np.float32)
  y = rng.integers(0, c, n)
  mem = rm.build_memory(x, y, rng.normal(size=(n, c)).astype(np.float32))
  xq = rng.normal(size=(q, 2)).astype(np.float32)
  yq = rng.integers(0, c, q)
  res = rm.sweep(mem, xq, rng.normal(size=(q, c)).astype(np.float32), yq, ks=(1, 5),
                 sigmas=(0.3,), temperatures=(1.0,), lams=(0.5,))
  # k = 1: p_kNN is the nearest label's one-hot, so the log-loss is exact in float64.
  nearest = y[np.asarray(rm.knn(xq, x, 1).indices)[:, 0]]
  want = np.where(nearest == yq, 0.0, -np.log(np.float64(np.float32(1e-7)))).mean()
  got = next(r for r in res.table if r["method"] == "knn" and r["k"] == 1)["log_loss"]
  assert got == pytest.approx(want, rel=1e-6)


def test_grids_may_be_arrays(cls_data):
  x, y, z, xq, yq, zq = cls_data
  want = rm.sweep((x, y, z), xq, zq, yq, ks=(1, 4), sigmas=(0.25, 1.0), temperatures=(1.0,))
  got = rm.sweep((x, y, z), xq, zq, yq, ks=np.array([1, 4]), sigmas=np.geomspace(0.25, 1.0, 2),
                 temperatures=jax.numpy.ones(1))
  assert got.table == want.table


def test_every_grid_takes_0d_arrays(cls_data):
  """ks, sigmas and temperatures took `jnp.float32(0.5)`-style settings; lams refused them."""
  x, y, z, xq, yq, zq = cls_data
  mem = rm.build_memory(x, y, z, task="classification", temperature=1.0)
  plain = rm.sweep(mem, xq, zq, yq, ks=(1, 3), sigmas=(0.5,), temperatures=(1.0,),
                   lams=(0.25, 0.5))
  arrays = rm.sweep(mem, xq, zq, yq, ks=(np.int32(1), jnp.int32(3)), sigmas=(jnp.float32(0.5),),
                    temperatures=(np.float64(1.0),), lams=(jnp.float32(0.25), np.float32(0.5)))
  assert arrays.table == plain.table
