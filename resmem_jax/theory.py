r"""The stylized linear regression behind ResMem's theory, as pure vmapped JAX.

A norm-constrained linear model cannot fit a linear target; the nearest-neighbour
regressor on its residuals (ResMem) removes most of what is left, at a rate set by n
and the intrinsic dimension of the inputs (Yang et al., NeurIPS 2023, section 5).

Setting (SPEC section 4):

  x ~ uniform on the unit sphere S^{d-1} (default), uniform on the cube [-1, 1]^d,
      or standard Gaussian N(0, I_d);
  y = <theta*, x> + noise * N(0, 1),  ||theta*|| = theta_norm (direction drawn per seed);
  base:   theta_hat = argmin_{||theta|| <= L} sum_i (y_i - <theta, x_i>)^2,  L < ||theta*||;
  ResMem: f(x) = <theta_hat, x> + sum_{j in N_k(x)} w_j r_j,  r_j = y_j - <theta_hat, x_j>,
          N_k(x) the k nearest training inputs, w = softmax(-d / sigma) (`rm.predict`);
  risk:   R(f) = E_x[(f(x) - <theta*, x>)^2], estimated on fresh test points.

The base line in closed form. Each domain has E[x x^T] = s I with s = 1/d on the
sphere (trace x x^T = ||x||^2 = 1), 1/3 on the cube, 1 for the Gaussian. So a linear
predictor has R(<theta, .>) = s ||theta - theta*||^2, minimized over the ball at its
point nearest theta*, theta_L = L theta* / ||theta*||:

  R_base -> s (||theta*|| - L)^2          (sphere: (||theta*|| - L)^2 / d).

On the constraint sphere R grows quadratically in the angle between theta_hat and
theta*, which is O(n^{-1/2}), so R_base(n) - R_base(inf) = O(1 / n).

The ResMem line, noiseless, k = 1. With x_(1) the nearest training input of a test x
and Delta = theta* - theta_hat, the prediction error is

  f(x) - <theta*, x> = <theta_hat, x> + <Delta, x_(1)> - <theta*, x> = <Delta, u>,
  u = x_(1) - x.

Take Delta as fixed (it depends on all n training points, on any single one only at
O(1/n), and tends to the constant theta* - theta_L). The joint law of the test point and
the training inputs is invariant under the domain's symmetry group (rotations for the
sphere and the Gaussian, signed permutations for the cube) and u is equivariant; each
of these groups acts irreducibly on R^d, so E[u u^T] = E[D_n^2] I / d (Schur's lemma),
D_n = ||x - x_(1)||. Hence

  R_resmem = ||Delta||^2 E[D_n^2] / d = R_base E[D_n^2] / (s d)
           -> (||theta*|| - L)^2 E[D_n^2] / d.

On the sphere s d = 1: ResMem multiplies the base risk by the mean squared
nearest-neighbour distance. That distance has an exact law there: (1 + <x, x'>) / 2 ~
Beta(m/2, m/2) with m = d - 1, so the chord ||x - x'|| <= t has probability
F(t) = I_{t^2/4}(m/2, m/2) (regularized incomplete beta), P(D_n > t) = (1 - F(t))^n, and
W = -n log(1 - F(D_n)) ~ Exp(1). Therefore

  E[D_n^2] = 4 E_W[ I^{-1}_{1 - exp(-W/n)}(m/2, m/2) ],   W ~ Exp(1),

a one-dimensional integral (`mean_sq_nn_distance`). For small z, I_z(a, a) ~
z^a / (a B(a, a)), which gives

  E[D_n^2] ~ 4 Gamma(1 + 2/m) (a B(a, a) / n)^{2/m} ∝ n^{-2/(d-1)},  a = m / 2:

slope -2/(d - 1) on a log-log plot, d - 1 being the intrinsic dimension of the sphere
(d = 2: E[D_n^2] ~ 2 pi^2 / n^2). The curve drawn in figure 1 is the exact one,
(||theta*|| - L)^2 / d * E[D_n^2]; the same argument on the cube gives the slope -2/d,
and on the Gaussian for d >= 3 (at d <= 2 its tails dominate and there is no power law:
`resmem_slope_theory` gives None), but no closed-form curve here. Assumptions: noise =
0, Delta independent of the test point's neighbourhood (exact as n -> inf), exact
neighbours.

With noise sigma_eps and k equally weighted neighbours the error is
<Delta, u_bar> + eps_bar, u_bar the mean offset of the k neighbours, with
E[eps_bar^2] = sigma_eps^2 / k: for k = 1 the risk tends to sigma_eps^2 (plus the
noiseless term above) and stops falling. Figure 3 lets k grow as n^{2/(m+2)} (m the
intrinsic dimension), the classical schedule that balances the variance against the
worst-case squared bias of a Lipschitz residual, (k / n)^{2/m}. The residual here is
linear, and its bias is smaller: the k offsets cancel to first order, so on the
sphere E[<Delta, u_bar>^2] is of order r_k^2 / k (r_k ~ (k / n)^{1/m}, the k-NN
radius) plus a curvature term r_k^4, both n^{-4/(m+2)} under this schedule. The risk
is then the variance sigma_eps^2 / k_n, slope -2/(m+2); without noise it falls as
n^{-4/(m+2)} (sphere; the cube's boundary and the Gaussian's density gradient bias
the offsets, and no slope is claimed there). A k growing faster would do better on
this problem: the schedule shows the trade-off, not the optimal rate.

Entry points: `get_config`, `run(config) -> results`, and `plot_risk_vs_n`,
`plot_risk_vs_capacity`, `plot_noise(results, path)`; `experiments/linear_theory.py`
is the command-line front end.

Reference: Yang et al., "ResMem: Learn what you can and memorize the rest",
NeurIPS 2023 (arXiv 2302.01576), section 5.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jaxtyping import Array, Float
from scipy import integrate, special

import resmem_jax as rm
from resmem_jax import _validation as v
from resmem_jax import analysis

HIGHEST = jax.lax.Precision.HIGHEST
DOMAINS = ("sphere", "cube", "gaussian")
K_RULES = ("fixed", "growing")
FIGURES = ("risk_vs_n", "risk_vs_capacity", "noise")
# Bisection steps on the KKT multiplier: 64 halvings shrink the bracket below any
# float32 spacing, after which the midpoint stops moving.
BISECTION_STEPS = 64
# `sigma=None` asks for the textbook k-NN average (equal weights). rm.predict takes a
# finite sigma > 0; with this one every exp(-(d_j - d_min) / sigma) rounds to exactly
# 1 in float32 for distances below 1e22, so the softmax weights are exactly 1 / k.
UNIFORM_SIGMA = 1e30


# ----------------------------------------------------------------------------- theory


def _check_domain_dim(domain: str, d: int) -> int:
  """d as an int, >= 2 on the sphere (S^0 is two points, of dimension 0), else >= 1."""
  v.check_choice("domain", domain, DOMAINS)
  return v.check_int("d", d, low=2 if domain == "sphere" else 1)


def second_moment(domain: str, d: int) -> float:
  """s with E[x x^T] = s I: 1/d (sphere), 1/3 (cube [-1, 1]^d), 1 (Gaussian)."""
  d = _check_domain_dim(domain, d)
  return {"sphere": 1.0 / d, "cube": 1.0 / 3.0, "gaussian": 1.0}[domain]


def intrinsic_dim(domain: str, d: int) -> int:
  """Dimension of the support: d - 1 on the sphere, d on the cube and the Gaussian."""
  d = _check_domain_dim(domain, d)
  return d - 1 if domain == "sphere" else d


def base_risk_limit(*, domain: str, d: int, radius: float, theta_norm: float) -> float:
  """s (||theta*|| - L)^2: the n -> inf test risk of least squares under ||theta|| <= L.

  For L >= ||theta*|| the constraint is inactive and the limit is 0.
  """
  v.check_non_negative("radius", radius)
  v.check_non_negative("theta_norm", theta_norm)
  return second_moment(domain, d) * max(theta_norm - radius, 0.0) ** 2


def mean_sq_nn_distance(n: int, d: int) -> float:
  r"""E[D_n^2], D_n the distance from a uniform point of S^{d-1} to the nearest of n others.

    E[D_n^2] = 4 \int_0^inf e^{-w} I^{-1}_{1 - e^{-w/n}}(m/2, m/2) dw,   m = d - 1,

  exact (see the module docstring); ~ 4 Gamma(1 + 2/m) (a B(a, a) / n)^{2/m}, a = m/2.

  Example:
    >>> n = 1000  # the circle: E[D_n^2] ~ 2 pi^2 / ((n + 1)(n + 2)) ~ 2 pi^2 / n^2
    >>> mean_sq_nn_distance(n, 2) * (n + 1) * (n + 2) / (2 * math.pi**2)
    0.99999...
  """
  n = v.check_int("n", n, low=1)
  d = v.check_int("d", d, low=2)
  a = (d - 1) / 2.0
  value, _ = integrate.quad(
      lambda w: math.exp(-w) * special.betaincinv(a, a, -math.expm1(-w / n)),
      0.0, math.inf, limit=200, epsabs=0.0, epsrel=1e-10)
  return 4.0 * value


def resmem_risk_theory(*, domain: str, d: int, radius: float, theta_norm: float,
                       noise: float, n: Sequence[int], k_per_n: Sequence[int]
                       ) -> list[float] | None:
  """The ResMem risk curve in closed form, where there is one (sphere, k = 1).

    R_resmem(n) = sigma_eps^2 + (||theta*|| - L)^2 / d * E[D_n^2]

  None for other domains or k > 1 (`resmem_slope_theory` gives the slope where known).
  """
  d = _check_domain_dim(domain, d)
  for name, value in (("radius", radius), ("theta_norm", theta_norm), ("noise", noise)):
    v.check_non_negative(name, value)
  n = [v.check_int(f"n[{i}]", m, low=1) for i, m in enumerate(n)]
  if domain != "sphere" or any(k != 1 for k in k_per_n):
    return None
  gap = max(theta_norm - radius, 0.0) ** 2 / d
  return [noise**2 + gap * mean_sq_nn_distance(m, d) for m in n]


def resmem_slope_theory(*, domain: str, d: int, noise: float, k_rule: str
                        ) -> float | None:
  """Asymptotic log-log slope of the ResMem risk against n (module docstring), or None
  where it is not a known power of n.

  Fixed k: -2/m without noise (m the intrinsic dimension), 0 with noise (the risk
  tends to sigma_eps^2 / k). The Gaussian at m <= 2 has none: its E[D_n^2] ~
  n^{-2/m} int p^{1 - 2/m} diverges in the tails (d = 2: a log factor; d = 1: a
  slope near -1.2 measured, not -2). k growing as n^{2/(m+2)}: -2/(m + 2) with noise
  (the variance sigma_eps^2 / k_n), -4/(m + 2) without it on the sphere, None on the
  cube and the Gaussian without noise.
  """
  m = intrinsic_dim(domain, d)
  v.check_non_negative("noise", noise)
  v.check_choice("k_rule", k_rule, K_RULES)
  if k_rule == "growing":
    if noise > 0:
      return -2.0 / (m + 2)
    return -4.0 / (m + 2) if domain == "sphere" else None
  if noise > 0:
    return 0.0
  return None if domain == "gaussian" and m <= 2 else -2.0 / m


def growing_k(n: int, *, m: int) -> int:
  """k_n = ceil(n^{2/(m+2)}): the classical k-NN schedule, rate-optimal for the worst
  Lipschitz residual (this problem's linear residual allows faster; module docstring)."""
  n, m = v.check_int("n", n, low=1), v.check_int("m", m, low=1)
  # The 1e-9 keeps exact powers exact: 100 ** 0.5 may round to 10.000000000000002.
  return min(n, math.ceil(n ** (2.0 / (m + 2)) - 1e-9))


def fit_slope(n: Sequence[float], risk: Sequence[float]) -> float:
  """Least-squares slope of log(risk) against log(n)."""
  log_n, log_r = np.log(np.asarray(n, np.float64)), np.log(np.asarray(risk, np.float64))
  return float(np.polyfit(log_n, log_r, 1)[0])


# ----------------------------------------------------------------------- simulation


def sample_inputs(key: Array, n: int, d: int, *, domain: str) -> Float[Array, "N D"]:
  """n points uniform on the unit sphere or the cube [-1, 1]^d, or standard Gaussian."""
  n, d = v.check_int("n", n, low=0), _check_domain_dim(domain, d)
  if domain == "cube":
    return jax.random.uniform(key, (n, d), minval=-1.0, maxval=1.0)
  g = jax.random.normal(key, (n, d))
  if domain == "gaussian":
    return g
  return g / jnp.linalg.norm(g, axis=-1, keepdims=True)


def constrained_least_squares(x: Float[Array, "N D"], y: Float[Array, "N"], radius,
                              n_rows=None) -> Float[Array, "D"]:
  r"""argmin_{||theta|| <= radius} ||x theta - y||^2, exactly, through one SVD.

  KKT: either the (minimum-norm) least-squares solution is feasible, or the solution is
  the ridge estimate theta(lam) = V diag(s / (s^2 + lam)) U^T y whose norm equals the
  radius. ||theta(lam)|| decreases in lam and is at most ||x^T y|| / lam, so lam lies in
  [0, ||x^T y|| / radius] and bisection on that bracket finds it; the returned point is
  on the feasible side. radius = 0 gives theta = 0.

  Args:
    x: (N, D) inputs.
    y: (N,) targets.
    radius: L >= 0 (may be traced; a traced L < 0 or NaN gives NaN, not a theta).
    n_rows: the number of data rows when the rows after them are zero padding (may be
      traced); the rank tolerance eps * max(n_rows, D) * s_max is that of the data
      alone, so a padded fit equals the unpadded one. Default: all rows.

  Returns:
    (D,) theta_hat.

  Raises:
    TypeError: x or y not floating.
    ValueError: x not (N, D) or y not (N,); a concrete radius that is negative or not
      finite, a concrete n_rows outside [0, N], concrete x or y not finite.
  """
  x, y = v.as_array("x", x), v.as_array("y", y)
  v.check_floating("x", x)
  v.check_floating("y", y)
  v.check_ndim("x", x, (2,), "an (N, D) matrix")
  if y.shape != x.shape[:1]:
    raise ValueError(f"y must be shaped (N,) = {x.shape[:1]}, one target per row of x, got "
                     f"y.shape={tuple(y.shape)}")
  v.check_finite("x", x)
  v.check_finite("y", y)
  if not v.is_traced(radius):
    v.check_non_negative("radius", v.concrete_scalar(radius))
  if n_rows is not None and not v.is_traced(n_rows):
    v.check_int("n_rows", n_rows, low=0, high=x.shape[0])
  if x.size == 0:  # no rows (or no columns): the minimum-norm solution is 0
    return jnp.zeros(x.shape[1], jnp.result_type(x, y))
  u, s, vt = jnp.linalg.svd(x, full_matrices=False)
  c = jnp.dot(u.T, y, precision=HIGHEST)
  sc = s * c
  rows = x.shape[0] if n_rows is None else n_rows
  tol = jnp.finfo(x.dtype).eps * jnp.maximum(rows, x.shape[1]) * s[0]
  coef_ls = jnp.where(s > tol, c / jnp.where(s > tol, s, 1.0), 0.0)
  r2 = radius**2

  def norm_sq(lam):
    return jnp.sum(jnp.square(sc / (jnp.square(s) + lam)))

  def step(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    outside = norm_sq(mid) > r2
    return jnp.where(outside, mid, lo), jnp.where(outside, hi, mid)

  hi = jnp.linalg.norm(sc) / jnp.maximum(radius, jnp.finfo(x.dtype).tiny)
  _, lam = jax.lax.fori_loop(0, BISECTION_STEPS, step, (jnp.zeros_like(hi), hi))
  feasible = jnp.sum(jnp.square(coef_ls)) <= r2
  coef = jnp.where(feasible, coef_ls, sc / (jnp.square(s) + lam))
  theta = jnp.dot(vt.T, coef, precision=HIGHEST)
  # radius 0: theta = 0. A traced radius < 0 or NaN cannot be checked: NaN, not a
  # plausible theta (inf is the unconstrained least squares, which the above gives).
  return jnp.where(radius > 0, theta, jnp.where(radius == 0, 0.0, jnp.nan).astype(theta.dtype))


class Trials(NamedTuple):
  """Nested learning-curve data for S seeds and a grid of G training-set sizes.

  The training set of size n is the first n rows of the seed's sample (the usual way
  to draw a learning curve: the sets grow by adding points), evaluated on the same
  fresh test points; seeds are independent.

  Attributes:
    x_train: (S, N, D) training inputs, N = max(n_grid).
    y_train: (S, N) noisy training targets.
    x_test: (S, T, D) fresh test inputs.
    truth_test: (S, T) noiseless targets <theta*, x> at the test inputs.
    theta_star: (S, D) the target of each seed.
    theta_hat: (S, G, D) constrained least squares on the first n_grid[g] points.
    base_train: (S, G, N) base outputs <theta_hat_g, x_i> on the training inputs (the
      first n_grid[g] of row g are the training set of that fit).
    base_test: (S, G, T) base outputs on the test set.
  """

  x_train: Float[Array, "S N D"]
  y_train: Float[Array, "S N"]
  x_test: Float[Array, "S T D"]
  truth_test: Float[Array, "S T"]
  theta_star: Float[Array, "S D"]
  theta_hat: Float[Array, "S G D"]
  base_train: Float[Array, "S G N"]
  base_test: Float[Array, "S G T"]


def simulate_trial(key: Array, *, n_grid: tuple[int, ...], n_test: int, d: int,
                   domain: str, theta_norm, noise, radius) -> Trials:
  """One seed: a target, nested training sets, test points, and the base model per n."""
  k_theta, k_train, k_noise, k_test = jax.random.split(key, 4)
  theta_star = theta_norm * sample_inputs(k_theta, 1, d, domain="sphere")[0]
  n_max = max(n_grid)
  x_train = sample_inputs(k_train, n_max, d, domain=domain)
  x_test = sample_inputs(k_test, n_test, d, domain=domain)
  y_train = (jnp.dot(x_train, theta_star, precision=HIGHEST)
             + noise * jax.random.normal(k_noise, (n_max,)))

  def fit(n):
    # The first n rows, as a fixed shape: zero rows change neither the singular values
    # and vectors of x nor U^T y, and the rank tolerance is that of n rows, so this is
    # least squares on those n points exactly.
    keep = jnp.arange(n_max) < n
    return constrained_least_squares(jnp.where(keep[:, None], x_train, 0.0),
                                     jnp.where(keep, y_train, 0.0), radius, n_rows=n)

  theta_hat = jax.lax.map(fit, jnp.asarray(n_grid))  # one fit at a time: O(N D) memory
  return Trials(
      x_train=x_train, y_train=y_train, x_test=x_test,
      truth_test=jnp.dot(x_test, theta_star, precision=HIGHEST), theta_star=theta_star,
      theta_hat=theta_hat, base_train=jnp.dot(theta_hat, x_train.T, precision=HIGHEST),
      base_test=jnp.dot(theta_hat, x_test.T, precision=HIGHEST))


def simulate_trials(keys: Array, *, n_grid: tuple[int, ...], n_test: int, d: int,
                    domain: str, theta_norm, noise, radius) -> Trials:
  """`simulate_trial` vmapped over a (S,) batch of keys: every field gains an S axis.

  theta_norm, noise and radius are traced, so sweeping them does not recompile; given
  as numbers they are checked first (finite, >= 0) with the static arguments.
  """
  v.check_choice("domain", domain, DOMAINS)
  v.check_int("d", d, low=1)
  v.check_int("n_test", n_test, low=1)
  n_grid = tuple(v.check_int("n_grid", n, low=1) for n in n_grid)
  if not n_grid:
    raise ValueError("n_grid must hold at least one training-set size, got n_grid=()")
  for name, value in (("theta_norm", theta_norm), ("noise", noise), ("radius", radius)):
    if not v.is_traced(value):
      v.check_non_negative(name, v.concrete_scalar(value))
  typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
  if keys.ndim != (1 if typed else 2):  # raw keys carry a trailing axis of key data
    raise ValueError(f"keys must be a (S,) batch of PRNG keys, e.g. jax.random.split(key, S), "
                     f"got keys.shape={tuple(keys.shape)}"
                     + ("" if typed else " (raw uint32 keys: (S, 2))"))
  return _simulate_trials(keys, n_grid=n_grid, n_test=n_test, d=d, domain=domain,
                          theta_norm=theta_norm, noise=noise, radius=radius)


@functools.partial(jax.jit, static_argnames=("n_grid", "n_test", "d", "domain"))
def _simulate_trials(keys: Array, *, n_grid: tuple[int, ...], n_test: int, d: int,
                     domain: str, theta_norm, noise, radius) -> Trials:
  one = functools.partial(simulate_trial, n_grid=n_grid, n_test=n_test, d=d,
                          domain=domain, theta_norm=theta_norm, noise=noise,
                          radius=radius)
  return jax.vmap(one)(keys)


@jax.jit
def estimate_risk(predictions: Float[Array, "S T"], truth: Float[Array, "S T"]
                  ) -> Float[Array, "S"]:
  """Per-seed mean squared error against the noiseless target."""
  return jnp.mean(jnp.square(predictions - truth), axis=-1)


def resmem_predictions(trials: Trials, n_grid: Sequence[int], g: int, *, k: int,
                       sigma: float) -> Float[Array, "S T"]:
  """ResMem test predictions per seed at n = n_grid[g]: `rm.build_memory` + `rm.predict`.

  Neighbours are searched in input space. A Python loop over seeds: `rm.predict`
  validates its inputs on the host.
  """
  n = n_grid[g]
  base_train = np.asarray(trials.base_train[:, g, :n])
  x_train, y_train = np.asarray(trials.x_train), np.asarray(trials.y_train)
  x_test, base_test = np.asarray(trials.x_test), np.asarray(trials.base_test[:, g])
  out = []
  for s in range(x_train.shape[0]):
    mem = rm.build_memory(x_train[s, :n], y_train[s, :n], base_train[s], task="regression")
    out.append(rm.predict(mem, x_test[s], base_test[s], k=k, sigma=sigma))
  return jnp.stack(out)


def seed_keys(seed: int, num_seeds: int, *, d: int) -> Array:
  """(S,) independent keys, a fixed function of (seed, d, seed index)."""
  base = jax.random.fold_in(jax.random.key(seed), d)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(num_seeds))


# -------------------------------------------------------------------------- config


def get_config(quick: bool = False) -> ml_collections.ConfigDict:
  """Settings of the three figures; `quick=True` draws a smaller figure 1 only.

  Radii (L) are fractions of ||theta*||. On the project's 2-core CPU machine,
  `python experiments/linear_theory.py --workdir runs/theory` draws all three figures in
  4-5 minutes (232 s and 271 s measured); `--quick` draws figure 1 for d in {2, 3, 4},
  n in [1e2, 1e4], in 20-90 s, depending on what else shares the machine.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_seeds = 10
  c.n_test = 4000
  c.domain = "sphere"
  c.theta_norm = 1.0
  c.figures = FIGURES

  # Figure 1: risk against n at one L < ||theta*||.
  c.risk_vs_n = ml_collections.ConfigDict()
  c.risk_vs_n.dims = (2, 3, 4, 8)
  c.risk_vs_n.radius = 0.5
  c.risk_vs_n.n = tuple(int(round(10 ** (2 + i / 4))) for i in range(13))  # 1e2 .. 1e5
  c.risk_vs_n.k = 1
  c.risk_vs_n.sigma = 1.0  # irrelevant at k = 1 (one weight, exactly 1)
  c.risk_vs_n.noise = 0.0
  c.risk_vs_n.slope_fit_min_n = 3000
  # Optional (d, largest n) pairs that cut a dimension's n grid short. None by default:
  # on the circle the nearest neighbour lies ~pi/n away, below the float32 rounding of
  # rm.knn's ranking score past n ~ 1e4, and rm.knn's certificate then sends those
  # queries to its exact direct search (slower, still exact).
  c.risk_vs_n.max_n_by_d = ()

  # Figure 2: risk against the base model's capacity L at fixed n.
  c.risk_vs_capacity = ml_collections.ConfigDict()
  c.risk_vs_capacity.dims = (3, 8)
  c.risk_vs_capacity.n = 1000
  c.risk_vs_capacity.radii = tuple(round(0.1 * i, 1) for i in range(11))  # x theta_norm
  c.risk_vs_capacity.k = 1
  c.risk_vs_capacity.sigma = 1.0

  # Figure 3: noisy labels, k = 1 against k growing with n.
  c.noise = ml_collections.ConfigDict()
  c.noise.d = 3
  c.noise.radius = 0.5
  c.noise.noise = 0.2
  # Up to 10^4.5 (k_n <= 178): beyond k = 256 the exact search gets far slower on CPU.
  c.noise.n = tuple(int(round(10 ** (2 + i / 4))) for i in range(11))
  c.noise.sigma = None  # equal weights: the textbook k-NN average
  c.noise.slope_fit_min_n = 3000

  if quick:
    c.num_seeds = 8
    c.n_test = 2000
    c.figures = ("risk_vs_n",)
    c.risk_vs_n.dims = (2, 3, 4)
    c.risk_vs_n.n = tuple(int(round(10 ** (2 + i / 3))) for i in range(7))  # 1e2 .. 1e4
    c.risk_vs_n.slope_fit_min_n = 1000
  return c


class CurveSpec(NamedTuple):
  """One curve to compute: a setting and the n values it is evaluated at."""

  figure: str
  domain: str
  d: int
  radius: float
  theta_norm: float
  noise: float
  n: tuple[int, ...]
  k_rule: str  # "fixed" or "growing"
  k: int | None  # the fixed k; None when it grows with n
  sigma: float | None  # None: equal weights
  slope_fit_min_n: int | None


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError/TypeError naming the first bad setting."""
  v.check_int("seed", config.seed, low=0)
  v.check_int("num_seeds", config.num_seeds, low=2)
  v.check_int("n_test", config.n_test, low=1)
  v.check_choice("domain", config.domain, DOMAINS)
  v.check_positive("theta_norm", config.theta_norm)
  if not config.figures:
    raise ValueError(f"figures must name at least one of {FIGURES}, got figures="
                     f"{tuple(config.figures)!r}")
  for name in config.figures:
    v.check_choice("figures", name, FIGURES)
  for figure, field in (("risk_vs_n", "dims"), ("risk_vs_capacity", "dims"),
                        ("risk_vs_capacity", "radii")):
    grid = config[figure][field]
    if figure in config.figures and not grid:
      raise ValueError(f"{figure}.{field} must hold at least one value when figures "
                       f"names {figure!r}, got {figure}.{field}={tuple(grid)!r}")
  min_d = 2 if config.domain == "sphere" else 1
  for d in tuple(config.risk_vs_n.dims) + tuple(config.risk_vs_capacity.dims) + (config.noise.d,):
    v.check_int("d", d, low=min_d)
  for name, grid in (("risk_vs_n.n", config.risk_vs_n.n), ("noise.n", config.noise.n)):
    if not grid:
      raise ValueError(f"{name} must hold at least one training-set size, got {name}={grid!r}")
    for n in grid:
      v.check_int(name, n, low=2)
  for name in ("risk_vs_n.slope_fit_min_n", "noise.slope_fit_min_n"):
    section, field = name.split(".")
    v.check_int(name, config[section][field], low=2)
  v.check_int("risk_vs_capacity.n", config.risk_vs_capacity.n, low=2)
  for pair in config.risk_vs_n.max_n_by_d:
    if len(pair) != 2:
      raise ValueError(f"risk_vs_n.max_n_by_d must hold (d, largest n) pairs, got {pair!r}")
    v.check_int("risk_vs_n.max_n_by_d", pair[1], low=min(config.risk_vs_n.n))
  for name, value in (("risk_vs_n.radius", config.risk_vs_n.radius),
                      ("noise.radius", config.noise.radius),
                      *(("risk_vs_capacity.radii", r) for r in config.risk_vs_capacity.radii)):
    v.check_non_negative(name, value)
  for name, value in (("risk_vs_n.radius", config.risk_vs_n.radius),
                      ("noise.radius", config.noise.radius)):
    if value >= 1:  # the slopes of figures 1 and 3 describe a base model that cannot fit
      raise ValueError(f"{name} must be < 1 (L < ||theta*||, as a fraction of theta_norm: "
                       f"at L >= ||theta*|| the base fits the target and both risks are "
                       f"round-off), got {name}={value!r}")
  for name, value in (("risk_vs_n.noise", config.risk_vs_n.noise),
                      ("noise.noise", config.noise.noise)):
    v.check_non_negative(name, value)
  for name, value in (("risk_vs_n.sigma", config.risk_vs_n.sigma),
                      ("risk_vs_capacity.sigma", config.risk_vs_capacity.sigma),
                      ("noise.sigma", config.noise.sigma)):
    if value is not None:
      v.check_positive(name, value)
  v.check_int("risk_vs_n.k", config.risk_vs_n.k, low=1, high=min(config.risk_vs_n.n))
  v.check_int("risk_vs_capacity.k", config.risk_vs_capacity.k, low=1,
              high=config.risk_vs_capacity.n)


def plan(config: ml_collections.ConfigDict) -> list[CurveSpec]:
  """The curves `run` computes, in order."""
  check_config(config)
  c, specs = config, []
  common = dict(domain=c.domain, theta_norm=float(c.theta_norm))
  if "risk_vs_n" in c.figures:
    f = c.risk_vs_n
    max_n = dict(f.max_n_by_d)
    specs += [CurveSpec("risk_vs_n", d=int(d), radius=float(f.radius) * c.theta_norm,
                        noise=float(f.noise),
                        n=tuple(m for m in f.n if m <= max_n.get(d, math.inf)),
                        k_rule="fixed", k=int(f.k),
                        sigma=f.sigma, slope_fit_min_n=int(f.slope_fit_min_n), **common)
              for d in f.dims]
  if "risk_vs_capacity" in c.figures:
    f = c.risk_vs_capacity
    specs += [CurveSpec("risk_vs_capacity", d=int(d), radius=float(r) * c.theta_norm,
                        noise=0.0, n=(int(f.n),), k_rule="fixed", k=int(f.k),
                        sigma=f.sigma, slope_fit_min_n=None, **common)
              for d in f.dims for r in f.radii]
  if "noise" in c.figures:
    f = c.noise
    specs += [CurveSpec("noise", d=int(f.d), radius=float(f.radius) * c.theta_norm,
                        noise=float(f.noise), n=tuple(f.n), k_rule=rule,
                        k=1 if rule == "fixed" else None, sigma=f.sigma,
                        slope_fit_min_n=int(f.slope_fit_min_n), **common)
              for rule in ("fixed", "growing")]
  return specs


def count_points(config: ml_collections.ConfigDict) -> int:
  """Number of (curve, n) evaluations `run` performs: the length of a progress bar."""
  return sum(len(spec.n) for spec in plan(config))


# -------------------------------------------------------------------------- running


def k_schedule(spec: CurveSpec) -> list[int]:
  if spec.k_rule == "growing":
    m = intrinsic_dim(spec.domain, spec.d)
    return [growing_k(n, m=m) for n in spec.n]
  return [spec.k] * len(spec.n)


def evaluate_curve(spec: CurveSpec, *, seed: int, num_seeds: int, n_test: int,
                   on_point: Callable[[CurveSpec, int], Any] | None = None
                   ) -> dict[str, Any]:
  """Base and ResMem test risks of one curve for every n, over `num_seeds` seeds.

  Returns the JSON-ready entry of `results["curves"]` (see `run`).
  """
  sigma = UNIFORM_SIGMA if spec.sigma is None else float(spec.sigma)
  k_per_n = k_schedule(spec)
  trials = simulate_trials(
      seed_keys(seed, num_seeds, d=spec.d), n_grid=spec.n, n_test=n_test, d=spec.d,
      domain=spec.domain, theta_norm=spec.theta_norm, noise=spec.noise,
      radius=spec.radius)
  trials = jax.device_get(trials)  # host copies: per-n slices then cost no dispatch
  base, resmem = [], []
  for g, (n, k) in enumerate(zip(spec.n, k_per_n)):
    base.append(np.asarray(estimate_risk(trials.base_test[:, g], trials.truth_test)))
    preds = resmem_predictions(trials, spec.n, g, k=k, sigma=sigma)
    resmem.append(np.asarray(estimate_risk(preds, trials.truth_test)))
    if on_point is not None:
      on_point(spec, n)
  base, resmem = np.stack(base), np.stack(resmem)  # (len(n), S)
  # The base model is linear: its population risk against the noiseless target is
  # exactly s ||theta_hat - theta*||^2 (E[x x^T] = s I), free of the test sample's noise.
  gap = trials.theta_hat.astype(np.float64) - trials.theta_star[:, None].astype(np.float64)
  population = second_moment(spec.domain, spec.d) * np.sum(gap * gap, axis=-1)  # (S, G)

  slope_fit = slope_fit_std = None
  fit_n: list[int] = []
  if spec.slope_fit_min_n is not None:
    mask = np.asarray(spec.n) >= spec.slope_fit_min_n
    fit_n = [int(n) for n in np.asarray(spec.n)[mask]]
    if len(fit_n) >= 2:
      slope_fit = fit_slope(fit_n, resmem.mean(axis=1)[mask])
      per_seed = [fit_slope(fit_n, resmem[mask, s]) for s in range(resmem.shape[1])]
      slope_fit_std = float(np.std(per_seed, ddof=1))
  theory_kwargs = dict(domain=spec.domain, d=spec.d)
  return {
      "figure": spec.figure,
      "domain": spec.domain,
      "d": spec.d,
      "d_eff": intrinsic_dim(spec.domain, spec.d),
      "L": spec.radius,
      "theta_norm": spec.theta_norm,
      "noise": spec.noise,
      "k": spec.k,
      "k_rule": spec.k_rule,
      "k_per_n": k_per_n,
      "sigma": spec.sigma,
      "num_seeds": num_seeds,
      "n_test": n_test,
      "n": list(spec.n),
      "base_risk": base.mean(axis=1).tolist(),
      "base_risk_std": base.std(axis=1, ddof=1).tolist(),
      "resmem_risk": resmem.mean(axis=1).tolist(),
      "resmem_risk_std": resmem.std(axis=1, ddof=1).tolist(),
      "base_risk_per_seed": base.tolist(),
      "base_risk_population": population.mean(axis=0).tolist(),
      "resmem_risk_per_seed": resmem.tolist(),
      "base_risk_theory": base_risk_limit(radius=spec.radius, theta_norm=spec.theta_norm,
                                          **theory_kwargs),
      "resmem_risk_theory": resmem_risk_theory(
          radius=spec.radius, theta_norm=spec.theta_norm, noise=spec.noise, n=spec.n,
          k_per_n=k_per_n, **theory_kwargs),
      "resmem_slope_theory": (
          resmem_slope_theory(noise=spec.noise, k_rule=spec.k_rule, **theory_kwargs)
          if spec.slope_fit_min_n is not None else None),
      "resmem_slope_fit": slope_fit,
      "resmem_slope_fit_std": slope_fit_std,
      "slope_fit_n": fit_n,
      # sigma^2 / k is the variance of an equal-weight average (and of k = 1 at any
      # sigma); soft weights have sigma^2 E[sum w_j^2] instead.
      "noise_floor": ([spec.noise**2 / k for k in k_per_n]
                      if spec.noise > 0 and (spec.sigma is None or max(k_per_n) == 1)
                      else None),
  }


def run(config: ml_collections.ConfigDict,
        on_point: Callable[[CurveSpec, int], Any] | None = None) -> dict[str, Any]:
  """Computes every curve of `config`; returns the JSON-ready results.

  Args:
    config: from `get_config` (possibly modified).
    on_point: called as on_point(spec, n) after each (curve, n) evaluation, e.g. to
      advance a progress bar of `count_points(config)` steps.

  Returns:
    {"config": dict, "curves": [...], "seconds": float, "backend": str, "jax": str,
    "hardware": dict, "provenance": dict}. Each curve has
    figure, domain, d, d_eff, L, theta_norm, noise, k (int, or None when k grows with
    n), k_rule, k_per_n, sigma, n (list), base_risk / resmem_risk (mean over seeds, per
    n, on the n_test test points), *_std (their standard deviation over seeds),
    *_per_seed, base_risk_population (the base models' exact population risk
    s ||theta_hat - theta*||^2, mean over seeds, per n), base_risk_theory
    (the n -> inf limit), resmem_risk_theory (list or None), resmem_slope_theory,
    resmem_slope_fit (fitted on n >= slope_fit_min_n, listed in slope_fit_n) and
    resmem_slope_fit_std (the std of the per-seed fits), noise_floor (sigma_eps^2 / k_n,
    or None without noise or with soft weights).

  Example:
    >>> results = run(get_config(quick=True))
    >>> plot_risk_vs_n(results, "risk_vs_n.png")
  """
  start = time.perf_counter()
  curves = [evaluate_curve(spec, seed=config.seed, num_seeds=config.num_seeds,
                           n_test=config.n_test, on_point=on_point)
            for spec in plan(config)]
  return {"config": config.to_dict(), "curves": curves,
          "seconds": time.perf_counter() - start, "backend": jax.default_backend(),
          "jax": jax.__version__,
          "hardware": analysis.hardware(), "provenance": analysis.provenance()}


# -------------------------------------------------------------------------- figures

BASE_COLOR, RESMEM_COLOR, GROWING_COLOR = "tab:blue", "tab:orange", "tab:green"


def slope_text(curve: dict[str, Any], *, std: bool = True) -> str:
  """"fit -1.003 (seeds' std 0.021), theory -1.000" for a curve with a fitted slope.

  The std is the spread of the per-seed fits, not the standard error of the fit to
  the mean curve (about sqrt(num_seeds) times smaller).
  """
  text = f"fit {curve['resmem_slope_fit']:+.3f}"
  if std and curve["resmem_slope_fit_std"] is not None:
    text += f" (seeds' std {curve['resmem_slope_fit_std']:.3f})"
  theory = curve["resmem_slope_theory"]
  return text + (f", theory {theory:+.3f}" if theory is not None else ", no theory slope")


def _curves(results: dict[str, Any], figure: str) -> list[dict[str, Any]]:
  curves = [c for c in results["curves"] if c["figure"] == figure]
  if not curves:
    raise ValueError(f"results hold no {figure!r} curves; run with {figure!r} in "
                     f"config.figures")
  return curves


def _band(ax, n, mean, std, color):
  mean, std = np.asarray(mean), np.asarray(std)
  ax.fill_between(n, np.maximum(mean - std, mean * 1e-3), mean + std, color=color,
                  alpha=0.2, linewidth=0)


def _new_figure(n_panels: int, *, width: float = 4.8, height: float = 3.8):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  cols = min(n_panels, 2 if n_panels == 4 else 3)
  rows = -(-n_panels // cols)
  fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[n_panels:]:
    ax.set_visible(False)
  return fig, axes[:n_panels]


def _save(fig, path):
  if path is not None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
  return fig


def plot_risk_vs_n(results: dict[str, Any], path: str | None = None):
  """Figure 1: test risk against n (log-log), base and ResMem, one panel per d.

  Draws the base limit s (||theta*|| - L)^2, the exact ResMem curve (sphere) whose
  slope tends to -2/d_eff, and the slope fitted over n >= slope_fit_min_n (the shaded
  range). Returns the matplotlib Figure; saves a PNG at `path` if given.
  """
  curves = _curves(results, "risk_vs_n")
  fig, axes = _new_figure(len(curves))
  for ax, c in zip(axes, curves):
    n = np.asarray(c["n"])
    if c["slope_fit_n"]:
      ax.axvspan(min(c["slope_fit_n"]), max(c["slope_fit_n"]), color="0.93", zorder=0,
                 label="n range of the slope fit")
    ax.loglog(n, c["base_risk"], "o-", color=BASE_COLOR, ms=4,
              label="base: least squares with $\\|\\theta\\|\\leq L$")
    _band(ax, n, c["base_risk"], c["base_risk_std"], BASE_COLOR)
    ax.axhline(c["base_risk_theory"], color="navy", ls="--", lw=1.2, zorder=3,
               label=(r"base limit $(\|\theta^*\|-L)^2/d$" if c["domain"] == "sphere"
                      else "base limit $s(\\|\\theta^*\\|-L)^2$"))
    ax.loglog(n, c["resmem_risk"], "s-", color=RESMEM_COLOR, ms=4,
              label=f"ResMem (k={c['k']}), mean ± std over seeds")
    _band(ax, n, c["resmem_risk"], c["resmem_risk_std"], RESMEM_COLOR)
    if c["resmem_risk_theory"] is not None:
      label = (r"ResMem theory $\frac{(\|\theta^*\|-L)^2}{d}\,E[D_n^2]$"
               r" (slope $\to -2/(d-1)$)")
      if c["noise"] > 0:  # k = 1 memorizes the noise: the risk tends to sigma^2
        label = (r"ResMem theory $\sigma_\varepsilon^2 + \frac{(\|\theta^*\|-L)^2}{d}"
                 r"\,E[D_n^2]$")
      ax.loglog(n, c["resmem_risk_theory"], ":", color="black", lw=2.0, label=label)
    title = f"d={c['d']} ({c['domain']}, intrinsic dim {c['d_eff']})"
    if c["resmem_slope_fit"] is not None:
      title += f"\nResMem slope: {slope_text(c)}"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training points n")
    ax.set_ylabel(r"test risk $E[(f(x)-\langle\theta^*,x\rangle)^2]$")
    ax.grid(True, which="major", alpha=0.3)
  c = curves[0]
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncol=2 if len(axes) % 2 == 0 else 3,
             fontsize=8.5)
  noise = "noiseless" if c["noise"] == 0 else rf"noise $\sigma_\varepsilon$={c['noise']:g}"
  fig.suptitle(f"ResMem on a norm-constrained linear model (L={c['L']:g}, "
               f"$\\|\\theta^*\\|$={c['theta_norm']:g}, {noise}): {c['num_seeds']} seeds, "
               f"{c['n_test']} test points each", fontsize=10.5)
  return _save(fig, path)


def plot_risk_vs_capacity(results: dict[str, Any], path: str | None = None):
  """Figure 2: test risk against the base model's capacity L at fixed n, one panel per d."""
  curves = _curves(results, "risk_vs_capacity")
  dims = sorted({c["d"] for c in curves})
  fig, axes = _new_figure(len(dims))
  for ax, d in zip(axes, dims):
    cs = sorted((c for c in curves if c["d"] == d), key=lambda c: c["L"])
    L = np.array([c["L"] for c in cs])
    base = np.array([c["base_risk"][0] for c in cs])
    base_std = np.array([c["base_risk_std"][0] for c in cs])
    res = np.array([c["resmem_risk"][0] for c in cs])
    res_std = np.array([c["resmem_risk_std"][0] for c in cs])
    ax.errorbar(L, base, base_std, fmt="o-", color=BASE_COLOR, ms=4, capsize=2,
                label="base (constrained LS)")
    ax.errorbar(L, res, res_std, fmt="s-", color=RESMEM_COLOR, ms=4, capsize=2,
                label=f"ResMem (k={cs[0]['k']})")
    ax.plot(L, [c["base_risk_theory"] for c in cs], "--", color=BASE_COLOR, lw=1.2,
            label="base limit (n→∞)")
    if cs[0]["resmem_risk_theory"] is not None:
      ax.plot(L, [c["resmem_risk_theory"][0] for c in cs], ":", color="black", lw=1.8,
              label=r"ResMem theory $\frac{(\|\theta^*\|-L)^2}{d}E[D_n^2]$")
    ax.set_title(f"{cs[0]['domain']}, d={d}, n={cs[0]['n'][0]}", fontsize=10)
    ax.set_xlabel(r"base model capacity $L$ (constraint $\|\theta\|\leq L$)")
    ax.set_ylabel("test risk")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
  fig.suptitle(rf"Risk against capacity ($\|\theta^*\|$={curves[0]['theta_norm']:g}): "
               "ResMem's absolute gain is largest for the smallest models", fontsize=10)
  return _save(fig, path)


def plot_noise(results: dict[str, Any], path: str | None = None):
  """Figure 3: noisy labels, ResMem with k = 1 against k growing with n (log-log)."""
  curves = _curves(results, "noise")
  fig, axes = _new_figure(1, width=7.5, height=6.0)
  ax = axes[0]
  c0 = curves[0]
  n = np.asarray(c0["n"])
  ax.loglog(n, c0["base_risk"], "o-", color=BASE_COLOR, ms=4, label="base (constrained LS)")
  ax.axhline(c0["base_risk_theory"], color=BASE_COLOR, ls="--", lw=1.2, label="base limit")
  for c in curves:
    growing = c["k_rule"] == "growing"
    color = GROWING_COLOR if growing else RESMEM_COLOR
    if growing:
      label = (rf"ResMem, $k_n=\lceil n^{{2/(d_{{eff}}+2)}}\rceil$"
               f" (k={c['k_per_n'][0]}..{c['k_per_n'][-1]})")
    else:
      label = "ResMem, k=1"
    if c["resmem_slope_fit"] is not None:
      label += f", slope {slope_text(c, std=False)}"
    ax.loglog(n, c["resmem_risk"], "s-", color=color, ms=4, label=label)
    _band(ax, n, c["resmem_risk"], c["resmem_risk_std"], color)
    if growing and c["noise_floor"] is not None:  # None without noise
      ax.loglog(n, c["noise_floor"], "-.", color=color, lw=1.2,
                label=r"variance term $\sigma_\varepsilon^2/k_n$")
    elif c["resmem_risk_theory"] is not None:
      ax.loglog(n, c["resmem_risk_theory"], ":", color="black", lw=1.8,
                label=r"k=1 theory $\sigma_\varepsilon^2 + \frac{(\|\theta^*\|-L)^2}{d}E[D_n^2]$")
  if c0["slope_fit_n"]:
    ax.axvspan(min(c0["slope_fit_n"]), max(c0["slope_fit_n"]), color="0.93", zorder=0,
               label="n range of the slope fits")
  ax.set_title(f"{c0['domain']}, d={c0['d']}, L={c0['L']:g}, "
               rf"noise $\sigma_\varepsilon$={c0['noise']:g}: 1-NN memorizes the noise",
               fontsize=10)
  ax.set_xlabel("training points n")
  ax.set_ylabel(r"test risk $E[(f(x)-\langle\theta^*,x\rangle)^2]$")
  fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2,
             fontsize=8)
  ax.grid(True, which="major", alpha=0.3)
  return _save(fig, path)


PLOTS = {"risk_vs_n": plot_risk_vs_n, "risk_vs_capacity": plot_risk_vs_capacity,
         "noise": plot_noise}
