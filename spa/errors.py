"""Exceptions the ``spa`` command turns into one line and exit code 2 (bad input).

They live here, free of torch and transformers, so that the command can catch them without importing
either: a stage that is already up to date then answers in about a second instead of seven (bench P5).
The modules that raise them re-export them under their old names.
"""

from __future__ import annotations


class SequenceTooLongError(ValueError):
    """A prompt (or prompt + response) does not fit the configured context length."""


class ModelLoadError(ValueError):
    """A model directory is missing, incomplete or not loadable safely."""


class RenderingError(ValueError):
    """The tokenizer cannot render conversations as this pipeline needs."""


class BackendUnavailable(RuntimeError):
    """The requested sampling backend cannot run here; the message says how to get it."""
