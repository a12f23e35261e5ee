"""``dblend coefficients``: show the blend coefficients of a preference (paper sections 2.4-2.7)."""

from __future__ import annotations

import argparse

from diffusion_blend.preference import Preference


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "coefficients",
        help="print the blend coefficients c_0 (base) and c_i (experts) of a preference",
        description="c_i = kl_scale * w_i, c_0 = 1 - kl_scale * sum(w). Members with c = 0 are never evaluated.",
    )
    parser.add_argument("--weights", required=True, help="reward weights, e.g. aesthetic=0.3,align=0.7")
    parser.add_argument("--kl-scale", type=float, default=1.0, help="KL scale lambda >= 0 (default 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    coefficients = Preference.parse(args.weights, args.kl_scale).coefficients()
    for member, coef in coefficients.items():
        label = "base" if member is None else member
        note = "" if coef != 0 else "  (not evaluated)"
        print(f"{label:>16s}  {coef:+.6g}{note}")
    if coefficients.is_convex:
        print("DB-MPA-LS (method 'ls'): valid, one network evaluation per step")
    else:
        print("DB-MPA-LS (method 'ls'): not valid (a negative coefficient); use DB-MPA (method 'mpa')")
    return 0
