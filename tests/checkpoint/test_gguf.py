"""GGUF (llama.cpp's format) for DeepSeek V2 / V3 and V4: export, import, tokenizer, errors.

The layout is checked against gguf-py (llama.cpp's own reader / quantizer) and against the
converter's rules written out independently here; logits against llama.cpp itself are compared
by benchmarks/gguf_llamacpp.py (llama.cpp is not a test dependency)."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import sparseek  # noqa: E402
from sparseek.checkpoint import CheckpointError  # noqa: E402
from sparseek.checkpoint.gguf import GGUFFile, save_gguf, tokenizer_from_gguf  # noqa: E402

TEXTS = ["def foo(x):\n    return x + 1  # héllo", "DeepSeek-V3 的 MoE 有 256 个专家。", "  spaces\t\tand 1234567 digits!!",
         "<｜begin▁of▁sentence｜>User: hi<｜end▁of▁sentence｜>", "カタカナ and emoji 🤖 ok"]


@pytest.fixture(scope="module", params=["debug-v3", "debug-v2"])
def family(request):
    model, tok = sparseek.load(request.param)
    return request.param, model, tok


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_f32_round_trip_is_exact(family, tmp_path):
    name, model, tok = family
    path = tmp_path / "m.gguf"
    res = save_gguf(model, path, tokenizer=tok, qtype="f32")
    assert res["files"] == [str(path)] and set(res["types"].values()) == {"F32"}
    back, tok2 = sparseek.load(str(path))
    assert back.args.model_type == model.args.model_type
    for field in ("hidden_size", "num_hidden_layers", "first_k_dense_replace", "q_lora_rank", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
                  "num_experts_per_tok", "scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor",
                  "n_group", "topk_group", "rope_theta", "max_position_embeddings", "vocab_size"):
        assert getattr(back.args, field) == getattr(model.args, field), field
    y, y2 = model.args.yarn(), back.args.yarn()
    for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale_all_dim"):
        assert float(y2[k]) == pytest.approx(float(y[k])), k
    assert len(back.mtp) == 0  # llama.cpp's layout drops the MTP layer
    sd, sd2 = model.state_dict(), back.state_dict()
    assert set(sd2) == {k for k in sd if not k.startswith("mtp.")}
    for k, v in sd2.items():
        assert torch.equal(v, sd[k]), k
    ids = torch.randint(0, model.args.vocab_size, (2, 24))
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    for text in TEXTS:
        assert tok2.encode(text) == tok.encode(text)
    assert (tok2.bos_id, tok2.eos_id) == (tok.bos_id, tok.eos_id)


def test_layout_follows_llama_cpp(tmp_path):
    """The converter's rules, restated: kv_b split per head into k_b (transposed) and v_b, experts
    stacked, 1-D tensors and the router in F32, and the metadata llama.cpp reads."""
    model, tok = sparseek.load("debug-v3")
    a = model.args
    path = tmp_path / "m.gguf"
    save_gguf(model, path, tokenizer=tok, qtype="f32")
    f = GGUFFile(str(path))
    h, nope, v, r = a.num_attention_heads, a.qk_nope_head_dim, a.v_head_dim, a.kv_lora_rank
    kv_b = model.layers[1].attn.wkv_b.weight.detach().view(h, nope + v, r)
    assert torch.equal(f.read("blk.1.attn_k_b.weight"), kv_b[:, :nope].transpose(1, 2))
    assert torch.equal(f.read("blk.1.attn_v_b.weight"), kv_b[:, nope:])
    assert f.shape("blk.1.ffn_gate_exps.weight") == (a.n_routed_experts, a.moe_intermediate_size, a.hidden_size)
    assert f.shape("blk.1.ffn_down_exps.weight") == (a.n_routed_experts, a.hidden_size, a.moe_intermediate_size)
    assert torch.equal(f.read("blk.2.exp_probs_b.bias"), model.layers[2].ffn.gate.bias)
    assert "blk.0.ffn_gate.weight" in f.tensors and "blk.0.ffn_gate_exps.weight" not in f.tensors  # dense first layer
    m = f.meta
    assert m["general.architecture"] == "deepseek2"
    assert m["deepseek2.attention.key_length"] == r + a.qk_rope_head_dim
    assert m["deepseek2.attention.key_length_mla"] == nope + a.qk_rope_head_dim
    assert m["deepseek2.attention.value_length_mla"] == v
    assert m["deepseek2.expert_gating_func"] == 2  # sigmoid
    assert m["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * a.yarn()["mscale_all_dim"])
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "gpt-2"

    save_gguf(model, path, tokenizer=tok, qtype="q8_0")
    q = GGUFFile(str(path))
    types = {n: q.type_name(n) for n in q.tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == "F32" and types["blk.1.attn_norm.weight"] == "F32"
    assert types["blk.1.ffn_gate_exps.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.1.attn_k_b.weight"] == "F16"  # rows of 16 do not fill a 32-block: the converter's fallback


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "bf16"])
def test_quantized_weights_are_ggml_blocks(qtype, tmp_path):
    """A quantized file loads as exactly what gguf-py's own quantize + dequantize make of the weights."""
    model, tok = sparseek.load("debug-v3")
    path = tmp_path / "m.gguf"
    save_gguf(model, path, tokenizer=tok, qtype=qtype)
    back, _ = sparseek.load(str(path), dtype="float32")
    w = model.layers[1].ffn.experts.w1.detach().float().numpy()
    t = gguf.GGMLQuantizationType[qtype.upper()]
    want = gguf.quants.dequantize(gguf.quants.quantize(w, t), t)
    assert np.array_equal(back.layers[1].ffn.experts.w1.detach().numpy(), want)
    head = back.head.weight.detach().numpy()
    if qtype == "q4_0":  # the output head is kept at Q8_0, as llama-quantize keeps it high
        q8 = gguf.GGMLQuantizationType.Q8_0
        ref = model.head.weight.detach().numpy()
        assert np.array_equal(head, gguf.quants.dequantize(gguf.quants.quantize(ref, q8), q8))
    ids = torch.randint(0, model.args.vocab_size, (1, 16))
    ref_p = _logits(model, ids).softmax(-1)
    got_p = _logits(back, ids).softmax(-1)
    assert (ref_p - got_p).abs().max() < {"bf16": 1e-3, "q8_0": 1e-2, "q4_0": 5e-2}[qtype]


def test_split_files_and_folder(tmp_path):
    model, tok = sparseek.load("debug-v3")
    res = save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, qtype="f32", split_max_bytes=120_000)
    files = res["files"]
    assert len(files) >= 3 and files[0].endswith("m-00001-of-%05d.gguf" % len(files))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder is gone
    ids = torch.randint(0, model.args.vocab_size, (1, 12))
    for where in (files[0], str(tmp_path)):  # the first part, or the folder holding the parts
        back, _ = sparseek.load(where)
        assert torch.equal(_logits(back, ids), _logits(model, ids))
    with pytest.raises(CheckpointError, match="part 2 of a split GGUF model"):
        sparseek.load(files[1])
    (tmp_path / files[-1].rsplit("/", 1)[1]).unlink()
    with pytest.raises(CheckpointError, match="1 of its .* parts are missing"):
        sparseek.load(files[0])


def _rewrite(src, dst, meta=None, tensors=None, arch=None):
    """Copy the GGUF file ``src`` to ``dst`` with metadata changed (``meta``: key -> value, None drops
    it) and tensors replaced (``tensors(name, array)`` -> [(name, array)], [] drops it)."""
    f = GGUFFile(str(src))
    arch = arch or f.meta["general.architecture"]
    w = gguf.GGUFWriter(str(dst), arch)
    values = {**f.meta, **(meta or {})}
    for k, v in values.items():
        if k != "general.architecture" and v is not None:
            _add(w, k, v)
    for n in f.tensors:
        arr = f.read(n).numpy()
        for name, out in (tensors(n, arr) if tensors else [(n, arr)]):
            w.add_tensor(name, out.astype(np.int32) if out.dtype == np.int64 else out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add(w, key, value):
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


def test_old_layout_kv_b_and_tied_head(tmp_path):
    """Files from before llama.cpp split kv_b carry one attn_kv_b and no key_length_mla; a file
    without an output tensor ties the head to the embedding."""
    model, tok = sparseek.load("debug-v3")
    a = model.args
    save_gguf(model, tmp_path / "new.gguf", tokenizer=tok, qtype="f32")

    def old_layout(n, arr):
        if n.endswith("attn_v_b.weight") or n == "output.weight":
            return []
        if n.endswith("attn_k_b.weight"):
            return [(n.replace("attn_k_b", "attn_kv_b"), model.layers[int(n.split(".")[1])].attn.wkv_b.weight.detach().numpy())]
        return [(n, arr)]

    _rewrite(tmp_path / "new.gguf", tmp_path / "old.gguf", tensors=old_layout,
             meta={"deepseek2.attention.key_length_mla": None, "deepseek2.attention.value_length_mla": None,
                   "deepseek2.attention.key_length": a.qk_nope_head_dim + a.qk_rope_head_dim,
                   "deepseek2.attention.value_length": a.v_head_dim})
    back, _ = sparseek.load(str(tmp_path / "old.gguf"))
    for i in range(a.num_hidden_layers):
        assert torch.equal(back.layers[i].attn.wkv_b.weight, model.layers[i].attn.wkv_b.weight)
    assert torch.equal(back.head.weight, model.embed.weight)


def test_deepseek_v3_pre_tokenizer_round_trip():
    """DeepSeek's real vocabulary (the V3 pre-tokenizer; 129,280 tokens, control tokens) through
    GGUF's fields and back tokenizes every text the same."""
    from sparseek.checkpoint.gguf import _vocab_fields
    from sparseek.tokenizer import deepseek_v4

    tok = deepseek_v4()
    v = _vocab_fields(tok, 129280)
    assert v["pre"] == "deepseek-v3"
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": v["pre"], "tokenizer.ggml.tokens": v["tokens"],
            "tokenizer.ggml.token_type": v["types"], "tokenizer.ggml.merges": v["merges"],
            "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id}
    back = tokenizer_from_gguf(meta)
    assert back.vocab_size == tok.vocab_size and (back.bos_token, back.eos_token) == (tok.bos_token, tok.eos_token)
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text), text
        assert back.decode(back.encode(text)) == text
    assert v["types"][tok.bos_id] == 3  # control


def test_errors_name_the_problem(tmp_path):
    model, tok = sparseek.load("debug-v3")
    with pytest.raises(ValueError, match="unknown GGUF type"):
        save_gguf(model, tmp_path / "x.gguf", qtype="q3_k")
    path = tmp_path / "m.gguf"
    save_gguf(model, path, tokenizer=tok, qtype="f32")
    bad = tmp_path / "bad.gguf"
    _rewrite(path, bad, arch="llama")
    with pytest.raises(CheckpointError, match="architecture 'llama' is not DeepSeek's"):
        sparseek.load(str(bad))

    def broken(n, arr):
        return [] if n == "blk.2.ffn_up_exps.weight" else [(n, arr[:, :-1] if n == "blk.1.attn_q_b.weight" else arr)]

    _rewrite(path, bad, tensors=broken, meta={"deepseek2.expert_count": None})
    with pytest.raises(CheckpointError, match="deepseek2.expert_count is missing"):
        sparseek.load(str(bad))
    _rewrite(path, bad, tensors=broken)
    with pytest.raises(CheckpointError) as e:
        sparseek.load(str(bad))
    assert "blk.2.ffn_up_exps.weight" in str(e.value) and "blk.1.attn_q_b.weight" in str(e.value)
    with pytest.raises(ValueError, match="quantize='stored'"):
        sparseek.load(str(path), quantize="stored")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        sparseek.load(str(tmp_path / "junk.gguf"))


def test_cli_export_gguf(tmp_path, capsys):
    from sparseek.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export-gguf", "debug-v3", str(out), "--type", "q8_0", "--eval-windows", "1", "--eval-len", "32"]) == 0
    text = capsys.readouterr().out
    assert "KL mean" in text and "Q8_0" in text and out.exists()
    llm = sparseek.LLM(str(out))
    res = llm.generate(["def f"], sparseek.SamplingParams(max_tokens=4, temperature=0))
    assert len(res[0].token_ids) == 4
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert '"model_type": "deepseek_v3"' in info and '"layers": 3' in info


def test_v4_round_trip_and_layout(tmp_path):
    """V4 as llama.cpp's deepseek4: official names one to one, tid2eid as I32 on hash layers (no router
    bias there), compressors / indexers only where the layer has them, the keys in the types its
    loader checks; the file loads back to the same model (MTP aside)."""
    model, tok = sparseek.load("debug")
    a = model.args
    path = tmp_path / "v4.gguf"
    save_gguf(model, path, tokenizer=tok, qtype="f32")
    f = GGUFFile(str(path))
    m = f.meta
    assert m["general.architecture"] == "deepseek4" and m["deepseek4.expert_gating_func"] == 4
    assert list(m["deepseek4.attention.compress_ratios"]) == a.compress_ratios
    assert m["deepseek4.hyper_connection.count"] == 4 and m["deepseek4.hash_layer_count"] == a.num_hash_layers
    assert list(m["deepseek4.swiglu_clamp_shexp"]) == [0.0] * a.num_hidden_layers  # the reference leaves it unclamped
    types = {k: f.tensors[k].tensor_type.name for k in f.tensors}
    assert types["blk.0.ffn_gate_tid2eid.weight"] == "I32" and "blk.0.exp_probs_b.bias" not in f.tensors
    assert torch.equal(f.read("blk.0.ffn_gate_tid2eid.weight"), model.layers[0].ffn.gate.tid2eid)
    assert "blk.1.exp_probs_b.bias" in f.tensors and "blk.1.ffn_gate_tid2eid.weight" not in f.tensors
    assert "blk.0.attn_compressor_kv.weight" not in f.tensors  # a sliding-window layer
    assert "blk.1.indexer.attn_q_b.weight" in f.tensors and "blk.2.indexer.attn_q_b.weight" not in f.tensors
    assert f.shape("blk.1.attn_compressor_ape.weight") == (4, 2 * a.head_dim)  # CSA: overlapping halves
    assert not [n for n in f.tensors if n.startswith("blk.") and int(n.split(".")[1]) >= a.num_hidden_layers]
    back, tok2 = sparseek.load(str(path))
    assert back.args.is_v4 and len(back.mtp) == 0 and back.args.compress_ratios == a.compress_ratios[:a.num_hidden_layers]
    for field in ("head_dim", "o_groups", "o_lora_rank", "sliding_window", "index_topk", "index_head_dim",
                  "num_hash_layers", "swiglu_limit", "clamp_shared_expert", "hc_sinkhorn_iters", "compress_rope_theta",
                  "routed_scaling_factor", "rope_scaling"):
        assert getattr(back.args, field) == pytest.approx(getattr(a, field)), field
    sd = model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k
    ids = torch.randint(0, a.vocab_size, (1, 40))  # past the 16-token window: compressed attention in use
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    assert tok2.encode(TEXTS[0]) == tok.encode(TEXTS[0])

    # DeepSeek's own layout (FP4 experts, FP8-like Q8_0 linears, bf16 ends) and a clamped shared expert
    clamped, _ = sparseek.load("debug", clamp_shared_expert=True)
    save_gguf(clamped, path, tokenizer=tok, qtype="mxfp4")
    f = GGUFFile(str(path))
    kinds = {n: f.type_name(n) for n in f.tensors}
    assert kinds["blk.1.ffn_gate_exps.weight"] == "MXFP4" and kinds["blk.1.attn_q_b.weight"] == "Q8_0"
    assert kinds["token_embd.weight"] == "BF16" and kinds["blk.1.hc_attn_fn.weight"] == "F32"
    assert kinds["blk.1.attn_compressor_kv.weight"] == "F32" and kinds["blk.1.indexer.proj.weight"] == "F32"
    assert sparseek.load(str(path))[0].args.clamp_shared_expert
    _rewrite(path, tmp_path / "mtp.gguf", meta={"deepseek4.nextn_predict_layers": 1})
    with pytest.raises(CheckpointError, match="MTP block"):
        sparseek.load(str(tmp_path / "mtp.gguf"))


def test_v4_file_chat_template_is_not_used(tmp_path):
    """V4 files carry V4's format as a Jinja template (for llama.cpp's chat); read back, a V4 file's
    template (llama.cpp's converter embeds its own) yields to sparseek's encoder; V3's is kept."""
    from sparseek.tokenizer.chat import v4_jinja_template

    model, tok = sparseek.load("debug")
    path = tmp_path / "v4.gguf"
    save_gguf(model, path, tokenizer=tok, qtype="f32")  # no template of its own: V4's format as Jinja
    assert GGUFFile(str(path)).meta["tokenizer.chat_template"] == v4_jinja_template()
    assert sparseek.load(str(path))[1].chat_template is None
    tok.chat_template = "{{ messages }}"
    save_gguf(model, path, tokenizer=tok, qtype="f32")
    assert GGUFFile(str(path)).meta["tokenizer.chat_template"] == "{{ messages }}"
    assert sparseek.load(str(path))[1].chat_template is None
    v3, tok3 = sparseek.load("debug-v3")
    tok3.chat_template = "{{ messages }}"
    save_gguf(v3, tmp_path / "v3.gguf", tokenizer=tok3, qtype="f32")
    assert sparseek.load(str(tmp_path / "v3.gguf"))[1].chat_template == "{{ messages }}"


def test_quantize_while_loading(tmp_path):
    """quantize="fp4" on a GGUF quantizes each layer as it is decoded: the same model as loading
    then quantizing, and an MXFP4 file's experts keep their values exactly."""
    from sparseek.quant import QuantExperts, QuantLinear, quantize_model_

    model, tok = sparseek.load("debug")
    path = tmp_path / "v4.gguf"
    save_gguf(model, path, tokenizer=tok, qtype="mxfp4")
    streamed, _ = sparseek.load(str(path), quantize="fp4", dtype="float32")
    whole, _ = sparseek.load(str(path), dtype="float32")
    gguf_experts = whole.layers[1].ffn.experts.w1.detach().clone()
    quantize_model_(whole, experts="fp4")
    assert isinstance(streamed.layers[1].ffn.experts, QuantExperts)
    assert isinstance(streamed.layers[1].attn.wq_b, QuantLinear)
    sd, sd2 = whole.state_dict(), streamed.state_dict()
    assert set(sd) == set(sd2)
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    assert torch.equal(streamed.layers[1].ffn.experts.decoded("w1", torch.float32), gguf_experts)
    ids = torch.randint(0, model.args.vocab_size, (1, 24))
    assert torch.equal(_logits(streamed, ids), _logits(whole, ids))


def test_v4_mtp_draft_file(tmp_path):
    """mtp=True writes V4's MTP block as llama.cpp's draft file (mtp-<name>.gguf: block L, e_proj |
    h_proj as one eh_proj, its HC head as output_hc_*), which loading finds beside the model."""
    model, tok = sparseek.load("debug")
    a = model.args
    res = save_gguf(model, tmp_path / "v4.gguf", tokenizer=tok, qtype="f32", mtp=True)
    assert [p.rsplit("/", 1)[1] for p in res["files"]] == ["v4.gguf", "mtp-v4.gguf"]
    d = GGUFFile(res["files"][1])
    n = a.num_hidden_layers
    assert d.meta["deepseek4.nextn_predict_layers"] == 1 and d.meta["deepseek4.block_count"] == n + 1
    assert len(d.meta["deepseek4.swiglu_clamp_exp"]) == n + 1
    eh = d.read(f"blk.{n}.nextn.eh_proj.weight")
    assert torch.equal(eh, torch.cat([model.mtp[0].e_proj.weight, model.mtp[0].h_proj.weight], dim=1))
    assert torch.equal(d.read("output_hc_fn.weight"), model.mtp[0].hc_head_fn)
    assert not [t for t in d.tensors if t.startswith("blk.") and int(t.split(".")[1]) != n]
    back, _ = sparseek.load(str(tmp_path))  # the folder: the model, and its draft file found beside it
    assert len(back.mtp) == 1 and back.args.num_nextn_predict_layers == 1
    sd = model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert len(sparseek.load(res["files"][0], tokenizer=False)[0].mtp) == 1
    from sparseek.checkpoint.gguf import load_gguf

    assert len(load_gguf(res["files"][0], mtp=False).mtp) == 0
    with pytest.raises(CheckpointError, match="not the MTP draft file"):
        load_gguf(res["files"][0], mtp=res["files"][0])
    llm = sparseek.LLM(res["files"][0], speculative_tokens=2)  # MTP speculative decoding from GGUF files
    plain = sparseek.LLM(res["files"][0])
    params = sparseek.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert llm.generate([[5, 6, 7]], params)[0].token_ids == plain.generate([[5, 6, 7]], params)[0].token_ids


def test_export_from_weights_kept_quantized(tmp_path):
    """A model holding DeepSeek's FP8 / FP4 weights (quantize="stored") exports without being
    decoded whole, tensor by tensor, to the same file as the decoded model."""
    from sparseek.quant import quantize_model_

    model, tok = sparseek.load("debug")
    quantize_model_(model, experts="fp4")
    sparseek.save(model, tmp_path / "fp4", tokenizer=tok)
    stored, _ = sparseek.load(str(tmp_path / "fp4"), quantize="stored", dtype="float32")
    decoded, _ = sparseek.load(str(tmp_path / "fp4"), dtype="float32")
    a = save_gguf(stored, tmp_path / "a.gguf", tokenizer=tok, qtype="mxfp4")
    b = save_gguf(decoded, tmp_path / "b.gguf", tokenizer=tok, qtype="mxfp4")
    assert a["types"] == b["types"] and a["types"]["blk.1.ffn_gate_exps.weight"] == "MXFP4"
    fa, fb = GGUFFile(a["files"][0]), GGUFFile(b["files"][0])
    assert set(fa.tensors) == set(fb.tensors)
    for n in fa.tensors:
        assert np.array_equal(np.asarray(fa.tensors[n].data), np.asarray(fb.tensors[n].data)), n
