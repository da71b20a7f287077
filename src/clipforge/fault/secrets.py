"""Keep credentials out of logged configs and checkpoints.

No paper. The resolved config is logged (W&B, CSV hparams) and stored in every checkpoint; an
``${oc.env:WANDB_API_KEY}`` interpolation or a ``logger.api_key=...`` override would otherwise copy a
secret into both. Two rules, applied recursively: a string under a key that names a credential is
masked, and any string equal to the value of a credential environment variable is masked wherever it
sits. Non-string values are left alone, so model fields such as an integer ``eot_token`` survive.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# Words that make a key a credential wherever they appear in it ("db_password", "aws_secret_access_key").
SECRET_WORDS = frozenset(
    [
        "password",
        "passwd",
        "secret",
        "credential",
        "credentials",
        "apikey",
        "accesskey",
        "privatekey",
        "bearer",
    ]
)
KEY_QUALIFIERS = frozenset(["api", "access", "private", "secret", "signing"])  # "<qualifier>_key"
VOCAB_TOKENS = frozenset(
    ["pad", "eos", "bos", "unk", "sot", "eot", "mask", "cls", "sep", "start", "end"]
)  # "eot_token" is vocabulary
SECRET_ENV = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """``api_key``, ``WANDB_API_KEY``, ``hf_token``, ``aws_secret_access_key``, ``db-password``: True;
    ``eot_token``, ``tokens``, ``key``, ``monitor``: False."""
    words = [w for w in re.split(r"[_\-.\s]+", str(key).lower()) if w]
    if not words or any(w in SECRET_WORDS for w in words):
        return bool(words)
    if words[-1] == "key" and len(words) > 1 and words[-2] in KEY_QUALIFIERS:
        return True
    return words[-1] == "token" and (len(words) == 1 or words[-2] not in VOCAB_TOKENS)


def _secret_env_values() -> set[str]:
    # Short values ("1", "true") are flags, not secrets, and would mask innocent config values.
    return {v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 8}


def scrub_secrets(obj: Any, secret_values: set[str] | None = None) -> Any:
    """A copy of ``obj`` (nested dicts/lists of primitives) with credentials replaced by ``"***"``."""
    values = _secret_env_values() if secret_values is None else secret_values

    def scrub(x: Any, key: str | None) -> Any:
        if isinstance(x, dict):
            return {k: scrub(v, str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(scrub(v, key) for v in x)
        if isinstance(x, str) and x and ((key is not None and is_secret_key(key)) or x in values):
            return MASK
        return x

    return scrub(obj, None)
