"""Every mutant of tests/mutation_check.py names a snippet found exactly once in its file (a
snippet duplicated by a later change would stop the mutation run)."""

from pathlib import Path

from tests.mutation_check import MUTANTS, ROOT


def test_every_mutant_snippet_occurs_once():
    bad = [(i, name, (ROOT / path).read_text().count(old))
           for i, (name, path, old, _, _) in enumerate(MUTANTS)
           if (ROOT / path).read_text().count(old) != 1]
    assert not bad, bad
    assert all(Path(ROOT / t).is_file() for *_, tests in MUTANTS for t in tests)
