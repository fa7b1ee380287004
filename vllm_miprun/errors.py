"""The one error base class. Every entry point maps ``MiprunError`` to one line and exit 2."""

from __future__ import annotations


class MiprunError(ValueError):
    """Bad input: the message says what was expected, what was given and what to do."""


class OptionError(MiprunError):
    """A user option is invalid."""


class ModelFolderError(OptionError):
    """The model folder is missing something the project needs (config, safetensors, tokenizer)."""


class CacheError(MiprunError):
    """A score cache or one of its sidecars is missing, corrupt or belongs to other weights."""


class CorpusError(MiprunError):
    """Calibration text is missing, unreadable or too short."""


class EvalError(MiprunError):
    """An evaluation request is invalid."""
