"""Function words inside a response (3DS spec item 5).

Tokens that fall inside function words are dropped from the weighted losses, so the difficulty
signal comes from content words. Which words count depends on what is installed:

- `pos`: words tagged PART, DET, PUNCT, CCONJ, ADP, SCONJ or INTJ by a trained spaCy pipeline
  (the paper used `zh_core_web_sm`). For Chinese without one, jieba.posseg tags mapped to the same
  classes; for English without one this is an error (there is no honest substitute).
- `lexical`: spaCy's blank pipeline for the language; stop words and punctuation.
- `punct`: punctuation only (spaCy's blank pipeline): on English byte-level BPE, the nearest to
  what the authors' token-string match drops in effect (docs/SPEC-3DS.md).
- `none`: no filter.
- `auto`: `pos` where a trained pipeline for the language is installed, else `lexical`.

Model-tokenizer tokens are aligned to words by character offsets, so any tokenizer works.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np

from threeds.errors import ThreedsError, first_line

Span = tuple[int, int]
SpansFn = Callable[[list[str]], list[list[Span]]]

FUNCTION_POS = frozenset({"PART", "DET", "PUNCT", "CCONJ", "ADP", "SCONJ", "INTJ"})
MODES = ("auto", "pos", "lexical", "punct", "none")
LANGS = ("en", "zh")
TRAINED_PIPELINES = {
    "en": ("en_core_web_sm", "en_core_web_md", "en_core_web_lg", "en_core_web_trf"),
    "zh": ("zh_core_web_sm", "zh_core_web_md", "zh_core_web_lg", "zh_core_web_trf"),
}
ZH_CJK_SHARE = 0.30
# Every code point str.isspace() accepts lies below U+3001 (the ideographic space is U+3000).
_WHITESPACE = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)

_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
# Only the tagger and what maps its tags to UD classes are needed.
_UNNEEDED_COMPONENTS = ["parser", "ner", "lemmatizer", "senter", "textcat"]
# jieba tags demonstratives/quantifiers as pronouns (r); UD treats 这/那/每/各... as DET.
_ZH_DETERMINERS = frozenset("这那每各该此某")
_ZH_CLASSIFIERS = frozenset("个些种位类项")


class FunctionWordsError(ThreedsError, RuntimeError):
    """The requested function-word mode cannot run with what is installed (one line: what to install)."""


def detect_language(text: str) -> str:
    """`zh` when CJK characters are at least 30% of the letters, else `en`."""
    letters = sum(map(str.isalpha, text))
    if letters == 0:
        return "en"
    return "zh" if len(_CJK.findall(text)) >= ZH_CJK_SHARE * letters else "en"


class FunctionWords:
    """Function-word spans and per-token flags for responses in English and Chinese."""

    def __init__(self, mode: str = "auto", lang: str = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"function-word mode must be one of {MODES}, got {mode!r}")
        if lang != "auto" and lang not in LANGS:
            raise ValueError(f"language must be 'auto' or one of {LANGS}, got {lang!r}")
        self.mode = mode
        self.lang = lang
        # Resolved now (cheap, nothing loaded) so a missing pipeline fails before a long run.
        self._plans = {lg: _plan(mode, lg) for lg in (LANGS if lang == "auto" else (lang,))}

    def describe(self) -> str:
        """What runs, for the run manifest, e.g. `lexical (spacy blank en)`."""
        if self.mode == "none":
            return "none (no function-word filter)"
        if self.lang != "auto":
            return _label(self._plans[self.lang], self.lang)
        return "; ".join(f"{lg}: {_label(plan, lg)}" for lg, plan in self._plans.items())

    def spans(self, text: str) -> list[Span]:
        """Character spans `[start, end)` of the function words in `text`."""
        return self._spans_batch([text])[0]

    def flags(self, texts: Sequence[str], offsets: Sequence[Sequence[Span]]) -> list[list[bool]]:
        """Per text, whether each token span (character offsets into that text) is a function word.

        A token is one when it has a non-whitespace character and all of them lie inside
        function words; a token reaching past the end of the text (e.g. an end-of-turn marker
        appended after it) never is.
        """
        if len(texts) != len(offsets):
            raise ValueError(f"{len(texts)} texts but {len(offsets)} offset lists")
        spans = self._spans_batch(list(texts))
        return [_token_flags(t, s, o) for t, s, o in zip(texts, spans, offsets)]

    def _spans_batch(self, texts: list[str]) -> list[list[Span]]:
        if self.mode == "none":
            return [[] for _ in texts]
        langs = [self.lang if self.lang != "auto" else detect_language(t) for t in texts]
        result: list[list[Span]] = [[] for _ in texts]
        for lg, plan in self._plans.items():
            idx = [i for i, t_lang in enumerate(langs) if t_lang == lg]
            if idx:
                found = _spans_fn(*plan, lg)([texts[i] for i in idx])
                for i, s in zip(idx, found):
                    result[i] = s
        return result


# ---------------------------------------------------------------------------------------------
# Choosing and loading a backend
# ---------------------------------------------------------------------------------------------


def installed_pipeline(lang: str) -> str | None:
    """The first trained spaCy pipeline for `lang` that is installed and importable.

    The importability check skips the PyPI placeholders named like spaCy models.
    """
    import spacy

    for name in TRAINED_PIPELINES[lang]:
        if spacy.util.is_package(name) and importlib.util.find_spec(name) is not None:
            return name
    return None


def _plan(mode: str, lang: str) -> tuple[str, str | None]:
    """(backend kind, trained pipeline name or None) for one language."""
    if mode == "none":
        return "none", None
    if mode in ("lexical", "punct"):
        return mode, None
    trained = installed_pipeline(lang)
    if trained is not None:
        return "pos", trained
    if mode == "auto":
        return "lexical", None
    if lang == "zh":
        return "jieba-pos", None
    raise FunctionWordsError(
        f"function-word mode 'pos' for {lang} needs a trained spaCy pipeline; install "
        f"{TRAINED_PIPELINES[lang][0]} (python -m spacy download {TRAINED_PIPELINES[lang][0]}), "
        "or use mode 'lexical'" + (" or lang 'zh'" if lang == "en" else "")
    )


def _label(plan: tuple[str, str | None], lang: str) -> str:
    kind, name = plan
    if kind == "pos":
        return f"pos ({name})"
    if kind == "jieba-pos":
        return "pos (jieba.posseg mapped to UD classes)"
    if kind == "lexical":
        segmenter = ", jieba segmenter" if lang == "zh" else ""
        return f"lexical (spacy blank {lang}{segmenter})"
    if kind == "punct":
        return f"punct (spacy blank {lang} punctuation)"
    return "none"


@cache
def _spans_fn(kind: str, name: str | None, lang: str) -> SpansFn:
    """Load (once per process) the function that finds function-word spans in a batch."""
    from spacy.attrs import IS_PUNCT, IS_STOP, POS
    from spacy.parts_of_speech import IDS

    if kind == "pos":
        pos_ids = np.array([IDS[p] for p in FUNCTION_POS], dtype=np.uint64)
        return _spacy_spans(_load_trained(name), [POS], lambda a: np.isin(a[:, 0], pos_ids))
    if kind == "lexical":
        return _spacy_spans(_load_blank(lang), [IS_STOP, IS_PUNCT], lambda a: a.any(axis=1))
    if kind == "punct":
        return _spacy_spans(_load_blank(lang), [IS_PUNCT], lambda a: a[:, 0] != 0)
    if kind == "jieba-pos":
        return _jieba_pos_spans()
    raise ValueError(f"unknown function-word backend {kind!r}")


def _load_trained(name: str):
    import spacy

    try:
        return spacy.load(name, exclude=_UNNEEDED_COMPONENTS)
    except (OSError, ValueError, ImportError, KeyError) as exc:  # a broken or mismatched install
        raise FunctionWordsError(f"spaCy pipeline {name} does not load ({first_line(exc)}); reinstall it "
                                 "(python -m spacy download NAME) or use --function-words lexical") from exc  # fmt: skip


def _load_blank(lang: str):
    import spacy

    try:
        if lang == "zh":
            _quiet_jieba()
            return spacy.blank("zh", config={"nlp": {"tokenizer": {"segmenter": "jieba"}}})
        return spacy.blank(lang)
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise FunctionWordsError(f"spaCy's blank {lang} pipeline does not load ({first_line(exc)}); "
                                 "reinstall spacy (and jieba for Chinese) or use --function-words none") from exc  # fmt: skip



def _quiet_jieba() -> None:
    """jieba logs its dictionary build at DEBUG/INFO on first use; keep run logs clean."""
    import jieba

    jieba.setLogLevel(logging.WARNING)


def _spacy_spans(nlp, attrs: list[int], select: Callable[[np.ndarray], np.ndarray]) -> SpansFn:
    """Spans of the tokens whose `attrs` columns `select` accepts.

    Reads token attributes as arrays (`Doc.to_array`): building Token objects one by one
    costs as much as the tokenizer itself.
    """
    from spacy.attrs import IDX, LENGTH

    def spans(texts: list[str]) -> list[list[Span]]:
        out: list[list[Span]] = []
        for doc in nlp.pipe(texts):
            table = doc.to_array([IDX, LENGTH, *attrs]).reshape(len(doc), 2 + len(attrs))
            hits = table[select(table[:, 2:])]
            out.append(list(zip(hits[:, 0].tolist(), (hits[:, 0] + hits[:, 1]).tolist())))
        return out

    return spans


def _jieba_pos_spans() -> SpansFn:
    _quiet_jieba()
    import jieba.posseg

    def spans(texts: list[str]) -> list[list[Span]]:
        return [_align_words(t, jieba.posseg.cut(t)) for t in texts]

    return spans


def _align_words(text: str, tagged) -> list[Span]:
    """Character spans of the jieba words whose tag maps to a function-word class."""
    out: list[Span] = []
    cursor = 0
    for word, flag in tagged:
        start = text.find(word, cursor)
        if start < 0:
            continue
        cursor = start + len(word)
        if not word.isspace() and jieba_ud_class(word, flag) is not None:
            out.append((start, cursor))
    return out


def jieba_ud_class(word: str, flag: str) -> str | None:
    """The UD function-word class of a jieba.posseg (word, tag), or None for other words."""
    if flag.startswith("u"):
        return "PART"
    if flag == "p":
        return "ADP"
    if flag.startswith("c"):
        return "CCONJ"
    if flag in ("e", "y"):
        return "INTJ"
    if flag in ("x", "w") or all(unicodedata.category(ch).startswith("P") for ch in word):
        return "PUNCT"
    if flag.startswith("r") and word[0] in _ZH_DETERMINERS:
        if len(word) == 1 or (len(word) == 2 and word[1] in _ZH_CLASSIFIERS):
            return "DET"
    return None


# ---------------------------------------------------------------------------------------------
# Token flags
# ---------------------------------------------------------------------------------------------


def _token_flags(text: str, spans: list[Span], offsets: Sequence[Span]) -> list[bool]:
    """Vectorised: prefix sums over characters make each token O(1)."""
    if len(offsets) == 0:
        return []
    n = len(text)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    nonspace = ~np.isin(codes, _WHITESPACE)
    inside = np.zeros(n + 1, dtype=np.int32)
    if spans:
        s = np.asarray(spans, dtype=np.int64)
        np.add.at(inside, np.clip(s[:, 0], 0, n), 1)
        np.add.at(inside, np.clip(s[:, 1], 0, n), -1)
    covered = np.cumsum(inside[:n]) > 0
    content = np.concatenate(([0], np.cumsum(nonspace)))
    outside = np.concatenate(([0], np.cumsum(nonspace & ~covered)))
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    in_text = (off[:, 0] >= 0) & (off[:, 1] <= n)
    start, end = np.clip(off[:, 0], 0, n), np.clip(off[:, 1], 0, n)
    end = np.maximum(start, end)
    flags = in_text & (content[end] > content[start]) & (outside[end] == outside[start])
    return flags.tolist()
