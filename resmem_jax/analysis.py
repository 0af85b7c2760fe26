"""What ResMem changed: examples fixed and broken, gain per class, pictures, tables.

Pure functions on predictions and labels, plus the plotting and formatting used by
`train.train_and_evaluate` and the model-size sweep. Matplotlib is imported lazily
with the Agg backend, so nothing here needs a display.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np


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
  labels, base_pred, resmem_pred = map(np.asarray, (labels, base_pred, resmem_pred))
  base_ok, resmem_ok = base_pred == labels, resmem_pred == labels
  return {"fixed": np.flatnonzero(~base_ok & resmem_ok),
          "broken": np.flatnonzero(base_ok & ~resmem_ok)}


def per_class_gain(labels: np.ndarray, base_pred: np.ndarray, resmem_pred: np.ndarray,
                   num_classes: int) -> dict[str, list]:
  """Per-class accuracy of the base model and of ResMem, and their difference.

  Returns:
    {"count", "deepnet_accuracy", "resmem_accuracy", "gain"}: lists of length
    `num_classes` (accuracies are NaN for a class absent from `labels`).
  """
  labels, base_pred, resmem_pred = map(np.asarray, (labels, base_pred, resmem_pred))
  count = np.bincount(labels, minlength=num_classes)
  with np.errstate(invalid="ignore", divide="ignore"):
    base = np.bincount(labels, weights=base_pred == labels, minlength=num_classes) / count
    res = np.bincount(labels, weights=resmem_pred == labels, minlength=num_classes) / count
  return {"count": count.tolist(), "deepnet_accuracy": base.tolist(),
          "resmem_accuracy": res.tolist(), "gain": (res - base).tolist()}


def _show(ax, image: np.ndarray) -> None:
  image = np.asarray(image)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=255)
  else:
    ax.imshow(image.astype(np.uint8))
  ax.set_xticks([])
  ax.set_yticks([])


def plot_neighbours(path: str, *, query_images: np.ndarray, query_labels: np.ndarray,
                    base_pred: np.ndarray, resmem_pred: np.ndarray,
                    neighbour_images: np.ndarray, neighbour_labels: np.ndarray,
                    weights: np.ndarray, k: int | None = None,
                    class_names: Sequence[str] | None = None) -> str:
  """A grid: each row a test image, then its nearest training images with weights.

  Args:
    path: PNG file to write.
    query_images: (R, H, W, C) uint8 test images.
    query_labels, base_pred, resmem_pred: (R,) true label, base and ResMem predictions.
    neighbour_images: (R, k, H, W, C) uint8 nearest training images, nearest first.
    neighbour_labels: (R, k) their labels.
    weights: (R, k) their residual weights w_j (softmax of -d / sigma).
    k: the number of neighbours ResMem uses, when more than the ones drawn.
    class_names: optional names of the classes.

  Returns:
    `path`.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  name = (lambda c: class_names[c]) if class_names is not None else str
  rows, shown = neighbour_labels.shape
  fig, axes = plt.subplots(rows, shown + 1, figsize=(1.5 * (shown + 1), 1.75 * rows + 0.6),
                           squeeze=False)
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
  fig.suptitle("test image (left): label, DeepNet / ResMem prediction;\n"
               f"{which} training images in embedding space, with residual weights w",
               fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / (1.75 * rows + 0.6)))
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_size_sweep(path: str, rows: Sequence[dict[str, Any]], *, title: str = "") -> str:
  """Test accuracy against parameter count, DeepNet and ResMem, mean +- std over seeds.

  Args:
    path: PNG file to write.
    rows: one dict per trained model with "params", "seed", "deepnet_test_accuracy",
      "resmem_test_accuracy" (and a "size" label).
    title: figure title.

  Returns:
    `path`.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  summary = summarize_size_sweep(rows)
  x = np.array([s["params"] for s in summary])
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label, color in (("deepnet", "DeepNet", "tab:blue"),
                            ("resmem", "ResMem", "tab:orange")):
    mean = np.array([s[f"{key}_mean"] for s in summary]) * 100
    std = np.array([s[f"{key}_std"] for s in summary]) * 100
    ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=label, color=color)
  ax.set_xscale("log")
  ax.set_xlabel("parameters of the base model")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title or "ResMem vs DeepNet across model sizes (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def summarize_size_sweep(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and std (over seeds) of the DeepNet and ResMem test accuracies per size."""
  sizes: dict[str, list] = {}
  for r in rows:
    sizes.setdefault(r["size"], []).append(r)
  out = []
  for size, group in sizes.items():
    base = np.array([g["deepnet_test_accuracy"] for g in group])
    res = np.array([g["resmem_test_accuracy"] for g in group])
    out.append({"size": size, "params": group[0]["params"], "seeds": len(group),
                "deepnet_mean": float(base.mean()), "deepnet_std": float(base.std()),
                "resmem_mean": float(res.mean()), "resmem_std": float(res.std()),
                "gain_mean": float((res - base).mean()),
                "gain_std": float((res - base).std())})
    for method in ("knn", "knn_lm"):
      accs = [g["baselines"][method] for g in group if method in g.get("baselines", {})]
      if accs:
        out[-1][f"{method}_mean"] = float(np.mean(accs))
        out[-1][f"{method}_std"] = float(np.std(accs))
  return sorted(out, key=lambda s: s["params"])


def format_results_table(results: dict[str, Any]) -> str:
  """A plain-text table of the test accuracies in `results` (see train_and_evaluate)."""
  rows = [("DeepNet", results["deepnet_test_accuracy"])]
  settings = results.get("baseline_settings", {})
  names = {"knn": "soft kNN on embeddings", "knn_lm": "kNN-LM interpolation"}
  for method, name in names.items():
    if method in results.get("baselines", {}):
      knobs = ", ".join(f"{key}={settings.get(method, {})[key]:.3g}"
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
  head = (f"{'size':<22}{'params':>9}{'seeds':>6}{'DeepNet':>16}{'ResMem':>16}"
          f"{'gain':>16}{'soft kNN':>16}{'kNN-LM':>16}")
  lines = [head, "-" * len(head)]
  for s in summary:
    lines.append(f"{s['size']:<22}{s['params']:>9}{s['seeds']:>6}{cell(s, 'deepnet')}"
                 f"{cell(s, 'resmem')}{cell(s, 'gain', '>+9.2f')}{cell(s, 'knn')}"
                 f"{cell(s, 'knn_lm')}")
  return "\n".join(lines)


def write_json(path: str, obj: Any) -> str:
  """Writes `obj` as indented JSON (NumPy scalars and arrays converted)."""

  def default(x):
    if isinstance(x, np.ndarray):
      return x.tolist()
    if isinstance(x, np.generic):
      return x.item()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, default=default)
  return path
