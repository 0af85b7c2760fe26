"""Base networks for the vision experiment: CIFAR/ImageNet ResNets and a small digit CNN.

Every model's `__call__(x, train)` returns `(logits, embedding)`: the embedding is the
input of the final dense layer, the space in which ResMem looks up neighbours
(Yang et al., "ResMem: Learn what you can and memorize the rest", NeurIPS 2023).

Presets are `functools.partial` over one configurable class (as in the Flax ImageNet
example): `ResNet20 = partial(CifarResNet, stage_sizes=(3, 3, 3))`, `ResNet18`, ... and
a tiny `_ResNetTiny` for tests.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from resmem_jax import _validation as v

ModuleDef = Any

# He et al. (2016) initialise convolutions with fan-out variance scaling.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def output_dtype(dtype) -> jnp.dtype:
  """The dtype of a model's logits and embedding for computation dtype `dtype`.

  At least float32 (bfloat16 and float16 features are widened for the memory and the
  loss), never narrower than `dtype` itself (float64 stays float64), and one JAX can
  hold: float32 when 64-bit JAX is off.
  """
  return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


class ResNetBlock(nn.Module):
  """Basic residual block: two 3x3 convolutions, projection shortcut on a shape change."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    # Zero-initialised last scale: each block starts as the identity (Goyal et al., 2017).
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
  """Bottleneck block: 1x1 reduce, 3x3, 1x1 expand by 4."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (1, 1))(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, (3, 3), self.strides)(y)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """A ResNet whose apply returns `(logits, embedding)`.

  Attributes:
    stage_sizes: blocks per stage; stage i has `num_filters * 2**i` filters and every
      stage after the first halves the resolution.
    block_cls: `ResNetBlock` or `BottleneckResNetBlock`.
    num_classes: width of the final dense layer.
    num_filters: filters of the first stage (16 for the CIFAR family, 64 for ImageNet).
    width: multiplier on every stage's filters (rounded, at least 1).
    stem: "cifar" (one 3x3 convolution) or "imagenet" (7x7 stride 2 plus 3x3 max-pool).
    dtype: computation dtype (parameters stay float32). Logits and embedding come out in
      `output_dtype(dtype)`: float32 for float32 and narrower, float64 for float64
      (with 64-bit JAX on).
    act: activation after every normalisation.
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef = ResNetBlock
  num_classes: int = 10
  num_filters: int = 16
  width: float = 1.0
  stem: str = "cifar"
  dtype: Any = jnp.float32
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x: Float[Array, "B H W C"], train: bool = False
               ) -> tuple[Float[Array, "B K"], Float[Array, "B E"]]:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    filters = max(1, int(round(self.num_filters * self.width)))
    if self.stem == "imagenet":
      x = conv(filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
      x = self.act(norm(name="bn_init")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    elif self.stem == "cifar":
      x = conv(filters, (3, 3), name="conv_init")(x)
      x = self.act(norm(name="bn_init")(x))
    else:
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got stem={self.stem!r}")
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(filters * 2**i, strides=strides, conv=conv, norm=norm,
                           act=self.act)(x)
    out = output_dtype(self.dtype)
    embedding = jnp.mean(x, axis=(1, 2)).astype(out)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(embedding)
    return logits.astype(out), embedding


# The CIFAR family of He et al. (2016), Sec. 4.2: depth 6n + 2, three stages of n basic
# blocks with 16, 32, 64 filters (times `width`) on 32x32 inputs. One difference: where the
# shape changes (the first block of stages 2 and 3) the shortcut is a 1x1 projection with
# BatchNorm (their option B), not the parameter-free zero-padded identity (option A) they
# used on CIFAR, so each net has two 1x1 convolutions (and BatchNorms) more than theirs.
CifarResNet = functools.partial(ResNet, block_cls=ResNetBlock, num_filters=16, stem="cifar")
ResNet8 = functools.partial(CifarResNet, stage_sizes=(1, 1, 1))
ResNet14 = functools.partial(CifarResNet, stage_sizes=(2, 2, 2))
ResNet20 = functools.partial(CifarResNet, stage_sizes=(3, 3, 3))
ResNet32 = functools.partial(CifarResNet, stage_sizes=(5, 5, 5))
ResNet44 = functools.partial(CifarResNet, stage_sizes=(7, 7, 7))
ResNet56 = functools.partial(CifarResNet, stage_sizes=(9, 9, 9))

# ImageNet presets (224x224 inputs).
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock,
                             num_filters=64, stem="imagenet")
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3),
                             block_cls=BottleneckResNetBlock, num_filters=64, stem="imagenet")

# Test-only: one stage of one block with 4 filters.
_ResNetTiny = functools.partial(ResNet, stage_sizes=(1,), num_filters=4, stem="cifar")


def cifar_resnet(depth: int, **kwargs) -> ResNet:
  """The CIFAR ResNet of depth `6n + 2` (8, 14, 20, 32, 44, 56, ...).

  He et al.'s (2016) CIFAR network, except for its two shape-changing shortcuts: 1x1
  projections with BatchNorm (option B), not their zero-padded identity (option A).

  Args:
    depth: total number of weighted layers, `6n + 2` with n >= 1.
    **kwargs: other `ResNet` attributes (num_classes, width, dtype).

  Returns:
    The (unbound) `ResNet` module.

  Raises:
    ValueError: if depth is not of the form 6n + 2.

  Example:
    >>> model = cifar_resnet(20, num_classes=10, width=2.0)
  """
  v.check_int("depth", depth, low=8)
  if (depth - 2) % 6:
    raise ValueError(f"depth must be 6n + 2 (8, 14, 20, ...), got depth={depth}")
  n = (depth - 2) // 6
  return CifarResNet(stage_sizes=(n, n, n), **kwargs)


class SmallCNN(nn.Module):
  """A small convolutional network for 28x28 (or 8x8) digits.

  `depth` 3x3 convolution + ReLU layers, then a dense layer of `embed_dim` units (the
  embedding) and the final dense layer. The first two convolutions (`width` and
  `2 * width` channels) are each followed by a 2x2 average pool; every convolution
  after the second keeps `2 * width` channels and the resolution ('SAME' padding, no
  pool), so extra depth adds `36 width^2 + 2 width` parameters and leaves the
  embedding layer's input (7 x 7 x 2 width on 28x28 digits) unchanged. `depth=1` is
  one pooled convolution (14 x 14 x width into the embedding layer). The default
  `depth=2` is the original two-stage network, with the same parameter names and
  hence the same initialisation for a given seed.

  The embedding layer is linear by default: with a handful of units a ReLU there
  dies easily and collapses training (measured: 1 of 3 seeds of width=2,
  embed_dim=8 stuck below 30% validation accuracy). Deliberately small so that it
  underfits somewhat: the regime in which ResMem's memorized residuals help most.

  Attributes:
    num_classes: number of classes.
    width: channels of the first convolution.
    embed_dim: size of the embedding (the input of the final dense layer).
    depth: number of 3x3 convolution + ReLU layers (at least 1).
    embed_act: apply a ReLU to the embedding layer.
    dtype: computation dtype (parameters stay float32). Logits and embedding come out in
      `output_dtype(dtype)`: float32 for float32 and narrower, float64 for float64
      (with 64-bit JAX on).
  """
  num_classes: int = 10
  width: int = 8
  embed_dim: int = 32
  depth: int = 2
  embed_act: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "B H W C"], train: bool = False
               ) -> tuple[Float[Array, "B K"], Float[Array, "B E"]]:
    del train  # No batch statistics or dropout: train and eval apply agree.
    v.check_int("depth", self.depth, low=1)
    pools = min(self.depth, 2)
    if x.ndim != 4 or min(x.shape[1:3]) < 2**pools:
      raise ValueError(f"SmallCNN(depth={self.depth}) pools {pools} times by 2 and needs "
                       f"(B, H, W, C) images with H, W >= {2**pools}, got x.shape={x.shape}")
    for i in range(self.depth):
      x = nn.Conv(self.width * 2**min(i, 1), (3, 3), dtype=self.dtype)(x)
      x = nn.relu(x)
      if i < 2:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    embedding = nn.Dense(self.embed_dim, dtype=self.dtype)(x)
    if self.embed_act:
      embedding = nn.relu(embedding)
    out = output_dtype(self.dtype)
    embedding = embedding.astype(out)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(embedding)
    return logits.astype(out), embedding


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet8": ResNet8,
    "resnet14": ResNet14,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet44": ResNet44,
    "resnet56": ResNet56,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "resnet_tiny": _ResNetTiny,
}


def create_model(name: str, *, num_classes: int, **kwargs) -> nn.Module:
  """The model registered as `name` (see `MODELS`), with `num_classes` outputs.

  Args:
    name: a key of `MODELS`, e.g. "small_cnn", "resnet20", "resnet18".
    num_classes: width of the final dense layer.
    **kwargs: attributes of the model class (width, embed_dim, dtype, ...).

  Raises:
    ValueError: unknown name.
  """
  v.check_choice("model", name, MODELS)
  v.check_int("num_classes", num_classes, low=1)
  return MODELS[name](num_classes=num_classes, **kwargs)


def count_params(params) -> int:
  """Number of scalar parameters in a pytree of arrays (or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(params)))
