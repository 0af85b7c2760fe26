"""Model presets: output shapes, parameter counts, the embedding is the head's input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resmem_jax import models


def _shapes(model, input_shape):
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  logits, emb = jax.eval_shape(model.apply, variables, x)
  return variables, logits.shape, emb.shape


def _cifar_resnet_params(n: int, filters: int, classes: int) -> int:
  """Closed-form count: 3x3 convs without bias, BatchNorm scale+bias, 1x1 projections."""
  conv = lambda cin, cout, k=3: cin * cout * k * k
  bn = lambda c: 2 * c
  total = conv(3, filters) + bn(filters)
  cin = filters
  for stage in range(3):
    cout = filters * 2**stage
    for block in range(n):
      total += conv(cin, cout) + bn(cout) + conv(cout, cout) + bn(cout)
      if cin != cout:
        total += conv(cin, cout, 1) + bn(cout)
      cin = cout
  return total + cin * classes + classes


@pytest.mark.parametrize("depth", [8, 14, 20, 32, 44, 56])
def test_cifar_resnet_shapes_and_params(depth):
  model = models.cifar_resnet(depth, num_classes=100)
  variables, logits, emb = _shapes(model, (2, 32, 32, 3))
  assert logits == (2, 100)
  assert emb == (2, 64)
  n = (depth - 2) // 6
  assert models.count_params(variables["params"]) == _cifar_resnet_params(n, 16, 100)


def test_resnet20_matches_he_et_al():
  # 0.27M parameters in He et al. (2016), Table 6 (projection shortcuts here).
  variables, _, _ = _shapes(models.ResNet20(num_classes=10), (1, 32, 32, 3))
  assert models.count_params(variables["params"]) == 272_474


def test_width_multiplier():
  variables, _, emb = _shapes(models.ResNet8(num_classes=10, width=2.0), (1, 32, 32, 3))
  assert emb == (1, 128)
  assert models.count_params(variables["params"]) == _cifar_resnet_params(1, 32, 10)


@pytest.mark.parametrize("name,expected,emb_dim", [
    ("resnet18", 11_689_512, 512),  # torchvision's resnet18 count
    ("resnet50", 25_557_032, 2048),  # torchvision's resnet50 count
])
def test_imagenet_presets(name, expected, emb_dim):
  model = models.create_model(name, num_classes=1000)
  variables, logits, emb = _shapes(model, (2, 224, 224, 3))
  assert logits == (2, 1000)
  assert emb == (2, emb_dim)
  assert models.count_params(variables["params"]) == expected


def test_small_cnn_shapes_and_params():
  model = models.SmallCNN(num_classes=10, width=2, embed_dim=8)
  variables, logits, emb = _shapes(model, (3, 28, 28, 1))
  assert (logits, emb) == ((3, 10), (3, 8))
  # conv 1->2, conv 2->4 (3x3 with bias), dense 7*7*4 -> 8, head 8 -> 10.
  expected = (9 * 2 + 2) + (9 * 2 * 4 + 4) + (196 * 8 + 8) + (8 * 10 + 10)
  assert models.count_params(variables["params"]) == expected
  # 8x8 digits work too (two 2x2 pools leave 2x2).
  _, logits, _ = _shapes(model, (3, 8, 8, 1))
  assert logits == (3, 10)


@pytest.mark.parametrize("model", [models._ResNetTiny(num_classes=5),
                                   models.SmallCNN(num_classes=5, width=2, embed_dim=6)])
def test_embedding_is_the_head_input(model):
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  logits, emb = model.apply(variables, x)
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, emb @ head["kernel"] + head["bias"][None], rtol=1e-5,
                             atol=1e-5)


def test_train_mode_updates_batch_stats():
  model = models._ResNetTiny(num_classes=3)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3)) + 2.0
  variables = model.init(jax.random.key(0), x)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_bad_arguments():
  with pytest.raises(ValueError, match="depth"):
    models.cifar_resnet(21)
  with pytest.raises(ValueError, match="model"):
    models.create_model("resnet19", num_classes=10)
  with pytest.raises(ValueError, match="stem"):
    _shapes(models.ResNet(stage_sizes=(1,), stem="bogus"), (1, 8, 8, 3))
