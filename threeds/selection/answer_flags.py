"""Flags on A', the model's own answer (issue 11, item 6).

Response Confidence is the weighted loss of A'. When generation went wrong, that number says
little about how hard the sample is for the model, so such answers are flagged (the app shows
them; `SelectConfig.exclude_flags` can drop them before the bands):

- `hit_max`: A' reached the generation cap, so it was cut off rather than finished. Exact where
  the run's generate log says so (`finish_reason` "length" in generations.jsonl: the local
  decoder and OpenAI-compatible servers report it). For logs written before that field, the run
  records the cap (`manifest.json` stages.generate.config.max_new_tokens) but not the number of
  tokens generated, so the count is A' re-encoded by the scoring stage with the run's tokenizer:
  `metrics.parquet` gen_tokens less the end-of-turn marker's tokens (read from one sample's rows
  of tokens.parquet, which lie past the end of A'). Re-encoding decoded text moves the count by
  a few tokens either way (on the demo run, cap 512: answers cut off re-encode to 512-524 tokens,
  the longest finished one to 471), so an answer within HIT_MAX_SLACK of the cap counts as
  reaching it. Unknown (never set) for runs that did not generate A' themselves.
- `repeats`: A' repeats itself. Its word tokens are the runs of letters and digits and each CJK
  ideograph on its own, case-folded (punctuation and spaces ignored). A token is *covered* when
  it lies inside an n-gram of REPEAT_N consecutive word tokens that occurs at least
  REPEAT_MIN_COUNT times in A' (occurrences may overlap). The flag is set when the covered share
  of the word tokens is at least REPEAT_SHARE. On the bundled sample data the human answers
  reach at most 0.38; the 135M demo model's loops ("nerve damage, nerve damage, ...") 0.5-1.0.
- `empty`: A' shows nothing: the input records' blank rule (`threeds.io.data.is_blank`). Scoring
  sets such records aside (rejects.jsonl), so a scored sample is flagged only if its A' was
  changed afterwards; the rule is here so that every consumer uses the same one.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from threeds.io.array_cache import read_cached, write_cached
from threeds.io.data import DataError, is_blank, read_jsonl
from threeds.names import ANSWER_FLAG_NAMES, ANSWER_FLAGS
from threeds.rundir import layout
from threeds.rundir.check import RunFileError, stage_part
from threeds.rundir.read import read_tokens
from threeds.rundir.record_index import RecordFile

REPEAT_N = 4
REPEAT_MIN_COUNT = 3
REPEAT_SHARE = 0.5
HIT_MAX_SLACK = 0.01  # of the cap, rounded down: 5 tokens at 512
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def word_tokens(text: str) -> list[str]:
    """The word tokens of the repeat rule: letter/digit runs and single CJK ideographs of the case-folded text."""
    return _WORD.findall(text.casefold())


def repeat_shares(texts: Sequence[str], n: int = REPEAT_N, min_count: int = REPEAT_MIN_COUNT) -> np.ndarray:
    """Per text, the share of its word tokens covered by an n-gram occurring >= min_count times in it.

    All texts at once (the words and then the n-grams numbered by hash tables, not one Python
    counter per text), so 100k answers cost seconds: each n-gram is a 64-bit hash of its word
    numbers and of its text's index."""
    words = [word_tokens(t) for t in texts]
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(len(texts))
    ids = pd.factorize(np.fromiter(itertools.chain.from_iterable(words), dtype=object, count=total))[0].astype(np.int64)
    text_of = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    position = np.arange(total) - starts[text_of]
    valid = np.flatnonzero(position <= lengths[text_of] - n)  # n-grams that stay inside their text
    covered = np.zeros(total + 1, dtype=np.int64)
    if valid.size:
        key = text_of[valid] * np.int64(0x9E3779B97F4A7C15 - (1 << 64))
        for k in range(n):
            key = key * np.int64(1_000_003) + ids[valid + k]  # wraps around: a hash, equal n-grams alike
        codes = pd.factorize(key)[0]
        repeated = valid[np.bincount(codes)[codes] >= min_count]
        covered += np.bincount(repeated, minlength=total + 1) - np.bincount(repeated + n, minlength=total + 1)
    inside = np.concatenate([[0], np.cumsum(np.cumsum(covered[:-1]) > 0)])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(lengths > 0, (inside[starts[1:]] - inside[starts[:-1]]) / lengths, 0.0)


def repeat_share(text: str, n: int = REPEAT_N, min_count: int = REPEAT_MIN_COUNT) -> float:
    """`repeat_shares` of one text."""
    return float(repeat_shares([text], n, min_count)[0])


def reaches_cap(tokens: np.ndarray, cap: int) -> np.ndarray:
    """True where a re-encoded token count is within HIT_MAX_SLACK of the cap or above it."""
    return np.asarray(tokens, dtype=float) >= cap - int(cap * HIT_MAX_SLACK)


@dataclass(frozen=True)
class AnswerFlags:
    """Per scored sample (rows of metrics.parquet), which flags its A' carries."""

    masks: dict[str, np.ndarray]  # flag name -> bool per row (hit_max all False when `cap` is None)
    repeat_share: np.ndarray  # per row, the repeat rule's covered share
    tokens: np.ndarray | None  # per row, A' tokens as re-encoded (None: the run cannot say)
    cap: int | None  # the run's max_new_tokens for A' (None: it did not generate A')

    def any_of(self, names: Iterable[str]) -> np.ndarray:
        """True where A' carries any of the flags `names`."""
        out = np.zeros(len(self.repeat_share), dtype=bool)
        for name in names:
            out |= self.masks[name]
        return out

    def labels(self) -> np.ndarray:
        """Per row, its flags in words ('hit max-new-tokens, repeats itself'; '' for none)."""
        out = np.full(len(self.repeat_share), "", dtype=object)
        for name in ANSWER_FLAGS:
            rows = np.flatnonzero(self.masks[name])
            out[rows] = [f"{old}, {ANSWER_FLAG_NAMES[name]}" if old else ANSWER_FLAG_NAMES[name] for old in out[rows]]
        return out

    def counts(self) -> dict[str, int]:
        return {name: int(self.masks[name].sum()) for name in ANSWER_FLAGS}


def flag_answers(
    texts: Sequence[str | None], tokens: np.ndarray | None, cap: int | None, finish: Sequence[str | None] | None = None,
    shares: np.ndarray | None = None,
) -> AnswerFlags:
    """The three flags of answers `texts` (None: no A'), given their token counts and the cap,
    where known why generation ended (`finish`: "length" = cut off at the cap, exact), and their
    repeat shares if already computed."""
    texts = ["" if t is None else str(t) for t in texts]
    shares = repeat_shares(texts) if shares is None else shares
    return flags_of(shares, np.array([is_blank(t) for t in texts], dtype=bool), tokens, cap, finish)


def flags_of(shares: np.ndarray, empty: np.ndarray, tokens: np.ndarray | None, cap: int | None,
             finish: Sequence[str | None] | None) -> AnswerFlags:  # fmt: skip
    """The flags from the answers' repeat shares and blankness, token counts, cap and finish reasons."""
    hit = reaches_cap(tokens, cap) if tokens is not None and cap is not None else np.zeros(len(shares), dtype=bool)
    if finish is not None:
        known = np.array([f in ("stop", "length") for f in finish], dtype=bool)
        hit = np.where(known, np.array([f == "length" for f in finish], dtype=bool), hit)
    return AnswerFlags({"hit_max": hit, "repeats": shares >= REPEAT_SHARE, "empty": empty}, shares, tokens, cap)


def generation_cap(manifest: dict) -> int | None:
    """max_new_tokens of the run's generate stage, as its manifest records it (None: not there)."""
    cap = stage_part(manifest, "generate", "config").get("max_new_tokens")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None


def answer_tokens(metrics: pd.DataFrame, texts: Sequence[str | None], tokens_path: Path) -> np.ndarray | None:
    """A' tokens per row as the scoring stage encoded them: gen_tokens less the end-of-turn
    marker's tokens (None when metrics.parquet has no gen_tokens column)."""
    if "gen_tokens" not in metrics.columns:
        return None
    counts = metrics["gen_tokens"].to_numpy(dtype=float)
    return np.maximum(counts - _marker_tokens(metrics, texts, tokens_path), 0)


def _marker_tokens(metrics: pd.DataFrame, texts: Sequence[str | None], tokens_path: Path) -> int:
    """Tokens of the end-of-turn marker: A' rows past the end of A' for one untruncated sample
    (0 when tokens.parquet cannot tell: the count is then high by a token or two)."""
    column = next((c for c in ("gen_truncated", "truncated") if c in metrics.columns), None)
    whole = np.arange(len(metrics)) if column is None else np.flatnonzero(~metrics[column].to_numpy(dtype=bool))
    if not whole.size or not tokens_path.is_file():
        return 0
    row = int(whole[0])
    try:
        rows = read_tokens(tokens_path, str(metrics["id"].iloc[row]))
    except RunFileError:
        return 0
    text = texts[row] or ""
    return int(((rows["response"] == "gen") & (rows["start"] >= len(text))).sum())


def run_answer_flags(run_dir: str | Path, metrics: pd.DataFrame, records: Sequence[dict], manifest: dict) -> AnswerFlags:
    """The flags of every scored sample of a run (records: data.jsonl, in metrics' row order; read
    in chunks, never all A' at once)."""
    answers = _Answers(records)
    cap = generation_cap(manifest)
    tokens = answer_tokens(metrics, answers, Path(run_dir) / layout.TOKENS) if cap is not None else None
    reasons = finish_reasons(Path(run_dir) / layout.GENERATIONS)
    finish = [reasons.get(str(i)) for i in metrics["id"]] if reasons else None
    if isinstance(records, RecordFile):
        shares, empty = cached_answer_checks(Path(run_dir), records)
    else:
        texts = ["" if t is None else str(t) for t in answers]
        shares, empty = cached_repeat_shares(Path(run_dir), texts), np.array([is_blank(t) for t in texts], dtype=bool)
    return flags_of(shares, empty, tokens, cap, finish)


class _Answers(Sequence):
    """The A' of a run's records by row, read as asked (for the one row `_marker_tokens` needs)."""

    def __init__(self, records: Sequence[dict]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, row):
        return self.records[row].get("generated_output")


def cached_answer_checks(run_dir: Path, records: RecordFile, chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """Per record of data.jsonl, the repeat share and the blankness of its A', kept in the run
    directory (`layout.REPEAT_SHARES`, described by data.jsonl's size and mtime, as its row index
    is): Stage 2 writes them (`keep_answer_checks`); for a run scored before, they are computed
    here `chunk` records at a time, so a run of 1.9M answers is read once."""
    array, description = (run_dir / name for name in layout.REPEAT_SHARES)
    cached = read_cached(array, description, _checks_meta(records), (len(records), 2))
    if cached is None:
        cached = np.concatenate([answer_checks(texts) for texts in records.field("generated_output", chunk)] or [np.empty((0, 2))])
        write_cached(array, description, cached, _checks_meta(records))
    return cached[:, 0], cached[:, 1] > 0


def keep_answer_checks(run_dir: Path, records: RecordFile, answers: Sequence[str | None]) -> None:
    """Stage 2's: the checks of the A' it has just written to data.jsonl (`records`), made from the
    answers at hand (~2 min at 1.9M), so that no reader parses data.jsonl's gigabytes for them."""
    array, description = (run_dir / name for name in layout.REPEAT_SHARES)
    write_cached(array, description, answer_checks(answers), _checks_meta(records))


def answer_checks(answers: Sequence[str | None]) -> np.ndarray:
    """Per A', its repeat share and whether it is blank (1.0), as two columns."""
    texts = ["" if t is None else str(t) for t in answers]
    return np.column_stack([repeat_shares(texts), [is_blank(t) for t in texts]]).reshape(len(texts), 2)


def _checks_meta(records: RecordFile) -> dict:
    return {"data": records.stamp, "rows": len(records), "n": REPEAT_N, "min_count": REPEAT_MIN_COUNT, "columns": ["share", "empty"]}


def cached_repeat_shares(run_dir: Path, texts: Sequence[str | None]) -> np.ndarray:
    """`repeat_shares` of a run's A', kept in the run directory (`layout.REPEAT_SHARES`: the array and its
    description, a digest of the texts and the rule's settings), since 100k long answers take
    ~20 s; a missing, stale or unreadable cache is recomputed, an unwritable directory only
    costs the recomputation next time."""
    texts = ["" if t is None else str(t) for t in texts]
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    meta = {"texts_sha256": digest.hexdigest(), "rows": len(texts), "n": REPEAT_N, "min_count": REPEAT_MIN_COUNT}
    array, description = (run_dir / name for name in layout.REPEAT_SHARES)
    cached = read_cached(array, description, meta, (len(texts),))
    if cached is not None:
        return cached
    shares = repeat_shares(texts)
    write_cached(array, description, shares, meta)
    return shares


def finish_reasons(log_path: Path) -> dict[str, str]:
    """id -> why its A' ended ("stop"/"length"), from the generate log's last good row per id
    (logs written before the field have none; an unreadable log gives none)."""
    try:
        rows = read_jsonl(log_path) if log_path.is_file() else []
    except (DataError, OSError):
        return {}
    return {str(r["id"]): r["finish_reason"] for r in rows
            if isinstance(r, dict) and r.get("error") is None and r.get("finish_reason") in ("stop", "length")}  # fmt: skip
