"""Secrets never reach a saved config, a log or a W&B run: which config keys are secrets, the
scrubbing of a config before it is saved or sent, and whether a W&B key is configured (from the
environment or ``wandb login``; never from a config file)."""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

# Words that make a config key name a secret. Key names are split into words (at non-letters
# and camelCase humps), so "eval.max_new_tokens" or "tokenizer" are kept while "hf_token",
# "wandb.api_key", "apiKey" or "aws_secret_access_key" are dropped.
_SECRET_WORDS = {"token", "password", "passwd", "secret", "secrets", "credential", "credentials",
                 "apikey", "auth"}
_SECRET_PAIRS = {("api", "key"), ("private", "key"), ("access", "key")}


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def looks_secret(name: str) -> bool:
    """True when a key name looks like it holds a secret (api_key, token, password, ...)."""
    words = _words(name)
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def _secret_env_values(environ: Mapping[str, str]) -> set[str]:
    # Values of environment variables that look secret (WANDB_API_KEY, HF_TOKEN, ...): a config
    # value equal to one of them is dropped too, whatever its key is called. Short values
    # ("1", "true") are not secrets and would drop unrelated entries.
    return {v for k, v in environ.items() if looks_secret(k) and len(v) >= 8}


def scrub(config: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """A copy of ``config`` without secrets, for W&B.

    Drops every entry (at any depth of nested dicts) whose key name looks like a secret
    (``looks_secret``) and every string value that contains the value of a secret-looking
    environment variable (``WANDB_API_KEY``, ``HF_TOKEN``, ...; ``environ`` defaults to
    ``os.environ``). The config passed to W&B is the resolved config, which holds no keys:
    this is defence in depth.
    """
    secrets = _secret_env_values(os.environ if environ is None else environ)

    def keep(value: Any) -> bool:
        return not (isinstance(value, str) and any(s in value for s in secrets))

    def walk(node: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if looks_secret(str(key)) or not keep(value):
                continue
            if isinstance(value, Mapping):
                value = walk(value)
            elif isinstance(value, (list, tuple)):
                value = [walk(v) if isinstance(v, Mapping) else v for v in value if keep(v)]
            out[key] = value
        return out

    return walk(config)


def has_api_key(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when W&B could authenticate without a prompt.

    Looks at ``WANDB_API_KEY`` and ``WANDB_IDENTITY_TOKEN_FILE`` in ``environ`` (default
    ``os.environ``), then asks wandb itself (``wandb.login(prompt=False, verify=False)``: the
    ``.netrc`` entry that ``wandb login`` writes for the configured server, no prompt, and no
    check against the server).
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        import wandb

        return bool(wandb.login(prompt=False, verify=False))
    except Exception as exc:  # unreadable netrc or a key in a bad format: W&B would fail too
        log.warning("W&B: cannot read a W&B API key (%s: %s)", type(exc).__name__, exc)
        return False
