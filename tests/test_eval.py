"""`threeds eval`: choice log-likelihoods with a shared prompt pass, prompts, rows, resume, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from threeds.cli import main as cli
from threeds.io.data import read_jsonl
from threeds.outcomes import loglik
from threeds.outcomes.benchsets import Bench, BenchItem
from threeds.config import EvalConfig, ModelConfig
from threeds.outcomes.evaluate import EvalSettingsError, encode, evaluate, render, shots_for
from threeds.outcomes.loglik import Request, choice_logprobs


def reference_logprobs(model, request: Request) -> list[float]:
    """One unbatched sequence `prompt + choice` per choice, the whole logits: the textbook way."""
    out = []
    with torch.no_grad():
        for cont in request.choices:
            logp = model(torch.tensor([request.prompt + cont])).logits[0].float().log_softmax(-1)
            start = len(request.prompt) - 1
            out.append(sum(float(logp[start + i, t]) for i, t in enumerate(cont)))
    return out


def random_requests(vocab: int, shapes: list[tuple[int, list[int]]], seed: int = 0) -> list[Request]:
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    return [Request(ids(n), [ids(k) for k in ks]) for n, ks in shapes]


@pytest.mark.parametrize("common", [0, 6])
def test_shared_prompt_pass_equals_one_sequence_per_choice(common, monkeypatch):
    """Packed tree rows (and the `share=False` harness rows), batched and padded, with and without a
    common start in the cache, the output layer in chunks, give each choice the log-probability of
    its own sequence."""
    monkeypatch.setattr(loglik, "HEAD_CHUNK", 5)
    model = tiny_llama(500, seed=3, layers=3)
    requests = random_requests(500, [(7, [1, 4, 2, 3]), (15, [3, 1]), (2, [5, 5, 1]), (30, [1, 2, 6, 2, 9])])
    head = random_requests(500, [(common, [])], seed=9)[0].prompt
    requests = [Request(head + r.prompt, r.choices) for r in requests]
    expected = [reference_logprobs(model, r) for r in requests]
    for share in (True, False):
        for batch_size, batch_tokens in ((1, 8192), (2, 8192), (32, 8192), (32, 40)):
            got = choice_logprobs(model, requests, share=share, batch_size=batch_size, batch_tokens=batch_tokens,
                                  min_prefix=4)  # fmt: skip
            for g, e in zip(got, expected):
                assert g == pytest.approx(e, abs=1e-5), (share, batch_size, batch_tokens)


def test_on_batch_reports_each_request_once():
    model = tiny_llama(100)
    requests = random_requests(100, [(3, [1, 2]), (9, [2]), (4, [1, 1, 1])])
    seen: dict[int, list[float]] = {}
    choice_logprobs(model, requests, batch_size=2, on_batch=lambda done, seconds: seen.update(done))
    assert sorted(seen) == [0, 1, 2] and seen[1] == pytest.approx(reference_logprobs(model, requests[1]), abs=1e-5)


ITEM = BenchItem("q1", "Which organ pumps blood?", ["heart", "liver"], 0, "anatomy")
SHOT = BenchItem("d1", "Which organ breathes?", ["kidney", "lung"], 1, "anatomy")


def test_plain_prompt_exactly():
    prompt, conts = render(ITEM, "plain", [SHOT], None)
    assert prompt == "Question: Which organ breathes?\nAnswer: lung\n\nQuestion: Which organ pumps blood?\nAnswer:"
    assert conts == [" heart", " liver"]
    ctx = BenchItem("p", "Does it?", ["yes", "no", "maybe"], 0, "pubmedqa", "An abstract.")
    assert render(ctx, "plain", [], None)[0] == "Context: An abstract.\nQuestion: Does it?\nAnswer:"


def test_chat_prompt_is_the_template_with_shots_as_turns(tokenizer):
    from threeds.model.prompts import prompt_format

    chat = prompt_format(tokenizer)
    prompt, conts = render(ITEM, "chat", [SHOT], chat)
    messages = [{"role": "user", "content": SHOT.question}, {"role": "assistant", "content": "lung"},
                {"role": "user", "content": ITEM.question}]  # fmt: skip
    assert prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and conts == ["heart", "liver"]
    assert render(ITEM, "chat", [], chat)[0] == chat.prompt(ITEM.question)


MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {}.\n\n"


def test_letters_prompt_is_lm_eval_harness_mmlu_default_exactly():
    """lm-evaluation-harness's MMLU default (tasks/mmlu/default: description, `{{question.strip()}}\\nA.
    {{choices[0]}}...\\nAnswer:`, choices A-D after a space; shots as first_n dev items, each followed by
    ' ' + its letter + '\\n\\n'), pinned on the bundled set's first anatomy item and dev item."""
    from threeds.outcomes.benchsets import load_bench

    bench = load_bench("mmlu-medical")
    item = next(i for i in bench.items if i.subject == "anatomy")
    shot = next(i for i in bench.dev if i.subject == "anatomy")
    block = ("A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral\n"
             "A. paralysis of the facial muscles.\nB. paralysis of the facial muscles and loss of taste.\n"
             "C. paralysis of the facial muscles, loss of taste and lacrimation.\n"
             "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\nAnswer:")  # fmt: skip
    prompt, conts = render(item, "letters", [], None)
    assert prompt == MMLU_DESCRIPTION.format("anatomy") + block and conts == [" A", " B", " C", " D"]
    one_shot = ("What is the embryological origin of the hyoid bone?\nA. The first pharyngeal arch\n"
                "B. The first and second pharyngeal arches\nC. The second pharyngeal arch\n"
                "D. The second and third pharyngeal arches\nAnswer: D\n\n")  # fmt: skip
    assert render(item, "letters", [shot], None)[0] == MMLU_DESCRIPTION.format("anatomy") + one_shot + block
    # a subject's underscores read as spaces, as the harness's generated descriptions do
    two = BenchItem("m", "Which?", ["x", "y"], 1, "college_medicine")
    assert render(two, "letters", [], None) == (MMLU_DESCRIPTION.format("college medicine") + "Which?\nA. x\nB. y\nAnswer:",
                                                [" A", " B"])  # fmt: skip


def test_five_shot_letters_prompt_is_lm_eval_harness_string_for_string():
    """The 5-shot request lm-evaluation-harness 0.4.13 itself built (tasks/mmlu/default: `first_n` shots
    from the subject's dev split; `bench/lmeval_prompts.py`'s harness side) for college medicine's second
    test item, kept in tests/golden: threeds' K-shot letters prompt, with the shots `shots_for` picks (the
    item's own subject's, not anatomy's, which come first in the files), is the same string."""
    from threeds.outcomes.benchsets import load_bench

    pinned = json.loads((Path(__file__).parent / "golden" / "lmeval_mmlu_college_medicine_5shot.json").read_text())
    bench = load_bench("mmlu-medical")
    item = [i for i in bench.items if i.subject == "college_medicine"][1]
    shots = shots_for(item, bench.dev, 5)
    assert [s.subject for s in shots] == ["college_medicine"] * 5
    assert render(item, "letters", shots, None) == (pinned["context"], pinned["continuations"])


def test_letters_prompt_for_pubmedqa_and_files_without_subject():
    ctx = BenchItem("p", "Does it?", ["yes", "no", "maybe"], 0, "pubmedqa", "An abstract.")
    assert render(ctx, "letters", [], None) == ("Abstract: An abstract.\nQuestion: Does it?\nA. yes\nB. no\nC. maybe\nAnswer:",
                                                [" A", " B", " C"])  # fmt: skip
    bare = BenchItem("1", "Pick one.", ["a", "b", "c", "d", "e"], 4, "")  # a CMB-style row of five options, no subject
    assert render(bare, "letters", [], None)[0] == "Pick one.\nA. a\nB. b\nC. c\nD. d\nE. e\nAnswer:"


@pytest.mark.parametrize("fmt", ["plain", "chat", "letters"])
def test_continuation_tokens_are_those_after_the_prompt(tokenizer, fmt):
    from threeds.model.prompts import prompt_format

    prompt, conts = render(ITEM, fmt, [], prompt_format(tokenizer))
    request = encode(tokenizer, prompt, conts, fmt)
    for cont, ids in zip(conts, request.choices):
        assert request.prompt + ids == tokenizer.encode(prompt + cont, add_special_tokens=fmt != "chat")


PLAIN, TINY = EvalConfig(prompt_format="plain"), ModelConfig(model="tiny")


def small_bench(n: int = 3) -> Bench:
    items = [BenchItem(f"q{i}", f"Question number {i} about the body?", ["heart", "lung", "the left kidney"][: 2 + i % 2],
                       i % 2, "anatomy" if i < 2 else "biology") for i in range(n)]  # fmt: skip
    return Bench("tiny", items, [SHOT])


def test_rows_summary_and_resume(tmp_path, tiny_model, tokenizer):
    out = tmp_path / "eval"
    bench = small_bench(3)
    calls = []
    first = evaluate(tiny_model, tokenizer, Bench("tiny", bench.items[:2], bench.dev), out, PLAIN, TINY,
                     progress=lambda *report: calls.append(report))  # fmt: skip
    rows = read_jsonl(out / "items.jsonl")
    # the work reported is each item's tokens (prompt and every choice), so the time left follows them
    tokens = [len(r.prompt) + sum(map(len, r.choices)) for r in (encode(tokenizer, row["prompt"], row["choices"], "plain") for row in rows)]
    assert first["n_items"] == 2 and calls[0] == (0, 2, 0, sum(tokens)) and calls[-1] == (2, 2, sum(tokens), sum(tokens))
    assert all(done != 1 or work in tokens for done, _, work, _ in calls)  # one item done: its own tokens
    row = rows[0]
    assert set(row) >= {"id", "subject", "gold", "pred", "correct", "pred_norm", "correct_norm", "gold_prob", "prompt",
                        "choices", "logprobs"}  # fmt: skip
    request = encode(tokenizer, row["prompt"], row["choices"], "plain")
    assert row["logprobs"] == pytest.approx(reference_logprobs(tiny_model, request), abs=1e-5)
    norm = [lp / len(c) for lp, c in zip(row["logprobs"], bench.items[0].choices)]
    assert row["gold_prob"] == pytest.approx(math.exp(norm[0]) / sum(math.exp(v) for v in norm))
    assert row["pred"] == max(range(2), key=lambda i: row["logprobs"][i]) and row["correct"] == (row["pred"] == 0)
    # mark a finished row, tear the file's tail as a kill would: the rerun keeps the row, scores only q2
    rows[0]["logprobs"], rows[0]["correct"] = [0.0, -1.0], True
    (out / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "q', encoding="utf-8")
    calls.clear()
    with pytest.warns(UserWarning, match="truncated last line"):
        summary = evaluate(tiny_model, tokenizer, bench, out, PLAIN, TINY, progress=lambda *report: calls.append(report))
    rows = read_jsonl(out / "items.jsonl")
    q2 = encode(tokenizer, rows[2]["prompt"], rows[2]["choices"], "plain")
    whole = sum(tokens) + len(q2.prompt) + sum(map(len, q2.choices))
    assert calls == [(2, 3, sum(tokens), whole), (3, 3, whole, whole)]  # the resumed items' work is done before the pace starts
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"] and rows[0]["logprobs"] == [0.0, -1.0]
    assert summary["n_items"] == 3 and summary["acc"] == pytest.approx(sum(r["correct"] for r in rows) / 3)
    assert summary["majority_acc"] == pytest.approx(2 / 3) and summary["subjects"]["biology"]["n_items"] == 1
    assert summary["bench"] == "tiny" and summary["prompt_format"] == "plain" and summary["shots"] == 0
    assert json.loads((out / "summary.json").read_text()) == summary


def test_letters_rows_score_the_letters(tmp_path, tiny_model, tokenizer):
    summary = evaluate(tiny_model, tokenizer, small_bench(3), tmp_path / "eval", EvalConfig(prompt_format="letters", shots=1), TINY)
    rows = read_jsonl(tmp_path / "eval" / "items.jsonl")
    assert rows[1]["choices"] == [" A", " B", " C"] and rows[1]["prompt"].endswith("B. lung\nC. the left kidney\nAnswer:")
    assert rows[0]["prompt"].startswith(MMLU_DESCRIPTION.format("anatomy") + "Which organ breathes?\nA. kidney\nB. lung\nAnswer: B\n\n")
    for row in rows:  # one-letter continuations: acc_norm is acc, probs the softmax of the log-probabilities
        request = encode(tokenizer, row["prompt"], row["choices"], "letters")
        assert row["logprobs"] == pytest.approx(reference_logprobs(tiny_model, request), abs=1e-5)
        assert row["pred_norm"] == row["pred"] and row["gold_prob"] == pytest.approx(
            math.exp(row["logprobs"][row["gold"]]) / sum(math.exp(v) for v in row["logprobs"]), rel=1e-5)
    assert summary["acc_norm"] == summary["acc"] and summary["prompt_format"] == "letters"


def test_other_settings_are_refused_unless_overwrite(tmp_path, tiny_model, tokenizer):
    out = tmp_path / "eval"
    bench = small_bench(2)
    evaluate(tiny_model, tokenizer, bench, out, PLAIN, TINY)
    with pytest.raises(EvalSettingsError, match="prompt_format 'plain', not 'chat'"):
        evaluate(tiny_model, tokenizer, bench, out, EvalConfig(prompt_format="chat"), TINY)
    summary = evaluate(tiny_model, tokenizer, bench, out, EvalConfig(shots=1), TINY, overwrite=True)
    assert summary["shots"] == 1 and read_jsonl(out / "items.jsonl")[0]["prompt"].count("<|im_start|>user") == 2


def test_cli_bad_file_is_one_line_and_writes_nothing(tmp_path, caplog):
    bad = tmp_path / "exam.jsonl"
    bad.write_text('{"id": "a", "question": "Q", "options": ["x", "y"], "answer": "maybe"}\n')
    out = tmp_path / "out"
    assert cli(["eval", "--bench", str(bad), "--out", str(out)]) == 1
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert message == f"{bad}: line 1 (id a): answer 'maybe' is not among the options A, B"
    assert not out.exists()


@pytest.mark.integration
def test_cli_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli(["eval", "--bench", "mmlu-medical", "--limit", "5", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_items"] == 5 and summary["prompt_format"] == "chat" and summary["model"].startswith("embedded:")
    rows = read_jsonl(out / "items.jsonl")
    assert len({r["subject"] for r in rows}) == 5
    assert all(len(r["logprobs"]) == len(r["choices"]) == 4 and all(lp < 0 for lp in r["logprobs"]) for r in rows)
    assert summary["acc"] == sum(r["correct"] for r in rows) / 5
    assert json.loads(capsys.readouterr().out)["n_items"] == 5


def test_adapter_is_applied(tmp_path, tiny_model_dir, tokenizer):
    """`load_model(spec, adapter=DIR)` merges the saved LoRA: evaluate scores the log-probs of the PEFT
    model itself, not those of the base model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from threeds.errors import ThreedsError
    from threeds.model.load import load_model
    from threeds.outcomes.benchsets import load_bench

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = reference_logprobs(base, encode(tokenizer, *render(ITEM, "plain", [], None), "plain"))
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    peft.save_pretrained(tmp_path / "adapter")
    exam = tmp_path / "exam.jsonl"
    exam.write_text(json.dumps({"id": "q1", "question": ITEM.question, "options": ITEM.choices, "answer": "A"}) + "\n")
    config = EvalConfig(bench=str(exam), adapter=str(tmp_path / "adapter"), prompt_format="plain")
    model, tok = load_model(str(tiny_model_dir), config.adapter, device="cpu")
    summary = evaluate(model, tok, load_bench(config.bench), tmp_path / "out", config, ModelConfig(model=str(tiny_model_dir)))
    (row,) = read_jsonl(tmp_path / "out" / "items.jsonl")
    expected = reference_logprobs(peft, encode(tokenizer, row["prompt"], row["choices"], "plain"))
    assert row["logprobs"] == pytest.approx(expected, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(expected, before)) > 1e-3
    assert summary["adapter"] == str(tmp_path / "adapter") and summary["model"] == str(tiny_model_dir)
    with pytest.raises(ThreedsError, match="no adapter_config.json"):
        load_model(str(tiny_model_dir), tmp_path, device="cpu")