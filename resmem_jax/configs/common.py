"""Defaults shared by every vision config; dataset configs override what differs."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "quick" or "key=value,key2=value2" config arguments (big_vision style).

  A bare word sets that key to True ("quick" -> quick=True); values are parsed as
  Python literals where possible.
  """
  import ast  # pylint: disable=g-import-not-at-top
  out = ml_collections.ConfigDict(defaults)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, _, value = part.partition("=")
    if not value:
      out[key] = True
      continue
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def base_config() -> ml_collections.ConfigDict:
  """Everything `train_and_evaluate` reads, with the MNIST-5k defaults."""
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = "mnist5k"
  # Optional settings are typed placeholders (None until set): a plain None field
  # cannot be set from the command line (--config.data_dir=...).
  optional = ml_collections.config_dict.placeholder
  c.data_dir = optional(str)  # TFDS data directory (None: TFDS default).
  c.manual_dir = optional(str)  # ImageNet's manual-download directory.
  c.val_size = optional(int)
  c.test_size = optional(int)
  c.max_train = optional(int)
  c.split_seed = 0
  c.image_size = 224  # ImageNet only.
  # Model.
  c.model = "small_cnn"
  c.model_kwargs = ml_collections.ConfigDict({"width": 8, "embed_dim": 32})
  # Optimization.
  c.seed = 0
  c.num_epochs = 30
  c.batch_size = 128
  c.eval_batch_size = 500
  c.learning_rate = 0.05
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.warmup_epochs = 1.0
  # CIFAR: 4-pixel-padded crop + flip; ImageNet: random-resized crop + flip. Both flip
  # images left to right, which digits (MNIST, digits) do not survive: off for them.
  c.augment = False
  c.steps_per_epoch = -1  # -1: one pass over the training split.
  c.keep_checkpoints = 2
  c.progress = True
  # ResMem stage: (k, sigma, T) chosen on validation from these grids.
  c.resmem = ml_collections.ConfigDict()
  c.resmem.ks = (1, 3, 5, 10, 20, 50)
  c.resmem.sigmas = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
  c.resmem.temperatures = (0.3, 0.5, 1.0, 2.0, 4.0)
  # Analysis outputs.
  c.analysis = ml_collections.ConfigDict()
  c.analysis.num_examples = 6  # test examples drawn with their neighbours
  c.analysis.num_neighbours = 5
  return c
