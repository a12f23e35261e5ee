"""Errors that mean "bad input": the CLI prints them as one line and exits with status 2."""


class DiffusionBlendError(ValueError):
    """Invalid user input (weights, files, adapters, shapes, values)."""


class AdapterMismatchError(DiffusionBlendError):
    """An adapter does not fit the base model it is being loaded into."""


class RewardError(DiffusionBlendError):
    """A reward is unknown, misconfigured, or returned NaN/infinite values."""
