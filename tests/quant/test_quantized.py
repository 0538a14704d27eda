"""Weight quantization: the in-memory layers decode exactly what the checkpoint codecs decode, a
quantized model saves in DeepSeek's layout and loads back bit for bit (kept quantized or
dequantized), transformers reads the V3 FP8 files we write, and the engine and CLI run on it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import sparseek
from sparseek.checkpoint.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8, unpack_fp4
from sparseek.model import build_model
from sparseek.model.common import Experts
from sparseek.quant import QuantExperts, QuantLinear, quantize_model_, quantized_bytes
from sparseek.quant import formats
from sparseek.quant.formats import dequantize, packed_decode, scales, values, word_planes_ok, word_product
from tests.conftest import randomize_, rel_err


@pytest.fixture(scope="module")
def v4():
    return randomize_(build_model(sparseek.preset("debug")), 7).eval()


def _ids(vocab=512, T=50):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(3))


def _u8(t):
    return t.contiguous().view(torch.uint8)


# ---------------------------------------------------------------------------- formats
def test_fp4_decoding_matches_the_table_for_every_byte():
    every = torch.arange(256, dtype=torch.uint8).view(8, 32)
    assert torch.equal(values(every, "fp4"), unpack_fp4(every.view(torch.int8)))


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (70, 64)])
@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32])
def test_fp8_decoding_matches_the_checkpoint_codec(shape, scale_dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    q, s = quant_fp8(w, scale_dtype=scale_dtype)
    fmt = "e8m0" if scale_dtype == torch.float8_e8m0fnu else "f32"
    got = dequantize(_u8(q), _u8(s), "fp8", fmt, shape[1], torch.float32)
    assert torch.equal(got, dequant_fp8(q, s, torch.float32))


def test_fp4_stack_decoding_matches_the_checkpoint_codec():
    w = torch.randn(3, 40, 96, generator=torch.Generator().manual_seed(2))
    parts = [quant_fp4(w[e]) for e in range(3)]
    raw = torch.stack([_u8(q) for q, _ in parts])
    scale = torch.stack([_u8(s) for _, s in parts])
    got = dequantize(raw, scale, "fp4", "e8m0", 96, torch.float32)
    for e, (q, s) in enumerate(parts):
        assert torch.equal(got[e], dequant_fp4(q, s, torch.float32))
    # a subset of the stack decodes as those experts alone
    idx = torch.tensor([2, 0])
    assert torch.equal(dequantize(raw[idx], scale[idx], "fp4", "e8m0", 96, torch.float32), got[idx])


def _every_code(fmt: str, sf: str, lead=(3,), out: int = 256, inp: int = 384, seed: int = 0):
    """Random bytes (every byte value among the first 256) and scales for a [*lead, out, inp] weight."""
    g = torch.Generator().manual_seed(seed)
    stored = inp if fmt == "fp8" else inp // 2
    raw = torch.randint(0, 256, (*lead, out, stored), dtype=torch.uint8, generator=g)
    raw.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    if fmt == "fp8":  # the NaN codes: never written by a converter (it clamps to +-448)
        raw[(raw & 0x7F) == 0x7F] = 0x3C
    rows, cols = (-(-out // 128), -(-inp // 128)) if fmt == "fp8" else (out, inp // 32)
    if sf == "e8m0":
        sc = torch.randint(100, 140, (*lead, rows, cols), dtype=torch.uint8, generator=g)
    else:
        sc = _u8(torch.rand(*lead, rows, cols, generator=g) * 1e-2).view(*lead, rows, cols * 4)
    return raw, sc


@pytest.mark.parametrize("fmt,sf", [("fp8", "e8m0"), ("fp8", "f32"), ("fp4", "e8m0"), ("fp4", "f32")])
def test_word_product_is_the_product_with_the_decoded_weight(fmt, sf):
    """Codes read a 32-bit word at a time (subnormal ones included, which compiled code must not
    flush) give the product with the decoded weight: per expert, shared, eager and compiled."""
    raw, sc = _every_code(fmt, sf)
    assert word_planes_ok(fmt, raw)
    x = torch.randn(3, 2, 384, generator=torch.Generator().manual_seed(1))
    w = dequantize(raw, sc, fmt, sf, 384, torch.float32)
    want = torch.einsum("eni,eoi->eno", x, w)
    assert rel_err(word_product(x, raw, sc, fmt, sf, 256, 384), want) < 1e-6
    assert rel_err(torch.compile(word_product, dynamic=False)(x, raw, sc, fmt, sf, 256, 384), want) < 1e-6
    # one weight for every row
    assert rel_err(word_product(x[0], raw[1], sc[1], fmt, sf, 256, 384), x[0] @ w[1].t()) < 1e-6
    # one row per weight (a decode step's (token, slot) pairs: leading dims and rows as one loop),
    # the weights given as int32 words gathered from the stack
    pairs = torch.tensor([[2, 0], [1, 2]])
    x1 = x[:, :1].reshape(1, 3, 1, 384).expand(2, 3, 1, 384)[:, :2]  # [2, 2, 1, 384]
    want1 = torch.einsum("abni,aboi->abno", x1, w[pairs])
    for f in (word_product, torch.compile(word_product, dynamic=False)):
        got = f(x1, raw.view(torch.int32)[pairs], sc[pairs], fmt, sf, 256, 384)
        assert got.shape == (2, 2, 1, 256) and rel_err(got, want1) < 1e-6


def test_fp4_planes_are_never_denormal():
    """Every e2m1 code read from a word is zero or a normal fp32 (a denormal operand costs an Intel
    core a microcode assist per multiply: 20x slower word products), worth its value times 2^-125."""
    from sparseek.quant.formats import plane_values, values

    words = torch.arange(16, dtype=torch.int32).repeat_interleave(8).view(16, 8)
    shifts = torch.arange(8, dtype=torch.int32) * 4
    words = (words << shifts).sum(-1, dtype=torch.int32)  # word c holds code c in all 8 places
    code_values = values(torch.arange(16, dtype=torch.uint8), "fp4").view(16, 2)[:, 0]  # low nibble: code c
    assert code_values[1] == 0.5 and code_values[2] == 1.0 and code_values[15] == -6.0
    for j in range(8):
        got = plane_values(words, "fp4", j)
        assert bool(((got == 0) | (got.abs() >= torch.finfo(torch.float32).tiny)).all())
        assert torch.equal(got * 2.0 ** 125, code_values)


def test_word_product_needs_whole_words_and_blocks():
    assert not word_planes_ok("fp8", torch.zeros(130, 256, dtype=torch.uint8))  # partial scale blocks
    assert not word_planes_ok("fp4", torch.zeros(64, 6, dtype=torch.uint8))  # 12 inputs: no whole word
    assert word_planes_ok("fp4", torch.zeros(64, 16, dtype=torch.uint8))


def _quantized_layers(fmt: str) -> tuple[QuantLinear, QuantExperts]:
    """A [384, 256] linear layer and 8 experts (256 -> 128) quantized to ``fmt``."""
    torch.manual_seed(0)
    lin = QuantLinear.from_linear(torch.nn.Linear(256, 384, bias=False), fmt)
    dense = Experts(8, 256, 128, limit=7.0)
    with torch.no_grad():
        for p in (dense.w1, dense.w2, dense.w3):
            p.copy_(torch.randn(p.shape) / 8)
    return lin, QuantExperts.from_experts(dense, fmt)


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_compiled_quantized_layers_decode_by_words(fmt, monkeypatch):
    """Compiled on a CPU, QuantLinear (a product of up to WORD_ROWS rows) and the experts'
    decode step take the word path and equal their eager forward."""
    lin, q = _quantized_layers(fmt)
    x = torch.randn(3, 256)
    w, idx = torch.rand(3, 2), torch.randint(0, 8, (3, 2))
    from sparseek.quant import modules

    calls = []

    def counted(*a, **k):
        calls.append(a[3])
        return word_product(*a, **k)

    monkeypatch.setattr(modules, "word_product", counted)
    torch._dynamo.reset()
    got_lin = torch.compile(lin, dynamic=False)(x)
    got_exp = torch.compile(q.forward_static, dynamic=False)(x, w, idx)
    assert calls.count(fmt) == 1 + 3  # the linear layer; w1, w3, w2 (all slots in one product each)
    assert rel_err(got_lin, lin(x)) < 1e-6
    assert rel_err(got_exp, q.forward_static(x, w, idx)) < 1e-6
    # hash-routed layers look their experts up from the token ids inside the graph
    table, tok = torch.randint(0, 8, (50, 2)), torch.tensor([3, 17, 3])
    got_hash = torch.compile(lambda t: q.forward_static(x, w, table[t]), dynamic=False)(tok)
    assert rel_err(got_hash, q.forward_static(x, w, table[tok])) < 1e-6


def test_e8m0_scales_are_their_powers_of_two_for_every_byte():
    e = torch.arange(256, dtype=torch.uint8)
    want = torch.exp2(e.double() - 127).float()  # 2^-127 is subnormal in fp32, 2^128 (the NaN byte) inf
    assert torch.equal(scales(e, "e8m0"), want)
    assert torch.equal(torch.compile(scales)(e, "e8m0"), want)


@pytest.mark.parametrize("fmt,sf", [("fp8", "e8m0"), ("fp8", "f32"), ("fp4", "e8m0"), ("fp4", "f32")])
def test_packed_decoding_is_the_decoded_weight(fmt, sf):
    """Whole matrices decoded by the packed kernel (eager and compiled: subnormal codes must not
    be flushed, the packed lanes must land in order) are ``dequantize``'s bits, for bf16 and
    fp32, a stack or one matrix, some experts of two stacks concatenated along the rows."""
    raw, sc = _every_code(fmt, sf)
    raw2, sc2 = _every_code(fmt, sf, seed=1)
    s, s2 = scales(sc, sf), scales(sc2, sf)
    idx = torch.tensor([2, 0])
    compiled = torch.compile(packed_decode, dynamic=True)
    for dtype in (torch.bfloat16, torch.float32):
        bf16 = dtype == torch.bfloat16
        want = dequantize(raw, sc, fmt, sf, 384, dtype)
        want2 = dequantize(raw2, sc2, fmt, sf, 384, dtype)
        for kernel in (packed_decode, compiled):
            assert torch.equal(kernel([raw], [s], None, fmt, bf16).view(dtype), want)
            assert torch.equal(kernel([raw[1]], [s[1]], None, fmt, bf16).view(dtype), want[1])
            both = kernel([raw, raw2], [s, s2], idx, fmt, bf16).view(dtype)
            assert torch.equal(both, torch.cat([want[idx], want2[idx]], dim=1))


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_compiled_decoders_decode_the_layers_weights(fmt, monkeypatch):
    """After ``compile_decoders()`` a quantized layer's eager forward decodes its weights with
    the compiled kernel (two experts' matrices in one call for the gate / up pair) and gives the
    same bits as without it."""
    lin, q = _quantized_layers(fmt)
    x = torch.randn(20, 256, dtype=torch.bfloat16)
    w, idx = torch.rand(20, 2), torch.randint(0, 6, (20, 2))
    want_lin, want_exp = lin(x), q(x, w, idx)
    monkeypatch.setattr(formats, "_decoder", None)
    formats.compile_decoders()
    calls = []
    kernel = formats._decoder

    def counted(raws, *a):
        calls.append(len(raws))
        return kernel(raws, *a)

    monkeypatch.setattr(formats, "_decoder", counted)
    assert torch.equal(lin(x), want_lin)
    assert torch.equal(q(x, w, idx), want_exp)
    assert calls == [1, 2, 1]  # the linear layer; the experts' w1 + w3, then w2
    assert torch.equal(lin.dequantize(torch.float16), dequantize(lin.weight, lin.scale, fmt, "e8m0", 256,
                                                                 torch.float16))  # fp16: the eager path
    assert calls == [1, 2, 1]


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_prefill_decodes_into_a_kept_buffer_and_big_layers_in_groups(fmt, monkeypatch):
    """Without autograd, the compiled decoder writes a linear layer's decoded fp32 weight into this
    thread's kept buffer (the same memory on every call: no fresh pages to fault in) with the
    bits of a fresh decode; under autograd it is a fresh tensor. A layer whose decoded experts
    exceed DECODE_BUDGET_BYTES runs its experts in groups (eager and inside a compiled forward,
    which leaves the graph for them) with the result of one pass."""
    from sparseek.quant import modules

    monkeypatch.setattr(formats, "SCRATCH_MIN_BYTES", 0)
    monkeypatch.setattr(formats, "_decoder", None)
    formats.compile_decoders()
    formats.release_scratch()
    lin, q = _quantized_layers(fmt)
    x = torch.randn(20, 256)
    w, idx = torch.rand(20, 2), torch.randint(0, 6, (20, 2))
    fresh = lin.dequantize(torch.float32)
    assert lin.dequantize(torch.float32, scratch="linear").data_ptr() != fresh.data_ptr()
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            kept = lin.dequantize(dtype, scratch="linear")
            assert torch.equal(kept, lin.dequantize(dtype)) and kept.dtype == dtype
            same = lin.dequantize(dtype, scratch="linear").data_ptr() == kept.data_ptr()
            assert same == (dtype == torch.float32)  # into bf16: fresh (see formats)
        assert torch.equal(lin(x), F.linear(x, fresh))
        one_pass = q(x, w, idx)
        groups = []
        decoded = QuantExperts.dense

        def counted(self, hit, dtype):
            groups.append(hit.tolist())
            return decoded(self, hit, dtype)
        monkeypatch.setattr(QuantExperts, "dense", counted)
        per_expert = 3 * 256 * 128 * 4
        monkeypatch.setattr(modules, "DECODE_BUDGET_BYTES", 2 * per_expert)  # two experts a group
        in_groups = q(x, w, idx)
        hit = idx.unique().tolist()
        assert groups == [hit[i:i + 2] for i in range(0, len(hit), 2)] and len(groups) > 1
        groups.clear()  # a compiled forward leaves the graph for the groups
        compiled = torch.compile(QuantExperts.compute, backend="eager")(q, x, w, idx)
        assert groups == [hit[i:i + 2] for i in range(0, len(hit), 2)]
    assert rel_err(in_groups, one_pass) < 1e-6 and torch.equal(compiled, in_groups)
    ref = Experts.wrap(q.decoded("w1", torch.float32), q.decoded("w2", torch.float32),
                       q.decoded("w3", torch.float32), q.limit)
    assert rel_err(in_groups, ref(x, w, idx)) < 1e-6
    formats.release_scratch()


# ---------------------------------------------------------------------------- layers
@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_quant_linear_is_the_linear_of_its_decoded_weight(fmt):
    lin = torch.nn.Linear(96, 130, bias=False)
    q = QuantLinear.from_linear(lin, fmt)
    w = q.dequantize(torch.float32)
    ref = dequant_fp8(*quant_fp8(lin.weight.detach()), torch.float32) if fmt == "fp8" else \
        dequant_fp4(*quant_fp4(lin.weight.detach()), torch.float32)
    assert torch.equal(w, ref)
    x = torch.randn(5, 96)
    assert torch.equal(q(x), F.linear(x, w))
    # casting the model cannot touch the stored bytes (they are not floating point)
    before = (q.weight.clone(), q.scale.clone())
    q.to(torch.bfloat16)
    assert torch.equal(q.weight, before[0]) and torch.equal(q.scale, before[1])
    assert q(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_quant_experts_every_path_equals_dense_experts_of_the_decoded_weights(fmt):
    torch.manual_seed(0)
    dense = Experts(8, 64, 32, limit=7.0)
    with torch.no_grad():
        for p in (dense.w1, dense.w2, dense.w3):
            p.copy_(torch.randn(p.shape) / 8)
    q = QuantExperts.from_experts(dense, fmt)
    ref = Experts.wrap(q.decoded("w1", torch.float32), q.decoded("w2", torch.float32),
                       q.decoded("w3", torch.float32), q.limit)
    x = torch.randn(11, 64)
    w = torch.rand(11, 2)
    idx = torch.randint(0, 5, (11, 2))  # experts 5-7 get no token: only the hit ones are decoded
    want = ref(x, w, idx)
    assert rel_err(q(x, w, idx), want) < 1e-6
    assert rel_err(q.forward_static(x, w, idx), ref.forward_static(x, w, idx)) < 1e-6
    assert rel_err(q._forward_loop(x[:4], idx[:4, 0].sort().values, w[:4, :1]),
                   ref._forward_loop(x[:4], idx[:4, 0].sort().values, w[:4, :1])) < 1e-6
    # and the decoded weights are the codec's
    for name in ("w1", "w2", "w3"):
        codec = quant_fp4 if fmt == "fp4" else quant_fp8
        deq = dequant_fp4 if fmt == "fp4" else dequant_fp8
        assert torch.equal(q.decoded(name, torch.float32)[3], deq(*codec(getattr(dense, name)[3].detach()),
                                                                   torch.float32))


def test_fp4_falls_back_to_fp8_where_the_block_does_not_fit(caplog):
    m = randomize_(build_model(sparseek.preset("debug").replace(moe_intermediate_size=48)), 1)
    quantize_model_(m)
    assert m.layers[0].ffn.experts.fmt == "fp8"
    assert "FP8" in caplog.text


# ---------------------------------------------------------------------------- checkpoints
def test_quantized_v4_saves_in_deepseeks_layout_and_loads_back(v4, tmp_path):
    m = quantize_model_(copy.deepcopy(v4))
    q_bytes, other = quantized_bytes(m)
    assert q_bytes > 0
    ids = _ids()
    with torch.no_grad():
        ref = m(ids)
    sparseek.save(m, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0" and cfg["expert_dtype"] == "fp4"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        dt = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    # spec 7.2: FP4 experts (int8 + e8m0 per 32), FP8 linears incl. wo_a and the MTP projections,
    # bf16/fp32 compressors, indexer head weights, router, norms, embedding and head
    assert dt["layers.1.ffn.experts.3.w1.weight"] == "I8" and dt["layers.1.ffn.experts.3.w1.scale"] == "F8_E8M0"
    for k in ("layers.1.attn.wq_a", "layers.1.attn.wo_a", "layers.1.attn.indexer.wq_b", "mtp.0.e_proj",
              "layers.0.ffn.shared_experts.w2"):
        assert dt[f"{k}.weight"] == "F8_E4M3" and dt[f"{k}.scale"] == "F8_E8M0", k
    for k in ("embed.weight", "head.weight", "layers.1.attn.compressor.wkv.weight", "layers.1.ffn.gate.weight",
              "layers.1.attn.indexer.weights_proj.weight"):
        assert dt[k] in ("F32", "BF16"), k

    kept, _ = sparseek.load(str(tmp_path), dtype=torch.float32, tokenizer=False, quantize="stored")
    assert isinstance(kept.layers[1].attn.wq_a, QuantLinear) and isinstance(kept.layers[1].ffn.experts, QuantExperts)
    assert quantized_bytes(kept) == (q_bytes, other)
    plain, _ = sparseek.load(str(tmp_path), dtype=torch.float32, tokenizer=False)
    assert quantized_bytes(plain)[0] == 0
    with torch.no_grad():
        assert torch.equal(kept(ids), ref)
        assert rel_err(plain(ids), ref) < 1e-5
    # saved again from memory: the same bytes
    sparseek.save(kept, tmp_path / "again")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(_u8(a.get_tensor(k)), _u8(b.get_tensor(k))), k
    # a dequantized copy's files hold plain weights, so its config must not claim FP8
    sparseek.save(plain, tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in cfg


def test_v3_fp8_checkpoint_we_write_is_what_transformers_reads(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    v3 = randomize_(build_model(sparseek.preset("debug-v3")), 2).eval()
    quantize_model_(v3, experts="fp8")
    assert v3.layers[1].attn.wkv_b.scale_fmt == "f32"  # V3's weight_scale_inv
    sparseek.save(v3, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.0.down_proj.weight_scale_inv" in keys
    assert "model.layers.1.self_attn.kv_b_proj.weight_scale_inv" in keys  # absorbed attention decodes it
    ids = _ids()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.float32)
    kept, _ = sparseek.load(str(tmp_path), dtype=torch.float32, tokenizer=False, quantize="stored")
    with torch.no_grad():
        ours = v3(ids)
        assert rel_err(hf(ids).logits, ours) < 1e-5
        assert torch.equal(kept(ids), ours)


def test_official_style_fp8_checkpoint_stays_quantized(v4, tmp_path):
    """A checkpoint quantized elsewhere (FP8 linears, FP4 experts, e8m0 scales): `stored` keeps its
    bytes and computes what the dequantized load computes."""
    from tests.checkpoint.test_io import _quantize_dir

    sparseek.save(v4, tmp_path / "plain")
    _quantize_dir(tmp_path / "plain", tmp_path / "q", fp4_experts=True, scale_name="scale")
    kept, _ = sparseek.load(str(tmp_path / "q"), dtype=torch.float32, tokenizer=False, quantize="stored")
    plain, _ = sparseek.load(str(tmp_path / "q"), dtype=torch.float32, tokenizer=False)
    assert isinstance(kept.layers[1].ffn.experts, QuantExperts) and kept.layers[1].ffn.experts.fmt == "fp4"
    with torch.no_grad():
        assert rel_err(kept(_ids()), plain(_ids())) < 1e-5


def test_load_refuses_what_it_cannot_do(tmp_path, caplog):
    sparseek.save(build_model(sparseek.preset("debug")), tmp_path)
    m, _ = sparseek.load(str(tmp_path), tokenizer=False, quantize="stored")  # nothing stored quantized
    assert "no FP8 / FP4 weights" in caplog.text and quantized_bytes(m)[0] == 0
    with pytest.raises(ValueError, match="quantize"):
        sparseek.load("debug", quantize="int3")
    with pytest.raises(ValueError, match="has none"):
        sparseek.load("debug", quantize="stored")
    from sparseek.engine import LLM
    from sparseek.model.lora import add_lora

    m, _ = sparseek.load("debug", tokenizer=False)
    with pytest.raises(ValueError, match="quantize"):
        LLM(m, quantize="fp8")
    with pytest.raises(ValueError, match="unquantized"):
        add_lora(quantize_model_(m))


# ---------------------------------------------------------------------------- engine and CLI
def test_decode_step_and_engine_on_quantized_weights(v4, tmp_path):
    """The fixed-shape decode step (experts gathered from their bytes) equals the forward, and the
    engine's greedy tokens from kept-quantized weights equal those of the dequantized load."""
    from sparseek.engine import LLM, SamplingParams
    from sparseek.tokenizer import default_tokenizer

    m = quantize_model_(copy.deepcopy(v4))
    ids = _ids(T=12)
    cache_a, cache_b = m.new_cache(2, 64), m.new_cache(2, 64)
    with torch.no_grad():
        m(ids[:, :8], cache=cache_a)
        m(ids[:, :8], cache=cache_b)
        for t in range(8, 12):
            assert rel_err(m.decode_step(ids[:, t:t + 1], cache_a), m(ids[:, t:t + 1], cache=cache_b)[:, -1]) < 1e-5
    sparseek.save(m, tmp_path)
    tok = default_tokenizer(512)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = ["def add(a, b):", "class Point:", "import os"]
    kept = LLM(str(tmp_path), tok, dtype=torch.float32, max_batch_size=2, max_seq_len=128, quantize="stored")
    plain = LLM(str(tmp_path), tok, dtype=torch.float32, max_batch_size=2, max_seq_len=128)
    assert [o.token_ids for o in kept.generate(prompts, params)] == [o.token_ids for o in plain.generate(prompts, params)]


def test_quantize_cli_writes_a_checkpoint_and_a_report(tmp_path, capsys):
    from sparseek.cli import main

    src = tmp_path / "bf16"
    from sparseek.tokenizer import default_tokenizer

    sparseek.save(randomize_(build_model(sparseek.preset("debug"), dtype=torch.bfloat16), 4), src,
                  tokenizer=default_tokenizer(512))
    assert main(["quantize", str(src), str(tmp_path / "q"), "--eval-windows", "2", "--eval-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement" in out and "KL mean" in out
    rep = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    r = rep["report"]
    assert r["tokens"] == 62 and 0 <= r["kl_mean"] <= r["kl_max"] and 0 < r["top1_agreement"] <= 1
    # in memory the original is fp32 or bf16 by the host's half-precision speed; on disk it is bf16
    assert rep["bytes_after"] < rep["bytes_before"] * 0.7
    assert rep["disk_bytes_after"] < rep["disk_bytes_before"] * 0.7
    m, _ = sparseek.load(str(tmp_path / "q"), tokenizer=False, quantize="stored")
    assert isinstance(m.layers[0].ffn.experts, QuantExperts)
    # the written model generates through the CLI with its weights kept quantized
    assert main(["generate", "-m", str(tmp_path / "q"), "--quantize", "stored", "-p", "def", "--max-tokens", "3",
                 "--temperature", "0"]) == 0
    # without the report it quantizes straight from the stored (bf16, memory-mapped) weights: same files
    assert main(["quantize", str(src), str(tmp_path / "q2"), "--no-report"]) == 0
    assert not (tmp_path / "q2" / "quantization_report.json").exists()
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "q2" / "model.safetensors"), "pt") as b:
        assert all(torch.equal(_u8(a.get_tensor(k)), _u8(b.get_tensor(k))) for k in a.keys())
    # and refuses to overwrite its own input
    assert main(["quantize", str(tmp_path / "q"), str(tmp_path / "q")]) == 2
    assert "is the input" in capsys.readouterr().err


def test_quality_report_measures_the_difference():
    from sparseek.quant.convert import compare

    lp = F.log_softmax(torch.randn(1, 20, 50), -1)[0]
    w = torch.randint(0, 50, (20,))
    same = compare([lp], [lp.clone()], [w])
    assert same["kl_max"] < 1e-6 and same["top1_agreement"] == 1 and abs(same["ppl_ratio"] - 1) < 1e-6
    other = compare([lp], [F.log_softmax(torch.randn(20, 50), -1)], [w])
    assert other["kl_mean"] > 0.1 and other["top1_agreement"] < 1


@pytest.mark.slow
def test_compiled_decode_on_quantized_weights_gives_the_same_tokens(v4, eager_hot_paths):
    """The compiled decode step decodes the gathered experts' bytes inside its products."""
    from sparseek.engine import LLM, SamplingParams
    from sparseek.tokenizer import default_tokenizer

    m = quantize_model_(copy.deepcopy(v4))
    tok = default_tokenizer(512)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = ["def add(a, b):", "class Point:", "import os"]
    eager = LLM(m, tok, max_batch_size=2, max_seq_len=128).generate(prompts, params)
    compiled = LLM(m, tok, max_batch_size=2, max_seq_len=128, compile=True).generate(prompts, params)
    assert [o.token_ids for o in eager] == [o.token_ids for o in compiled]
