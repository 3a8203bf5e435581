"""Go's path/filepath Match and Glob, which containerd uses for annotation allow-lists (Match) and
for `imports` entries (Glob). Their rules differ from Python's fnmatch/glob: `*` and `?` never
match `/` (so `*` alone does not pass `thaw.dev/snapshot`), a class is `[^...]` (not `[!...]`) and
may match `/`, a malformed pattern matches nothing, and Glob does not hide dot files."""

from __future__ import annotations

import os
from typing import Any

# Tokens: these two markers, _Class, or a literal character (a str: never `is` a marker).
_STAR, _ANY = object(), object()


class _Class:
    __slots__ = ("negated", "ranges")

    def __init__(self, negated: bool, ranges: list[tuple[str, str]]):
        self.negated, self.ranges = negated, ranges

    def matches(self, c: str) -> bool:
        return any(lo <= c <= hi for lo, hi in self.ranges) != self.negated


def _escaped(p: str, i: int) -> tuple[str, int] | None:
    """A class member at p[i] (`\\` escapes); None where Go reports ErrBadPattern."""
    if i >= len(p) or p[i] in "-]":
        return None
    if p[i] == "\\":
        i += 1
        if i >= len(p):
            return None
    if i + 1 >= len(p):        # the class is never closed
        return None
    return p[i], i + 1


def _tokens(pattern: str) -> list[Any] | None:
    """The pattern as a list of `*`, `?`, _Class and literal characters; None if malformed."""
    out: list[Any] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if not out or out[-1] is not _STAR:
                out.append(_STAR)
            i += 1
        elif c == "?":
            out.append(_ANY)
            i += 1
        elif c == "\\":
            if i + 1 >= len(pattern):
                return None
            out.append(pattern[i + 1])
            i += 2
        elif c == "[":
            i += 1
            negated = i < len(pattern) and pattern[i] == "^"
            i += negated
            ranges: list[tuple[str, str]] = []
            while not (ranges and i < len(pattern) and pattern[i] == "]"):
                lo = _escaped(pattern, i)
                if lo is None:
                    return None
                lo_c, i = lo
                hi_c = lo_c
                if pattern[i] == "-":
                    hi = _escaped(pattern, i + 1)
                    if hi is None:
                        return None
                    hi_c, i = hi
                ranges.append((lo_c, hi_c))
            out.append(_Class(negated, ranges))
            i += 1
        else:
            out.append(c)
            i += 1
    return out


def match(pattern: str, name: str) -> bool:
    """filepath.Match(pattern, name), a malformed pattern being no match."""
    tokens = _tokens(pattern)
    if tokens is None:
        return False
    reach = {0}                 # positions in name reachable after the tokens so far
    for tok in tokens:
        nxt = set()
        for p in reach:
            if tok is _STAR:
                nxt.add(p)
                while p < len(name) and name[p] != "/":
                    p += 1
                    nxt.add(p)
            elif p < len(name) and (name[p] != "/" if tok is _ANY else
                                    tok.matches(name[p]) if isinstance(tok, _Class) else name[p] == tok):
                nxt.add(p + 1)
        if not nxt:
            return False
        reach = nxt
    return len(name) in reach


def has_meta(path: str) -> bool:
    return any(c in path for c in "*?[\\")


def glob(pattern: str) -> list[str]:
    """filepath.Glob(pattern): existing paths matching it, each directory's matches sorted."""
    if _tokens(pattern) is None:
        return []
    if not has_meta(pattern):
        return [pattern] if os.path.lexists(pattern) else []
    d, name = os.path.split(pattern)
    if d == pattern:
        return []
    dirs = glob(d) if has_meta(d) else [d]
    out = []
    for parent in dirs:
        try:
            entries = sorted(os.listdir(parent or ".")) if os.path.isdir(parent or ".") else []
        except OSError:
            continue
        out += [os.path.join(parent, e) for e in entries if match(name, e)]
    return out
