"""bench/mutations.py breaks thaw on purpose, one exact piece of text at a time, and runs the tests
that must catch each break. It runs outside CI (minutes), so a refactor that moves a piece of
text would make its break silently "stale": this keeps every break aimed at code that exists."""

from __future__ import annotations

import importlib
import os
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
