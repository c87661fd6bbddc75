"""Function-word spans and token flags, English and Chinese, on hand-checked sentences."""

from __future__ import annotations

import random

import pytest
from spacy.language import Language

import threeds.model.function_words as fwm
from threeds.model.function_words import (
    FunctionWords,
    FunctionWordsError,
    detect_language,
)

EN = "The cat and the dog sat on a mat."
ZH = "我的头很疼，怎么办？"


def words(text: str, spans: list[tuple[int, int]]) -> list[str]:
    return [text[s:e] for s, e in spans]


@pytest.fixture
def no_trained(monkeypatch):
    """Behave as if no trained spaCy pipeline were installed, whatever this machine has."""
    monkeypatch.setattr(fwm, "installed_pipeline", lambda lang: None)


@Language.component("test_fake_tagger")
def _fake_tagger(doc):
    tags = {"The": "DET", "the": "DET", "a": "DET", "and": "CCONJ", "on": "ADP", ".": "PUNCT"}
    for tok in doc:
        tok.pos_ = tags.get(tok.text, "NOUN")
    return doc


def test_lexical_english_spans():
    fw = FunctionWords("lexical", "en")
    assert words(EN, fw.spans(EN)) == ["The", "and", "the", "on", "a", "."]
    assert fw.describe() == "lexical (spacy blank en)"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_lexical_spans_match_spacy_token_attributes(lang):
    text = {
        "en": "However, it's what we do  next\n\nthat matters (really!) -- isn't it?",
        "zh": "如果血压一直很高，那么就应该及时去医院，并且按时吃药。Please rest.",
    }[lang]
    nlp = fwm._load_blank(lang)
    expected = [(t.idx, t.idx + len(t)) for t in nlp(text) if t.is_stop or t.is_punct]
    assert FunctionWords("lexical", lang).spans(text) == expected


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_punct_mode_marks_punctuation_only(lang):
    text = {"en": "However, it's what we do next -- isn't it?", "zh": "如果血压很高，那么就应该及时去医院。"}[lang]
    expected = [(t.idx, t.idx + len(t)) for t in fwm._load_blank(lang)(text) if t.is_punct]
    fw = FunctionWords("punct", lang)
    assert fw.spans(text) == expected and len(expected) >= 2
    assert all(not text[s:e].isalnum() for s, e in expected)
    assert fw.describe() == f"punct (spacy blank {lang} punctuation)"


def test_flags_align_tokens_by_character_offsets():
    fw = FunctionWords("lexical", "en")
    offsets = [
        (0, 3),  # "The"
        (3, 7),  # " cat": content word with a leading space
        (7, 11),  # " and": the space does not count against it
        (8, 10),  # "an": part of a function word
        (15, 17),  # " d": straddles into "dog"
        (0, 7),  # "The cat": covers a content word
        (11, 16),  # " the ": whitespace on both sides of a function word
        (3, 4),  # " ": whitespace only
        (5, 5),  # empty
        (32, 33),  # "."
    ]
    expected = [True, False, True, True, False, False, True, False, False, True]
    assert fw.flags([EN], [offsets]) == [expected]


def test_tokens_past_the_end_of_the_text_are_never_function_words():
    fw = FunctionWords("lexical", "en")
    n = len(EN)
    assert fw.flags([EN], [[(n - 1, n), (n, n + 10), (n - 1, n + 3)]]) == [[True, False, False]]


def test_lexical_chinese_uses_jieba_words():
    fw = FunctionWords("lexical", "zh")
    found = words(ZH, fw.spans(ZH))
    assert {"的", "，", "？"} <= set(found)
    assert "头" not in found and "疼" not in found
    per_char = [(i, i + 1) for i in range(len(ZH))]
    flags = dict(zip(ZH, fw.flags([ZH], [per_char])[0]))
    assert flags["的"] and flags["，"] and flags["？"]
    assert not flags["头"] and not flags["疼"]
    assert "jieba" in fw.describe()


def test_pos_chinese_without_trained_pipeline_uses_jieba_posseg(no_trained):
    fw = FunctionWords("pos", "zh")
    assert words(ZH, fw.spans(ZH)) == ["的", "，", "？"]
    text = "在医生的指导下服用，但是这个药不要多吃。"
    found = words(text, fw.spans(text))
    for word in ["在", "的", "，", "但是", "这个", "。"]:  # ADP PART PUNCT CCONJ DET PUNCT
        assert word in found
    for word in ["医生", "指导", "服用", "药"]:
        assert word not in found
    assert fw.describe() == "pos (jieba.posseg mapped to UD classes)"


@pytest.mark.parametrize(
    ("word", "flag", "cls"),
    [
        ("的", "uj", "PART"),
        ("在", "p", "ADP"),
        ("但是", "c", "CCONJ"),
        ("啊", "e", "INTJ"),
        ("吗", "y", "INTJ"),
        ("，", "x", "PUNCT"),
        (".", "m", "PUNCT"),
        ("这", "r", "DET"),
        ("每个", "r", "DET"),
        ("我", "r", None),
        ("每天", "r", None),
        ("医生", "n", None),
    ],
)
def test_jieba_tags_map_to_ud_classes(word, flag, cls):
    assert fwm.jieba_ud_class(word, flag) == cls


def test_pos_english_without_trained_pipeline_is_a_clear_error(no_trained):
    with pytest.raises(FunctionWordsError, match="en_core_web_sm"):
        FunctionWords("pos", "en")
    with pytest.raises(FunctionWordsError, match="en_core_web_sm"):
        FunctionWords("pos", "auto")


def test_auto_falls_back_to_lexical_without_trained_pipeline(no_trained):
    fw = FunctionWords("auto", "auto")
    assert fw.describe() == (
        "en: lexical (spacy blank en); zh: lexical (spacy blank zh, jieba segmenter)"
    )


def test_auto_uses_pos_tags_of_a_trained_pipeline(monkeypatch):
    monkeypatch.setattr(fwm, "installed_pipeline", lambda lang: "fake_core_test")

    def load_fake(name):
        nlp = fwm._load_blank("en")
        nlp.add_pipe("test_fake_tagger")
        return nlp

    monkeypatch.setattr(fwm, "_load_trained", load_fake)
    fwm._spans_fn.cache_clear()
    try:
        fw = FunctionWords("auto", "en")
        assert fw.describe() == "pos (fake_core_test)"
        text = "The dog sat on the mat and it slept."
        # "it" is a stop word but a pronoun: the POS filter keeps it.
        assert words(text, fw.spans(text)) == ["The", "on", "the", "and", "."]
    finally:
        fwm._spans_fn.cache_clear()


def test_none_mode_flags_nothing():
    fw = FunctionWords("none")
    assert fw.spans(EN) == []
    assert fw.flags([EN, ZH], [[(0, 3)], [(1, 2)]]) == [[False], [False]]
    assert fw.describe().startswith("none")


def test_language_detection_and_mixed_batch(no_trained):
    assert detect_language(ZH) == "zh"
    assert detect_language(EN) == "en"
    assert detect_language("1234 !!") == "en"
    assert detect_language("Take 阿司匹林 daily with water") == "en"  # 4 CJK of 22 letters
    assert detect_language("请服用 aspirin") == "zh"  # 3 CJK of 10 letters
    fw = FunctionWords("lexical", "auto")
    flags = fw.flags([EN, ZH, ""], [[(0, 3), (4, 7)], [(1, 2), (2, 3)], [(0, 1)]])
    assert flags == [[True, False], [True, False], [False]]


def test_flags_validate_arguments():
    with pytest.raises(ValueError):
        FunctionWords("stopwords")
    with pytest.raises(ValueError):
        FunctionWords(lang="fr")
    with pytest.raises(ValueError):
        FunctionWords("lexical", "en").flags([EN], [])
    assert FunctionWords("lexical", "en").flags([EN], [[]]) == [[]]


def test_vectorised_flags_match_the_definition():
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("ab  \n.\u3000\xa0") for _ in range(rng.randint(0, 30)))
        n = len(text)
        spans = sorted({(s, s + rng.randint(1, 4)) for s in rng.sample(range(n + 1), min(n, 5))})
        spans = [(s, min(e, n)) for s, e in spans if s < n]
        offsets = [(s, s + rng.randint(0, 6)) for s in (rng.randint(0, n + 2) for _ in range(20))]
        covered = {i for s, e in spans for i in range(s, e)}

        def reference(s: int, e: int) -> bool:
            chars = [i for i in range(s, e) if i >= n or not text[i].isspace()]
            return e <= n and bool(chars) and all(i in covered for i in chars)

        assert fwm._token_flags(text, spans, offsets) == [reference(s, e) for s, e in offsets]
