"""Keep secrets out of the lineage log: redact values whose key looks secret, and URL passwords.

Applied by `Recorder.record` to all data, so free-form metadata (metrics tags, CI context, error
text) never carries a password, token or key even when a plugin puts one there.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

REDACTED = "[REDACTED]"

# Words that make a key secret wherever they appear in it ("db_password", "clientSecret").
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "pass",
        "passphrase",
        "secret",
        "secrets",
        "token",
        "tokens",
        "credential",
        "credentials",
        "creds",
        "apikey",
        "privatekey",
        "authorization",
        "auth",
        "cookie",
        "signature",
        "dsn",
    }
)
# "key" is secret at the end of a name ("api_key", "private_key", "key") unless it names a column.
_KEY_WORDS = frozenset({"key", "keys"})
_NOT_SECRET_KEYS = frozenset({"primary", "foreign", "sort", "partition", "replication", "natural"})
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+(?=@)")
_QUERY_PARAM = re.compile(r"(?P<head>[?&;])(?P<name>[A-Za-z][A-Za-z0-9_.-]*)=[^&;#\s\"']+")


def is_secret_key(name: str) -> bool:
    """True when a key name looks like it holds a secret."""
    words = [word.lower() for word in _WORD.findall(name)]
    if not words:
        return False
    if any(word in _SECRET_WORDS for word in words):
        return True
    joined = "".join(words)
    if any(secret in joined for secret in ("password", "secret", "apikey", "accesskey")):
        return True
    return words[-1] in _KEY_WORDS and (len(words) == 1 or words[-2] not in _NOT_SECRET_KEYS)


def redact_text(text: str) -> str:
    """`text` without URL passwords (`scheme://user:pw@host`) nor secret query parameters.

    A query parameter is secret when its name looks secret (`?motherduck_token=...`,
    `&api_key=...`, `;password=...`).
    """
    if "@" in text:
        text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    if "=" in text:
        text = _QUERY_PARAM.sub(_redact_param, text)
    return text


def _redact_param(match: re.Match[str]) -> str:
    if not is_secret_key(match.group("name")):
        return match.group(0)
    return f"{match.group('head')}{match.group('name')}={REDACTED}"


def redact(value: Any, *, keep: Collection[str] = ()) -> Any:
    """A copy of `value` with secret-looking keys' values and URL passwords redacted.

    `keep` names top-level keys whose subtrees hold names, not values (a stream's schema maps
    column names to types, and a column called `password` is no secret); URL passwords are
    still removed there.
    """
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = str(key)
            if name in keep:
                out[name] = _redact_urls(item)
            elif is_secret_key(name) and item is not None and not isinstance(item, bool):
                out[name] = REDACTED
            else:
                out[name] = redact(item)
        return out
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def _redact_urls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _redact_urls(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_urls(item) for item in value]
    return redact_text(value) if isinstance(value, str) else value
