"""The stylized linear-regression theory check (resmem_jax.theory, experiments/linear_theory.py).

The acceptance checks of issue 4 run on the `--quick` configuration (d in {2, 3, 4},
sphere, L = 0.5, ||theta*|| = 1, noiseless, k = 1, 8 seeds x 2000 test points, n from
100 to 10^4, slopes fitted on n >= 1000), the same numbers the quick script reports.
Budget: about 40 s in total on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resmem_jax as rm
from resmem_jax import theory


# Under `pytest -n 2 --dist loadgroup` (the README's test command) one worker runs this
# module, so the quick run below (about a minute) is computed once.
pytestmark = pytest.mark.xdist_group("linear_theory")


@pytest.fixture(scope="module")
def quick_results():
  return theory.run(theory.get_config(quick=True))


def _fig1(results):
  return {c["d"]: c for c in results["curves"] if c["figure"] == "risk_vs_n"}


# ------------------------------------------------------------- acceptance (issue 4)


def test_quick_config_is_the_issue_setting(quick_results):
  curves = _fig1(quick_results)
  assert sorted(curves) == [2, 3, 4]
  for c in curves.values():
    assert (c["domain"], c["L"], c["theta_norm"], c["noise"], c["k"]) == (
        "sphere", 0.5, 1.0, 0.0, 1)
    assert c["num_seeds"] >= 8 and c["n_test"] >= 2000
    assert min(c["n"]) == 100 and max(c["n"]) >= 10_000


def test_base_risk_at_largest_n_matches_closed_form(quick_results):
  for d, c in _fig1(quick_results).items():
    limit = (1.0 - 0.5) ** 2 / d
    assert c["base_risk_theory"] == pytest.approx(limit)
    assert c["base_risk"][-1] == pytest.approx(limit, rel=0.05), d
    # Free of the test sample's noise: the population risk of a fit constrained to
    # ||theta|| <= L is at least the limit, and O(1/n) above it.
    population = np.asarray(c["base_risk_population"])
    assert np.all(population >= limit * (1 - 1e-6)), d
    assert population[-1] == pytest.approx(limit, rel=2e-3), d


def test_resmem_slope_matches_theory(quick_results):
  for d, c in _fig1(quick_results).items():
    theory_slope = -2.0 / (d - 1)
    assert c["resmem_slope_theory"] == pytest.approx(theory_slope)
    assert c["slope_fit_n"] == [n for n in c["n"] if n >= 1000]
    assert len(c["slope_fit_n"]) >= 4
    assert c["resmem_slope_fit"] == pytest.approx(theory_slope, rel=0.10), d


def test_resmem_below_base_at_every_n(quick_results):
  for d, c in _fig1(quick_results).items():
    for n, base, res in zip(c["n"], c["base_risk"], c["resmem_risk"]):
      assert res < base, (d, n)
    # Per seed as well, not only on average.
    assert np.all(np.asarray(c["resmem_risk_per_seed"]) < np.asarray(c["base_risk_per_seed"]))


def test_resmem_risk_matches_exact_nn_curve(quick_results):
  # The derivation, not only its slope: R_resmem = (||theta*|| - L)^2 / d * E[D_n^2].
  for d, c in _fig1(quick_results).items():
    ratio = np.asarray(c["resmem_risk"]) / np.asarray(c["resmem_risk_theory"])
    big = np.asarray(c["n"]) >= 1000
    assert math.exp(np.mean(np.log(ratio[big]))) == pytest.approx(1.0, abs=0.10), (d, ratio)


def test_results_are_json_and_plots_write(quick_results, tmp_path):
  text = json.dumps(quick_results)
  assert json.loads(text)["curves"][0]["figure"] == "risk_vs_n"
  path = tmp_path / "risk_vs_n.png"
  theory.plot_risk_vs_n(quick_results, str(path))
  assert path.stat().st_size > 10_000
  with pytest.raises(ValueError, match="noise"):
    theory.plot_noise(quick_results, str(tmp_path / "noise.png"))


# ------------------------------------------------------------------- base model


def _projected_gradient(x, y, radius, steps=20_000):
  """Float64 oracle: projected gradient descent on the ball (convex, 1/L step)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  step = 1.0 / np.linalg.eigvalsh(x.T @ x).max()
  theta = np.zeros(x.shape[1])
  for _ in range(steps):
    theta = theta - step * x.T @ (x @ theta - y)
    norm = np.linalg.norm(theta)
    if norm > radius:
      theta *= radius / norm
  return theta


@pytest.mark.parametrize("radius", [0.05, 0.3, 0.8])
def test_constrained_least_squares_matches_projected_gradient(radius):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(40, 5)).astype(np.float32)
  y = (x @ rng.normal(size=5) + 0.3 * rng.normal(size=40)).astype(np.float32)
  theta = np.asarray(theory.constrained_least_squares(jnp.asarray(x), jnp.asarray(y), radius))
  oracle = _projected_gradient(x, y, radius)
  np.testing.assert_allclose(theta, oracle, atol=2e-5 * max(1.0, np.linalg.norm(oracle)))
  assert np.linalg.norm(theta) == pytest.approx(radius, rel=1e-5)


def test_constrained_least_squares_inactive_and_zero_radius():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(30, 4)).astype(np.float32)
  y = rng.normal(size=30).astype(np.float32)
  lstsq = np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)[0]
  theta = theory.constrained_least_squares(jnp.asarray(x), jnp.asarray(y), 10.0)
  np.testing.assert_allclose(theta, lstsq, atol=1e-5)
  zero = theory.constrained_least_squares(jnp.asarray(x), jnp.asarray(y), 0.0)
  np.testing.assert_array_equal(zero, np.zeros(4, np.float32))
  # Traced, the radius cannot be checked: a bad one gives NaN, never the plausible 0.
  fit = jax.jit(theory.constrained_least_squares)
  np.testing.assert_array_equal(fit(x, y, 0.0), np.zeros(4, np.float32))
  np.testing.assert_allclose(fit(x, y, np.inf), lstsq, atol=1e-5)
  for bad in (-1.0, np.nan):
    assert np.all(np.isnan(np.asarray(fit(x, y, bad)))), bad


def test_zero_padding_leaves_the_constrained_fit_unchanged():
  """The nested fits pad the first n rows with zeros to the largest n: the rank
  tolerance must be that of the n data rows, not of the padded matrix (a small but
  real singular value was once cut at 10^5 padded rows, and the fit left optimal)."""
  x = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0.02], [1, 1, 0]], np.float32)  # s ratio 0.012
  y = np.array([0, 0, 0.04, 0], np.float32)  # least squares: (0, 0, 2), norm 2
  want = np.array([0.0, 0.0, 1.5])  # the constrained optimum at L = 1.5
  for pad in (0, 1000, 100_000):
    xp = np.concatenate([x, np.zeros((pad, 3), np.float32)])
    yp = np.concatenate([y, np.zeros(pad, np.float32)])
    theta = theory.constrained_least_squares(jnp.asarray(xp), jnp.asarray(yp), 1.5, n_rows=4)
    np.testing.assert_allclose(np.asarray(theta), want, atol=1e-5, err_msg=f"pad={pad}")
  # Through the nested simulation: the fit at n = 4 must not depend on the largest n.
  small, large = (theory.simulate_trials(theory.seed_keys(0, 2, d=4), n_grid=grid, n_test=10,
                                         d=4, domain="sphere", theta_norm=1.0, noise=1.0,
                                         radius=3.0).theta_hat[:, 0]
                  for grid in ((4, 8), (4, 100_000)))
  np.testing.assert_allclose(np.asarray(small), np.asarray(large), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("radius", [-1.0, float("nan"), float("inf")])
def test_constrained_least_squares_rejects_a_bad_radius(radius):
  x, y = jnp.ones((3, 2)), jnp.ones(3)
  with pytest.raises(ValueError, match="radius"):
    theory.constrained_least_squares(x, y, radius)


def test_constrained_least_squares_rejects_misshaped_or_bad_data():
  x, y = jnp.ones((3, 2)), jnp.ones(3)
  cases = [
      (dict(y=jnp.ones((3, 1))), ValueError, r"y.shape=\(3, 1\)"),  # was a (2, 2) "theta"
      (dict(y=jnp.ones(4)), ValueError, r"y.shape=\(4,\)"),
      (dict(x=jnp.ones(3)), ValueError, r"x.shape=\(3,\)"),
      (dict(y=jnp.array([1.0, jnp.nan, 0.0])), ValueError, r"y\[1\]=nan"),
      (dict(x=jnp.ones((3, 2), jnp.int32)), TypeError, "x.dtype=int32"),
      (dict(n_rows=4), ValueError, "n_rows"),
  ]
  for overrides, error, message in cases:
    kwargs = dict(x=x, y=y, radius=1.0) | overrides
    with pytest.raises(error, match=message):
      theory.constrained_least_squares(**kwargs)


def test_simulate_trials_rejects_negative_scales():
  for name in ("theta_norm", "noise", "radius"):
    kwargs = dict(theta_norm=1.0, noise=0.0, radius=0.5) | {name: -0.5}
    with pytest.raises(ValueError, match=f"{name}=-0.5"):
      theory.simulate_trials(theory.seed_keys(0, 2, d=3), n_grid=(10,), n_test=5, d=3,
                             domain="sphere", **kwargs)


@pytest.mark.parametrize("key", [jax.random.key(0), jax.random.PRNGKey(0)])
def test_simulate_trials_asks_for_a_batch_of_keys(key):
  with pytest.raises(ValueError, match=r"keys must be a \(S,\) batch of PRNG keys"):
    theory.simulate_trials(key, n_grid=(10,), n_test=5, d=3, domain="sphere",
                           theta_norm=1.0, noise=0.0, radius=0.5)


def test_simulate_trials_fits_every_prefix_and_vmaps_over_seeds():
  n_grid = (10, 25, 60)
  trials = theory.simulate_trials(theory.seed_keys(0, 2, d=3), n_grid=n_grid, n_test=50,
                                  d=3, domain="sphere", theta_norm=1.0, noise=0.1,
                                  radius=0.4)
  assert trials.x_train.shape == (2, 60, 3) and trials.theta_hat.shape == (2, 3, 3)
  solve = jax.jit(theory.constrained_least_squares)
  for s in range(2):
    for g, n in enumerate(n_grid):
      direct = solve(trials.x_train[s, :n], trials.y_train[s, :n], 0.4)
      np.testing.assert_allclose(trials.theta_hat[s, g], direct, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(trials.theta_star, axis=-1), 1.0, rtol=1e-6)
  # Seeds are independent draws.
  assert not np.allclose(trials.x_train[0], trials.x_train[1])


# ---------------------------------------------------------------------- theory


@pytest.mark.parametrize("domain", theory.DOMAINS)
def test_second_moment_and_base_limit(domain):
  d, n = 4, 200_000
  x = theory.sample_inputs(jax.random.key(3), n, d, domain=domain)
  s = theory.second_moment(domain, d)
  np.testing.assert_allclose(np.asarray(x.T @ x) / n, s * np.eye(d), atol=0.02 * s)
  if domain == "sphere":
    np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, rtol=1e-5)
  if domain == "cube":
    assert float(jnp.abs(x).max()) <= 1.0
  # Population risk of theta_L = L theta*/||theta*||, by Monte Carlo.
  theta_star = jnp.array([0.6, -0.8, 0.0, 0.0]) * 1.5
  theta_l = theta_star / 1.5 * 0.5
  risk = float(jnp.mean(jnp.square(x @ (theta_l - theta_star))))
  limit = theory.base_risk_limit(domain=domain, d=d, radius=0.5, theta_norm=1.5)
  assert risk == pytest.approx(limit, rel=0.02)


def test_mean_sq_nn_distance_circle_and_asymptote():
  for n in (10, 1000):
    # Circle: arc gaps give E[A^2] = 2 pi^2 / ((n+1)(n+2)); chord = 2 sin(A/2) <= arc.
    arc = 2 * math.pi**2 / ((n + 1) * (n + 2))
    chord = theory.mean_sq_nn_distance(n, 2)
    assert chord < arc and chord == pytest.approx(arc, rel=3.0 / n)
  for d in (3, 4, 8):
    m, a = d - 1, (d - 1) / 2
    n = 10**7
    asymptote = 4 * math.gamma(1 + 2 / m) * (a * math.exp(
        math.lgamma(a) * 2 - math.lgamma(2 * a)) / n) ** (2 / m)
    assert theory.mean_sq_nn_distance(n, d) == pytest.approx(asymptote, rel=0.01)


def test_mean_sq_nn_distance_matches_monte_carlo():
  d, n, queries, reps = 4, 300, 2000, 4
  keys = jax.random.split(jax.random.key(4), 2 * reps)
  sq = []
  for r in range(reps):
    train = theory.sample_inputs(keys[2 * r], n, d, domain="sphere")
    test = theory.sample_inputs(keys[2 * r + 1], queries, d, domain="sphere")
    sq.append(np.square(np.asarray(rm.knn(test, train, 1).distances[:, 0])))
  assert np.mean(sq) == pytest.approx(theory.mean_sq_nn_distance(n, d), rel=0.03)


def test_fit_slope_and_growing_k():
  n = np.array([100, 1000, 10_000])
  assert theory.fit_slope(n, 3.0 * n**-0.75) == pytest.approx(-0.75)
  assert [theory.growing_k(n, m=2) for n in (100, 10_000)] == [10, 100]
  slope = theory.resmem_slope_theory
  assert slope(domain="sphere", d=3, noise=0.2, k_rule="growing") == -0.5  # sigma^2 / k_n
  assert slope(domain="sphere", d=3, noise=0.0, k_rule="growing") == -1.0  # r_k^2 / k
  assert slope(domain="cube", d=3, noise=0.0, k_rule="growing") is None
  assert slope(domain="sphere", d=3, noise=0.2, k_rule="fixed") == 0.0
  assert slope(domain="cube", d=3, noise=0.0, k_rule="fixed") == pytest.approx(-2 / 3)
  assert slope(domain="gaussian", d=3, noise=0.0, k_rule="fixed") == pytest.approx(-2 / 3)
  for d in (1, 2):  # E[D_n^2] is not a power of n: the tails' integral diverges
    assert slope(domain="gaussian", d=d, noise=0.0, k_rule="fixed") is None


def _noise_spec(**overrides):
  spec = theory.CurveSpec("noise", domain="sphere", d=3, radius=0.5, theta_norm=1.0,
                          noise=0.2, n=(1000,), k_rule="fixed", k=1, sigma=None,
                          slope_fit_min_n=None)
  return spec._replace(**overrides)


def test_noisy_labels_one_neighbour_keeps_the_noise_growing_k_averages_it():
  """Figure 3's numbers: with k = 1 the risk is sigma^2 + the noiseless term (exactly
  the theory curve); k_n = ceil(sqrt(n)) neighbours divide the noise by k_n."""
  one = theory.evaluate_curve(_noise_spec(), seed=0, num_seeds=4, n_test=2000)
  assert one["resmem_risk_theory"][0] > 0.2**2
  assert one["resmem_risk"][0] == pytest.approx(one["resmem_risk_theory"][0], rel=0.05)
  grow = theory.evaluate_curve(_noise_spec(k_rule="growing", k=None), seed=0, num_seeds=4,
                               n_test=2000)
  assert grow["k_per_n"] == [32] and grow["noise_floor"] == [pytest.approx(0.2**2 / 32)]
  # The variance term dominates; the linear residual's bias adds under half of it.
  assert grow["noise_floor"][0] <= grow["resmem_risk"][0] < 1.5 * grow["noise_floor"][0]


def test_growing_k_without_noise_falls_as_n_to_the_minus_4_over_m_plus_2():
  """The k neighbours' offsets cancel to first order: risk ~ r_k^2 / k = n^{-4/(m+2)}
  (m = 2: slope -1), not the -2/(m+2) of a worst-case Lipschitz residual."""
  curve = theory.evaluate_curve(
      _noise_spec(noise=0.0, n=(300, 1000, 3000), k_rule="growing", k=None,
                  slope_fit_min_n=300), seed=0, num_seeds=4, n_test=2000)
  assert curve["resmem_slope_theory"] == -1.0 and curve["noise_floor"] is None
  assert curve["resmem_slope_fit"] == pytest.approx(-1.0, abs=0.2)


# ---------------------------------------------------------------------- config


def test_bad_config_raises_naming_the_setting():
  config = theory.get_config(quick=True)
  config.domain = "torus"
  with pytest.raises(ValueError, match="domain"):
    theory.plan(config)
  config = theory.get_config(quick=True)
  config.risk_vs_n.radius = -1.0
  with pytest.raises(ValueError, match="risk_vs_n.radius"):
    theory.plan(config)
  for section in ("risk_vs_n", "noise"):  # L >= ||theta*||: nothing left to memorize
    config = theory.get_config(quick=True)
    config[section].radius = 1.0
    with pytest.raises(ValueError, match=f"{section}.radius must be < 1"):
      theory.plan(config)
  config = theory.get_config(quick=True)
  config.num_seeds = 1
  with pytest.raises(ValueError, match="num_seeds"):
    theory.plan(config)
  for section, name, value, error in [("risk_vs_n", "slope_fit_min_n", None, TypeError),
                                      ("noise", "slope_fit_min_n", 1, ValueError),
                                      ("risk_vs_n", "n", (), ValueError),
                                      ("noise", "noise", float("nan"), ValueError)]:
    config = theory.get_config(quick=True)
    config[section][name] = value
    with pytest.raises(error, match=f"{section}.{name}"):
      theory.plan(config)


def test_empty_grids_of_a_drawn_figure_raise():
  """An empty list for a figure that is drawn fails in check_config, not in the plot
  after results.json is written; a figure that is not drawn may leave its lists empty."""
  config = theory.get_config(quick=True)
  config.figures = ()
  with pytest.raises(ValueError, match="figures must name at least one"):
    theory.plan(config)
  for section, name in (("risk_vs_n", "dims"), ("risk_vs_capacity", "dims"),
                        ("risk_vs_capacity", "radii")):
    config = theory.get_config()
    config[section][name] = ()
    with pytest.raises(ValueError, match=f"{section}.{name} must hold at least one"):
      theory.plan(config)
  config = theory.get_config(quick=True)  # figure 1 only
  config.risk_vs_capacity.dims = config.risk_vs_capacity.radii = ()
  assert {spec.figure for spec in theory.plan(config)} == {"risk_vs_n"}


def test_script_checks_flags_before_writing(tmp_path):
  from experiments import linear_theory  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "never_made"
  with pytest.raises(ValueError, match="num_seeds"):
    linear_theory.main(["--workdir", str(workdir), "--quick", "--seeds", "1"])
  assert not workdir.exists()


def test_plots_say_what_noise_was_used(tmp_path):
  """Figure 1 names its noise (and the sigma^2 term of its theory line); figure 3
  draws without a variance line when the noise is 0."""
  config = theory.get_config()
  config.num_seeds, config.n_test, config.figures = 2, 100, ("risk_vs_n", "noise")
  config.risk_vs_n.dims, config.risk_vs_n.n, config.risk_vs_n.slope_fit_min_n = (2,), (20, 40), 20
  config.noise.d, config.noise.n, config.noise.slope_fit_min_n = 2, (20, 40), 20
  config.risk_vs_n.noise, config.noise.noise = 0.2, 0.0
  results = theory.run(config)
  fig = theory.plot_risk_vs_n(results, str(tmp_path / "n.png"))  # rendered: mathtext parsed
  assert "0.2" in fig._suptitle.get_text() and "noiseless" not in fig._suptitle.get_text()
  labels = fig.axes[0].get_legend_handles_labels()[1]
  assert any("sigma_" in label and "theory" in label for label in labels), labels
  theory.plot_noise(results, str(tmp_path / "noise.png"))  # noise 0: no variance line
  assert os.path.getsize(tmp_path / "noise.png") > 10_000


def test_script_writes_json_and_all_figures(tmp_path, monkeypatch):
  from experiments import linear_theory  # pylint: disable=g-import-not-at-top

  default_config = theory.get_config

  def tiny(quick=False):
    del quick
    c = default_config()
    c.num_seeds, c.n_test = 2, 100
    c.risk_vs_n.dims, c.risk_vs_n.n, c.risk_vs_n.slope_fit_min_n = (2,), (20, 40), 20
    # Shapes shared with the curve above, so little compiles anew.
    c.risk_vs_capacity.dims, c.risk_vs_capacity.n = (2,), 40
    c.risk_vs_capacity.radii = (0.0, 0.5, 1.0)
    c.noise.d, c.noise.n, c.noise.slope_fit_min_n = 2, (20, 40), 20
    return c

  monkeypatch.setattr(theory, "get_config", tiny)
  assert linear_theory.main(["--workdir", str(tmp_path)]) == 0
  results = json.loads((tmp_path / "results.json").read_text())
  figures = [c["figure"] for c in results["curves"]]
  assert figures.count("risk_vs_n") == 1 and figures.count("risk_vs_capacity") == 3
  assert figures.count("noise") == 2
  required = {"domain", "d", "L", "theta_norm", "noise", "k", "n", "base_risk",
              "resmem_risk", "base_risk_theory", "resmem_slope_fit",
              "resmem_slope_theory", "base_risk_std", "resmem_risk_std"}
  for c in results["curves"]:
    assert required <= set(c)
    assert len(c["base_risk"]) == len(c["resmem_risk"]) == len(c["n"])
  growing = [c for c in results["curves"] if c["k_rule"] == "growing"][0]
  # k_n = ceil(n^{2/(m+2)}) with m = 1 on the circle: 20^(2/3) = 7.4, 40^(2/3) = 11.7.
  assert growing["k"] is None and growing["k_per_n"] == [8, 12]
  for name in theory.FIGURES:
    assert os.path.getsize(tmp_path / f"{name}.png") > 10_000


def test_theory_helpers_check_their_inputs():
  """A negative noise counted as noise in the risk and as none in the slope; a typo'd
  k_rule or domain went through as the default; d = 0 divided by zero."""
  bad = [
      (lambda: theory.second_moment("sphere", 0), ValueError, "d must satisfy 2 <= d"),
      (lambda: theory.second_moment("cube", 2.5), TypeError, "d must be an int"),
      (lambda: theory.resmem_slope_theory(domain="sphere", d=1, noise=0.0, k_rule="fixed"),
       ValueError, "2 <= d"),
      (lambda: theory.resmem_slope_theory(domain="sphere", d=3, noise=-0.2, k_rule="fixed"),
       ValueError, "noise must be a finite number >= 0"),
      (lambda: theory.resmem_slope_theory(domain="sphere", d=3, noise=0.0, k_rule="grow"),
       ValueError, "k_rule must be one of"),
      (lambda: theory.resmem_risk_theory(domain="sphere", d=3, radius=0.5, theta_norm=1.0,
                                         noise=-0.2, n=[1000], k_per_n=[1]),
       ValueError, "noise"),
      (lambda: theory.resmem_risk_theory(domain="sphere", d=3, radius=0.5, theta_norm=1.0,
                                         noise=0.1, n=[100.9], k_per_n=[1]),
       TypeError, "n[0] must be an int"),
      (lambda: theory.base_risk_limit(domain="cube", d=4, radius=-1.0, theta_norm=1.0),
       ValueError, "radius"),
      (lambda: theory.growing_k(0, m=2), ValueError, "1 <= n"),
      (lambda: theory.sample_inputs(jax.random.key(0), 4, 3, domain="torus"),
       ValueError, "domain must be one of"),
      (lambda: theory.sample_inputs(jax.random.key(0), -1, 3, domain="cube"),
       ValueError, "0 <= n"),
  ]
  for call, exc, fragment in bad:
    with pytest.raises(exc) as info:
      call()
    assert fragment in str(info.value), str(info.value)


def test_constrained_least_squares_without_data_is_zero():
  """No rows (or no columns): the minimum-norm solution, not an IndexError on s[0]."""
  for shape in ((0, 3), (5, 0)):
    theta = theory.constrained_least_squares(jnp.zeros(shape), jnp.zeros(shape[0]), 1.0)
    assert theta.shape == (shape[1],) and not np.any(theta)


# ------------------------------------------- edges and plumbing (from a mutation audit)


def test_closed_forms_outside_the_figures_settings():
  """Where the figures do not reach: L >= ||theta*|| leaves no base risk (the
  constraint is inactive), the exact ResMem curve exists on the sphere only (None on
  the cube and the Gaussian), and k_n = ceil(n^{2/(m+2)}) is exact at exact powers
  n = c^(m+2) (1024^(2/5) evaluates to 16.000000000000004) and one above them."""
  for radius in (1.0, 1.5, 3.0):
    assert theory.base_risk_limit(domain="sphere", d=4, radius=radius, theta_norm=1.0) == 0.0
  kwargs = dict(d=3, radius=0.5, theta_norm=1.0, noise=0.0, n=[100], k_per_n=[1])
  assert theory.resmem_risk_theory(domain="sphere", **kwargs) is not None
  for domain in ("cube", "gaussian"):
    assert theory.resmem_risk_theory(domain=domain, **kwargs) is None, domain
  for m in (1, 2, 3, 4):
    for c in range(2, 30):
      n = c ** (m + 2)
      assert theory.growing_k(n, m=m) == c * c, (n, m)
      assert theory.growing_k(n + 1, m=m) == c * c + 1, (n, m)


def test_simulation_draws_the_target_and_fresh_test_points_off_the_sphere():
  """||theta*|| = theta_norm on the cube and the Gaussian too: the target's direction is
  drawn on the sphere, whatever the inputs' domain (drawn from the domain itself its
  norm is random, and the base limit s (||theta*|| - L)^2 is off). The test points are
  fresh: none is a training point (a shared key would hand ResMem the answers)."""
  for domain in ("cube", "gaussian"):  # the sphere's target is drawn as its inputs are
    trials = theory.simulate_trials(theory.seed_keys(0, 2, d=3), n_grid=(40,), n_test=30,
                                    d=3, domain=domain, theta_norm=2.0, noise=0.0, radius=0.5)
    np.testing.assert_allclose(np.linalg.norm(trials.theta_star, axis=-1), 2.0, rtol=1e-6,
                               err_msg=domain)
    x_train, x_test = np.asarray(trials.x_train), np.asarray(trials.x_test)
    gaps = np.linalg.norm(x_test[:, :, None] - x_train[:, None], axis=-1)  # (S, T, N)
    assert gaps.min() > 1e-4, (domain, gaps.min())


def test_curve_numbers_match_a_float64_recomputation():
  """evaluate_curve's numbers, recomputed in float64 NumPy from the same trials: the
  base risk of the fit at each n, its population risk s ||theta_hat - theta*||^2,
  ResMem with sigma=None as the plain mean of the k nearest residuals of that fit, the
  slope fitted on n >= slope_fit_min_n and the seeds' std of it (ddof=1); with soft
  weights (sigma given, k > 1) there is no sigma^2 / k noise floor."""
  grid, seeds, n_test, k = (20, 40), 3, 100, 4
  spec = _noise_spec(noise=0.1, n=grid, k=k, slope_fit_min_n=20)
  curve = theory.evaluate_curve(spec, seed=5, num_seeds=seeds, n_test=n_test)
  trials = jax.device_get(theory.simulate_trials(
      theory.seed_keys(5, seeds, d=3), n_grid=grid, n_test=n_test, d=3, domain="sphere",
      theta_norm=1.0, noise=0.1, radius=0.5))
  x, y, x_test, truth, theta_hat, theta_star = (
      np.asarray(a, np.float64) for a in (trials.x_train, trials.y_train, trials.x_test,
                                          trials.truth_test, trials.theta_hat,
                                          trials.theta_star))
  base, resmem = np.zeros((len(grid), seeds)), np.zeros((len(grid), seeds))
  for g, n in enumerate(grid):
    for s in range(seeds):
      theta = theta_hat[s, g]
      base[g, s] = np.mean(np.square(x_test[s] @ theta - truth[s]))
      dist = np.linalg.norm(x_test[s][:, None, :] - x[s, None, :n], axis=-1)
      nearest = np.argsort(dist, axis=1)[:, :k]
      residual = y[s, :n] - x[s, :n] @ theta
      pred = x_test[s] @ theta + residual[nearest].mean(axis=1)
      resmem[g, s] = np.mean(np.square(pred - truth[s]))
  np.testing.assert_allclose(curve["base_risk_per_seed"], base, rtol=1e-4)
  np.testing.assert_allclose(curve["resmem_risk_per_seed"], resmem, rtol=1e-3)
  population = np.sum(np.square(theta_hat - theta_star[:, None]), axis=-1).mean(axis=0) / 3
  np.testing.assert_allclose(curve["base_risk_population"], population, rtol=1e-5)
  assert curve["slope_fit_n"] == [20, 40]
  log_n = np.log(grid)
  assert curve["resmem_slope_fit"] == pytest.approx(
      np.polyfit(log_n, np.log(resmem.mean(axis=1)), 1)[0], rel=1e-3, abs=1e-4)
  per_seed = [np.polyfit(log_n, np.log(resmem[:, s]), 1)[0] for s in range(seeds)]
  assert curve["resmem_slope_fit_std"] == pytest.approx(np.std(per_seed, ddof=1), rel=1e-2)
  assert curve["noise_floor"] == [pytest.approx(0.1**2 / k)] * len(grid)
  soft = theory.evaluate_curve(spec._replace(sigma=1.0, n=grid[:1], slope_fit_min_n=None),
                               seed=5, num_seeds=seeds, n_test=n_test)
  assert soft["noise_floor"] is None


def test_plan_scales_radii_cuts_grids_and_checks_what_would_fail_mid_run():
  """Radii are fractions of ||theta*|| in every figure; max_n_by_d keeps the n up to and
  including its bound; a sphere of d = 1 (S^0) and a fixed k above the smallest n fail
  in plan, before the script writes anything, not mid-run (d = 1 is fine on the cube)."""
  config = theory.get_config()
  config.theta_norm = 2.0
  config.risk_vs_n.max_n_by_d = ((3, 1000),)
  specs = theory.plan(config)
  assert [s.radius for s in specs if s.figure != "risk_vs_capacity"] == [1.0] * 6
  assert sorted(s.radius for s in specs if s.figure == "risk_vs_capacity") == sorted(
      2.0 * r for r in config.risk_vs_capacity.radii for _ in config.risk_vs_capacity.dims)
  n_by_d = {s.d: s.n for s in specs if s.figure == "risk_vs_n"}
  assert n_by_d[3] == tuple(n for n in config.risk_vs_n.n if n <= 1000) and n_by_d[3][-1] == 1000
  assert n_by_d[2] == tuple(config.risk_vs_n.n)
  for name, value, match in (("dims", (1,), "d must"), ("k", 101, "risk_vs_n.k")):
    config = theory.get_config(quick=True)  # the sphere, n >= 100
    config.risk_vs_n[name] = value
    with pytest.raises(ValueError, match=match):
      theory.plan(config)
  config = theory.get_config(quick=True)
  config.domain, config.risk_vs_n.dims = "cube", (1,)
  assert [s.d for s in theory.plan(config)] == [1]


def test_run_draws_from_the_configured_seed():
  """config.seed picks the draws: run at seed 1 gives evaluate_curve's numbers at seed
  1, which differ from those at seed 0."""
  config = theory.get_config(quick=True)
  config.seed, config.num_seeds, config.n_test = 1, 2, 50
  config.risk_vs_n.dims, config.risk_vs_n.n, config.risk_vs_n.slope_fit_min_n = (2,), (20,), 20
  (curve,) = theory.run(config)["curves"]
  (spec,) = theory.plan(config)
  at = {seed: theory.evaluate_curve(spec, seed=seed, num_seeds=2, n_test=50)
        for seed in (0, 1)}
  assert curve["base_risk_per_seed"] == at[1]["base_risk_per_seed"]
  assert curve["base_risk_per_seed"] != at[0]["base_risk_per_seed"]


def test_script_flags_reach_the_config():
  """Each flag of the script lands in its config field and --quick picks the quick
  config; without flags the config is get_config's."""
  from experiments import linear_theory  # pylint: disable=g-import-not-at-top

  def config_of(*flags):
    return linear_theory.make_config(linear_theory.parse_args(["--workdir", "w", *flags]))

  assert config_of().to_dict() == theory.get_config().to_dict()
  assert config_of("--quick").to_dict() == theory.get_config(quick=True).to_dict()
  config = config_of("--quick", "--seeds", "3", "--n_test", "7", "--domain", "cube",
                     "--theta_norm", "2.5", "--figures", "noise", "risk_vs_n")
  want = theory.get_config(quick=True)
  want.num_seeds, want.n_test, want.domain, want.theta_norm = 3, 7, "cube", 2.5
  want.figures = ("noise", "risk_vs_n")
  assert config.to_dict() == want.to_dict()
