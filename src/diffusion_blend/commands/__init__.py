"""Sub-commands of ``dblend``; each module exposes ``register(subparsers)``."""

TILT_HELP = ("SMC's proposal tilt: 'auto' (default: learned step by step from the run's own weights, never below the "
             "blend; docs/method.md) or a number t > 0: the proposal blends at KL scale t x lambda, the target keeps "
             "lambda")


def proposal_tilt(text: str) -> float | str:
    """``--smc-proposal-tilt``: ``auto`` or a number (checked by ``SMCOptions`` where the options are built)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None
