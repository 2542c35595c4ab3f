"""The errors of a run's input: raised where a problem is found, caught at the command lines
(exit status 2, one line) and never retried by Ray."""

from __future__ import annotations


class InputError(Exception):
    """A problem of a run's input (config, data, model, checkpoint): the same every time the run
    starts, so the run stops at once (exit status 2) and is never retried. The message names the
    key or file and the fix. Subclasses: ConfigError, DataFormatError, EncodeError,
    ModelLoadError, BilevelError, CheckpointError."""


class ConfigError(InputError, ValueError):
    """A configuration problem; the message names the key, the value and what is allowed."""
