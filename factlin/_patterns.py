"""Layer-name patterns: shell-style globs and compiled regular expressions.

Globs are matched against the whole qualified name with :func:`fnmatch.fnmatchcase` (``'*'``
also crosses dots); regexes must match the whole name (:meth:`re.Pattern.fullmatch`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Optional, Union

from .errors import describe

__all__ = ["NameMatcher", "Pattern", "Patterns", "matches", "pattern_str"]

#: A name pattern: a glob string or a compiled regular expression.
Pattern = Union[str, re.Pattern]
#: One pattern or several.
Patterns = Union[Pattern, Sequence[Pattern]]


class NameMatcher:
    """Glob strings and compiled regexes, matched against whole qualified names."""

    def __init__(self, name: str, value: object) -> None:
        self.name = name
        items = [value] if isinstance(value, (str, re.Pattern)) else value
        if not isinstance(items, (list, tuple)):
            raise TypeError(
                f"{name}={describe(value)}: expected None, a glob string, a compiled regex "
                "(re.compile) or a list of them"
            )
        for item in items:
            if not isinstance(item, (str, re.Pattern)):
                raise TypeError(
                    f"{name}={describe(value)}: every pattern must be a glob string or a "
                    f"compiled regex, got {describe(item)}"
                )
        self.patterns: list[Pattern] = list(items)

    def first_match(self, names: Sequence[str]) -> Optional[Pattern]:
        for pattern in self.patterns:
            if any(matches(pattern, n) for n in names):
                return pattern
        return None


def matches(pattern: Pattern, name: str) -> bool:
    if isinstance(pattern, str):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern.fullmatch(name) is not None


def pattern_str(pattern: Pattern) -> str:
    return repr(pattern) if isinstance(pattern, str) else f"re.compile({pattern.pattern!r})"
