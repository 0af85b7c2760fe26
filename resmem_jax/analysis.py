"""What ResMem changed: examples fixed and broken, gain per class, pictures, tables.

Pure functions on predictions and labels, plus the plotting and formatting used by
`train.train_and_evaluate`, the model-size sweep and the notebooks. Figures are bare
`matplotlib.figure.Figure`s (no pyplot, no backend switch): each plot returns its
Figure, which a notebook displays, and saves a PNG when given a `path`.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import math
import os
import platform
import subprocess
import uuid
from typing import Any, Sequence

import jax
import numpy as np


def _class_vectors(**arrays) -> list[np.ndarray]:
  """The arrays as NumPy, after checking that each is a (Q,) vector of integer classes
  of one length Q: a (Q, 1) prediction would broadcast against (Q,) labels to a (Q, Q)
  comparison and give indices beyond Q."""
  out = []
  for name, x in arrays.items():
    x = np.asarray(x)
    if x.ndim != 1:
      raise ValueError(f"{name} must be a (Q,) vector of classes, got {name}.shape={x.shape}")
    if not np.issubdtype(x.dtype, np.integer):
      raise TypeError(f"{name} must hold integer classes, got {name}.dtype={x.dtype}")
    out.append(x)
  if len({len(x) for x in out}) != 1:
    shapes = ", ".join(f"{name}.shape={x.shape}" for name, x in zip(arrays, out))
    raise ValueError(f"the class vectors must have one length, got {shapes}")
  return out


def fixed_and_broken(labels: np.ndarray, base_pred: np.ndarray, resmem_pred: np.ndarray
                     ) -> dict[str, np.ndarray]:
  """Indices where ResMem fixed the base model (base wrong, ResMem right) and broke it.

  Args:
    labels: (Q,) true labels.
    base_pred: (Q,) predicted classes of the base model.
    resmem_pred: (Q,) predicted classes of ResMem.

  Returns:
    {"fixed": int64 indices, "broken": int64 indices}; the accuracy gain is
    (len(fixed) - len(broken)) / Q.
  """
  labels, base_pred, resmem_pred = _class_vectors(labels=labels, base_pred=base_pred,
                                                  resmem_pred=resmem_pred)
  base_ok, resmem_ok = base_pred == labels, resmem_pred == labels
  return {"fixed": np.flatnonzero(~base_ok & resmem_ok),
          "broken": np.flatnonzero(base_ok & ~resmem_ok)}


def per_class_gain(labels: np.ndarray, base_pred: np.ndarray, resmem_pred: np.ndarray,
                   num_classes: int) -> dict[str, list]:
  """Per-class accuracy of the base model and of ResMem, and their difference.

  Returns:
    {"count", "deepnet_accuracy", "resmem_accuracy", "gain"}: lists of length
    `num_classes` (None for a class absent from `labels`: null in JSON).

  Raises:
    ValueError: a label outside [0, num_classes).
  """
  labels, base_pred, resmem_pred = _class_vectors(labels=labels, base_pred=base_pred,
                                                  resmem_pred=resmem_pred)
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise ValueError(f"labels must lie in [0, {num_classes=}), got labels[{bad[0]}]="
                     f"{labels[bad[0]]}")
  count = np.bincount(labels, minlength=num_classes)
  with np.errstate(invalid="ignore", divide="ignore"):
    base = np.bincount(labels, weights=base_pred == labels, minlength=num_classes) / count
    res = np.bincount(labels, weights=resmem_pred == labels, minlength=num_classes) / count
  present = count > 0
  as_list = lambda x: [float(a) if ok else None for a, ok in zip(x, present)]
  return {"count": count.tolist(), "deepnet_accuracy": as_list(base),
          "resmem_accuracy": as_list(res), "gain": as_list(res - base)}


def median_nn_distance(queries, keys) -> float:
  r"""Median distance from a query to its nearest key: the natural unit of sigma.

  scale = median_q min_i ||q - x_i||, with the exact nearest neighbour of `rm.knn`
  (k = 1, Euclidean). ResMem's weights softmax(-d / sigma) depend on d / sigma only,
  so a sigma grid written in units of this scale suits embeddings of any size. Pass
  held-out queries (validation embeddings) and the memory's keys: a training point's
  own key is at distance 0.

  Args:
    queries: (Q, D) float embeddings, e.g. of the validation split.
    keys: (N, D) float embeddings of the memory (the training split).

  Returns:
    The median nearest-neighbour distance as a Python float, or 1.0 if it is 0 (more
    than half the queries coincide with a key), so that dividing by it is safe.

  Raises:
    ValueError: no queries.
    ValueError, TypeError: from `rm.knn`, for arrays that are not (Q, D) and (N, D)
      floats with N >= 1.

  Example:
    >>> scale = analysis.median_nn_distance(val_emb, train_emb)
    >>> rm.sweep(memory, val_emb, val_logits, val_y, ks=(1, 10),
    ...          sigmas=[s * scale for s in (0.3, 1.0, 3.0)], temperatures=(1.0,))

  Reference: Yang et al., "ResMem: Learn what you can and memorize the rest",
  NeurIPS 2023 (sigma is tuned on validation; the unit is this library's choice).
  """
  from resmem_jax.kernels import knn  # pylint: disable=g-import-not-at-top
  nearest = knn(queries, keys, 1).distances[:, 0]
  if nearest.shape[0] == 0:
    raise ValueError("median_nn_distance needs at least one query, got queries.shape="
                     f"{tuple(np.shape(queries))}")
  scale = float(np.median(np.asarray(nearest)))
  return scale if scale > 0 else 1.0


def _new_figure(**kwargs):
  # A bare Figure, not pyplot: no global backend switch and no figure left open in a
  # notebook's pyplot state. PNG output goes through Agg on demand.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(**kwargs)


def _save(fig, path: str | None, *, dpi: int):
  if path is not None:
    fig.savefig(path, dpi=dpi)
  return fig


def _show(ax, image: np.ndarray) -> None:
  image = np.asarray(image)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=255)
  else:
    ax.imshow(image.astype(np.uint8))
  ax.set_xticks([])
  ax.set_yticks([])


def plot_neighbours(*, query_images: np.ndarray, query_labels: np.ndarray,
                    base_pred: np.ndarray, resmem_pred: np.ndarray,
                    neighbour_images: np.ndarray, neighbour_labels: np.ndarray,
                    weights: np.ndarray, k: int | None = None,
                    class_names: Sequence[str] | None = None, title: str = "",
                    path: str | None = None):
  """A grid: each row a test image, then its nearest training images with weights.

  Args:
    query_images: (R, H, W, C) uint8 test images.
    query_labels, base_pred, resmem_pred: (R,) true label, base and ResMem predictions.
    neighbour_images: (R, k, H, W, C) uint8 nearest training images, nearest first.
    neighbour_labels: (R, k) their labels.
    weights: (R, k) their residual weights w_j (softmax of -d / sigma).
    k: the number of neighbours ResMem uses, when more than the ones drawn.
    class_names: optional names of the classes.
    title: a first line for the figure's title: how the rows were chosen, say.
    path: if given, the figure is also saved there as a PNG.

  Returns:
    The matplotlib Figure (a notebook displays it; nothing is left in pyplot's state).
  """
  name = (lambda c: class_names[c]) if class_names is not None else str
  rows, shown = neighbour_labels.shape
  # Constrained layout reserves room for every title, so a row's two-line titles never
  # cover the images of the row above.
  fig = _new_figure(figsize=(1.5 * (shown + 1), 1.8 * rows + 0.6), layout="constrained")
  axes = fig.subplots(rows, shown + 1, squeeze=False)
  for r in range(rows):
    _show(axes[r, 0], query_images[r])
    axes[r, 0].set_title(f"y={name(query_labels[r])}\nnet {name(base_pred[r])}"
                         f" / rm {name(resmem_pred[r])}", fontsize=8)
    for spine in axes[r, 0].spines.values():
      spine.set_edgecolor("tab:red")
      spine.set_linewidth(2)
    for j in range(shown):
      _show(axes[r, j + 1], neighbour_images[r, j])
      axes[r, j + 1].set_title(f"y={name(neighbour_labels[r, j])}\nw={weights[r, j]:.2f}",
                               fontsize=8)
  which = (f"the {shown} nearest of ResMem's k={k}" if k and k > shown
           else "nearest")
  fig.suptitle((f"{title}\n" if title else "")
               + "test image (left): label, DeepNet / ResMem prediction;\n"
               f"{which} training images in embedding space, with residual weights w",
               fontsize=9)
  return _save(fig, path, dpi=100)


def plot_size_sweep(rows: Sequence[dict[str, Any]], *, title: str = "",
                    path: str | None = None):
  """Test accuracy against parameter count, DeepNet and ResMem, mean +- std over seeds.

  Colour tells the method (DeepNet blue, ResMem orange), marker and line style the
  depth: the points of one depth are joined across widths, so a depth's curve and
  the gap between its two colours read at a glance. Rows without a "depth" form one
  group. The two methods' points are drawn 1.5% left and right of their parameter
  count (a sliver on the log axis) so that their error bars do not hide each other.

  Args:
    rows: one dict per trained model with "params", "seed", "deepnet_test_accuracy",
      "resmem_test_accuracy" (and a "size" label, optionally a "depth").
    title: figure title.
    path: if given, the figure is also saved there as a PNG.

  Returns:
    The matplotlib Figure.
  """
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top

  summary = summarize_size_sweep(rows)
  depths = sorted({s.get("depth") for s in summary}, key=lambda d: (d is None, d))
  markers = dict(zip(depths, itertools.cycle("o^sDvP*X")))  # a 9th depth repeats the 1st
  styles = dict(zip(depths, itertools.cycle(["-", "--", ":", "-."])))
  fig = _new_figure(figsize=(6.5, 4.2), layout="constrained")
  ax = fig.subplots()
  methods = (("deepnet", "DeepNet", "tab:blue"), ("resmem", "ResMem", "tab:orange"))
  for depth in depths:
    group = [s for s in summary if s.get("depth") == depth]  # sorted by params
    x = np.array([s["params"] for s in group])
    for (key, _, color), dodge in zip(methods, (0.985, 1.015)):
      mean = np.array([s[f"{key}_mean"] for s in group]) * 100
      std = np.array([s[f"{key}_std"] for s in group]) * 100
      ax.errorbar(x * dodge, mean, yerr=std, marker=markers[depth],
                  linestyle=styles[depth], capsize=3, color=color, markersize=6)
  handles = [Line2D([], [], color=color, label=label) for _, label, color in methods]
  if depths != [None]:
    handles += [Line2D([], [], color="gray", marker=markers[d], linestyle=styles[d],
                       label=f"depth {d}") for d in depths]
  ax.set_xscale("log")
  # Plain counts at 1, 2, 5 x 10^n: the default's minor labels collide within a decade.
  ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xlabel("parameters of the base model")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title or "ResMem vs DeepNet across model sizes (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(handles=handles, fontsize=8, ncol=2 if len(handles) > 4 else 1)
  return _save(fig, path, dpi=120)


GRID_METHODS = ("resmem", "knn", "knn_lm")


def plot_sweep_heatmap(result, *, method: str = "resmem", temperature: float | None = None,
                       sigma_unit: float = 1.0, path: str | None = None):
  """The sweep's metric over (k, sigma) for one method, one cell per setting.

  Rows are k, columns sigma, each cell annotated with its value (accuracy in %, or
  mse), at one temperature (and, for knn_lm, the best row's lam). The best setting of
  `method` is outlined when it lies in the drawn slice; the base model's best
  validation value, when the sweep has it, is in the title for reference.

  Args:
    result: a `resmem_jax.SweepResult` (from `rm.sweep`).
    method: "resmem", "knn" or "knn_lm" (the methods with a (k, sigma) grid).
    temperature: the temperature of the slice; default the best row's (ignored by
      "knn", which has none).
    sigma_unit: sigma tick labels are sigma / sigma_unit (e.g. the
      `median_nn_distance` the grid was scaled by).
    path: if given, the figure is also saved there as a PNG.

  Returns:
    The matplotlib Figure.

  Raises:
    TypeError: if `result` is not a SweepResult.
    ValueError: for an unknown `method`, a non-positive `sigma_unit`, or a
      `temperature` the sweep did not score.

  Example:
    >>> scale = analysis.median_nn_distance(val_emb, train_emb)
    >>> result = rm.sweep(memory, val_emb, val_logits, val_y, ks=(1, 5, 20),
    ...                   sigmas=[s * scale for s in (0.3, 1, 3)], temperatures=(1.0,))
    >>> fig = analysis.plot_sweep_heatmap(result, sigma_unit=scale)
  """
  from resmem_jax import _validation as v  # pylint: disable=g-import-not-at-top
  from resmem_jax.sweep import SweepResult  # pylint: disable=g-import-not-at-top

  if not isinstance(result, SweepResult):
    raise TypeError(f"result must be a SweepResult (from rm.sweep), got "
                    f"{type(result).__name__}")
  v.check_choice("method", method, GRID_METHODS)
  v.check_positive("sigma_unit", sigma_unit)
  best = result.best[method]
  if method == "knn":
    temperature = None
  elif temperature is None:
    temperature = best["temperature"]
  rows = [r for r in result.table if r["method"] == method
          and r["temperature"] == temperature and r["lam"] == best["lam"]]
  if not rows:
    scored = sorted({r["temperature"] for r in result.table if r["method"] == method},
                    key=str)
    raise ValueError(f"the sweep scored {method} at no temperature={temperature!r}; "
                     f"its temperatures are {scored}")
  ks = sorted({r["k"] for r in rows})
  sigmas = sorted({r["sigma"] for r in rows})
  metric = result.metric
  values = np.full((len(ks), len(sigmas)), np.nan)
  for r in rows:
    values[ks.index(r["k"]), sigmas.index(r["sigma"])] = r[metric]
  shown = 100 * values if metric == "accuracy" else values
  fmt = "{:.1f}" if metric == "accuracy" else "{:.3g}"

  fig = _new_figure(figsize=(1.0 + 0.85 * len(sigmas) + 1.2, 1.4 + 0.45 * len(ks)),
                    layout="constrained")
  ax = fig.subplots()
  # Brighter is better for either metric: mse runs the colour map the other way.
  im = ax.imshow(shown, cmap="viridis" if metric == "accuracy" else "viridis_r",
                 aspect="auto")
  ax.set_xticks(range(len(sigmas)), [f"{s / sigma_unit:.3g}" for s in sigmas])
  ax.set_yticks(range(len(ks)), [str(k) for k in ks])
  cmap, norm = im.get_cmap(), im.norm
  for i in range(len(ks)):
    for j in range(len(sigmas)):
      if np.isfinite(shown[i, j]):
        luminance = np.dot(cmap(norm(shown[i, j]))[:3], (0.299, 0.587, 0.114))
        ax.text(j, i, fmt.format(shown[i, j]), ha="center", va="center", fontsize=8,
                color="white" if luminance < 0.5 else "black")
  if best["temperature"] == temperature:  # the best row lies in this slice
    from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top
    i, j = ks.index(best["k"]), sigmas.index(best["sigma"])
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="tab:red",
                           linewidth=2))
  ax.set_xlabel("sigma" if sigma_unit == 1.0 else f"sigma (in units of {sigma_unit:.3g})")
  ax.set_ylabel("k")
  unit = " (%)" if metric == "accuracy" else ""
  knobs = "".join(f", {name}={value:g}" for name, value in
                  (("T", temperature), ("lam", best["lam"])) if value is not None)
  title = f"{method} validation {metric}{unit}{knobs}"
  if "deepnet" in result.best:
    base = result.best["deepnet"][metric]
    title += f"\ndeepnet alone: {fmt.format(100 * base if metric == 'accuracy' else base)}"
  ax.set_title(title, fontsize=10)
  fig.colorbar(im, ax=ax)
  return _save(fig, path, dpi=120)


def summarize_size_sweep(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and sample std (ddof = 1, over seeds) of the test accuracies per size.

  Rows are grouped by their "size" label; a group's width, embed_dim and depth (when
  the rows have them) are carried over. Sorted by parameter count. A size run with
  one seed has std 0. A baseline's mean and std are given only where every row of the
  group has that baseline (a mean over some of the seeds beside `seeds` counting all of
  them would misread).
  """
  def std(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1)) if values.size > 1 else 0.0

  sizes: dict[str, list] = {}
  for r in rows:
    sizes.setdefault(r["size"], []).append(r)
  out = []
  for size, group in sizes.items():
    base = np.array([g["deepnet_test_accuracy"] for g in group])
    res = np.array([g["resmem_test_accuracy"] for g in group])
    out.append({"size": size, "params": group[0]["params"], "seeds": len(group),
                **{key: group[0][key] for key in ("width", "embed_dim", "depth")
                   if key in group[0]},
                "deepnet_mean": float(base.mean()), "deepnet_std": std(base),
                "resmem_mean": float(res.mean()), "resmem_std": std(res),
                "gain_mean": float((res - base).mean()), "gain_std": std(res - base)})
    for method in ("knn", "knn_lm"):
      accs = [g["baselines"][method] for g in group if method in g.get("baselines", {})]
      if len(accs) == len(group):
        out[-1][f"{method}_mean"] = float(np.mean(accs))
        out[-1][f"{method}_std"] = std(accs)
  return sorted(out, key=lambda s: s["params"])


def _knob(value) -> str:
  """An int as it is (k=1234, not 1.23e+03), a float to 3 significant digits."""
  return str(value) if isinstance(value, (int, np.integer)) else f"{value:.3g}"


def format_results_table(results: dict[str, Any]) -> str:
  """A plain-text table of the test accuracies in `results` (see train_and_evaluate)."""
  rows = [("DeepNet", results["deepnet_test_accuracy"])]
  settings = results.get("baseline_settings", {})
  names = {"knn": "soft kNN on embeddings", "knn_lm": "kNN-LM interpolation"}
  for method, name in names.items():
    if method in results.get("baselines", {}):
      knobs = ", ".join(f"{key}={_knob(settings[method][key])}"
                        for key in ("k", "sigma", "temperature", "lam")
                        if key in settings.get(method, {}))
      rows.append((f"{name} ({knobs})" if knobs else name, results["baselines"][method]))
  best = results["best"]
  rows.append((f"ResMem (k={best['k']}, sigma={best['sigma']:.3g}, "
               f"temperature={best['temperature']:.3g})", results["resmem_test_accuracy"]))
  width = max(len(name) for name, _ in rows) + 2
  lines = [f"{'method (settings chosen on validation)':<{width}}{'test accuracy':>14}"]
  lines.append("-" * len(lines[0]))
  lines += [f"{name:<{width}}{100 * acc:>13.2f}%" for name, acc in rows]
  lines.append(f"n_train={results['n_train']}  n_val={results['n_val']}  "
               f"n_test={results['n_test']}  params={results.get('params', '?')}")
  return "\n".join(lines)


def format_size_sweep_table(rows: Sequence[dict[str, Any]]) -> str:
  """A plain-text table of `summarize_size_sweep(rows)` (accuracies in %)."""
  summary = summarize_size_sweep(rows)
  cell = lambda s, key, fmt=">9.2f": (
      f"{100 * s[key + '_mean']:{fmt}} ± {100 * s[key + '_std']:<4.2f}"
      if key + "_mean" in s else f"{'-':>16}")
  head = (f"{'size':<30}{'params':>9}{'seeds':>6}{'DeepNet':>16}{'ResMem':>16}"
          f"{'gain':>16}{'soft kNN':>16}{'kNN-LM':>16}")
  lines = [head, "-" * len(head)]
  for s in summary:
    lines.append(f"{s['size']:<30}{s['params']:>9}{s['seeds']:>6}{cell(s, 'deepnet')}"
                 f"{cell(s, 'resmem')}{cell(s, 'gain', '>+9.2f')}{cell(s, 'knn')}"
                 f"{cell(s, 'knn_lm')}")
  return "\n".join(lines)


def _json_ready(x: Any) -> Any:
  """`x` with NumPy and JAX values as Python ones and non-finite floats as None (null):
  NaN and Infinity are not JSON, and strict parsers (JavaScript, jq) reject them."""
  if isinstance(x, dict):
    return {_json_ready(key): _json_ready(value) for key, value in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_ready(value) for value in x]
  if isinstance(x, jax.Array):
    x = np.asarray(x)
  if isinstance(x, np.ndarray):
    return _json_ready(x.tolist())
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def hardware() -> dict[str, Any]:
  """What an experiment ran on, for its JSON: JAX's first device and the host's cores."""
  device = jax.devices()[0]
  return {"platform": device.platform, "device_kind": device.device_kind,
          "cpu_count": os.cpu_count()}


def provenance() -> dict[str, Any]:
  """What produced an experiment's numbers, for its JSON: the package versions and, in
  a git checkout of this library, its commit and whether the tree had changes (None
  for both elsewhere, e.g. a pip-installed copy)."""
  versions = {"python": platform.python_version()}
  for package in ("resmem_jax", "jax", "jaxlib", "flax", "optax", "numpy"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  here = os.path.dirname(os.path.abspath(__file__))

  def git(*args) -> str | None:
    try:
      out = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                           timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
      return None
    return out.stdout.strip()

  top = git("rev-parse", "--show-toplevel")  # a checkout of this library, not another's
  mine = top is not None and os.path.isfile(os.path.join(top, "kernels", "api.py"))
  commit = git("rev-parse", "HEAD") if mine else None
  status = git("status", "--porcelain", "--untracked-files=no") if commit else None
  return {"versions": versions, "git_commit": commit,
          "git_dirty": None if status is None else bool(status)}


def write_text(path: str, text: str) -> str:
  """Writes `text` to a temporary file beside `path` and moves it into place, so a
  failed write (disk full, an interrupt) leaves the old file whole, never cut off."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # open(): the umask's mode
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_json(path: str, obj: Any) -> str:
  """Writes `obj` as indented, strict JSON (NumPy and JAX values converted, NaN and inf
  as null), with `write_text`: a value JSON cannot hold raises before anything is
  written, and leaves the file as it was."""
  return write_text(path, json.dumps(_json_ready(obj), indent=2, allow_nan=False))
