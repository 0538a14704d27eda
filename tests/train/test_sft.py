"""Supervised fine-tuning masks and LoRA adapters (attention + routed experts)."""

from __future__ import annotations

import json

import pytest
import torch

import sparseek
from sparseek.model import build_model
from sparseek.tokenizer import default_tokenizer
from sparseek.checkpoint.adapters import load_adapters, save_adapters
from sparseek.model.lora import LoRAExperts, LoRALinear, add_lora, merge_lora
from sparseek.train.sft import IGNORE, SFTConfig, encode_example, finetune
from tests.conftest import randomize_


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(512)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "add them"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6"},
]


@pytest.mark.parametrize("thinking", [False, True])
def test_only_assistant_tokens_are_trained(tok, thinking):
    ids, labels = encode_example(tok, CHAT, thinking=thinking)
    trained = tok.decode([t for t in labels if t != IGNORE], skip_special_tokens=False)
    eos = "<｜end▁of▁sentence｜>"
    if thinking:
        assert trained == f"add them</think>4{eos}</think>6{eos}"
    else:
        assert trained == f"4{eos}6{eos}"
    prompt = tok.decode([t for t, l in zip(ids, labels) if l == IGNORE], skip_special_tokens=False)
    assert "Be brief." in prompt and "2+2?" in prompt and "<｜Assistant｜>" in prompt
    assert "add them" not in prompt and "4" not in prompt.replace("3+3", "")


def test_tool_calls_are_trained(tok):
    chat = [{"role": "system", "content": "s", "tools": [{"type": "function", "function": {"name": "f"}}]},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": json.dumps({"x": 1})}}]},
            {"role": "tool", "content": "ok"},
            {"role": "assistant", "content": "done"}]
    ids, labels = encode_example(tok, chat)
    trained = tok.decode([t for t in labels if t != IGNORE], skip_special_tokens=False)
    assert '<｜DSML｜invoke name="f">' in trained and trained.endswith("done<｜end▁of▁sentence｜>")
    assert "<tool_result>" not in trained


@pytest.fixture
def v4():
    return randomize_(build_model(sparseek.preset("debug")), 2).eval()


def _ids():
    return torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))


def test_lora_merge_equals_unmerged(v4):
    add_lora(v4, rank=4, alpha=8.0)
    kinds = {type(m) for m in v4.modules()}
    assert LoRALinear in kinds and LoRAExperts in kinds
    assert v4.layers[1].attn.compressor.wkv.__class__ is torch.nn.Linear  # compressors untouched
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in v4.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        adapted = v4(_ids())
        base_out = None
    trainable = {n for n, p in v4.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    merged = merge_lora(v4)
    assert not any(isinstance(m, (LoRALinear, LoRAExperts)) for m in merged.modules())
    with torch.no_grad():
        assert torch.allclose(merged(_ids()), adapted, atol=1e-4)
    assert base_out is None


def test_adapters_save_and_load(v4, tmp_path):
    ref_model = randomize_(build_model(sparseek.preset("debug")), 2).eval()
    add_lora(v4, rank=2)
    with torch.no_grad():
        for n, p in v4.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        want = v4(_ids())
    save_adapters(v4, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    load_adapters(ref_model, tmp_path)
    with torch.no_grad():
        assert torch.allclose(ref_model(_ids()), want, atol=1e-6)


def test_sft_with_lora_learns_and_leaves_the_base(tok, tmp_path):
    model = randomize_(build_model(sparseek.preset("debug")), 3)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                             {"role": "assistant", "content": f"number {i} it is"}]}) + "\n")
    res = finetune(model, tok, SFTConfig(data=str(data), out=str(tmp_path / "out"), max_steps=30, lr=5e-3,
                                         batch_size=4, lora_rank=4, warmup=2), log=lambda s: None)
    assert res["losses"][-1] < 0.5 * res["losses"][0]
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            key = k.replace(".base.", ".")
            assert torch.equal(v, base[key]), k
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
