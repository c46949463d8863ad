"""Exceptions raised by freecure. Every message says what was wrong and what to do."""


class FreeCureError(Exception):
    """Base class of freecure's own errors."""


class InputError(FreeCureError, ValueError):
    """A user-supplied value (file, prompt, option) cannot be used as given."""


class WeightsNotFoundError(FreeCureError, FileNotFoundError):
    """A model checkpoint could not be found or does not match the model."""
