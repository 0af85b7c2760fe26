"""Training: one-step end-to-end runs, checkpoint resume, optimizer, the ResMem stage."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

import resmem_jax as rm
from resmem_jax import analysis
from resmem_jax import configs
from resmem_jax import data
from resmem_jax import train

RESULT_KEYS = ("deepnet_test_accuracy", "resmem_test_accuracy", "best", "n_train", "n_val",
               "n_test", "baselines")


def _tiny(config, **overrides):
  config.progress = False
  config.num_epochs = 1
  config.steps_per_epoch = 1
  config.resmem.ks = (1, 3)
  config.resmem.sigmas = (1.0,)
  config.resmem.temperatures = (1.0,)
  config.analysis.num_examples = 2
  config.analysis.num_neighbours = 2
  for key, value in overrides.items():
    config[key] = value
  return config


def _check_results(workdir, results, n_classes):
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  for key in RESULT_KEYS:
    assert key in on_disk, key
  assert set(on_disk["baselines"]) == {"deepnet", "knn", "knn_lm"}
  assert on_disk["baselines"]["deepnet"] == pytest.approx(results["deepnet_test_accuracy"])
  assert set(on_disk["best"]) >= {"k", "sigma", "temperature"}
  saved = json.load(open(os.path.join(workdir, "analysis.json")))
  assert len(saved["per_class"]["gain"]) == n_classes
  # fixed - broken is exactly the accuracy gain.
  gain = (saved["n_fixed"] - saved["n_broken"]) / results["n_test"]
  assert gain == pytest.approx(results["resmem_test_accuracy"]
                               - results["deepnet_test_accuracy"])
  assert os.path.getsize(os.path.join(workdir, "neighbours.png")) > 1000
  lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1]


def test_one_step_on_mock_cifar100(tmp_path):
  config = _tiny(configs.get_config("cifar100", "quick"), model="resnet_tiny",
                 val_size=4, max_train=None, batch_size=8, eval_batch_size=8)
  config.model_kwargs = {}
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    results = train.train_and_evaluate(config, str(tmp_path))
  assert (results["n_train"], results["n_val"], results["n_test"]) == (20, 4, 24)
  assert results["num_classes"] == 100
  _check_results(str(tmp_path), results, 100)


def test_one_step_on_embedded_digits(tmp_path):
  config = _tiny(configs.get_config("digits", "quick"), batch_size=32)
  config.model_kwargs.width = 2
  config.model_kwargs.embed_dim = 4
  results = train.train_and_evaluate(config, str(tmp_path))
  assert (results["n_train"], results["n_val"], results["n_test"]) == (1259, 179, 359)
  _check_results(str(tmp_path), results, 10)


def _mnist_tiny(num_epochs=1, max_train=200):
  config = configs.get_config("mnist", "quick")
  config.progress = False
  config.num_epochs = num_epochs
  config.max_train = max_train
  config.batch_size = 100
  config.analysis.num_examples = 0
  return config


@pytest.mark.parametrize("model", ["small_cnn", "resnet_tiny"])
def test_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch, model):
  """resnet_tiny adds BatchNorm statistics and augmentation (its random crops and flips
  are keyed by step) to what a resume must restore or replay."""
  config = _mnist_tiny(num_epochs=3, max_train=300)
  if model == "resnet_tiny":
    config.model, config.model_kwargs, config.augment = "resnet_tiny", {}, True
  splits = train.load_splits(config)
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"), splits=splits)

  real_step, calls = train.train_step, []

  def killed_in_epoch_two(*args, **kwargs):
    calls.append(1)
    if len(calls) == 5:  # epoch 2 (3 steps per epoch), after one of its steps
      raise KeyboardInterrupt
    return real_step(*args, **kwargs)

  workdir = str(tmp_path / "resumed")
  monkeypatch.setattr(train, "train_step", killed_in_epoch_two)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, workdir, splits=splits)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
  monkeypatch.setattr(train, "train_step", real_step)
  resumed = train.train_and_evaluate(config, workdir, splits=splits)

  for key in ("deepnet_test_accuracy", "resmem_test_accuracy", "best", "baselines"):
    assert resumed[key] == straight[key], key
  assert (straight["resumed_from_step"], resumed["resumed_from_step"]) == (None, 3)
  # The epochs' times add up across the runs of a workdir; a finished run resumed
  # trains nothing.
  assert resumed["timing_s"]["train_epochs"] > 0
  again = train.train_and_evaluate(config, workdir, splits=splits)
  assert again["resumed_from_step"] == 9
  assert again["timing_s"]["train_epochs"] == resumed["timing_s"]["train_epochs"]
  drop_time = lambda r: {k: v for k, v in r.items() if k != "epoch_time_s"}
  assert drop_time(resumed["final_epoch"]) == drop_time(straight["final_epoch"])
  lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_lazy_splits_are_augmented_on_the_host_and_resume_exactly(tmp_path, monkeypatch,
                                                                     tiny_tfds):
  """The ImageNet path (`SourceSplit`): augment=True draws a random-resized crop and flip
  per image as it is decoded, keyed by (seed, step), not the on-device CIFAR crop; a run
  killed in epoch 2 resumes to the parameters of an uninterrupted one."""
  from tiny_tfds import TINY  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(data, "_LAZY_TFDS", (TINY,))
  config = _mnist_tiny(num_epochs=2, max_train=None)
  config.dataset, config.data_dir, config.image_size, config.val_size = TINY, tiny_tfds, 8, 6
  config.batch_size, config.augment = 18, True  # 54 training images: 3 steps per epoch
  splits = train.load_splits(config)
  assert isinstance(splits.train, data.SourceSplit)
  seeds, device_augment = [], []
  real_take, real_step = data.SourceSplit.take, train.train_step

  def take(self, indices, augment_seed=None):
    seeds.append(augment_seed)
    return real_take(self, indices, augment_seed)

  def step(*args, augment, **kwargs):
    device_augment.append(augment)
    return real_step(*args, augment=augment, **kwargs)

  monkeypatch.setattr(data.SourceSplit, "take", take)
  monkeypatch.setattr(train, "train_step", step)
  straight, _ = train.train(config, str(tmp_path / "straight"), splits)
  assert [s for s in seeds if s is not None] == [(0, step) for step in range(6)]
  assert device_augment == [False] * 6

  real_order = train.epoch_order

  def killed_in_epoch_two(seed, epoch, n):
    if epoch == 1:
      raise KeyboardInterrupt
    return real_order(seed, epoch, n)

  workdir = str(tmp_path / "resumed")
  monkeypatch.setattr(train, "epoch_order", killed_in_epoch_two)
  with pytest.raises(KeyboardInterrupt):
    train.train(config, workdir, splits)
  monkeypatch.setattr(train, "epoch_order", real_order)
  resumed, _ = train.train(config, workdir, splits)
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)


def test_a_resumed_run_compiles_train_step_once(tmp_path, monkeypatch):
  """Orbax restored the step as a Python int beside committed arrays: train_step compiled
  for that mix on the first step after a resume, and again for the next step."""
  config = _mnist_tiny(num_epochs=2)  # 2 steps per epoch
  splits = train.load_splits(config)
  real_order = train.epoch_order

  def killed_in_epoch_two(seed, epoch, n):
    if epoch == 1:
      raise KeyboardInterrupt
    return real_order(seed, epoch, n)

  monkeypatch.setattr(train, "epoch_order", killed_in_epoch_two)
  with pytest.raises(KeyboardInterrupt):
    train.train(config, str(tmp_path), splits)
  monkeypatch.setattr(train, "epoch_order", real_order)
  jax.clear_caches()  # the killed run's executables must not serve the resumed run
  assert train.train_step._cache_size() == 0  # pylint: disable=protected-access
  state, history = train.train(config, str(tmp_path), splits)
  assert [r["epoch"] for r in history] == [1, 2] and int(state.step) == 4
  # One entry per argument signature train_step was called with: one compilation each.
  assert train.train_step._cache_size() == 1  # pylint: disable=protected-access


def _epochs_logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["epoch"] for line in f]


def test_an_interrupted_save_loses_no_epoch(tmp_path, monkeypatch):
  """Ctrl-C during the last epoch's save: its checkpoint still lands (the manager is
  waited for), and its metrics line must be there too. It was written after the save,
  so the resumed run had nothing left to train and reported epoch 2 as the final one."""
  config = _mnist_tiny(num_epochs=3)
  config.steps_per_epoch = 1
  splits = train.load_splits(config)
  workdir = str(tmp_path)
  real = train._checkpoint_manager

  def interrupted_at_step_3(*args):
    manager = real(*args)
    save = manager.save

    def save_then_interrupt(step, *a, **kw):
      out = save(step, *a, **kw)
      if step == 3:
        raise KeyboardInterrupt
      return out

    manager.save = save_then_interrupt
    return manager

  monkeypatch.setattr(train, "_checkpoint_manager", interrupted_at_step_3)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, workdir, splits=splits)
  monkeypatch.setattr(train, "_checkpoint_manager", real)
  results = train.train_and_evaluate(config, workdir, splits=splits)
  assert results["resumed_from_step"] == 3
  assert results["final_epoch"]["epoch"] == 3
  assert _epochs_logged(workdir) == [1, 2, 3]


def test_resume_drops_only_unsaved_or_cut_off_records(tmp_path, monkeypatch):
  """The log is rewritten only when a record must go, and then atomically: every start
  used to truncate and rewrite it, so a failed rewrite left it empty."""
  config = _mnist_tiny(num_epochs=2)
  config.steps_per_epoch = 1
  splits = train.load_splits(config)
  workdir = str(tmp_path)
  train.train(config, workdir, splits)
  path = os.path.join(workdir, "metrics.jsonl")
  stamp = lambda: (open(path).read(), os.stat(path).st_ino, os.stat(path).st_mtime_ns)
  logged, before = open(path).read(), stamp()
  train.train(config, workdir, splits)  # nothing to drop: the file is left alone
  assert stamp() == before

  with open(path, "a") as f:
    f.write('{"epoch": 3, "step": 3}\n{"epoch": 4, "st')  # unsaved, then cut off
  def disk_full(*args):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(os, "replace", disk_full)
  with pytest.raises(OSError, match="No space"):
    train._resume_metrics(path, 2)
  monkeypatch.undo()
  assert open(path).read().startswith(logged)  # the failed rewrite lost nothing
  assert not [name for name in os.listdir(workdir) if ".tmp-" in name]
  train.train(config, workdir, splits)
  assert open(path).read() == logged and _epochs_logged(workdir) == [1, 2]
  with open(path, "w") as f:
    f.write('{"epoch": 1, "st\n' + logged)
  with pytest.raises(ValueError, match="line 1 is not JSON"):
    train.train(config, workdir, splits)


def test_a_workdir_resumes_only_its_own_run(tmp_path):
  """A checkpoint trained under other settings is never reported under this config."""
  workdir = str(tmp_path)
  config = _mnist_tiny()
  splits = train.load_splits(config)
  first = train.train_and_evaluate(config, workdir, splits=splits)
  # Settings of the ResMem stage, the analysis and the run may change on resume.
  config.resmem.ks = (1,)
  config.eval_batch_size = 50
  config.progress = False
  again = train.train_and_evaluate(config, workdir, splits=splits)
  assert again["deepnet_test_accuracy"] == first["deepnet_test_accuracy"]
  for name, value in [("seed", 1), ("batch_size", 50), ("num_epochs", 2),
                      ("learning_rate", 0.1)]:
    changed = _mnist_tiny()
    changed[name] = value
    with pytest.raises(ValueError, match=f"other settings.*{name}"):
      train.train_and_evaluate(changed, workdir, splits=splits)
  wider = _mnist_tiny()
  wider.model_kwargs.width = 3
  with pytest.raises(ValueError, match="model_kwargs"):  # not Orbax's shape error
    train.train_and_evaluate(wider, workdir, splits=splits)
  # Same settings, other data (splits passed in, or a changed data_dir): refused too.
  bigger = train.load_splits(_mnist_tiny(max_train=300))
  with pytest.raises(ValueError, match="other settings.*data.*'n_train': 200"):
    train.train_and_evaluate(_mnist_tiny(), workdir, splits=bigger)
  # A checkpoint that does not say what it was trained with is not trusted.
  os.remove(os.path.join(workdir, train.TRAINING_CONFIG_FILE))
  with pytest.raises(ValueError, match="no training_config.json"):
    train.train_and_evaluate(_mnist_tiny(), workdir, splits=splits)
  # A fresh workdir takes any settings.
  other = _mnist_tiny()
  other.seed = 1
  assert train.train_and_evaluate(other, str(tmp_path / "fresh"), splits=splits)["seed"] == 1


@pytest.mark.parametrize("name,value,error", [
    ("batch_size", 0, ValueError), ("batch_size", -5, ValueError),
    ("max_train", 0, ValueError), ("num_epochs", -1, ValueError),
    ("learning_rate", -0.1, ValueError), ("learning_rate", 0.0, ValueError),
    ("warmup_epochs", -2, ValueError), ("weight_decay", -1.0, ValueError),
    ("momentum", 1.0, ValueError), ("momentum", float("nan"), ValueError),
    ("seed", -1, ValueError), ("eval_batch_size", 0, ValueError),
    ("keep_checkpoints", 0, ValueError)])
def test_bad_training_settings_raise_naming_the_setting(tmp_path, name, value, error):
  config = _mnist_tiny()
  config[name] = value
  with pytest.raises(error, match=name):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")  # raised before training


@pytest.mark.parametrize("path,value,message", [
    ("seed", 2**32 + 5, "seed must satisfy"),  # jax.random.key keeps the low 32 bits
    ("steps_per_epoch", 0, "steps_per_epoch must satisfy"),
    ("steps_per_epoch", -2, "steps_per_epoch must satisfy"),
    ("resmem.ks", (0,), r"resmem.ks\[0\] must satisfy"),
    ("resmem.ks", (2.7,), r"resmem.ks\[0\] must be"),  # was truncated to 2
    ("resmem.ks", (), "resmem.ks must be a non-empty sequence"),
    ("resmem.sigmas", (1.0, -1.0), r"resmem.sigmas\[1\] must be finite and > 0, got "
     r"resmem.sigmas\[1\]=-1.0"),  # as written, not times the median distance
    ("resmem.temperatures", (0.0,), r"resmem.temperatures\[0\] must be finite and > 0"),
    ("analysis.num_neighbours", 0, "analysis.num_neighbours must satisfy"),
    ("analysis.num_examples", -1, "analysis.num_examples must satisfy")])
def test_bad_resmem_and_analysis_settings_raise_before_training(tmp_path, monkeypatch,
                                                                path, value, message):
  """These were refused after the whole training run (or never: 2.7 became k = 2, and
  seeds 5 and 2**32 + 5 shared their initial weights)."""
  def no_training(*args, **kwargs):
    raise AssertionError("training started")
  monkeypatch.setattr(train, "train", no_training)
  config = _mnist_tiny()
  parent, _, name = path.rpartition(".")
  (config[parent] if parent else config)[name] = value
  with pytest.raises((ValueError, TypeError), match=message):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("steps", [-1, None, 3])
def test_steps_per_epoch_takes_minus_one_none_or_a_positive_int(steps):
  config = _mnist_tiny()
  config.steps_per_epoch = steps
  train.check_training_config(config)


def test_the_resmem_stage_names_a_bad_sigma_as_written():
  rng = np.random.default_rng(0)
  outputs = (rng.normal(size=(20, 3)).astype(np.float32),
             rng.normal(size=(20, 4)).astype(np.float32))
  held_out = (outputs[0], outputs[1] + 0.3)  # a median distance to the training set != 1
  labels = np.arange(20) % 3
  with pytest.raises(ValueError, match=r"got sigmas\[0\]=-1.0$"):
    train.resmem_stage(train_outputs=outputs, train_labels=labels, val_outputs=held_out,
                       val_labels=labels, test_outputs=held_out, test_labels=labels,
                       ks=(1,), sigmas=(-1.0,), temperatures=(1.0,))


def test_a_diverged_run_stops_before_its_checkpoint(tmp_path):
  config = _mnist_tiny()
  config.learning_rate = 1e30
  with pytest.raises(FloatingPointError, match="diverged in epoch 1"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path / "checkpoints")


@pytest.mark.parametrize("name,value", [("width", 0), ("width", -1), ("embed_dim", 0),
                                        ("depth", 0)])
def test_bad_model_size_raises(tmp_path, name, value):
  config = _mnist_tiny()
  config.model_kwargs[name] = value
  with pytest.raises(ValueError, match=f"model_kwargs.{name}"):
    train.train_and_evaluate(config, str(tmp_path))


def test_schedule_and_weight_decay_mask():
  config = configs.get_config("mnist")
  config.num_epochs, config.warmup_epochs, config.learning_rate = 4, 1.0, 0.2
  tx, schedule = train.create_optimizer(config, steps_per_epoch=10)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(0.2)
  assert float(schedule(40)) == pytest.approx(0.0, abs=1e-7)
  assert float(schedule(5)) == pytest.approx(0.1)
  # With zero gradients only the decayed kernels move; biases are not decayed.
  config.warmup_epochs = 0.0
  tx, _ = train.create_optimizer(config, steps_per_epoch=10)
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
  # Nesterov SGD on the decay gradient wd * w: -lr * (1 + momentum) * wd at step 0.
  np.testing.assert_allclose(updates["dense"]["kernel"],
                             -0.2 * (1 + config.momentum) * config.weight_decay, rtol=1e-5)


def test_train_step_fits_a_batch():
  config = configs.get_config("mnist")
  config.num_epochs, config.learning_rate, config.warmup_epochs = 1, 0.1, 0.0
  config.model_kwargs.width, config.model_kwargs.embed_dim = 8, 32
  splits = data.load_splits("digits")
  model = train.create_model(config, 10)
  state = train.create_train_state(jax.random.key(0), config, model, (8, 8, 1), 40)
  images, labels = splits.train.take(np.arange(64))
  losses = []
  for step in range(40):
    state, m = train.train_step(state, images, labels, jax.random.key(step),
                                mean=splits.mean, std=splits.std, augment=False)
    losses.append(float(m["loss_sum"] / m["count"]))
  assert losses[-1] < 0.5 * losses[0]
  assert int(state.step) == 40


def test_resmem_stage_on_a_tiny_run(tmp_path):
  config = configs.get_config("mnist", "quick")
  config.progress = False
  config.num_epochs = 1
  config.max_train = 400
  splits = train.load_splits(config)
  state, _ = train.train(config, str(tmp_path), splits)
  outputs = {name: train.compute_outputs(state, getattr(splits, name), mean=splits.mean,
                                         std=splits.std, batch_size=256)
             for name in ("train", "validation", "test")}
  # The padded last batch (400 = 256 + 144) gives the same outputs as one batch.
  whole = train.compute_outputs(state, splits.train, mean=splits.mean, std=splits.std,
                                batch_size=400)
  np.testing.assert_allclose(outputs["train"][0], whole[0], rtol=1e-5, atol=1e-5)
  stage = train.resmem_stage(
      train_outputs=outputs["train"], train_labels=splits.train.labels,
      val_outputs=outputs["validation"], val_labels=splits.validation.labels,
      test_outputs=outputs["test"], test_labels=splits.test.labels,
      ks=(1, 5, 20), sigmas=(0.3, 1.0), temperatures=(0.5, 1.0))
  best = stage["best"]
  assert best["k"] in (1, 5, 20) and best["temperature"] in (0.5, 1.0)
  # The sigma grid's unit: the median validation-to-train nearest-neighbour distance.
  assert stage["sigma_scale"] == analysis.median_nn_distance(outputs["validation"][1],
                                                             outputs["train"][1])
  assert stage["sigma_scale"] > 0
  assert min(abs(best["sigma_relative"] - s) for s in (0.3, 1.0)) < 1e-6
  assert best["sigma"] == pytest.approx(best["sigma_relative"] * stage["sigma_scale"])
  # The chosen setting is the best on validation, and the test number is rm.predict's.
  mem = rm.build_memory(outputs["train"][1], splits.train.labels, outputs["train"][0],
                        temperature=best["temperature"])
  for name, labels, key in (("validation", splits.validation.labels, "resmem_val_accuracy"),
                            ("test", splits.test.labels, "resmem_test_accuracy")):
    logits, emb = outputs[name]
    scores = rm.predict(mem, emb, logits, k=best["k"], sigma=best["sigma"])
    assert stage[key] == pytest.approx(float(np.mean(np.argmax(scores, -1) == labels)))
  assert stage["deepnet_test_accuracy"] == pytest.approx(
      float(np.mean(outputs["test"][0].argmax(-1) == splits.test.labels)))
  # The chosen setting is the best ResMem row of the validation grid.
  grid = rm.sweep(rm.build_memory(outputs["train"][1], splits.train.labels, outputs["train"][0]),
               outputs["validation"][1], outputs["validation"][0], splits.validation.labels,
               ks=(1, 5, 20), sigmas=tuple(s * stage["sigma_scale"] for s in (0.3, 1.0)),
               temperatures=(0.5, 1.0))
  assert stage["resmem_val_accuracy"] == max(r["accuracy"] for r in grid.table
                                             if r["method"] == "resmem")
  assert set(stage["baselines"]) == {"deepnet", "knn", "knn_lm"}
  # relative_sigma=False: the grid is absolute, in the embedding's own units.
  absolute = train.resmem_stage(
      train_outputs=outputs["train"], train_labels=splits.train.labels,
      val_outputs=outputs["validation"], val_labels=splits.validation.labels,
      test_outputs=outputs["test"], test_labels=splits.test.labels,
      ks=(5,), sigmas=(best["sigma"],), temperatures=(best["temperature"],),
      relative_sigma=False)
  assert absolute["sigma_scale"] == 1.0 and absolute["best"]["sigma"] == best["sigma"]


@pytest.mark.parametrize("n_fixed,n_broken,rows,want_fixed,want_broken", [
    (19, 7, 6, 3, 3), (19, 7, 5, 3, 2), (3, 1, 6, 3, 1), (0, 4, 3, 0, 3), (0, 0, 2, 0, 0)])
def test_the_neighbours_picture_shows_fixes_and_breaks_alike(n_fixed, n_broken, rows,
                                                             want_fixed, want_broken):
  """It showed ResMem's fixes first: with 19 fixes and 7 breaks, six rows of fixes and
  a title that did not say how they were chosen."""
  fixed, broken = np.arange(10, 10 + n_fixed), np.arange(50, 50 + n_broken)
  chosen, caption = train.picture_rows(fixed, broken, 100, rows)
  assert len(chosen) == rows and len(set(chosen.tolist())) == rows
  assert np.isin(chosen, fixed).sum() == want_fixed
  assert np.isin(chosen, broken).sum() == want_broken
  others = rows - want_fixed - want_broken
  assert caption == (f"{want_fixed} of the {n_fixed} test images ResMem fixed, {want_broken} "
                     f"of the {n_broken} it broke" + (f", {others} others" if others else ""))


def test_the_cosine_decay_spans_the_steps_after_warmup():
  """Optax's decay_steps counts the warmup: the cosine runs from the end of warmup to the
  last step, halving the peak halfway there (not reaching 0 a warmup early)."""
  config = configs.get_config("mnist")
  config.num_epochs, config.warmup_epochs, config.learning_rate = 4, 1.0, 0.2
  _, schedule = train.create_optimizer(config, steps_per_epoch=10)
  for step in (10, 20, 25, 30, 35, 39):
    want = 0.2 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 30))
    assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-7), step


@pytest.mark.parametrize("n_train,batch_size,limit,want", [
    (250, 100, -1, 2), (250, 100, None, 2), (50, 128, -1, 1), (200, 100, 1, 1),
    (200, 100, 100, 2)])
def test_steps_per_epoch_counts_full_batches_up_to_the_limit(n_train, batch_size, limit,
                                                             want):
  """The ragged last batch is dropped, a batch larger than the training set is the whole
  set, and a steps_per_epoch limit can shorten an epoch but never lengthen it."""
  config = _mnist_tiny()
  config.batch_size, config.steps_per_epoch = batch_size, limit
  assert train.steps_per_epoch_for(config, n_train) == want


def test_epoch_order_is_a_fresh_permutation_per_seed_and_epoch():
  """Each epoch reshuffles, and seeds shuffle apart; the same (seed, epoch) replays."""
  orders = {(s, e): train.epoch_order(s, e, 50) for s in (0, 1) for e in (0, 1)}
  for order in orders.values():
    np.testing.assert_array_equal(np.sort(order), np.arange(50))
  assert len({order.tobytes() for order in orders.values()}) == 4
  np.testing.assert_array_equal(train.epoch_order(1, 0, 50), orders[(1, 0)])


def test_each_epoch_takes_every_example_once_and_logs_its_last_steps_rate(
    tmp_path, monkeypatch):
  """The batches of an epoch partition the training set, the key behind a step's crops
  and flips differs from step to step, and an epoch's record holds the rate its last
  step (step - 1) was taken with: with no warmup over 4 steps, the cosine at steps 1 and
  3 (not 2 and 4, whose rate is 0)."""
  config = _mnist_tiny(num_epochs=2)  # 200 examples, 2 steps per epoch
  config.warmup_epochs = 0.0
  splits = train.load_splits(config)
  batches, keys = [], []
  real_take, real_step = data.ArraySplit.take, train.train_step

  def take(self, indices):
    if self is splits.train:
      batches.append(np.asarray(indices))
    return real_take(self, indices)

  def step(state, images, labels, rng, **kwargs):
    keys.append(tuple(np.asarray(jax.random.key_data(rng)).ravel().tolist()))
    return real_step(state, images, labels, rng, **kwargs)

  monkeypatch.setattr(data.ArraySplit, "take", take)
  monkeypatch.setattr(train, "train_step", step)
  _, history = train.train(config, str(tmp_path), splits)
  assert len(batches) == 4 and len(set(keys)) == 4
  for epoch in (batches[:2], batches[2:]):
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), np.arange(200))
  for record, last in zip(history, (1, 3), strict=True):
    want = config.learning_rate * 0.5 * (1 + math.cos(math.pi * last / 4))
    assert record["learning_rate"] == pytest.approx(want, rel=1e-5)


def _resnet_tiny_state(splits):
  config = _mnist_tiny()
  config.model, config.model_kwargs = "resnet_tiny", {}
  model = train.create_model(config, splits.num_classes)
  return train.create_train_state(jax.random.key(0), config, model, splits.image_shape, 10)


def test_train_step_updates_the_batchnorm_running_statistics():
  """The step's new BatchNorm statistics are kept in the state (evaluation reads them)."""
  splits = data.load_splits("digits")
  state = _resnet_tiny_state(splits)
  before = jax.tree.map(np.array, state.batch_stats)
  images, labels = splits.train.take(np.arange(32))
  state, _ = train.train_step(state, images, labels, jax.random.key(0), mean=splits.mean,
                              std=splits.std, augment=False)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, state.batch_stats)
  assert all(jax.tree.leaves(changed))


def test_evaluation_uses_the_running_statistics_not_the_batchs():
  """compute_outputs applies the model in inference mode: an example's logits are those
  of apply(train=False) and do not depend on the batch (or padding) it is evaluated in."""
  splits = data.load_splits("digits")
  state = _resnet_tiny_state(splits)
  split = data.ArraySplit(*splits.validation.take(np.arange(10)))
  logits, emb = train.compute_outputs(state, split, mean=splits.mean, std=splits.std,
                                      batch_size=10)
  small, _ = train.compute_outputs(state, split, mean=splits.mean, std=splits.std,
                                   batch_size=3)
  np.testing.assert_allclose(small, logits, rtol=1e-5, atol=1e-5)
  want, want_emb = state.apply_fn(
      {"params": state.params, "batch_stats": state.batch_stats},
      data.normalize(split.images, splits.mean, splits.std), train=False)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(emb, want_emb, rtol=1e-5, atol=1e-5)


def test_augmentation_pads_with_the_mean_pixel():
  """Crops are taken after normalization, so the padding is the mean pixel: images that
  are all the mean pixel train exactly as without augmentation (black padding would
  shift every crop's border to -mean / std)."""
  config = configs.get_config("mnist")
  model = train.create_model(config, 10)
  images = np.full((8, 8, 8, 1), 100, np.uint8)
  labels = np.arange(8, dtype=np.int32)
  out = {}
  for augment in (False, True):
    state = train.create_train_state(jax.random.key(0), config, model, (8, 8, 1), 10)
    state, m = train.train_step(state, images, labels, jax.random.key(1), mean=(100.0,),
                                std=(50.0,), augment=augment)
    out[augment] = (float(m["loss_sum"]), jax.tree.map(np.asarray, state.params))
  assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               out[True][1], out[False][1])


def test_the_resmem_stage_caps_k_at_the_training_set_size():
  """A k beyond the training set means every training example (a config's grid can
  outgrow a small max_train)."""
  rng = np.random.default_rng(0)
  outputs = (rng.normal(size=(20, 3)).astype(np.float32),
             rng.normal(size=(20, 4)).astype(np.float32))
  labels = np.arange(20) % 3
  stage = train.resmem_stage(train_outputs=outputs, train_labels=labels, val_outputs=outputs,
                             val_labels=labels, test_outputs=outputs, test_labels=labels,
                             ks=(50,), sigmas=(1.0,), temperatures=(1.0,))
  assert stage["best"]["k"] == 20
