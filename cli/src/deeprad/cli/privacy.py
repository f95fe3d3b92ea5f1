"""`deeprad privacy epsilon`: what a DP-SGD configuration costs, or the noise for a budget;
`deeprad privacy ledger` (privacy_ledger.py): what a privacy ledger holds."""

from __future__ import annotations

import argparse
import json

from deeprad.cli import privacy_ledger
from deeprad.core.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `privacy epsilon` to the `deeprad` command."""
    privacy = subparsers.add_parser("privacy", help="differential-privacy accounting")
    sub = privacy.add_subparsers(dest="privacy_command", required=True)
    eps = sub.add_parser(
        "epsilon", help="ε of a DP-SGD configuration, or the noise multiplier for a target ε",
        description="Compose `steps` Poisson-sampled Gaussian mechanisms with dp-accounting and "
                    "print ε at δ exactly as the accountant computes it; with --target-epsilon, "
                    "print the smallest noise multiplier that stays within it.")
    eps.add_argument("--noise-multiplier", type=float, metavar="Z",
                     help="Gaussian noise std / clipping norm")
    eps.add_argument("--target-epsilon", type=float, metavar="E",
                     help="find the noise multiplier for this ε instead")
    eps.add_argument("--sample-rate", type=float, required=True, metavar="Q",
                     help="Poisson sampling rate: expected batch size / records")
    eps.add_argument("--steps", type=int, required=True, metavar="T",
                     help="DP-SGD steps: epochs x rounds / Q for the whole study")
    eps.add_argument("--delta", type=float, required=True, metavar="D",
                     help="δ, below 1 / records")
    eps.add_argument("--accountant", choices=["rdp", "pld"], default="rdp",
                     help="Rényi DP (default) or privacy-loss distributions (tighter, slower)")
    eps.add_argument("--json", action="store_true", help="print one JSON object")
    eps.set_defaults(func=cmd_epsilon)
    privacy_ledger.register(sub)


def cmd_epsilon(args: argparse.Namespace) -> int:
    """Print ε (or the noise multiplier for --target-epsilon)."""
    from deeprad.core.privacy import epsilon, noise_for_target_epsilon

    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise ConfigError("give exactly one of --noise-multiplier (to compute ε) and "
                          "--target-epsilon (to compute the noise multiplier)")
    out: dict[str, object] = {"accountant": args.accountant, "sample_rate": args.sample_rate,
                              "steps": args.steps, "delta": args.delta}
    if args.noise_multiplier is not None:
        value = epsilon(args.noise_multiplier, args.sample_rate, args.steps, args.delta,
                        args.accountant)
        out = {**out, "noise_multiplier": args.noise_multiplier, "epsilon": value}
        text = (f"epsilon = {value!r}  ({args.accountant}, delta {args.delta!r}, noise "
                f"multiplier {args.noise_multiplier!r}, sample rate {args.sample_rate!r}, "
                f"{args.steps} steps)")
    else:
        z = noise_for_target_epsilon(args.target_epsilon, args.sample_rate, args.steps,
                                     args.delta, args.accountant)
        value = epsilon(z, args.sample_rate, args.steps, args.delta, args.accountant)
        out = {**out, "target_epsilon": args.target_epsilon, "noise_multiplier": z,
               "epsilon": value}
        text = (f"noise multiplier = {z!r}  gives epsilon = {value!r} <= target "
                f"{args.target_epsilon!r}  ({args.accountant}, delta {args.delta!r}, sample "
                f"rate {args.sample_rate!r}, {args.steps} steps)")
    print(json.dumps(out) if args.json else text)
    return 0
