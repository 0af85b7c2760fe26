"""Train a base network, then add ResMem on its embedding: the vision experiment.

`train_and_evaluate(config, workdir)` is the whole experiment (Yang et al., "ResMem:
Learn what you can and memorize the rest", NeurIPS 2023, Sec. 5):

  1. load deterministic train / validation / test splits (`resmem_jax.data`);
  2. train the base model (Flax `TrainState`, jitted steps, SGD with Nesterov momentum,
     linear warmup then cosine decay, weight decay), logging JSON lines and saving an
     Orbax checkpoint every epoch; a killed run resumes from its last checkpoint to the
     same final metrics as an uninterrupted one (data order and augmentation depend only
     on the seed, the epoch and the step);
  3. the ResMem stage (`resmem_stage`): embeddings and logits of the training set (no
     augmentation), (k, sigma, T) chosen on the validation split, then the test split
     once, next to the baselines;
  4. the analysis (`resmem_jax.analysis`): examples fixed and broken, gain per class,
     and a picture of test digits with their nearest training digits.

Everything is written to `workdir`: metrics.jsonl, checkpoints/, results.json,
analysis.json, neighbours.png.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from jaxtyping import Array, Float, Int, UInt8
from tqdm.auto import tqdm

from resmem_jax import _validation as v
from resmem_jax import analysis as analysis_lib
from resmem_jax import data as data_lib
from resmem_jax import models as models_lib
from resmem_jax.memory import check_temperature
from resmem_jax.predict import check_sigma
from resmem_jax.sweep import check_grid


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics (an empty dict for models without)."""
  batch_stats: Any = flax.struct.field(default_factory=dict)


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  kwargs = dict(config.get("model_kwargs", {}) or {})
  return models_lib.create_model(config.model, num_classes=num_classes, **kwargs)


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with Nesterov momentum, linear warmup then cosine decay, L2 weight decay.

  Weight decay is added to the gradient (before momentum, as in He et al.'s ResNet
  recipe) and applies to kernels only: biases and BatchNorm scales are not decayed.
  """
  total = max(1, config.num_epochs * steps_per_epoch)
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=total, end_value=0.0)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
      optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  return tx, schedule


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict, model,
                       image_shape: tuple[int, ...], steps_per_epoch: int) -> TrainState:
  """Initial `TrainState` of `model` for inputs of `image_shape` (H, W, C)."""
  variables = jax.jit(functools.partial(model.init, train=False))(
      rng, jnp.zeros((1, *image_shape), jnp.float32))
  tx, _ = create_optimizer(config, steps_per_epoch)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)


def _apply(state: TrainState, params, images, *, train: bool):
  variables = {"params": params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
    if train:
      (logits, emb), updates = state.apply_fn(variables, images, train=True,
                                              mutable=["batch_stats"])
      return logits, emb, updates["batch_stats"]
  logits, emb = state.apply_fn(variables, images, train=train)
  return logits, emb, state.batch_stats


@functools.partial(jax.jit, static_argnames=("mean", "std", "augment"), donate_argnums=0)
def train_step(state: TrainState, images: UInt8[Array, "B H W C"], labels: Int[Array, "B"],
               rng: jax.Array, *, mean: tuple[float, ...], std: tuple[float, ...],
               augment: bool) -> tuple[TrainState, dict[str, Array]]:
  """One SGD step on a batch of uint8 images: normalize, augment, forward, update."""
  x = data_lib.normalize(images, mean, std)
  if augment:
    x = data_lib.augment_crop_flip(rng, x)

  def loss_fn(params):
    logits, _, batch_stats = _apply(state, params, x, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, batch_stats)

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {"loss_sum": loss * labels.shape[0],
             "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
             "count": jnp.asarray(labels.shape[0])}
  return state, metrics


@functools.partial(jax.jit, static_argnames=("mean", "std"))
def eval_step(state: TrainState, images: UInt8[Array, "B H W C"], *,
              mean: tuple[float, ...], std: tuple[float, ...]
              ) -> tuple[Float[Array, "B K"], Float[Array, "B E"]]:
  """Logits and embeddings of a batch (inference mode: running BatchNorm statistics)."""
  logits, emb, _ = _apply(state, state.params, data_lib.normalize(images, mean, std),
                          train=False)
  return logits, emb


def compute_outputs(state: TrainState, split, *, mean, std, batch_size: int = 512
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Logits (N, K) and embeddings (N, E) of every example of `split`, in order.

  No augmentation. The last batch is padded to `batch_size` so one compiled eval step
  serves every batch.
  """
  n = len(split)
  batch_size = max(1, min(batch_size, n))
  logits, embs = [], []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    images, _ = split.take(idx)
    pad = batch_size - len(idx)
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    lg, em = eval_step(state, images, mean=tuple(mean), std=tuple(std))
    logits.append(np.asarray(lg)[:len(idx)])
    embs.append(np.asarray(em)[:len(idx)])
  return np.concatenate(logits), np.concatenate(embs)


def _evaluate(state, split, mean, std, batch_size) -> dict[str, float]:
  logits, _ = compute_outputs(state, split, mean=mean, std=std, batch_size=batch_size)
  labels = split.labels
  loss = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits),
                                                         jnp.asarray(labels))
  return {"loss": float(jnp.mean(loss)),
          "accuracy": float(np.mean(np.argmax(logits, -1) == labels))}


def steps_per_epoch_for(config: ml_collections.ConfigDict, n_train: int) -> int:
  """Full batches per epoch (the ragged last batch is dropped: one compiled shape)."""
  batch_size = min(config.batch_size, n_train)
  steps = n_train // batch_size
  limit = config.get("steps_per_epoch", -1)
  return min(steps, limit) if limit and limit > 0 else steps


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The training-example order of `epoch`: a function of (seed, epoch) only, so a
  resumed run replays exactly the batches an uninterrupted one would see."""
  return np.random.default_rng((seed, epoch)).permutation(n)


def _checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def _to_checkpoint(state: TrainState) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state}


def _latest_step(workdir: str) -> int | None:
  """The step of the latest checkpoint in `workdir`, None if it holds none."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  manager = _checkpoint_manager(workdir, 1)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_or_init(manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
  """`state` replaced by the latest checkpoint in `manager`, if there is one."""
  step = manager.latest_step()
  if step is None:
    return state
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_checkpoint(state))
  restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  # Orbax gives the step back as a Python int beside committed device arrays: train_step
  # then compiled twice, for that mix and again for its own output, whose step is
  # committed. A committed int32 step, placed like the params, matches that output.
  placement = jax.tree.leaves(restored["params"])[0].sharding
  return state.replace(step=jax.device_put(np.asarray(restored["step"], np.int32), placement),
                       params=restored["params"],
                       batch_stats=restored["batch_stats"], opt_state=restored["opt_state"])


def _resume_metrics(path: str, upto_epoch: int) -> list[dict[str, Any]]:
  """The logged epochs the restored state has done; rewrites the log without the rest.

  A record is logged before its checkpoint is saved, so a run stopped in between leaves
  a record past the checkpoint (dropped here), never a checkpoint without its record. A
  run stopped while appending can leave a cut-off last line (dropped too). The log is
  rewritten only when something is dropped, and then atomically, so a failed rewrite
  cannot lose the epochs already logged.
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise ValueError(f"{path} line {i + 1} is not JSON; it is the metrics log of this "
                         f"workdir, which only this function writes") from None
  kept = [r for r in records if r["epoch"] <= upto_epoch]
  if len(kept) < len(lines):
    analysis_lib.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
  return kept


# jax.random.key keeps a seed's low 32 bits (64-bit JAX off): seeds 5 and 2**32 + 5
# would start from the same weights while NumPy shuffled their batches apart.
MAX_SEED = 2**32 - 1


def check_resmem_grids(ks, sigmas, temperatures, *, prefix: str = "") -> None:
  """Raises ValueError or TypeError naming the first ResMem grid value out of range, as
  written (before `sigmas` are scaled), with `rm.sweep`'s checks: ks ints >= 1 (repeats
  allowed: they are merged), sigmas and temperatures distinct, finite and > 0."""
  check_grid(f"{prefix}ks", ks, lambda name, k: v.check_int(name, k, low=1), distinct=False)
  check_grid(f"{prefix}sigmas", sigmas, check_sigma)
  check_grid(f"{prefix}temperatures", temperatures, check_temperature)


def check_training_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError or TypeError naming the first setting out of range: of training,
  and of the ResMem grids and the analysis (checked here too, so that a bad value is
  refused before the training run, not after it)."""
  v.check_int("seed", config.seed, low=0, high=MAX_SEED)
  steps = config.get("steps_per_epoch", -1)
  if steps is not None and steps != -1:
    v.check_int("steps_per_epoch", steps, low=1)  # -1 (or None): one whole pass
  v.check_int("batch_size", config.batch_size, low=1)
  v.check_int("eval_batch_size", config.get("eval_batch_size", 512), low=1)
  v.check_int("keep_checkpoints", config.get("keep_checkpoints", 2), low=1)  # 0: no resume
  v.check_int("num_epochs", config.num_epochs, low=0)
  if config.get("max_train") is not None:
    v.check_int("max_train", config.max_train, low=1)
  v.check_positive("learning_rate", config.learning_rate)
  for name in ("warmup_epochs", "weight_decay", "momentum"):
    v.check_non_negative(name, config.get(name, 0.0))
  if config.get("momentum", 0.0) >= 1:
    raise ValueError(f"momentum must be < 1, got momentum={config.momentum!r}")
  for name, value in dict(config.get("model_kwargs") or {}).items():
    if name in ("width", "embed_dim", "depth") and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
      raise ValueError(f"model_kwargs.{name} must be > 0, got {name}={value!r}")
  if config.get("resmem") is not None:
    check_resmem_grids(config.resmem.ks, config.resmem.sigmas, config.resmem.temperatures,
                       prefix="resmem.")
  analysis = config.get("analysis") or {}
  v.check_int("analysis.num_examples", analysis.get("num_examples", 0), low=0)
  v.check_int("analysis.num_neighbours", analysis.get("num_neighbours", 5), low=1)


# Settings that leave the trained model unchanged: a resumed run may change them.
RESUMABLE_SETTINGS = ("progress", "keep_checkpoints", "eval_batch_size", "resmem", "analysis",
                      "data_dir", "manual_dir")
TRAINING_CONFIG_FILE = "training_config.json"


def _training_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings that determine the trained model, as JSON values."""
  settings = {k: val for k, val in config.to_dict().items() if k not in RESUMABLE_SETTINGS}
  return json.loads(json.dumps(settings, default=repr))


def _check_same_run(workdir: str, config: ml_collections.ConfigDict, resuming: bool,
                    data: dict[str, Any]) -> None:
  """A checkpoint resumes only the run that wrote it.

  The first run in `workdir` records its training settings and the facts of the data
  it trained on (`data`: training-set size, steps per epoch, image shape, classes); a
  later run that would resume from the checkpoint must have the same ones, or it
  raises instead of reporting the old model's numbers under the new config (a new
  training-set size would also shift the epoch a step count stands for).
  """
  path = os.path.join(workdir, TRAINING_CONFIG_FILE)
  settings = {**_training_settings(config), "data": json.loads(json.dumps(data))}
  if resuming and not os.path.exists(path):
    raise ValueError(f"workdir {workdir!r} holds a checkpoint but no {TRAINING_CONFIG_FILE} "
                     f"saying what it was trained with; use a new workdir, or delete the "
                     f"old one to start over")
  if resuming:
    with open(path) as f:
      recorded = json.load(f)
    changed = sorted(name for name in set(recorded) | set(settings)
                     if recorded.get(name) != settings.get(name))
    if changed:
      details = ", ".join(f"{name}: {recorded.get(name)!r} -> {settings.get(name)!r}"
                          for name in changed)
      raise ValueError(
          f"workdir {workdir!r} holds a checkpoint trained with other settings ({details}); "
          f"use a new workdir for this config, or delete the old one to start over")
  else:
    with open(path, "w") as f:
      json.dump(settings, f, indent=1, sort_keys=True)


def train(config: ml_collections.ConfigDict, workdir: str, splits: data_lib.Splits
          ) -> tuple[TrainState, list[dict[str, Any]]]:
  """Trains (or resumes training of) the base model; returns the final state and the
  per-epoch metrics (also in `workdir/metrics.jsonl`).

  Raises:
    ValueError: a training setting out of range, or a workdir whose checkpoint was
      trained with other settings or data (`RESUMABLE_SETTINGS` may differ).
    FloatingPointError: the training loss of an epoch is not finite (diverged).
  """
  check_training_config(config)
  os.makedirs(workdir, exist_ok=True)
  n_train = len(splits.train)
  batch_size = min(config.batch_size, n_train)
  steps_per_epoch = steps_per_epoch_for(config, n_train)
  model = create_model(config, splits.num_classes)
  state = create_train_state(jax.random.key(config.seed), config, model,
                             splits.image_shape, steps_per_epoch)
  _, schedule = create_optimizer(config, steps_per_epoch)
  mean, std = tuple(splits.mean), tuple(splits.std)
  augment = bool(config.get("augment", False))
  # Held in memory (CIFAR, MNIST): crop and flip on device inside train_step. Read lazily
  # (ImageNet): random-resized crop and flip as the images are decoded on the host.
  host_augment = augment and isinstance(splits.train, data_lib.SourceSplit)
  aug_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  eval_bs = config.get("eval_batch_size", 512)

  manager = _checkpoint_manager(workdir, config.get("keep_checkpoints", 2))
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  data = {"n_train": n_train, "steps_per_epoch": steps_per_epoch,
          "image_shape": list(splits.image_shape), "num_classes": splits.num_classes}
  try:
    _check_same_run(workdir, config, resuming=manager.latest_step() is not None, data=data)
    state = restore_or_init(manager, state)
    start_epoch = int(state.step) // steps_per_epoch
    history = _resume_metrics(metrics_path, start_epoch)
    total = config.num_epochs * steps_per_epoch
    bar = tqdm(total=total, initial=int(state.step), desc="train", unit="step",
               disable=not config.get("progress", True), dynamic_ncols=True)
    for epoch in range(start_epoch, config.num_epochs):
      t0 = time.time()
      order = epoch_order(config.seed, epoch, n_train)
      sums = None
      for i in range(steps_per_epoch):
        step = epoch * steps_per_epoch + i
        batch = order[i * batch_size:(i + 1) * batch_size]
        images, labels = (splits.train.take(batch, augment_seed=(config.seed, step))
                          if host_augment else splits.train.take(batch))
        state, m = train_step(state, images, labels, jax.random.fold_in(aug_key, step),
                              mean=mean, std=std, augment=augment and not host_augment)
        sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
        bar.update(1)
      sums = jax.device_get(sums)
      train_loss = float(sums["loss_sum"] / sums["count"])
      val = _evaluate(state, splits.validation, mean, std, eval_bs)
      # The validation loss sees the parameters after the epoch's last step, which the
      # training loss (of the parameters before each step) does not.
      if not (math.isfinite(train_loss) and math.isfinite(val["loss"])):
        raise FloatingPointError(  # before a NaN model is checkpointed
            f"training diverged in epoch {epoch + 1}: train_loss={train_loss}, val_loss="
            f"{val['loss']} (learning_rate={config.learning_rate}); lower the learning rate "
            f"and use a new workdir")
      record = {"epoch": epoch + 1, "step": int(state.step),
                "train_loss": train_loss,
                "train_accuracy": float(sums["correct"] / sums["count"]),
                "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                "learning_rate": float(schedule(int(state.step) - 1)),
                "epoch_time_s": round(time.time() - t0, 3)}
      bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_acc=f"{val['accuracy']:.3f}")
      history.append(record)
      with open(metrics_path, "a") as f:  # first: see _resume_metrics
        f.write(json.dumps(record) + "\n")
      manager.save(int(state.step), args=ocp.args.StandardSave(_to_checkpoint(state)))
    bar.close()
  finally:
    manager.wait_until_finished()
    manager.close()
  return state, history


def resmem_stage(*, train_outputs: tuple[np.ndarray, np.ndarray], train_labels: np.ndarray,
                 val_outputs: tuple[np.ndarray, np.ndarray], val_labels: np.ndarray,
                 test_outputs: tuple[np.ndarray, np.ndarray], test_labels: np.ndarray,
                 ks: Sequence[int], sigmas: Sequence[float],
                 temperatures: Sequence[float], relative_sigma: bool = True
                 ) -> dict[str, Any]:
  r"""ResMem on a trained model's outputs: tune on validation, then test once.

  1. Memory of the training set: keys phi(x_i), residuals onehot(y_i) - softmax(z_i / T).
  2. `rm.sweep` scores every (k, sigma, T) of ResMem, and of the baselines (DeepNet alone,
     soft kNN on the embeddings, kNN-LM interpolation), on the validation split.
  3. Each method's best validation setting is applied to the test split once; ResMem's
     through `rm.predict` with a memory rebuilt at the chosen T.

  Args:
    train_outputs, val_outputs, test_outputs: (logits (N, C), embeddings (N, E)) of
      each split, computed without augmentation.
    train_labels, val_labels, test_labels: (N,) int labels.
    ks, sigmas, temperatures: the grids searched on validation.
    relative_sigma: if True, `sigmas` are multiples of the median distance from a
      validation embedding to its nearest training embedding (a scale measured on
      train and validation only), so one grid serves embeddings of any scale.

  Returns:
    A dict: deepnet/resmem test accuracies, `best` (k, sigma, temperature chosen on
    validation), validation accuracies, `baselines` (test accuracy of each method at
    its best validation setting) and `baseline_settings`, the sigma scale, the
    predictions on the test split (`test_predictions`: arrays, not JSON).
  """
  import resmem_jax as rm  # pylint: disable=g-import-not-at-top
  from resmem_jax.sweep import sweep  # pylint: disable=g-import-not-at-top

  train_logits, train_emb = train_outputs
  val_logits, val_emb = val_outputs
  test_logits, test_emb = test_outputs
  check_resmem_grids(ks, sigmas, temperatures)
  n_train = train_emb.shape[0]
  ks = tuple(sorted({min(int(k), n_train) for k in ks}))  # k > n_train: every example
  scale = (analysis_lib.median_nn_distance(jnp.asarray(val_emb), jnp.asarray(train_emb))
           if relative_sigma else 1.0)
  sigma_grid = tuple(float(s * scale) for s in sigmas)
  memory = rm.build_memory(train_emb, train_labels, train_logits, temperature=1.0)
  val = sweep(memory, val_emb, val_logits, val_labels, ks=ks, sigmas=sigma_grid,
              temperatures=tuple(float(t) for t in temperatures))
  best = val.best["resmem"]

  final = rm.build_memory(train_emb, train_labels, train_logits,
                          temperature=best["temperature"])
  scores = np.asarray(rm.predict(final, test_emb, test_logits, k=best["k"],
                                 sigma=best["sigma"]))
  resmem_pred = scores.argmax(-1)
  deepnet_pred = test_logits.argmax(-1)

  # Every method at its own best validation setting, scored on test in one pass: the
  # grid below is the union of the chosen settings, and each method reads off the row
  # of its own validation choice (nothing is selected on test).
  chosen = {m: val.best[m] for m in ("deepnet", "knn", "knn_lm")}
  union = lambda key, default: tuple(sorted({r[key] for r in chosen.values()
                                             if r[key] is not None} or {default}))
  test = sweep(memory, test_emb, test_logits, test_labels, ks=union("k", ks[0]),
               sigmas=union("sigma", sigma_grid[0]),
               temperatures=union("temperature", 1.0), lams=union("lam", 0.5))
  knobs = ("k", "sigma", "temperature", "lam")
  baselines, settings = {}, {}
  for method, row in chosen.items():
    (match,) = [r for r in test.table if r["method"] == method
                and all(r[key] == row[key] for key in knobs)]
    baselines[method] = match["accuracy"]
    settings[method] = {key: row[key] for key in knobs if row[key] is not None}
    settings[method]["val_accuracy"] = row["accuracy"]
  return {
      "deepnet_test_accuracy": float(np.mean(deepnet_pred == test_labels)),
      "resmem_test_accuracy": float(np.mean(resmem_pred == test_labels)),
      "deepnet_val_accuracy": float(np.mean(val_logits.argmax(-1) == val_labels)),
      "resmem_val_accuracy": best["accuracy"],
      "best": {"k": best["k"], "sigma": best["sigma"], "temperature": best["temperature"],
               "sigma_relative": best["sigma"] / scale},
      "sigma_scale": scale,
      "baselines": baselines,
      "baseline_settings": settings,
      "test_predictions": {"deepnet": deepnet_pred, "resmem": resmem_pred,
                           "resmem_scores": scores},
  }


def load_splits(config: ml_collections.ConfigDict) -> data_lib.Splits:
  """The deterministic splits `config` asks for (see `resmem_jax.data.load_splits`)."""
  return data_lib.load_splits(
      config.dataset, val_size=config.get("val_size"), test_size=config.get("test_size"),
      split_seed=config.get("split_seed", 0), data_dir=config.get("data_dir"),
      manual_dir=config.get("manual_dir"), image_size=config.get("image_size", 224),
      max_train=config.get("max_train"))


def picture_rows(fixed: np.ndarray, broken: np.ndarray, n_test: int, rows: int
                 ) -> tuple[np.ndarray, str]:
  """The test examples the neighbours picture shows, and a caption saying how they
  were chosen: what the memory changed, as many of ResMem's fixes as of its breaks
  where both exist (an odd row goes to the fixes), then the first test examples."""
  n_broken = min(len(broken), rows // 2)
  n_fixed = min(len(fixed), rows - n_broken)
  n_broken = min(len(broken), rows - n_fixed)
  order = np.concatenate([fixed[:n_fixed], broken[:n_broken], np.arange(n_test)])
  _, keep = np.unique(order, return_index=True)
  chosen = order[np.sort(keep)][:rows]
  others = len(chosen) - n_fixed - n_broken
  caption = (f"{n_fixed} of the {len(fixed)} test images ResMem fixed, {n_broken} of the "
             f"{len(broken)} it broke" + (f", {others} others" if others else ""))
  return chosen, caption


def _neighbour_picture(path, config, splits, outputs, stage, fixed_broken) -> str | None:
  import resmem_jax as rm  # pylint: disable=g-import-not-at-top
  rows = int(config.analysis.get("num_examples", 0))
  if rows <= 0:
    return None
  chosen, caption = picture_rows(fixed_broken["fixed"], fixed_broken["broken"],
                                 len(splits.test), rows)
  best = stage["best"]
  res = rm.knn(jnp.asarray(outputs["test"][1][chosen]), jnp.asarray(outputs["train"][1]),
               best["k"])
  weights = np.asarray(rm.neighbour_weights(res.distances, sigma=best["sigma"]))
  shown = min(int(config.analysis.get("num_neighbours", 5)), best["k"])
  idx = np.asarray(res.indices)[:, :shown]
  q_images, q_labels = splits.test.take(chosen)
  n_images, n_labels = splits.train.take(idx.reshape(-1))
  preds = stage["test_predictions"]
  analysis_lib.plot_neighbours(
      query_images=q_images, query_labels=q_labels,
      base_pred=preds["deepnet"][chosen], resmem_pred=preds["resmem"][chosen],
      neighbour_images=n_images.reshape(*idx.shape, *n_images.shape[1:]),
      neighbour_labels=n_labels.reshape(idx.shape), weights=weights[:, :shown],
      k=best["k"], title=caption, path=path)
  return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       splits: data_lib.Splits | None = None) -> dict[str, Any]:
  """The whole experiment: train (or resume) the base model, then ResMem, then analysis.

  Writes to `workdir`: metrics.jsonl (one JSON line per epoch), checkpoints/ (Orbax,
  every epoch), results.json (test accuracies of DeepNet, ResMem and the baselines,
  the (k, sigma, T) chosen on validation, split sizes, timings, package versions and
  the library's git commit), analysis.json (examples fixed and broken, gain per
  class) and neighbours.png.

  Args:
    config: an ml_collections config (see `resmem_jax.configs`).
    workdir: output directory; an existing one resumes from its last checkpoint.
    splits: optional pre-loaded `load_splits(config)` (the size sweep reuses one).

  Returns:
    The results dict written to results.json.

  Example:
    >>> from resmem_jax import configs, train
    >>> results = train.train_and_evaluate(configs.get_config("mnist"), "runs/mnist")
    >>> results["resmem_test_accuracy"] - results["deepnet_test_accuracy"]
  """
  t_start = time.time()
  check_training_config(config)  # before the data are loaded
  os.makedirs(workdir, exist_ok=True)
  splits = load_splits(config) if splits is None else splits
  t_data = time.time() - t_start
  resumed_from_step = _latest_step(workdir)
  state, history = train(config, workdir, splits)
  t_train = time.time() - t_start - t_data
  t0 = time.time()
  mean, std = splits.mean, splits.std
  bs = config.get("eval_batch_size", 512)
  outputs = {name: compute_outputs(state, getattr(splits, name), mean=mean, std=std,
                                   batch_size=bs)
             for name in ("train", "validation", "test")}
  t_embed = time.time() - t0
  t0 = time.time()
  stage = resmem_stage(
      train_outputs=outputs["train"], train_labels=splits.train.labels,
      val_outputs=outputs["validation"], val_labels=splits.validation.labels,
      test_outputs=outputs["test"], test_labels=splits.test.labels,
      ks=config.resmem.ks, sigmas=config.resmem.sigmas,
      temperatures=config.resmem.temperatures,
      relative_sigma=config.resmem.get("relative_sigma", True))
  t_resmem = time.time() - t0
  preds = stage.pop("test_predictions")
  fb = analysis_lib.fixed_and_broken(splits.test.labels, preds["deepnet"], preds["resmem"])
  per_class = analysis_lib.per_class_gain(splits.test.labels, preds["deepnet"],
                                          preds["resmem"], splits.num_classes)
  stage["test_predictions"] = preds
  picture = _neighbour_picture(os.path.join(workdir, "neighbours.png"), config, splits,
                               outputs, stage, fb)
  stage.pop("test_predictions")
  analysis_lib.write_json(os.path.join(workdir, "analysis.json"), {
      "fixed": fb["fixed"], "broken": fb["broken"],
      "n_fixed": len(fb["fixed"]), "n_broken": len(fb["broken"]),
      "per_class": per_class})
  results = {
      "dataset": config.dataset, "model": config.model,
      "model_kwargs": dict(config.get("model_kwargs", {}) or {}),
      "params": models_lib.count_params(state.params),
      "seed": config.seed,
      "n_train": len(splits.train), "n_val": len(splits.validation),
      "n_test": len(splits.test), "num_classes": splits.num_classes,
      **stage,
      "n_fixed": int(len(fb["fixed"])), "n_broken": int(len(fb["broken"])),
      "final_epoch": history[-1] if history else None,
      "resumed_from_step": resumed_from_step,
      "neighbours_png": picture,
      # train: this invocation's training call (setup, restore and compilation
      # included; near 0 for a finished run resumed); train_epochs: the epochs' own
      # times (with their validation pass) summed over every run of this workdir;
      # embed: the base model's outputs on the three splits; resmem: the memory, the
      # validation sweep and the test evaluation.
      "timing_s": {"data": round(t_data, 2), "train": round(t_train, 2),
                   "train_epochs": round(sum(r["epoch_time_s"] for r in history), 2),
                   "embed": round(t_embed, 2), "resmem": round(t_resmem, 2),
                   "total": round(time.time() - t_start, 2)},
      "hardware": analysis_lib.hardware(),
      "provenance": analysis_lib.provenance(),
      "config": config.to_dict(),
  }
  analysis_lib.write_json(os.path.join(workdir, "results.json"), results)
  return results


def run_size_sweep(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Trains `config.sweep.sizes` x `config.sweep.seeds` and compares DeepNet with ResMem.

  Each size is a `(width, embed_dim, depth)` triple of `SmallCNN` attributes (a
  `(width, embed_dim)` pair means depth 2, the original network). Each (size, seed)
  runs `train_and_evaluate` in its own sub-workdir (so a killed sweep resumes where
  it stopped) on one shared set of splits. Writes size_sweep.json (one row per run)
  and size_sweep.png (test accuracy against parameter count, mean and std over
  seeds, one marker per depth): Fig. 3 of Yang et al. (2023) at this machine's scale.

  Returns:
    The rows: size, width, embed_dim, depth, seed, params, DeepNet/ResMem test
    accuracy, chosen (k, sigma, T).

  Raises:
    ValueError: a size that is not a (width, embed_dim[, depth]) tuple of positive ints,
      seeds that are not distinct non-negative ints.
  """
  sizes = []
  for size in config.sweep.sizes:
    if len(size) not in (2, 3):
      raise ValueError(f"sweep sizes must be (width, embed_dim) or (width, embed_dim, depth),"
                       f" got size={tuple(size)!r}")
    width, embed_dim, depth = (*size, 2) if len(size) == 2 else size
    sizes.append((v.check_int("width", width, low=1), v.check_int("embed_dim", embed_dim, low=1),
                  v.check_int("depth", depth, low=1)))
  seeds = [v.check_int("sweep.seeds", seed, low=0, high=MAX_SEED) for seed in config.sweep.seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"sweep.seeds must be distinct ints (one sub-workdir each), got "
                     f"sweep.seeds={tuple(config.sweep.seeds)!r}")
  check_training_config(config)
  splits = load_splits(config)
  rows = []
  for width, embed_dim, depth in tqdm(sizes, desc="sizes",
                                      disable=not config.get("progress", True)):
    for seed in seeds:
      cfg = ml_collections.ConfigDict(config.to_dict())
      del cfg["sweep"]
      cfg.seed = int(seed)
      cfg.model_kwargs.width = width
      cfg.model_kwargs.embed_dim = embed_dim
      cfg.model_kwargs.depth = depth
      size = f"width={width},embed={embed_dim},depth={depth}"
      sub = os.path.join(workdir, f"w{width}_e{embed_dim}_d{depth}_s{seed}")
      r = train_and_evaluate(cfg, sub, splits=splits)
      rows.append({"size": size, "width": width, "embed_dim": embed_dim, "depth": depth,
                   "seed": int(seed), "params": r["params"],
                   "deepnet_test_accuracy": r["deepnet_test_accuracy"],
                   "resmem_test_accuracy": r["resmem_test_accuracy"],
                   "baselines": r["baselines"], "best": r["best"],
                   "train_time_s": r["timing_s"]["train_epochs"]})
  analysis_lib.write_json(os.path.join(workdir, "size_sweep.json"),
                          {"rows": rows, "summary": analysis_lib.summarize_size_sweep(rows)})
  analysis_lib.plot_size_sweep(
      rows, path=os.path.join(workdir, "size_sweep.png"),
      title=f"{config.dataset}: SmallCNN widths and depths, mean ± std over "
            f"{len(config.sweep.seeds)} seeds")
  return rows
