"""Keeping secrets out of logs and messages: ``redact_url`` for URLs and DSNs, ``redact`` for text.

Every message, log event or exception that names a connection target passes it through
``redact_url`` first; text that may echo a secret from elsewhere (a driver's error message, a
config dump) goes through ``redact`` with the secrets the caller knows, which ``url_secrets`` can
extract from a URL. All three are pure functions.
Redaction errs on the side of hiding too much: an ambiguous URL loses some of its host part rather
than risk showing part of a password, and callers that know the secret also pass it to ``redact``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, unquote

MASK = "***"

# Query-string (``?password=x&...``) and libpq key/value (``password='x y' host=h``) forms. The
# value ends at "&", whitespace or ";" unless it is quoted.
_PARAM_RE = re.compile(
    r"""(?ix)
    (?P<name>
        (?<![\w.\-])[\w.\-]*(?:password|passwd|pwd|secret|token)
        | (?<![\w.\-])(?:pass|auth)
    )
    (?P<eq>\s*=\s*)
    (?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^&\s;]+)
    """
)
# A URL runs to the next whitespace: a password with an unencoded space is not a valid URL.
_URL_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>\S*)")


def _userinfo_split(rest: str) -> tuple[str, str, str] | None:
    """``rest`` (a URL after ``scheme://``) as (user, password, remainder from "@"), if any."""
    # In a well-formed URL the userinfo ends at the last "@" before the first "/", "?" or "#".
    # Passwords are often random strings holding one of those, unencoded; when that hides the
    # "@", the last "@" of the whole URL is taken instead, which may mask some host too.
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    at = authority.rfind("@")
    if at < 0:
        at = rest.rfind("@")
    if at < 0:
        return None
    user, colon, password = rest[:at].partition(":")
    if not colon:
        return None
    return user, password, rest[at:]


def _redact_userinfo(match: re.Match[str]) -> str:
    parts = _userinfo_split(match.group("rest"))
    if parts is None:
        return match.group(0)
    user, _password, tail = parts
    return f"{match.group('head')}{user}:{MASK}{tail}"


def url_secrets(url: str) -> list[str]:
    """The password of every URL in ``url``, decoded and not, and its pieces, for ``redact``.

    URL parsers that trip over an unencoded password quote the piece they choked on in their
    error message (e.g. "Port could not be cast to integer value as 'pw-tail'"), so the pieces
    between "/", "?", "#", "@" and ":" count as secrets too.
    """
    found: list[str] = []
    for match in _URL_RE.finditer(url):
        parts = _userinfo_split(match.group("rest"))
        if parts is None or not parts[1]:
            continue
        password = parts[1]
        for text in (password, unquote(password)):
            found.append(text)
            found.extend(piece for piece in re.split(r"[/?#@:]", text) if piece)
    return list(dict.fromkeys(found))


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``; the user, host and the rest are kept.

    Handles ``scheme://user:password@host/...``, ``scheme://:password@host``, password query
    parameters (``?password=...``) and libpq-style ``key=value`` DSNs, also when the URL is
    embedded in a longer text. A URL without a password comes back unchanged.
    """
    text = _URL_RE.sub(_redact_userinfo, url)
    return _PARAM_RE.sub(lambda m: m.group("name") + m.group("eq") + MASK, text)


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every literal occurrence of each non-empty secret replaced by ``***``.

    The percent-encoded forms of each secret are replaced too, because secrets often reach
    messages inside URLs.
    """
    variants: set[str] = set()
    for secret in secrets:
        if secret:
            variants.update({secret, quote(secret, safe=""), quote_plus(secret, safe="")})
    # Longest first, so a secret that contains another is not left half-masked.
    for variant in sorted(variants, key=len, reverse=True):
        text = text.replace(variant, MASK)
    return text
