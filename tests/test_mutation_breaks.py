"""bench/mutations.py breaks thaw on purpose, one exact piece of text at a time, and runs the tests
that must catch each break. It runs outside CI (minutes), so a refactor that moves a piece of
text would make its break silently "stale", and so would a renamed test: this keeps every break
aimed at code and at tests that exist."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import mutations  # noqa: E402


@pytest.mark.parametrize("brk", mutations.BREAKS, ids=[b[0] for b in mutations.BREAKS])
def test_each_break_names_text_found_once_and_tests_that_exist(brk: tuple[str, str, str, str, list[str]]) -> None:
    name, module, old, new, tests = brk
    path = importlib.import_module(module).__file__
    assert path is not None
    with open(path) as f:
        source = f.read()
    assert source.count(old) == 1, f"{name}: its text is found {source.count(old)} times in {path}"
    assert old != new
    for t in tests:
        if t.startswith("tests/"):
            assert os.path.exists(os.path.join(ROOT, t.split("::")[0])), f"{name}: {t} does not exist"


def _selects(expr: str, nodeid: str) -> bool:
    """pytest's -k, for the expressions the breaks use: words (a case-insensitive substring of
    the test's file, name or parameters) joined by and / or / not."""
    name = nodeid.lower()
    py = re.sub(r"[\w.\[\]-]+", lambda m: m[0] if m[0] in ("and", "or", "not") else repr(m[0].lower() in name), expr)
    return bool(eval(py))   # built above from True, False and the three operators only


@pytest.fixture(scope="module")
def collected() -> list[str]:
    files = sorted({t.split("::")[0] for b in mutations.BREAKS for t in b[4] if t.startswith("tests/")})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert ids, out.stdout[-2000:] + out.stderr[-2000:]
    return ids


@pytest.mark.parametrize("brk", mutations.BREAKS, ids=[b[0] for b in mutations.BREAKS])
def test_each_break_selects_a_test(brk: tuple[str, str, str, str, list[str]], collected: list[str]) -> None:
    """A renamed test would leave its break selecting nothing (pytest exits 5: a stale break,
    reported only outside CI)."""
    name, _module, _old, _new, args = brk
    files = [a.split("::")[0] for a in args if a.startswith("tests/")]
    expr = args[args.index("-k") + 1] if "-k" in args else None
    chosen = [i for i in collected if i.split("::")[0] in files and (expr is None or _selects(expr, i))]
    assert chosen, f"{name}: -k {expr!r} selects no test in {files}"
