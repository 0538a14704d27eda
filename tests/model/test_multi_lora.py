"""Several LoRA adapters at once, one per batch row: each row's logits equal the model with that
row's adapter merged (V4 and V3; prefill, cached decode and the fixed-shape decode step)."""

from __future__ import annotations

import copy

import pytest
import torch

import sparseek
from sparseek.checkpoint.adapters import merge_adapters, read_adapters, save_adapters
from sparseek.model import build_model
from sparseek.model.lora import add_lora
from sparseek.model.multi_lora import attach_adapters
from tests.conftest import randomize_, rel_err


def _adapters(base, tmp_path, specs):
    """Adapter directories trained on nothing: random B so that each changes the model."""
    dirs = {}
    for i, (name, rank, targets) in enumerate(specs):
        m = copy.deepcopy(base)
        add_lora(m, rank=rank, alpha=2.0 * rank, targets=targets)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for k, p in m.named_parameters():
                if "lora_B" in k:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        save_adapters(m, str(tmp_path / name), base="debug")
        dirs[name] = str(tmp_path / name)
    return dirs


@pytest.mark.parametrize("preset", ["debug", "debug-v3"])
def test_each_row_runs_its_own_adapter(tmp_path, preset):
    base = randomize_(build_model(sparseek.preset(preset)), 3).eval()
    dirs = _adapters(base, tmp_path, [("a", 4, ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "wq", "wkv_a", "wkv_b", "wo",
                                                 "experts")),
                                      ("b", 2, ("experts",))])
    merged = {n: merge_adapters(copy.deepcopy(base), d).eval() for n, d in dirs.items()}
    merged[None] = base
    multi = copy.deepcopy(base)
    rows = attach_adapters(multi, {n: read_adapters(d) for n, d in dirs.items()})
    names = ["a", None, "b", "a"]
    rows.slots = torch.tensor([rows.slot(n) for n in names])
    ids = torch.randint(0, base.args.vocab_size, (4, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = multi(ids)
        for i, n in enumerate(names):
            want = merged[n](ids[i:i + 1])
            assert rel_err(got[i:i + 1], want) < 1e-4, (i, n)
        # cached: a chunked prefill then one-token steps, each row's adapter held by the cache
        cache = multi.new_cache(4, 64)
        cache.adapter[:] = rows.slots
        steps = [multi(ids[:, :30], cache)] + [multi(ids[:, t:t + 1], cache) for t in range(30, 40)]
        assert rel_err(torch.cat(steps, 1), got) < 1e-4
        if hasattr(multi, "decode_step"):  # V4's fixed-shape step gathers each token's expert pairs
            cache = multi.new_cache(4, 64)
            cache.adapter[:] = rows.slots
            multi(ids[:, :39], cache)
            assert rel_err(multi.decode_step(ids[:, 39:40], cache), got[:, -1]) < 1e-4
        rows.slots = None  # all rows on the base model: the plain paths
        assert rel_err(multi(ids), base(ids)) < 1e-5
        assert rel_err(multi(ids, multi.new_cache(4, 64)), base(ids)) < 1e-5  # a fresh cache: all base
    with pytest.raises(ValueError, match="unknown LoRA adapter 'c'"):
        rows.slot("c")


def test_engine_serves_adapters_per_request(tmp_path):
    """LLM(lora_modules=...): requests with different adapters (and the same prompt under two) in
    one continuous batch get the tokens of each adapter merged and run alone."""
    from sparseek.engine import LLM, SamplingParams
    from sparseek.tokenizer import default_tokenizer

    tok = default_tokenizer(512)
    base = randomize_(build_model(sparseek.preset("debug")), 5).eval()
    dirs = _adapters(base, tmp_path, [("a", 4, ("wq_a", "wo_a", "experts")), ("b", 2, ("wkv", "experts"))])
    llm = LLM(copy.deepcopy(base), tok, max_batch_size=3, max_seq_len=128, lora_modules=dirs)
    prompts = [[5, 9, 200, 17], [5, 9, 200, 17], list(range(30, 60)), [7] * 12, [5, 9, 200, 17]]
    names = ["a", "b", "a", None, None]
    params = [SamplingParams(max_tokens=10 + i, temperature=0, ignore_eos=True, lora=n) for i, n in enumerate(names)]
    got = llm.generate(prompts, params)
    for p, sp, out in zip(prompts, params, got):
        m = base if sp.lora is None else merge_adapters(copy.deepcopy(base), dirs[sp.lora])
        alone = LLM(m, tok, max_batch_size=1, max_seq_len=128).generate([p], SamplingParams(
            max_tokens=sp.max_tokens, temperature=0, ignore_eos=True))[0]
        assert out.token_ids == alone.token_ids, sp.lora
    assert got[0].token_ids != got[1].token_ids  # the adapters matter
    with pytest.raises(ValueError, match="unknown LoRA adapter 'c'"):
        llm.generate([[1, 2]], SamplingParams(lora="c"))
    with pytest.raises(ValueError, match="holds none"):
        LLM(copy.deepcopy(base), tok).generate([[1, 2]], SamplingParams(lora="a"))
    # MTP speculative decoding with adapters (the MTP block's own attention adapted too): greedy
    # tokens as plain decoding gives them
    spec = LLM(copy.deepcopy(base), tok, max_batch_size=3, max_seq_len=128, lora_modules=dirs, speculative_tokens=2)
    drafted = spec.generate(prompts, params)
    assert [o.token_ids for o in drafted] == [o.token_ids for o in got] and all(o.drafted for o in drafted)
    assert any(".mtp." in f".{n}" and "MultiLoRA" in type(m).__name__ for n, m in spec.model.named_modules())


def test_prefix_cache_keeps_snapshots_per_adapter(tmp_path):
    """A prompt read under one adapter is never restored for another (or the base model): each
    request's tokens equal its adapter's alone, and only a repeat under the same adapter hits."""
    from sparseek.engine import LLM, SamplingParams
    from sparseek.tokenizer import default_tokenizer

    tok = default_tokenizer(512)
    base = randomize_(build_model(sparseek.preset("debug")), 7).eval()
    dirs = _adapters(base, tmp_path, [("a", 4, ("wq_a", "wkv", "wo_a", "experts"))])
    llm = LLM(copy.deepcopy(base), tok, max_batch_size=2, max_seq_len=160, lora_modules=dirs)
    assert llm.prefix_cache is not None
    system = list(range(40, 88))  # 48 tokens: three blocks of a kept prefix

    def run(lora, tail):
        sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, lora=lora)
        return llm.generate([system + tail], sp)[0]

    def alone(lora, tail):
        m = base if lora is None else merge_adapters(copy.deepcopy(base), dirs[lora])
        return LLM(m, tok, max_batch_size=1, max_seq_len=160, prefix_cache_bytes=0).generate(
            [system + tail], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].token_ids

    first = run("a", [3, 4, 5])
    assert first.token_ids == alone("a", [3, 4, 5]) and llm.prefix_cache.hits == 0
    other = run(None, [3, 4, 5])  # the same prompt, the base model: nothing of "a" restored
    assert other.num_cached_tokens == 0 and llm.prefix_cache.hits == 0
    assert other.token_ids == alone(None, [3, 4, 5]) != first.token_ids
    again = run("a", [3, 4, 5, 6, 7])  # the same adapter: its kept prompt restored
    assert again.num_cached_tokens >= len(system) and llm.prefix_cache.hits == 1
    assert again.token_ids == alone("a", [3, 4, 5, 6, 7])


def _compiled_engine_equals_eager(tmp_path, monkeypatch, compiled: bool):
    from sparseek.engine import LLM, SamplingParams
    from sparseek.tokenizer import default_tokenizer

    if not compiled:  # the fixed-shape step run uncompiled: the engine's side in seconds
        from sparseek.engine import compile as engine_compile
        from sparseek.model import v4

        monkeypatch.setattr(engine_compile, "CompiledStep", lambda fn, device, **kw: fn)
        monkeypatch.setattr(v4, "compile_hot_paths", lambda: None)
    tok = default_tokenizer(512)
    base = randomize_(build_model(sparseek.preset("debug")), 11).eval()
    dirs = _adapters(base, tmp_path, [("a", 4, ("wq_a", "wkv", "wo_a", "wo_b", "experts")), ("b", 2, ("experts",))])
    prompts = [[5, 9, 200, 17], list(range(30, 70)), [7] * 12, [5, 9, 200, 17]]
    params = [SamplingParams(max_tokens=8 + i, temperature=0, ignore_eos=True, lora=n)
              for i, n in enumerate(["a", "b", None, "b"])]
    want = LLM(copy.deepcopy(base), tok, max_batch_size=3, max_seq_len=128, lora_modules=dirs).generate(prompts, params)
    llm = LLM(copy.deepcopy(base), tok, max_batch_size=3, max_seq_len=128, compile=True, lora_modules=dirs)
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    spec = LLM(copy.deepcopy(base), tok, max_batch_size=3, max_seq_len=128, compile=True, lora_modules=dirs,
               speculative_tokens=2)  # the fixed-shape verify and MTP steps with adapters
    assert [o.token_ids for o in spec.generate(prompts, params)] == [o.token_ids for o in want]
    assert got[0].token_ids != got[3].token_ids  # one prompt, two adapters


def test_fixed_shape_decode_step_runs_each_row_s_adapter(tmp_path, monkeypatch):
    _compiled_engine_equals_eager(tmp_path, monkeypatch, compiled=False)


@pytest.mark.slow
def test_compiled_decode_runs_each_row_s_adapter(tmp_path, monkeypatch, eager_hot_paths):
    """The compiled step gathers each token's pair (one graph for any mix of adapters)."""
    _compiled_engine_equals_eager(tmp_path, monkeypatch, compiled=True)


def test_adapters_load_and_unload_at_run_time(tmp_path):
    """LLM.load_lora / unload_lora: adapters come and go between calls, each request still getting
    its adapter's tokens; an engine without adapters takes a first one and, without any again,
    runs the base model plainly; bad adapters are refused and change nothing."""
    from sparseek.engine import LLM, SamplingParams
    from sparseek.tokenizer import default_tokenizer

    tok = default_tokenizer(512)
    base = randomize_(build_model(sparseek.preset("debug")), 5).eval()
    dirs = _adapters(base, tmp_path, [("a", 4, ("wq_a", "wo_a", "experts")), ("b", 2, ("wkv", "experts"))])
    prompts = [[5, 9, 200, 17], list(range(30, 50))]

    def alone(name, p):
        m = base if name is None else merge_adapters(copy.deepcopy(base), dirs[name])
        return LLM(m, tok, max_batch_size=1, max_seq_len=96).generate([p], SamplingParams(
            max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids

    def run(llm, names):
        sps = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, lora=n) for n in names]
        return [o.token_ids for o in llm.generate(prompts, sps)]

    llm = LLM(copy.deepcopy(base), tok, max_batch_size=2, max_seq_len=96)
    llm.load_lora("b", dirs["b"])  # the first adapter of an engine started without any
    assert run(llm, ["b", None]) == [alone("b", prompts[0]), alone(None, prompts[1])]
    llm.load_lora("a", dirs["a"])
    assert llm.lora_rows.names == ["b", "a"]
    assert run(llm, ["a", "b"]) == [alone("a", prompts[0]), alone("b", prompts[1])]
    with pytest.raises(ValueError, match="already loaded"):
        llm.load_lora("a", dirs["a"])
    with pytest.raises((ValueError, OSError)):
        llm.load_lora("c", str(tmp_path / "nowhere"))
    other = _adapters(randomize_(build_model(sparseek.preset("debug", hidden_size=48)), 1), tmp_path / "x",
                      [("wide", 2, ("wq_a",))])
    with pytest.raises(ValueError, match="do not fit"):
        llm.load_lora("wide", other["wide"])
    assert llm.lora_rows.names == ["b", "a"] and run(llm, ["a", "b"]) == [alone("a", prompts[0]),
                                                                          alone("b", prompts[1])]
    llm.unload_lora("b")
    with pytest.raises(ValueError, match="unknown LoRA adapter 'b'"):
        run(llm, ["b", None])
    assert run(llm, [None, "a"]) == [alone(None, prompts[0]), alone("a", prompts[1])]
    llm.unload_lora("a")
    assert llm.lora_rows is None and not any("Multi" in type(m).__name__ for m in llm.model.modules())
    assert run(llm, [None, None]) == [alone(None, p) for p in prompts]
    with pytest.raises(ValueError, match="unknown LoRA adapter"):
        llm.unload_lora("a")
