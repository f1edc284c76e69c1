"""Short, readable error text from an exception and its chain of causes.

Why: every cluster error ends the job with one line, so the messages built in
this package quote exceptions squeezed onto one line and name the root cause.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

BAD_KWARG = re.compile(r"unexpected keyword argument '([^']+)'")


def causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its chain of causes/contexts."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def bad_kwarg(exc: BaseException) -> str | None:
    """The unexpected keyword named by a TypeError anywhere in the chain, if any."""
    for e in causes(exc):
        if isinstance(e, TypeError):
            m = BAD_KWARG.search(str(e))
            if m:
                return m.group(1)
    return None


def reason(exc: BaseException) -> str:
    """A short hint from the root cause when it says more than 'timed out'."""
    root = list(causes(exc))[-1]
    text = one_line(root)
    if root is exc or not text or "timed out" in text.lower():
        return ""
    return f" ({type(root).__name__}: {text})"


def one_line(exc: BaseException) -> str:
    """An exception message squeezed onto one line."""
    return " ".join(str(exc).split())[:300]
