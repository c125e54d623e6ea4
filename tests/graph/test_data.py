"""graphpress.data.stdlib_sentences: a deterministic corpus of real sentences whose first part
(the first paragraphs of public callables' docstrings) comes first, so fixed offsets keep
meaning the same sentences when more prose is appended; slices are disjoint and bounded."""

from __future__ import annotations

import inspect

import pytest

from graphpress.data import STDLIB_MODULES, stdlib_sentences
from graphpress.graph.errors import GraphpressError


def test_corpus_is_large_unique_and_well_formed():
    corpus = stdlib_sentences()
    assert len(corpus) > 5000 and len(set(corpus)) == len(corpus)
    assert all(4 <= len(s.split()) <= 60 and s[0].isupper() for s in corpus)


def test_first_paragraph_sentences_come_first():
    import abc

    first = next(member for name, member in sorted(vars(abc).items())
                 if not name.startswith("_") and callable(member) and inspect.getdoc(member))
    paragraph = " ".join(inspect.getdoc(first).split("\n\n")[0].split())
    assert paragraph.startswith(stdlib_sentences(1)[0])
    assert STDLIB_MODULES[0] == "abc"


def test_offsets_give_disjoint_slices_and_bounds_are_checked():
    a, b = stdlib_sentences(100), stdlib_sentences(100, offset=100)
    assert not set(a) & set(b) and stdlib_sentences(200) == a + b
    with pytest.raises(GraphpressError, match="corpus has"):
        stdlib_sentences(10, offset=len(stdlib_sentences()))
