"""The error every model setting check raises."""


class ModelConfigError(ValueError):
    """A model setting that cannot work (message names the key, value and what is allowed)."""
