"""LoRA adapters in inference: merged from their files into the weights (``merge_adapters``, ``sparseek.checkpoint.adapters``), loaded
with their base by ``sparseek.load`` / ``LLM`` / the CLI, refused by name when they do not fit."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

import sparseek
from sparseek.checkpoint import load_model, save_model
from sparseek.engine import LLM, SamplingParams
from sparseek.model import build_model
from sparseek.checkpoint.adapters import merge_adapters, save_adapters
from sparseek.model.lora import add_lora
from sparseek.tokenizer import default_tokenizer
from tests.conftest import randomize_


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(512)


def _ids():
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def _adapted(preset: str, seed: int, rank: int = 4, alpha: float = 8.0):
    """A random model with random (non-zero) adapters on attention and experts, unmerged."""
    model = randomize_(build_model(sparseek.preset(preset)), seed).eval()
    add_lora(model, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("preset", ["debug", "debug-v3"])
def test_merged_from_file_equals_the_unmerged_adapters(preset, tmp_path):
    adapted = _adapted(preset, 2)
    with torch.no_grad():
        want = adapted(_ids())
    save_adapters(adapted, tmp_path)
    base = randomize_(build_model(sparseek.preset(preset)), 2).eval()
    with torch.no_grad():
        before = base(_ids())
    merge_adapters(base, str(tmp_path))
    assert not any("lora" in type(m).__name__.lower() for m in base.modules())  # plain modules: fast paths stay
    with torch.no_grad():
        got = base(_ids())
    assert (before - want).abs().max() > 1e-2  # the adapters change the output...
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)  # ...and merging keeps that change


def test_merge_sums_in_fp32_and_rounds_once(tmp_path):
    adapted = _adapted("debug", 3)
    save_adapters(adapted, tmp_path)
    base = randomize_(build_model(sparseek.preset("debug")), 3).to(torch.bfloat16)
    w0 = base.layers[0].attn.wq_a.weight.detach().clone()
    e0 = base.layers[0].ffn.experts.w2.detach().clone()
    merge_adapters(base, str(tmp_path))
    la = adapted.layers[0].attn.wq_a
    want = (w0.float() + la.scale * (la.lora_B.float() @ la.lora_A.float())).to(torch.bfloat16)
    assert torch.equal(base.layers[0].attn.wq_a.weight, want)
    ex = adapted.layers[0].ffn.experts
    want_e = (e0.float() + ex.scale * torch.bmm(ex.lora_B_w2.float(), ex.lora_A_w2.float())).to(torch.bfloat16)
    assert torch.equal(base.layers[0].ffn.experts.w2, want_e)


def test_adapters_that_do_not_fit_are_refused_by_name(tmp_path):
    save_adapters(_adapted("debug", 1), tmp_path / "v4")
    other = randomize_(build_model(sparseek.preset("debug-v3")), 1)
    with pytest.raises(ValueError, match="do not fit this model: .*missing"):
        merge_adapters(other, str(tmp_path / "v4"))
    wider = randomize_(build_model(sparseek.preset("debug", moe_intermediate_size=48)), 1)
    with pytest.raises(ValueError, match="of another shape .*lora_A_w2"):
        merge_adapters(wider, str(tmp_path / "v4"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        merge_adapters(other, str(tmp_path))
    with pytest.raises(ValueError, match="names no base model"):
        sparseek.load(str(tmp_path / "v4"))


def test_save_is_whole_and_names_its_base(tmp_path, tok):
    adapted = _adapted("debug", 1)
    save_adapters(adapted, tmp_path / "a", base="debug", tokenizer=tok)
    names = sorted(os.listdir(tmp_path / "a"))
    assert "adapter_model.safetensors" in names and "tokenizer.json" in names
    assert not [n for n in names if n.startswith(".")]  # the staging directory is gone
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "debug" and cfg["peft_type"] == "LORA"
    save_adapters(adapted, tmp_path / "b", base=str(tmp_path / "a"))  # a directory is kept absolute
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((tmp_path / "a").resolve())


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tok):
    """A saved base checkpoint and LoRA adapters trained on it by ``finetune`` (which records the base)."""
    from sparseek.train.sft import SFTConfig, finetune

    root = tmp_path_factory.mktemp("lora")
    base = randomize_(build_model(sparseek.preset("debug")), 4).eval()
    save_model(base, root / "base", tokenizer=tok)
    data = root / "chat.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                             {"role": "assistant", "content": f"number {i} it is"}]}) + "\n")
    model = load_model(str(root / "base"), dtype=torch.float32)
    finetune(model, tok, SFTConfig(data=str(data), out=str(root / "ft"), max_steps=6, lr=5e-3, batch_size=4,
                                   lora_rank=4, warmup=1, base=str(root / "base")), log=lambda s: None)
    with torch.no_grad():
        want = model(_ids())  # the fine-tuned model, adapters unmerged
    return root, want


def test_load_an_adapter_directory_merges_onto_its_base(finetuned):
    root, want = finetuned
    model, tok = sparseek.load(str(root / "ft"), dtype="float32")
    assert tok is not None
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), want, atol=2e-4, rtol=1e-4)
    explicit, _ = sparseek.load(str(root / "base"), dtype="float32", lora=str(root / "ft"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), explicit.state_dict().values()))
    with pytest.raises(ValueError, match="quantize='stored'"):
        sparseek.load(str(root / "ft"), quantize="stored")
    from sparseek.quant import quantize_model_

    q, _ = sparseek.load(str(root / "ft"), dtype="float32", quantize="fp8")
    assert any(type(m).__name__ == "QuantLinear" for m in q.modules())
    quantize_model_(model, experts="fp8")  # the merged model quantized: what quantize= must give
    with torch.no_grad():
        assert torch.equal(q(_ids()), model(_ids()))


def test_engine_and_cli_serve_the_fine_tune(finetuned, tmp_path, capsys):
    from sparseek.cli import main

    root, _ = finetuned
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    merged, tok = sparseek.load(str(root / "ft"), dtype="float32")
    want = LLM(merged, tok).generate(["def f(x):"], params)[0].token_ids
    assert LLM(str(root / "ft"), dtype="float32").generate(["def f(x):"], params)[0].token_ids == want
    base = LLM(str(root / "base"), dtype="float32", lora=[str(root / "ft")])
    assert base.generate(["def f(x):"], params)[0].token_ids == want
    with pytest.raises(ValueError, match="lora applies while loading"):
        LLM(merged, tok, lora=str(root / "ft"))

    assert main(["merge", "-m", str(root / "ft"), "--dtype", "float32", "--out", str(tmp_path / "merged")]) == 0
    again, _ = sparseek.load(str(tmp_path / "merged"), dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), again.state_dict().values()))
    assert main(["merge", "-m", str(root / "base"), "--out", str(tmp_path / "x")]) == 2
    assert "nothing to merge" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["generate", "-m", str(root / "base"), "--lora", str(root / "ft"), "--dtype", "float32",
                 "-p", "def f(x):", "--max-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def f(x):" + tok.decode(want))


def test_finetune_verb_writes_adapters_that_chat_loads(finetuned, tmp_path, capsys):
    from sparseek.cli import main

    root, _ = finetuned
    out = tmp_path / "ft2"
    assert main(["finetune", "-m", str(root / "ft"), "--data", str(root / "chat.jsonl"), "--out", str(out),
                 "--lora-rank", "2", "--max-steps", "2"]) == 0  # adapters trained on the merged fine-tune
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((root / "ft").resolve()) and cfg["r"] == 2
    stacked, _ = sparseek.load(str(out), dtype="float32")  # base, then ft, then ft2
    by_hand, _ = sparseek.load(str(root / "base"), dtype="float32", lora=[str(root / "ft"), str(out)])
    assert all(torch.equal(a, b) for a, b in zip(stacked.state_dict().values(), by_hand.state_dict().values()))


def _peft_adapters(preset: str, tmp_path, ids):
    """A random model saved as ``base`` and PEFT adapters trained (randomly) on transformers' copy of
    it, on its linear layers (attention, compressors and indexers, shared experts, dense MLPs), with
    rsLoRA scaling and a per-module alpha, saved as ``peft``: (model, PEFT's logits on ``ids``). On
    V3, transformers 5 hands PEFT its fused routed-expert tensors for gate/up/down_proj."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    # moe_intermediate_size 16: 2 x 16 != hidden 64, or PEFT cannot tell a fused [E, 2I, D] tensor's in from its out
    model = randomize_(build_model(sparseek.preset(preset, moe_intermediate_size=16)), 5).eval()
    sparseek.save(model, tmp_path / "base")
    cls = transformers.DeepseekV4ForCausalLM if model.args.is_v4 else transformers.DeepseekV3ForCausalLM
    hf = cls.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    # transformers' V4 reads o_a_proj's weight directly (grouped output projection): PEFT cannot wrap it
    targets = ["q_a_proj", "q_b_proj", "kv_proj", "o_b_proj", "gate_proj", "up_proj", "down_proj", "weights_proj"]
    if not model.args.is_v4:  # transformers 5 turns gate/up/down_proj on its fused experts into target_parameters
        targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                          init_lora_weights=False, use_rslora=True,
                          alpha_pattern={"o_b_proj" if model.args.is_v4 else "o_proj": 3.0, "q_b_proj": 5.0})
    tuned = peft.get_peft_model(hf, cfg).eval()
    with torch.no_grad():
        want = tuned(ids).logits
    tuned.save_pretrained(tmp_path / "peft")
    return model, want


@pytest.mark.parametrize("preset", ["debug", "debug-v3"])
def test_peft_adapters_merge_to_peft_s_logits(preset, tmp_path):
    """PEFT's adapters (``_peft_adapters``) merged by sparseek: the logits are PEFT's; on V3 the fused
    routed-expert adapters merge into every expert too."""
    model, want = _peft_adapters(preset, tmp_path, _ids())
    with torch.no_grad():
        base = model(_ids())
    merged, _ = sparseek.load(str(tmp_path / "base"), dtype="float32", lora=str(tmp_path / "peft"), tokenizer=False)
    with torch.no_grad():
        got = merged(_ids())
    assert (base - want).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # PEFT records the base's path: the adapter directory alone loads as the fine-tuned model
    alone, _ = sparseek.load(str(tmp_path / "peft"), dtype="float32", tokenizer=False)
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), merged.state_dict().values()))
    if not model.args.is_v4:  # the routed experts were adapted too, through the fused tensors
        keys = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_parameters"]
        assert sorted(keys) == ["down_proj", "gate_up_proj"]
        plain = randomize_(build_model(sparseek.preset(preset, moe_intermediate_size=16)), 5)
        moe = next(i for i, layer in enumerate(plain.layers) if hasattr(layer.ffn, "experts"))
        for w in ("w1", "w2", "w3"):
            assert not torch.equal(getattr(merged.layers[moe].ffn.experts, w), getattr(plain.layers[moe].ffn.experts, w))


@pytest.mark.parametrize("preset", ["debug", "debug-v3"])
def test_peft_adapters_serve_unmerged_per_row(preset, tmp_path):
    """The same PEFT adapters kept unmerged beside the base (vLLM's --lora-modules): converted to
    sparseek's layout, they adapt the compressors (read as weights) and the shared experts too; a
    row running them gives PEFT's logits (one-shot, chunked prefill + cached decode, V4's fixed-shape
    step), a row without them the base model's, and the engine's tokens equal the merged model's."""
    import copy

    from sparseek.checkpoint.adapters import read_adapters
    from sparseek.model.multi_lora import attach_adapters

    ids = _ids()
    model, want = _peft_adapters(preset, tmp_path, ids)
    cfg, state = read_adapters(str(tmp_path / "peft"), model)
    assert cfg["r"] == cfg["lora_alpha"] == 1  # the scales went into B
    if model.args.is_v4:  # PEFT's kv_proj / gate_proj also matched the compressors
        assert any(".compressor.wkv.lora_A" in k for k in state) and any(".compressor.wgate.lora_A" in k for k in state)
        assert any(".shared_experts.w2.lora_A" in k for k in state)
    else:
        assert any(k.endswith("experts.lora_A_w1") for k in state)
    multi = copy.deepcopy(model)
    rows = attach_adapters(multi, {"peft": (cfg, state)})
    rows.slots = torch.tensor([1, 0])
    both = torch.cat([ids[:1], ids[:1]])  # the same tokens, with and without the adapters
    with torch.no_grad():
        got = multi(both)
        torch.testing.assert_close(got[:1], want[:1], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(got[1:], model(ids[:1]), atol=1e-5, rtol=1e-5)
        cache = multi.new_cache(2, 64)
        cache.adapter[:] = rows.slots
        steps = [multi(both[:, :15], cache)] + [multi(both[:, t:t + 1], cache) for t in range(15, 24)]
        torch.testing.assert_close(torch.cat(steps, 1), got, atol=1e-4, rtol=1e-4)
        if hasattr(multi, "decode_step"):
            cache = multi.new_cache(2, 64)
            cache.adapter[:] = rows.slots
            multi(both[:, :23], cache)
            torch.testing.assert_close(multi.decode_step(both[:, 23:24], cache), got[:, -1], atol=1e-4, rtol=1e-4)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm = LLM(str(tmp_path / "base"), dtype="float32", lora_modules={"peft": str(tmp_path / "peft")})
    served = llm.generate([[3, 4, 5]], dataclasses.replace(sp, lora="peft"))[0].token_ids
    assert served == LLM(str(tmp_path / "peft"), dtype="float32").generate([[3, 4, 5]], sp)[0].token_ids


def test_adapters_for_modules_the_model_cannot_adapt_unmerged_are_refused(tmp_path):
    from sparseek.checkpoint.adapters import read_adapters
    from sparseek.model.multi_lora import attach_adapters

    model = randomize_(build_model(sparseek.preset("debug")), 6).eval()
    g = torch.Generator().manual_seed(0)
    n, dim = model.layers[0].ffn.gate.weight.shape
    # the router is a weight sparseek reads itself, not a linear layer: merge only
    _write_peft(tmp_path / "router", {"model.layers.0.mlp.gate.lora_A.weight": torch.randn(2, dim, generator=g),
                                      "model.layers.0.mlp.gate.lora_B.weight": torch.randn(n, 2, generator=g)},
                target_modules=["gate"])
    before = [m for m in model.modules()]
    with pytest.raises(ValueError, match="name no linear layer or expert stack"):
        attach_adapters(model, {"r": read_adapters(str(tmp_path / "router"), model)})
    assert [m for m in model.modules()] == before  # nothing left swapped
    with pytest.raises(ValueError, match="needs the model"):
        read_adapters(str(tmp_path / "router"))


def _write_peft(directory, tensors: dict, **cfg):
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file({f"base_model.model.{k}": v.clone().contiguous() for k, v in tensors.items()},
              os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["gate_proj"], **cfg}, f)


def test_peft_per_expert_modules_and_what_is_refused(tmp_path):
    """Per-expert modules (DeepSeek's own layout, transformers before fused experts) merge into their
    expert of the stack; DoRA, saved modules, biases and adapters that fit nothing are refused by name."""
    model = randomize_(build_model(sparseek.preset("debug-v3")), 6).eval()
    moe = next(i for i, layer in enumerate(model.layers) if hasattr(layer.ffn, "experts"))
    experts = model.layers[moe].ffn.experts
    g = torch.Generator().manual_seed(0)
    inter, dim = experts.w1.shape[1:]
    a, b = torch.randn(2, dim, generator=g), torch.randn(inter, 2, generator=g)
    before = experts.w1.detach().clone()
    _write_peft(tmp_path / "e", {f"model.layers.{moe}.mlp.experts.3.gate_proj.lora_A.weight": a,
                                 f"model.layers.{moe}.mlp.experts.3.gate_proj.lora_B.weight": b})
    merge_adapters(model, str(tmp_path / "e"))
    assert torch.equal(experts.w1[3], before[3] + 2.0 * (b @ a))  # alpha / r = 2
    assert torch.equal(torch.cat([experts.w1[:3], experts.w1[4:]]), torch.cat([before[:3], before[4:]]))
    for name, cfg, match in (("dora", {"use_dora": True}, "DoRA"), ("save", {"modules_to_save": ["lm_head"]},
                             "modules_to_save"), ("bias", {"bias": "all"}, "bias='all'")):
        _write_peft(tmp_path / name, {f"model.layers.{moe}.mlp.experts.3.gate_proj.lora_A.weight": a,
                                      f"model.layers.{moe}.mlp.experts.3.gate_proj.lora_B.weight": b}, **cfg)
        with pytest.raises(ValueError, match=match):
            merge_adapters(model, str(tmp_path / name))
    _write_peft(tmp_path / "wrong", {"model.layers.0.self_attn.nonesuch.lora_A.weight": a,
                                     "model.layers.0.self_attn.nonesuch.lora_B.weight": b,
                                     f"model.layers.{moe}.mlp.experts.3.gate_proj.lora_A.weight": a.t(),
                                     f"model.layers.{moe}.mlp.experts.3.gate_proj.lora_B.weight": b})
    with pytest.raises(ValueError, match=r"1 unexpected .*nonesuch.*1 of another shape .*experts.3.gate_proj"):
        merge_adapters(model, str(tmp_path / "wrong"))
    with pytest.raises(ValueError, match="does not attach them"):
        from sparseek.checkpoint.adapters import load_adapters

        load_adapters(model, str(tmp_path / "e"))


def test_a_part_of_the_experts_takes_its_part_of_the_adapters(tmp_path):
    """An expert stack holding experts [first, first + n) of a layer (an expert-sharded rank) gets
    exactly those experts' updates, from sparseek's stacked adapters and from PEFT's per-expert ones."""
    from sparseek.model.common import Experts

    save_adapters(_adapted("debug", 7), tmp_path / "ours")
    full = randomize_(build_model(sparseek.preset("debug")), 7)
    part = randomize_(build_model(sparseek.preset("debug")), 7)
    n = full.args.n_routed_experts
    layers = [i for i, layer in enumerate(part.layers) if hasattr(layer.ffn, "experts")]
    for i in layers:
        ex = part.layers[i].ffn.experts
        half = Experts.wrap(*(getattr(ex, w)[n // 2:].clone() for w in ("w1", "w2", "w3")), ex.limit)
        half.first, half.total = n // 2, n
        part.layers[i].ffn.experts = half
    g = torch.Generator().manual_seed(1)
    inter, dim = full.layers[layers[0]].ffn.experts.w1.shape[1:]
    peft_tensors = {}
    for e in (1, n - 1):  # one expert of each half
        peft_tensors[f"model.layers.{layers[0]}.ffn.experts.{e}.w1.lora_A.weight"] = torch.randn(2, dim, generator=g)
        peft_tensors[f"model.layers.{layers[0]}.ffn.experts.{e}.w1.lora_B.weight"] = torch.randn(inter, 2, generator=g)
    _write_peft(tmp_path / "peft", peft_tensors)
    for model in (full, part):
        merge_adapters(model, str(tmp_path / "ours"))
        merge_adapters(model, str(tmp_path / "peft"))
    for i in layers:
        for w in ("w1", "w2", "w3"):
            assert torch.equal(getattr(part.layers[i].ffn.experts, w), getattr(full.layers[i].ffn.experts, w)[n // 2:])
