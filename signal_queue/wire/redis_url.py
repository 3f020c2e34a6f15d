"""Redis URLs as messages may show them: every password masked.

Both sides show the URL they use (logs, errors, the CLI and its ``--json``), so
one function masks it, for every scheme and also for URLs that do not parse.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

#: What a password is shown as.
MASK = "***"


def safe_url(url: str) -> str:
    """``url`` as every message, log line and CLI output shows it: passwords replaced by ``***``.

    Masks the userinfo's password (``redis://user:***@host``; a userinfo without ``:``
    is masked whole, as some clients read it as a password) and the value of any query
    parameter whose name contains ``password`` (``?password=***``, ``?ssl_password=***``),
    for every scheme and also for URLs that urllib or redis-py cannot parse: the userinfo
    is taken to end at the last ``@``, so a password holding an unencoded ``/``, ``?``,
    ``#`` or ``@`` is masked whole. When in doubt it masks more (a query holding an ``@``
    is shown from the host on as userinfo), never less.
    """
    return _mask_url(url)[0]


def url_secrets(url: str) -> list[str]:
    """The secrets :func:`safe_url` masks in ``url`` (empty when it shows ``url`` unchanged)."""
    return _mask_url(url)[1]


def hide_secrets(text: str, url: str) -> str:
    """``text``, a message about ``url`` (a redis-py or urllib error), with ``url``'s secrets masked.

    Such messages may quote part of the URL: redis-py's "Port could not be cast to integer
    value as '...'" quotes what follows the first ``:`` of an unparsable userinfo, the
    start of a password that holds a ``/``. So each secret, decoded or not, and each of its
    pieces between URL delimiters (3 characters or more) is replaced.
    """
    pieces: set[str] = set()
    for secret in url_secrets(url):
        for form in (secret, unquote_plus(secret)):
            pieces.add(form)
            pieces.update(p for p in re.split(r"[/?#@:&;=]", form) if len(p) >= 3)
    for piece in sorted(pieces, key=len, reverse=True):
        if piece:
            text = text.replace(piece, MASK)
    return text


def _mask_url(url: str) -> tuple[str, list[str]]:
    secrets: list[str] = []
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, tail = rest.rpartition("@")
    if at and userinfo:
        user, colon, password = userinfo.partition(":")
        if colon and password:
            secrets.append(password)
            userinfo = f"{user}:{MASK}"
        elif not colon:
            secrets.append(user)
            userinfo = MASK
        head = f"{userinfo}@"
    else:
        head, tail = "", rest
    path, question, query = tail.partition("?")
    if question:
        shown: list[str] = []
        in_secret = False
        for part in query.split("&"):
            name, equals, value = part.partition("=")
            if equals and "password" in unquote_plus(name).lower():
                in_secret = True
                secrets.append(value)
                shown.append(f"{name}={MASK}")
            elif in_secret and not equals:
                secrets.append(part)  # an unencoded "&" in the password: redis-py reads less, we hide all
            else:
                in_secret = False
                shown.append(part)
        tail = f"{path}?{'&'.join(shown)}"
    return f"{scheme}{sep}{head}{tail}", [s for s in secrets if s]
