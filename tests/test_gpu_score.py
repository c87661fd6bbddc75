"""bench/gpu_score.py runs end to end on the CPU at the tiny shape (the GPU run is the same command)."""

from __future__ import annotations

import json

import gpu_score


def test_gpu_bench_smoke_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    result = gpu_score.main(["--shape", "tiny", "--device", "cpu", "--samples", "4", "--naive-samples", "1",
                             "--chunk-size", "2", "--max-length", "256", "--function-words", "lexical",
                             "--json", str(out)])  # fmt: skip
    assert [r["path"] for r in result["rows"]] == ["gpu path", "end to end", "naive"]
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and row["mfu"] is None and row["peak_gpu_gib"] is None
    assert result["rows"][0]["forward_tokens"] == result["rows"][1]["forward_tokens"] > 0
    assert result["speedup_gpu_path"] > 0 and json.loads(out.read_text())["shape"] == "tiny"
    assert "| naive | 1 |" in capsys.readouterr().out


def test_mfu_inputs():
    """The 7B shape's matmul parameters are Qwen2-7B's published 7.62B less its 0.54B input embedding
    (norms and biases are negligible), and the peak is looked up from the device name, PCIe first."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**gpu_score.SHAPES["7b"]))
    assert abs(gpu_score.matmul_parameters(model) / 1e9 - 7.07) < 0.01
    assert next(t for k, t in gpu_score.PEAK_TFLOPS if k in "NVIDIA H100 PCIe") == 756.0
    assert next(t for k, t in gpu_score.PEAK_TFLOPS if k in "NVIDIA H100 80GB HBM3") == 989.4
