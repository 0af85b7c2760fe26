"""The command line: experiments/vision.py end to end, and the size sweep, on tiny runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resmem_jax import analysis
from resmem_jax import SweepResult
from resmem_jax import configs
from resmem_jax import models
from resmem_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vision_main_prints_the_table_and_writes_results(tmp_path):
  workdir = str(tmp_path / "mnist")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "vision.py"),
         f"--workdir={workdir}",
         f"--config={os.path.join(ROOT, 'experiments', 'configs', 'mnist.py')}:quick",
         "--config.num_epochs=1", "--config.max_train=300", "--config.progress=False",
         "--config.analysis.num_examples=2"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "DeepNet" in out.stdout and "ResMem (k=" in out.stdout
  results = json.load(open(os.path.join(workdir, "results.json")))
  for key in ("deepnet_test_accuracy", "resmem_test_accuracy", "best", "n_train", "n_val",
              "n_test", "baselines"):
    assert key in results
  assert (results["n_train"], results["n_val"], results["n_test"]) == (300, 500, 1000)
  assert f"{100 * results['resmem_test_accuracy']:.2f}%" in out.stdout
  assert os.path.exists(os.path.join(workdir, "neighbours.png"))


def test_every_config_loads_with_its_quick_variant():
  for name in configs.NAMES:
    full, quick = configs.get_config(name), configs.get_config(name, "quick")
    assert full.num_epochs >= quick.num_epochs
    assert "dataset" in full and "resmem" in full
  assert configs.get_config("cifar10", "depth=32,width=2.0").model == "resnet32"
  with pytest.raises(ValueError, match="name"):
    configs.get_config("svhn")


def test_optional_settings_can_be_set_from_the_command_line():
  """data_dir, max_train, ... are None by default; a plain None field would refuse
  --config.data_dir=... (ml_collections cannot infer its type)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  for name in ("mnist", "cifar10", "imagenet"):
    path = os.path.join(ROOT, "experiments", "configs", f"{name}.py")
    argv = ["vision.py", f"--config={path}", "--config.data_dir=/data/tfds",
            "--config.manual_dir=/data/manual", "--config.max_train=300",
            "--config.val_size=50", "--config.test_size=60"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", path, flag_values=values, lock_config=True,
                                    sys_argv=argv)  # as experiments/vision.py, argv given
    values(argv)
    config = values.config
    assert (config.data_dir, config.manual_dir, config.max_train, config.val_size,
            config.test_size) == ("/data/tfds", "/data/manual", 300, 50, 60)
    assert configs.get_config(name).to_dict()["data_dir"] is None


def test_size_sweep_on_a_tiny_grid(tmp_path):
  config = configs.get_config("mnist_sweep", "quick")
  # A triple and an old-style pair (depth 2).
  config.sweep.sizes = ((1, 2, 3), (2, 4))
  config.sweep.seeds = (3,)
  config.max_train = 200
  config.steps_per_epoch = 2
  rows = train.run_size_sweep(config, str(tmp_path))
  assert [(r["width"], r["embed_dim"], r["depth"], r["seed"]) for r in rows] == [
      (1, 2, 3, 3), (2, 4, 2, 3)]
  # conv 1->1, 1->2, 2->2 (3x3 with bias), dense 7*7*2 -> 2, head 2 -> 10.
  assert rows[0]["params"] == 10 + 20 + 38 + (98 * 2 + 2) + (2 * 10 + 10)
  assert rows[0]["params"] < rows[1]["params"]
  saved_kwargs = json.load(open(tmp_path / "w1_e2_d3_s3" / "results.json"))["model_kwargs"]
  assert saved_kwargs["depth"] == 3
  table = analysis.format_size_sweep_table(rows)
  assert "width=1,embed=2,depth=3" in table and "width=2,embed=4,depth=2" in table
  assert os.path.getsize(os.path.join(tmp_path, "size_sweep.png")) > 1000
  saved = json.load(open(os.path.join(tmp_path, "size_sweep.json")))
  assert len(saved["rows"]) == 2 and len(saved["summary"]) == 2
  assert [s["depth"] for s in saved["summary"]] == [3, 2]


def test_size_sweep_rejects_a_bad_size(tmp_path):
  config = configs.get_config("mnist_sweep", "quick")
  config.sweep.sizes = ((2, 8, 2, 1),)
  with pytest.raises(ValueError, match="size"):
    train.run_size_sweep(config, str(tmp_path))
  config.sweep.sizes = ((2, 8, 0),)
  with pytest.raises(ValueError, match="depth"):
    train.run_size_sweep(config, str(tmp_path))
  config.sweep.sizes = ((2, 8, 2),)
  config.sweep.seeds = (0, 0)  # one sub-workdir counted twice, with a std of 0
  with pytest.raises(ValueError, match="sweep.seeds must be distinct"):
    train.run_size_sweep(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_full_sweep_grid_covers_widths_and_depths():
  sizes = configs.get_config("mnist_sweep").sweep.sizes
  assert len({w for w, _, _ in sizes}) >= 3 and len({d for _, _, d in sizes}) >= 3
  params = [models.count_params(jax.eval_shape(
      models.SmallCNN(width=w, embed_dim=e, depth=d).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))["params"]) for w, e, d in sizes]
  assert len(set(params)) == len(sizes)


def test_size_sweep_plot_marks_each_depth():
  many = [{"size": f"d{d}", "params": 100 + d, "depth": d, "seed": 0,
           "deepnet_test_accuracy": 0.5, "resmem_test_accuracy": 0.6} for d in range(1, 11)]
  analysis.plot_size_sweep(many)  # ten depths: markers repeat (a 9th raised KeyError)
  rows = [{"size": f"d{d}w{w}", "params": 100 * w + d, "depth": d, "seed": 0,
           "deepnet_test_accuracy": 0.5, "resmem_test_accuracy": 0.6}
          for w in (1, 2) for d in (1, 4)]
  fig = analysis.plot_size_sweep(rows)
  (ax,) = fig.axes
  assert [t.get_text() for t in ax.get_legend().get_texts()] == [
      "DeepNet", "ResMem", "depth 1", "depth 4"]
  # One line per (depth, method), each through that depth's two widths.
  lines = [l for l in ax.get_lines() if l.get_linestyle() != "None"]  # not the caps
  assert [len(l.get_xdata()) for l in lines] == [2, 2, 2, 2]
  assert [(l.get_marker(), l.get_color()) for l in lines] == [
      ("o", "tab:blue"), ("o", "tab:orange"), ("^", "tab:blue"), ("^", "tab:orange")]


def test_size_sweep_summary_over_seeds():
  row = lambda size, params, seed, base, res: {
      "size": size, "params": params, "seed": seed, "deepnet_test_accuracy": base,
      "resmem_test_accuracy": res, "baselines": {"knn": res - 0.01, "knn_lm": base}}
  rows = [row("big", 100, 0, 0.9, 0.9), row("small", 10, 0, 0.5, 0.6),
          row("small", 10, 1, 0.7, 0.7), row("big", 100, 1, 0.8, 0.9),
          row("one seed", 1000, 0, 0.9, 0.95)]
  small, big, single = analysis.summarize_size_sweep(rows)  # sorted by parameter count
  assert (small["size"], small["seeds"], big["size"]) == ("small", 2, "big")
  assert small["deepnet_mean"] == pytest.approx(0.6)
  assert small["deepnet_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))  # sample std
  assert small["gain_mean"] == pytest.approx(0.05)
  assert big["resmem_std"] == pytest.approx(0.0)
  assert big["knn_mean"] == pytest.approx(0.89)
  assert single["deepnet_std"] == 0.0 and single["seeds"] == 1
  # A baseline some seeds lack has no mean: it was the mean over the others, beside a
  # `seeds` that counted every one.
  del rows[3]["baselines"]["knn"]
  _, big, _ = analysis.summarize_size_sweep(rows)
  assert "knn_mean" not in big and "knn_std" not in big
  assert big["knn_lm_mean"] == pytest.approx(0.85) and big["seeds"] == 2


def test_per_class_gain_of_an_absent_class_is_null_in_strict_json(tmp_path):
  labels = np.array([0, 0, 2])
  gain = analysis.per_class_gain(labels, np.array([0, 1, 2]), np.array([0, 0, 1]), 3)
  assert gain["count"] == [2, 0, 1]
  assert gain["deepnet_accuracy"] == [0.5, None, 1.0]
  assert gain["gain"] == [0.5, None, -1.0]
  path = analysis.write_json(str(tmp_path / "a.json"),
                             {"per_class": gain, "x": np.float32("nan"), "y": [np.inf, 1]})
  text = open(path).read()
  assert "NaN" not in text and "Infinity" not in text
  loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
  assert loaded["x"] is None and loaded["y"] == [None, 1]
  assert loaded["per_class"]["resmem_accuracy"] == [1.0, None, 0.0]
  # JAX values and NumPy keys are converted; what JSON cannot hold leaves the old file.
  analysis.write_json(path, {"acc": jnp.float32(0.5), "per_k": {np.int64(3): jnp.ones(2)}})
  assert json.load(open(path)) == {"acc": 0.5, "per_k": {"3": [1.0, 1.0]}}
  with pytest.raises(TypeError, match="not JSON serializable"):
    analysis.write_json(path, {"acc": 0.9, "model": object()})
  assert json.load(open(path))["acc"] == 0.5 and os.listdir(tmp_path) == ["a.json"]


def test_results_table_prints_an_int_k_whole():
  results = {"deepnet_test_accuracy": 0.8, "resmem_test_accuracy": 0.9,
             "best": {"k": 1234, "sigma": 0.5, "temperature": 1.0},
             "baselines": {"knn": 0.85}, "baseline_settings": {"knn": {"k": 1234, "sigma": 0.5}},
             "n_train": 5000, "n_val": 500, "n_test": 1000}
  table = analysis.format_results_table(results)
  assert "soft kNN on embeddings (k=1234, sigma=0.5)" in table  # was k=1.23e+03
  assert "ResMem (k=1234, sigma=0.5, temperature=1)" in table


def test_analysis_inputs_are_checked():
  with pytest.raises(ValueError,
                     match=r"labels must lie in \[0, num_classes=2\), got labels\[1\]=3"):
    analysis.per_class_gain(np.array([0, 3]), np.array([0, 1]), np.array([0, 1]), 2)
  with pytest.raises(ValueError, match="labels must lie in"):
    analysis.per_class_gain(np.array([-1, 0]), np.array([0, 1]), np.array([0, 1]), 2)
  with pytest.raises(ValueError, match="at least one query"):
    analysis.median_nn_distance(np.zeros((0, 3), np.float32), np.ones((5, 3), np.float32))
  # A (Q, 1) prediction broadcast to a (Q, Q) comparison: indices beyond Q, no error.
  labels, base = np.array([0, 1, 2, 1]), np.array([0, 0, 2, 0])
  with pytest.raises(ValueError, match=r"resmem_pred must be a \(Q,\) vector of classes, "
                     r"got resmem_pred.shape=\(4, 1\)"):
    analysis.fixed_and_broken(labels, base, labels[:, None])
  with pytest.raises(TypeError, match="labels must hold integer classes"):
    analysis.per_class_gain(labels.astype(float), base, base, 3)
  with pytest.raises(ValueError, match="must have one length"):
    analysis.fixed_and_broken(labels, base[:3], base)
  assert {k: v.tolist() for k, v in analysis.fixed_and_broken(labels, base, labels).items()} == {
      "fixed": [1, 3], "broken": []}


def _tiny_sweep(seed=0):
  import resmem_jax as rm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  emb, val_emb = (rng.normal(size=(n, 4)).astype(np.float32) for n in (200, 60))
  logits, val_logits = (rng.normal(size=(n, 3)).astype(np.float32) for n in (200, 60))
  labels, val_labels = rng.integers(0, 3, 200), rng.integers(0, 3, 60)
  scale = analysis.median_nn_distance(val_emb, emb)
  result = rm.sweep(rm.build_memory(emb, labels, logits), val_emb, val_logits, val_labels,
                    ks=(1, 5, 20), sigmas=[s * scale for s in (0.3, 1.0, 3.0, 10.0)],
                    temperatures=(0.5, 2.0))
  return result, scale


def test_median_nn_distance_matches_brute_force():
  rng = np.random.default_rng(1)
  queries, keys = rng.normal(size=(41, 5)), rng.normal(size=(97, 5))
  brute = np.median(np.linalg.norm(queries[:, None] - keys[None], axis=-1).min(-1))
  got = analysis.median_nn_distance(queries.astype(np.float32), keys.astype(np.float32))
  assert isinstance(got, float)
  assert got == pytest.approx(brute, rel=1e-5)
  # Queries that are keys are at distance 0: the unit falls back to 1.
  assert analysis.median_nn_distance(keys[:9].astype(np.float32),
                                     keys.astype(np.float32)) == 1.0


def test_sweep_heatmap_draws_the_table_slice():
  result, scale = _tiny_sweep()
  best = result.best["resmem"]
  fig = analysis.plot_sweep_heatmap(result, sigma_unit=scale)
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == ["0.3", "1", "3", "10"]
  assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "5", "20"]
  # One annotated cell per (k, sigma) at the best temperature, with the table's value.
  expected = sorted(f"{100 * r['accuracy']:.1f}" for r in result.table
                    if r["method"] == "resmem" and r["temperature"] == best["temperature"])
  assert sorted(t.get_text() for t in ax.texts) == expected
  assert f"T={best['temperature']:g}" in ax.get_title()
  (outline,) = ax.patches  # the best setting, at its (k, sigma) cell
  assert outline.get_xy() == (
      sorted({r["sigma"] for r in result.table if r["sigma"]}).index(best["sigma"]) - 0.5,
      (1, 5, 20).index(best["k"]) - 0.5)
  other = 0.5 if best["temperature"] == 2.0 else 2.0
  ax = analysis.plot_sweep_heatmap(result, temperature=other).axes[0]
  assert f"T={other:g}" in ax.get_title() and not ax.patches
  assert ax.get_xlabel() == "sigma"
  knn = analysis.plot_sweep_heatmap(result, method="knn").axes[0]
  assert sorted(t.get_text() for t in knn.texts) == sorted(
      f"{100 * r['accuracy']:.1f}" for r in result.table if r["method"] == "knn")


def test_sweep_heatmap_rejects_bad_arguments():
  result, _ = _tiny_sweep()
  with pytest.raises(ValueError, match="method"):
    analysis.plot_sweep_heatmap(result, method="deepnet")
  with pytest.raises(ValueError, match="temperature=1.0"):
    analysis.plot_sweep_heatmap(result, temperature=1.0)
  with pytest.raises(ValueError, match="sigma_unit"):
    analysis.plot_sweep_heatmap(result, sigma_unit=0.0)
  with pytest.raises(TypeError, match="SweepResult"):
    analysis.plot_sweep_heatmap(result.table)


def _neighbour_figure(path=None, rows=4, shown=3):
  rng = np.random.default_rng(0)
  return analysis.plot_neighbours(
      query_images=rng.integers(0, 256, (rows, 8, 8, 1), dtype=np.uint8),
      query_labels=np.arange(rows), base_pred=np.arange(rows), resmem_pred=np.arange(rows),
      neighbour_images=rng.integers(0, 256, (rows, shown, 8, 8, 1), dtype=np.uint8),
      neighbour_labels=np.zeros((rows, shown), int), weights=np.full((rows, shown), 0.5),
      k=10, path=path)


def test_plots_leave_the_backend_alone_and_save_only_when_asked(tmp_path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  previous = matplotlib.get_backend()
  matplotlib.use("template")  # stands in for a notebook's inline backend
  try:
    rows = [{"size": "s", "params": 10, "seed": 0, "deepnet_test_accuracy": 0.5,
             "resmem_test_accuracy": 0.6}]
    figs = [_neighbour_figure(), analysis.plot_size_sweep(rows),
            analysis.plot_sweep_heatmap(_tiny_sweep()[0])]
    assert all(isinstance(f, Figure) for f in figs)
    assert matplotlib.get_backend() == "template"
  finally:
    matplotlib.use(previous)
  assert os.listdir(tmp_path) == []
  path = str(tmp_path / "n.png")
  assert isinstance(_neighbour_figure(path), Figure)
  assert os.path.getsize(path) > 1000


def test_neighbour_titles_do_not_cover_the_row_above():
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  fig = _neighbour_figure(rows=4, shown=3)
  canvas = FigureCanvasAgg(fig)
  canvas.draw()  # runs the layout engine
  renderer = canvas.get_renderer()
  axes = np.array(fig.axes).reshape(4, 4)
  for r in range(1, 4):
    for c in range(4):
      title = axes[r, c].title.get_window_extent(renderer)
      above = axes[r - 1, c].get_window_extent(renderer)
      assert title.y1 <= above.y0, (r, c, title, above)
  suptitle = fig._suptitle.get_window_extent(renderer)  # pylint: disable=protected-access
  assert all(suptitle.y0 >= axes[0, c].title.get_window_extent(renderer).y1
             for c in range(4))


def test_provenance_names_the_versions_and_this_checkout(monkeypatch):
  got = analysis.provenance()
  assert got["versions"]["jax"] == jax.__version__
  assert set(got["versions"]) >= {"python", "resmem_jax", "jaxlib", "flax", "numpy"}
  if os.path.isdir(os.path.join(os.path.dirname(os.path.dirname(__file__)), ".git")):
    assert re.fullmatch(r"[0-9a-f]{40}", got["git_commit"]), got
    assert isinstance(got["git_dirty"], bool)

  def no_git(*args, **kwargs):
    raise FileNotFoundError("git")

  monkeypatch.setattr(subprocess, "run", no_git)
  got = analysis.provenance()
  assert got["git_commit"] is None and got["git_dirty"] is None

# --------------------------------------------------------------------------------------
# Analyses and figures against hand-written expectations (from a mutation audit: each
# test fails on a plausible slip that the tests above let through).


def test_fixed_and_broken_against_a_loop():
  """An example both models get wrong is neither fixed nor broken."""
  rng = np.random.default_rng(5)
  labels, base, res = rng.integers(0, 4, (3, 200))
  got = analysis.fixed_and_broken(labels, base, res)
  assert ((base != labels) & (res != labels)).any()  # the case that tells them apart
  assert got["fixed"].tolist() == [i for i in range(200)
                                   if base[i] != labels[i] and res[i] == labels[i]]
  assert got["broken"].tolist() == [i for i in range(200)
                                    if base[i] == labels[i] and res[i] != labels[i]]


def test_per_class_gain_covers_every_class_and_no_more():
  """Classes above the largest label present get an entry (null); a label equal to
  num_classes is out of range."""
  gain = analysis.per_class_gain(np.array([0, 0, 1]), np.array([0, 1, 1]),
                                 np.array([0, 0, 0]), 4)
  assert gain["count"] == [2, 1, 0, 0]
  assert gain["deepnet_accuracy"] == [0.5, 1.0, None, None]
  assert gain["resmem_accuracy"] == [1.0, 0.0, None, None]
  assert gain["gain"] == [0.5, -1.0, None, None]
  with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=2\), got "
                                       r"labels\[1\]=2"):
    analysis.per_class_gain(np.array([0, 2]), np.array([0, 1]), np.array([0, 1]), 2)


def _sweep_row(method, k, sigma, temperature, lam, **metrics):
  return dict(method=method, k=k, sigma=sigma, temperature=temperature, lam=lam, **metrics)


def _synthetic_sweep():
  """2 ks x 3 sigmas of ResMem, and of kNN-LM at two lams, every cell a distinct
  accuracy; the best settings lie off the diagonal."""
  table, acc = [], iter(np.linspace(0.10, 0.90, 40))
  for method, lams in (("resmem", (None,)), ("knn_lm", (0.2, 0.5))):
    for lam in lams:
      for k in (1, 5):
        for sigma in (0.1, 1.0, 10.0):
          table.append(_sweep_row(method, k, sigma, 1.0, lam, accuracy=float(next(acc)),
                                  log_loss=1.0))
  best = {"resmem": _sweep_row("resmem", 1, 10.0, 1.0, None, accuracy=0.9, log_loss=1.0),
          "knn_lm": _sweep_row("knn_lm", 5, 0.1, 1.0, 0.2, accuracy=0.9, log_loss=1.0)}
  return SweepResult(table=tuple(table), best=best, metric="accuracy", n_queries=10)


def test_sweep_heatmap_of_hand_made_tables():
  """The outline at (column sigma, row k) of an off-diagonal best; the kNN-LM map at
  the best lam; a regression map annotated with the mse itself."""
  result = _synthetic_sweep()
  (outline,) = analysis.plot_sweep_heatmap(result).axes[0].patches
  assert outline.get_xy() == (2 - 0.5, 0 - 0.5)  # sigma 10 is column 2, k 1 row 0
  ax = analysis.plot_sweep_heatmap(result, method="knn_lm").axes[0]
  assert sorted(t.get_text() for t in ax.texts) == sorted(
      f"{100 * r['accuracy']:.1f}" for r in result.table
      if r["method"] == "knn_lm" and r["lam"] == 0.2)
  assert "lam=0.2" in ax.get_title()
  table = tuple(_sweep_row("resmem", k, s, None, None, mse=0.01 * (i + 1))
                for i, (k, s) in enumerate([(1, 0.5), (1, 2.0), (4, 0.5), (4, 2.0)]))
  best = {"resmem": table[0], "deepnet": _sweep_row("deepnet", None, None, None, None,
                                                    mse=0.5)}
  ax = analysis.plot_sweep_heatmap(SweepResult(
      table=table, best=best, metric="mse", n_queries=10)).axes[0]
  assert sorted(t.get_text() for t in ax.texts) == ["0.01", "0.02", "0.03", "0.04"]
  assert "deepnet alone: 0.5" in ax.get_title()


def test_size_sweep_table_puts_each_method_in_its_column():
  rows = [{"size": "s", "params": 10, "seed": 0, "deepnet_test_accuracy": 0.5,
           "resmem_test_accuracy": 0.6, "baselines": {"knn": 0.81, "knn_lm": 0.73}}]
  head, _, line = analysis.format_size_sweep_table(rows).splitlines()
  assert head.split()[-6:] == ["DeepNet", "ResMem", "gain", "soft", "kNN", "kNN-LM"]
  assert re.findall(r"([+-]?\d+\.\d+) ±", line) == ["50.00", "60.00", "+10.00", "81.00",
                                                     "73.00"]


def test_neighbour_cells_show_their_own_image_label_weight_and_predictions():
  rows, shown = 3, 4
  rng = np.random.default_rng(7)
  args = dict(
      query_images=rng.integers(0, 256, (rows, 6, 6, 1), dtype=np.uint8),
      query_labels=np.arange(rows), base_pred=np.arange(rows) + 1,
      resmem_pred=np.arange(rows) + 5,
      neighbour_images=rng.integers(0, 256, (rows, shown, 6, 6, 1), dtype=np.uint8),
      neighbour_labels=np.arange(rows * shown).reshape(rows, shown),
      weights=np.arange(1, rows * shown + 1).reshape(rows, shown) / 100)
  axes = np.array(analysis.plot_neighbours(**args).axes).reshape(rows, shown + 1)
  for r in range(rows):
    assert axes[r, 0].get_title() == f"y={r}\nnet {r + 1} / rm {r + 5}"
    np.testing.assert_array_equal(axes[r, 0].images[0].get_array(),
                                  args["query_images"][r, ..., 0])
    for j in range(shown):
      np.testing.assert_array_equal(axes[r, j + 1].images[0].get_array(),
                                    args["neighbour_images"][r, j, ..., 0])
      assert axes[r, j + 1].get_title() == (
          f"y={args['neighbour_labels'][r, j]}\nw={(shown * r + j + 1) / 100:.2f}")


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
  path = str(tmp_path / "a.json")
  analysis.write_json(path, {"acc": 0.5})

  def replace(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", replace)
  with pytest.raises(OSError, match="disk full"):
    analysis.write_json(path, {"acc": 0.9})
  monkeypatch.undo()
  with open(path) as f:
    assert json.load(f) == {"acc": 0.5}
  assert os.listdir(tmp_path) == ["a.json"]
