"""Model presets: output shapes, parameter counts, the embedding is the head's input."""

from __future__ import annotations

import functools

import flax.linen as nn
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


def _small_cnn_params(width: int, embed_dim: int, depth: int, pixels: int = 28) -> int:
  """Closed form: 3x3 convs with bias, 2x2 pools after the first two, dense, head."""
  conv = lambda cin, cout: 9 * cin * cout + cout
  channels = [width * 2**min(i, 1) for i in range(depth)]
  total = sum(conv(cin, cout) for cin, cout in zip([1] + channels, channels))
  side = pixels // 2**min(depth, 2)
  return total + (side * side * channels[-1] * embed_dim + embed_dim) + (embed_dim * 10 + 10)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_small_cnn_depth_shapes_and_params(depth):
  model = models.SmallCNN(num_classes=10, width=3, embed_dim=5, depth=depth)
  variables, logits, emb = _shapes(model, (2, 28, 28, 1))
  assert (logits, emb) == ((2, 10), (2, 5))
  assert models.count_params(variables["params"]) == _small_cnn_params(3, 5, depth)
  assert sorted(variables["params"]) == sorted(
      [f"Conv_{i}" for i in range(depth)] + ["Dense_0", "head"])
  assert variables["params"][f"Conv_{depth - 1}"]["kernel"].shape[-1] == 3 * 2**min(depth - 1, 1)
  _, logits, _ = _shapes(model, (2, 8, 8, 1))  # 8x8 digits at every depth
  assert logits == (2, 10)
  side = 2 ** min(depth, 2)  # the smallest image its pools leave a pixel of
  assert _shapes(model, (2, side, side, 1))[1] == (2, 10)
  with pytest.raises(ValueError, match=f"H, W >= {side}"):  # was a ZeroDivisionError
    _shapes(model, (2, side - 1, side, 1))


def test_small_cnn_default_is_the_original_two_stage_network():
  # The default (depth 2) must keep its parameter names, hence its initialisation for a
  # seed, and compute conv-relu-pool twice, dense, head: published numbers rely on it.
  # Flax draws each parameter from the seed folded with its path, so the same names and
  # shapes (listed explicitly here) mean the same initialisation.
  model = models.SmallCNN(num_classes=10, width=2, embed_dim=8)
  assert model.depth == 2
  x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == {"params": {
      "Conv_0": {"kernel": ((3, 3, 1, 2), jnp.float32), "bias": ((2,), jnp.float32)},
      "Conv_1": {"kernel": ((3, 3, 2, 4), jnp.float32), "bias": ((4,), jnp.float32)},
      "Dense_0": {"kernel": ((7 * 7 * 4, 8), jnp.float32), "bias": ((8,), jnp.float32)},
      "head": {"kernel": ((8, 10), jnp.float32), "bias": ((10,), jnp.float32)},
  }}
  p = variables["params"]
  h = x
  for name in ("Conv_0", "Conv_1"):
    h = jax.lax.conv_general_dilated(h, p[name]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + p[name]["bias"][None, None, None])
    h = h.reshape(h.shape[0], h.shape[1] // 2, 2, h.shape[2] // 2, 2, -1).mean(axis=(2, 4))
  emb = h.reshape(3, -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None]
  logits, got_emb = model.apply(variables, x)
  np.testing.assert_allclose(got_emb, emb, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, emb @ p["head"]["kernel"] + p["head"]["bias"][None],
                             rtol=1e-5, atol=1e-5)
  assert models.count_params(p) == _small_cnn_params(2, 8, 2) == 1762


@pytest.mark.parametrize("model", [models._ResNetTiny(num_classes=5),
                                   models.SmallCNN(num_classes=5, width=2, embed_dim=6)])
def test_embedding_is_the_head_input(model):
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  logits, emb = model.apply(variables, x)
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, emb @ head["kernel"] + head["bias"][None], rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("model_cls", [models._ResNetTiny, models.SmallCNN])
@pytest.mark.parametrize("dtype,want", [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.float32),
                                        (jnp.float64, jnp.float64)])
def test_outputs_are_at_least_float32_and_keep_float64(model_cls, dtype, want):
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 1))
  jax.config.update("jax_enable_x64", True)
  try:
    model = model_cls(num_classes=3, dtype=dtype)
    xj = jnp.asarray(x, dtype)
    logits, emb = model.apply(model.init(jax.random.key(0), xj), xj)
    assert (logits.dtype, emb.dtype) == (want, want)
  finally:
    jax.config.update("jax_enable_x64", False)
  assert models.output_dtype(jnp.float64) == jnp.float32  # 64-bit JAX off


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
  with pytest.raises(ValueError, match="depth"):
    _shapes(models.SmallCNN(depth=0), (1, 28, 28, 1))


@pytest.mark.parametrize("stem,sides", [("cifar", (16, 8, 4)), ("imagenet", (4, 2, 1))])
def test_stages_halve_the_resolution_and_the_embedding_is_their_mean(stem, sides):
  """Stage i > 0 halves the resolution (the first keeps the stem's), the ImageNet stem
  quarters it (stride-2 conv, stride-2 pool), and the embedding is the global average
  of the last block's output: none of these changes a shape or a parameter count."""
  model = models.ResNet(stage_sizes=(1, 1, 1), num_filters=4, stem=stem, num_classes=3)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  (_, emb), state = jax.jit(functools.partial(
      model.apply, capture_intermediates=True, mutable=["intermediates"]))(variables, x)
  blocks = [state["intermediates"][f"ResNetBlock_{i}"]["__call__"][0] for i in range(3)]
  assert [b.shape[1:3] for b in blocks] == [(s, s) for s in sides]
  np.testing.assert_allclose(emb, blocks[-1].mean(axis=(1, 2)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block_cls,filters", [(models.ResNetBlock, 4),
                                               (models.BottleneckResNetBlock, 1)])
def test_a_residual_block_starts_as_the_identity(block_cls, filters):
  """The last BatchNorm of a block starts with scale 0 (Goyal et al., 2017): at
  initialisation a block that keeps the shape returns relu(x), its residual branch 0."""
  conv = functools.partial(nn.Conv, use_bias=False)
  norm = functools.partial(nn.BatchNorm, use_running_average=True)
  block = block_cls(filters, conv=conv, norm=norm, act=nn.relu)
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
  out = block.apply(block.init(jax.random.key(0), x), x)
  np.testing.assert_allclose(out, jax.nn.relu(x), rtol=1e-6, atol=1e-6)


def test_batchnorm_running_statistics_move_a_tenth_of_the_way():
  """BatchNorm momentum 0.9 (PyTorch's 0.1, the ResNet recipe), not Flax's default 0.99,
  with which the running statistics of a short run barely leave their initial values:
  one train step from the initial mean 0 gives 0.1 times the batch's mean."""
  model = models._ResNetTiny(num_classes=3)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3)) + 2.0
  variables = model.init(jax.random.key(0), x)
  _, state = model.apply(variables, x, train=True, capture_intermediates=True,
                         mutable=["batch_stats", "intermediates"])
  h = state["intermediates"]["conv_init"]["__call__"][0]
  np.testing.assert_allclose(state["batch_stats"]["bn_init"]["mean"],
                             0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)


def test_width_multiplier_rounds_the_filters():
  """`width` scales the filters rounded to the nearest int (at least 1), not truncated:
  16 * 0.3 = 4.8 filters is 5, so the embedding has 4 * 5 = 20 units."""
  _, _, emb = _shapes(models.ResNet8(num_classes=10, width=0.3), (1, 32, 32, 3))
  assert emb == (1, 4 * round(16 * 0.3))
  _, _, emb = _shapes(models.ResNet8(num_classes=10, width=0.01), (1, 32, 32, 3))
  assert emb == (1, 4)


@pytest.mark.parametrize("depth", [2, 5])
def test_cifar_resnet_needs_at_least_one_block_per_stage(depth):
  """Depth 6n + 2 with n >= 1: depth 2 (n = 0) would be a stem and a head, no stage."""
  with pytest.raises(ValueError, match="depth"):
    models.cifar_resnet(depth)
