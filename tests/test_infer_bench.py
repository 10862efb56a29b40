"""scripts/infer_bench.py and the cost accounting it reads from model.py: FLOPs and KV bytes by formula, checked
against each other and by hand; the sweep on a saved tiny checkpoint; the device table it takes peaks from."""

import json

import pytest

from nanochat_jax.config import ModelConfig
from nanochat_jax.model import (attended_positions, decode_flops_per_token, head_dim, kv_bytes, matmul_params,
                                padded_vocab, prefill_flops)
from nanochat_jax.targets import CHIPS, chip_of
from test_engine import byte_tokenizer, random_model, save_tiny_checkpoint, tiny_config
from conftest import load_script

WINDOWED = ModelConfig(depth=4, aspect_ratio=32, head_dim=32, n_kv_head=1, vocab_size=300, sequence_len=1024,
                       window_pattern="SL", compute_dtype="bfloat16")  # short window: 1024 / 4 = 256 positions


def test_decode_and_prefill_costs_follow_the_windows():
    """A sliding-window layer attends to at most its window; a prompt's prefill costs what decoding its positions
    one by one costs, less the lm_head at every position but the last; KV bytes count keys and values in bf16."""
    cfg = WINDOWED
    assert attended_positions(cfg, 40) == [40] * 4 and attended_positions(cfg, 600) == [256, 600, 256, 600]
    per_position = 4 * cfg.n_head * head_dim(cfg)
    assert decode_flops_per_token(cfg, 600) == 2 * matmul_params(cfg) + per_position * (256 + 600) * 2
    head = 2 * padded_vocab(cfg) * cfg.n_embd
    for length in (1, 256, 300, 1024):
        one_by_one = sum(decode_flops_per_token(cfg, t + 1) for t in range(length))
        assert prefill_flops(cfg, length) == one_by_one - (length - 1) * head
    assert kv_bytes(cfg, 1) == 4 * 2 * 1 * 32 * 2  # layers x (k, v) x kv heads x head_dim x bf16
    assert kv_bytes(cfg, attended_positions(cfg, 600)) == 2 * 32 * 2 * (256 + 600) * 2


@pytest.mark.parametrize("kind, chip", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                        ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
                                        ("NVIDIA GH200 480GB", None), ("NVIDIA A100-SXM4-80GB", None),
                                        ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("TPU v5 lite", "v5e"),
                                        ("TPU v5e", "v5e"), ("TPU v5", "v5p"), ("TPU v5p", "v5p"), ("TPU v4", "v4"),
                                        ("cpu", None)])
def test_device_kinds_find_their_datasheet(kind, chip):
    assert chip_of(kind) is (CHIPS[chip] if chip else None)


def test_sweep_on_a_checkpoint_prints_a_card_a_table_and_json(home, capsys):
    """Every row decodes exactly --decode-tokens (no early stop on the random model's special tokens); the JSON
    line carries the card and the sweep, MBU and MFU follow from the card's bytes and FLOPs and the timings."""
    save_tiny_checkpoint(home, random_model(), byte_tokenizer(), stage="sft", step=3)
    bench = load_script("infer_bench")
    assert bench.main(["-i", "sft", "--batch-sizes", "1,3", "--decode-tokens", "24", "--chunk", "8"]) == 0
    out = capsys.readouterr().out
    assert "prompt cut to 104 tokens" in out and "prefill (batch 1, 104 tokens)" in out  # 128 - 24
    result = json.loads(out.strip().splitlines()[-1])
    cfg = tiny_config()
    assert result["step"] == 3 and result["device"] == "cpu" and result["memory"] is None
    assert result["context_mid"] == 104 + 12 and result["kv_bytes_per_token"] == kv_bytes(cfg, 1)
    assert result["weight_bytes_per_step"] == 4 * matmul_params(cfg)  # float32
    assert result["ceiling_batch1_tok_per_sec"] == pytest.approx(
        result["peak_bandwidth"] / (result["weight_bytes_per_step"] + result["kv_read_bytes_per_step"]))
    assert [row["batch_size"] for row in result["sweep"]] == [1, 3]
    for row in result["sweep"]:
        batch, tpot = row["batch_size"], row["tpot_sec"]
        assert 0 < tpot and 0 < row["ttft_sec"] and 0 < row["first_column_sec"]
        assert row["tok_per_sec"] == pytest.approx(batch / tpot)
        step_bytes = result["weight_bytes_per_step"] + batch * result["kv_read_bytes_per_step"]
        assert row["mbu_percent"] == pytest.approx(100 * step_bytes / tpot / result["peak_bandwidth"])
        flops = batch * decode_flops_per_token(cfg, 116)
        assert row["mfu_percent"] == pytest.approx(100 * flops / tpot / result["peak_flops"])
    assert result["prefill"]["time_sec"] == result["sweep"][0]["ttft_sec"]  # batch 1's
    assert result["prefill"]["mfu_percent"] == pytest.approx(
        100 * prefill_flops(cfg, 104) / result["prefill"]["time_sec"] / result["peak_flops"])


def test_settings_that_cannot_run_are_refused(home, capsys):
    bench = load_script("infer_bench")
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch-sizes", "1,x"])
    assert "--batch-sizes takes whole numbers" in capsys.readouterr().err
    for tokens in ("0", "1"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--decode-tokens", tokens])
    save_tiny_checkpoint(home, random_model(), byte_tokenizer(), stage="base", step=1)
    with pytest.raises(bench.UserError, match="leaves no room for a prompt in the model's context of 128 tokens"):
        bench.main(["--decode-tokens", "128"])
    with pytest.raises(bench.UserError, match="--decode-tokens 16 must be more than --chunk 16"):
        bench.main(["--decode-tokens", "16"])
    capsys.readouterr()
    assert bench.main(["--batch-sizes", "2"]) == 0  # by default half the context (128) is generated
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["prompt_tokens"], result["decode_tokens"]) == (64, 64)
