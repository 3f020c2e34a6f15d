"""Redis URLs as the app and its workers name them, and as messages may show them (no secrets)."""

from __future__ import annotations

import re


def safe_url(url: str) -> str:
    """``url`` with any password replaced, for messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
