"""Which settings are secrets, and how to print a value that may hold one.

Used by the settings' error messages and reprs (``config.py``, the sidecar
section) and by the CLI: a secret's value is never printed.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

SECRET_WORDS = ("password", "secret", "token", "credential", "private", "basic_auth", "basic.auth")
"""A setting or librdkafka property whose name contains one of these holds a secret."""
SECRET_KEYS = frozenset({"ssl.key.pem", "ssl_key", "sasl.oauthbearer.config"})
"""Secrets whose names say nothing of it (a private key, a config string with a secret)."""
HIDDEN = "<secret, not shown>"


def is_secret_key(name: str) -> bool:
    """Whether the value of setting or property ``name`` must never be printed."""
    lowered = name.lower()
    return lowered in SECRET_KEYS or any(word in lowered for word in SECRET_WORDS)


def redact(value: object) -> object:
    """``value`` safe to print: secret entries of mappings hidden, URL passwords masked.

    Text that looks like JSON and names a secret (a whole section given in one
    ``DEDUPE_*`` variable) is hidden whole: it cannot be parsed to hide less.
    """
    if isinstance(value, dict):
        return {k: HIDDEN if is_secret_key(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        if value.lstrip().startswith(("{", "[")) and any(
            word in value.lower() for word in SECRET_WORDS
        ):
            return HIDDEN
        return _mask_url_password(value)
    return value


_QUERY_SECRET_WORDS = ("key", "sig", "auth")
"""Query parameters named like these hold a secret too (``api_key``, ``sig``, ``auth``)."""


def _mask_url_password(text: str) -> str:
    """A URL's password (or a user alone: a token given as the user name) and the values
    of its secret-looking query parameters masked; ``user@host`` without a scheme too."""
    if "://" not in text:
        if "@" in text and " " not in text.strip():  # "token@host:8081": a URL without scheme
            return "***@" + text.rsplit("@", 1)[1]
        return text
    if "@" not in text and "?" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    elif parts.username is not None:
        netloc = "***@" + parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=netloc)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        masked = [(k, "***" if _secret_param(k) else v) for k, v in pairs]
        if masked != pairs:
            parts = parts._replace(query=urlencode(masked, safe="*"))
    return parts.geturl()


def _secret_param(name: str) -> bool:
    lowered = name.lower()
    return is_secret_key(lowered) or any(word in lowered for word in _QUERY_SECRET_WORDS)
