"""The exceptions mmeff raises: one class per kind of bad input, each with a message that names the problem."""

from __future__ import annotations


class MmeffError(ValueError):
    """Base class of every error mmeff raises on bad input."""


class UnknownPresetError(MmeffError):
    """A preset or method name that is not registered; the message lists the valid ones."""


class UnsupportedModelError(MmeffError):
    """A model class no adapter supports, or a model setting a method cannot run with."""


class ImageTokenMismatchError(MmeffError):
    """The number of image placeholder tokens in the prompt does not match the images given."""


class StageConflictError(MmeffError):
    """Methods that cannot be combined (two owners of one exclusive insertion point, or a declared conflict)."""


class ConfigError(MmeffError):
    """A method config with an invalid value."""
