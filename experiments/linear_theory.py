r"""ResMem on the stylized linear regression: risk curves against n, L and noise.

Draws the three figures of `resmem_jax.theory` (see its docstring for the maths) and
writes them with the numbers to --workdir:

  results.json            {"config", "curves": [...], "seconds", "backend", "jax", "hardware",
                          "provenance"}
  risk_vs_n.png           figure 1: base and ResMem risk against n, d in {2, 3, 4, 8}
  risk_vs_capacity.png    figure 2: risk against the base model's norm bound L
  noise.png               figure 3: noisy labels, k = 1 against k growing with n

Usage:
  python experiments/linear_theory.py --workdir runs/theory           # all three figures
  python experiments/linear_theory.py --workdir runs/theory_quick --quick  # figure 1, small

Flags override the config: --seeds, --n_test, --domain, --theta_norm, --figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tqdm import tqdm

from resmem_jax import analysis
from resmem_jax import theory


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="where results.json and PNGs go")
  parser.add_argument("--quick", action="store_true",
                      help="figure 1 only, d in {2, 3, 4}, n up to 1e4 (20-90 s on 2 CPU cores)")
  parser.add_argument("--seeds", type=int, default=None, help="number of seeds")
  parser.add_argument("--n_test", type=int, default=None, help="test points per seed")
  parser.add_argument("--domain", choices=theory.DOMAINS, default=None)
  parser.add_argument("--theta_norm", type=float, default=None, help="||theta*||")
  parser.add_argument("--figures", nargs="+", choices=theory.FIGURES, default=None)
  return parser.parse_args(argv)


def make_config(args: argparse.Namespace):
  config = theory.get_config(quick=args.quick)
  for flag, field in (("seeds", "num_seeds"), ("n_test", "n_test"), ("domain", "domain"),
                      ("theta_norm", "theta_norm")):
    if getattr(args, flag) is not None:
      config[field] = getattr(args, flag)
  if args.figures is not None:
    config.figures = tuple(args.figures)
  return config


def main(argv=None) -> int:
  args = parse_args(argv)
  config = make_config(args)
  theory.check_config(config)  # a bad flag fails before anything is written
  os.makedirs(args.workdir, exist_ok=True)
  start = time.perf_counter()
  with tqdm(total=theory.count_points(config), unit="pt") as bar:
    def on_point(spec, n):
      bar.set_postfix_str(f"{spec.figure} d={spec.d} L={spec.radius:g} n={n}")
      bar.update(1)
    results = theory.run(config, on_point=on_point)
  analysis.write_json(os.path.join(args.workdir, "results.json"), results)
  for name in config.figures:
    theory.PLOTS[name](results, os.path.join(args.workdir, f"{name}.png"))
  for c in results["curves"]:
    if c["resmem_slope_fit"] is None:
      continue
    last = len(c["n"]) - 1
    print(f"{c['figure']:>9} d={c['d']} k={c['k'] or 'growing'} noise={c['noise']:g}: "
          f"ResMem slope {theory.slope_text(c)} (n >= {c['slope_fit_n'][0]}); "
          f"base risk at n={c['n'][last]}: {c['base_risk'][last]:.4g} "
          f"(limit {c['base_risk_theory']:.4g})")
  print(f"wrote {args.workdir} in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
