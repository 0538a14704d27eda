"""sparseek's GGUF files against llama.cpp itself: the same file run by both, logits and tokens compared.

    pip install llama-cpp-python   # builds llama.cpp (a few minutes); not a sparseek dependency
    python benchmarks/gguf_llamacpp.py --llama-cpp-src PATH --out benchmarks/results/cpu-gguf-llamacpp.txt

0. With ``--llama-cpp-src`` (a llama.cpp checkout, e.g. the one vendored in llama-cpp-python's
   sdist): llama.cpp's own converter (convert_hf_to_gguf.py) turns the checkpoint sparseek saves
   into GGUF, and sparseek's export of the same model is compared with it tensor by tensor (type
   and bytes) and key by key.
1. Export (``sparseek.checkpoint.gguf.save_gguf``) V3-, V2- and V4-shaped models (random weights,
   the head scaled so the logits spread over several nats) in F32, F16, Q8_0, Q4_0 / MXFP4, load
   each file in llama.cpp and in sparseek, and compare next-token logits at every position of the
   same ids: max |difference| relative to the logits' spread, how many positions differ by more
   than 1% of it, top-1 agreement, and KL(llama.cpp || sparseek). llama.cpp's deepseek4 is an
   implementation of V4 written apart from sparseek's (hyper-connections, CSA with the lightning
   indexer, HCA, hash routing, attention sinks): agreement is evidence for both. A position where
   two experts' routing scores tie to ~1e-5 can pick different experts in the two (their sums run
   in different orders), which shows as one position off and its echo in later ones.
2. Import: llama.cpp's own quantizer (``llama_model_quantize``) turns the F32 file into Q4_K_M,
   Q6_K and Q2_K (block formats sparseek cannot write); sparseek reads those and is compared with
   llama.cpp on them the same way.
3. Tokenizers: for each pre-tokenizer sparseek writes (gpt-2, deepseek-v3 with DeepSeek's real
   129,280-token vocabulary, deepseek-llm), llama.cpp's tokenization of varied text is compared with
   sparseek's tokenizer rebuilt from the same file.
llama.cpp computes in its own order (its KV cache in F16, its own matmul kernels), so F32 files
agree to ~1e-3 of the logit spread, not bit for bit. On a quantized file they part further:
llama.cpp also rounds the activations entering its quantized products (to Q8_0 / Q8_K blocks),
sparseek multiplies the decoded weights in full precision; the "KL vs original" columns say which of
the two stays nearer the unquantized model. llama.cpp's CPU "extra" weight buffers are
switched off (see ``_no_extra_buffers``: with them this llama.cpp aborts on any DeepSeek file whose
attn_k_b is not F32, its converter's own files included).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile

import numpy as np
import torch

import sparseek
from sparseek.checkpoint.gguf import GGUFFile, save_gguf

try:
    import llama_cpp
except ImportError:
    sys.exit("this benchmark needs llama.cpp's Python binding: pip install llama-cpp-python")

TEXTS = [
    "def foo(x):\n    return x + 1  # héllo wörld\n\n\tclass Bar:  pass",
    "DeepSeek-V3 的混合专家模型有 256 个路由专家和 1 个共享专家。日本語のテキスト、カタカナ、ひらがな。",
    "  multiple   spaces\t\ttabs\r\nwindows line 1234567890 3.14159 -42 1e-9 ",
    "Emoji 🤖🚀 and symbols ©®™ → ∑∫√ «quotes» „more“ ‘single’",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी, 한국어 텍스트",
    "URL https://example.com/a?b=c&d=e#f, email a.b@c.de, path C:\\Users\\x",
    "I'm you're we've they'll she'd IT'S DON'T",
    "<｜begin▁of▁sentence｜>User: hi<｜end▁of▁sentence｜>",
]


def _texts() -> list[str]:
    from sparseek.tokenizer.tokenizer import stdlib_texts

    out = list(TEXTS)
    for text in stdlib_texts(max_bytes=200_000):
        out.extend(text[i:i + 2000] for i in range(0, min(len(text), 20_000), 2000))
    return out


def _scaled(name: str, **overrides):
    """A preset with weights scaled up so the logits spread (random init gives near-uniform ones)."""
    model, tok = sparseek.load(name, **overrides)
    with torch.no_grad():
        model.head.weight.mul_(8.0)
    return model, tok


def _no_extra_buffers() -> None:
    """llama.cpp's CPU "extra" weight buffers (AMX / repacked layouts, used on this machine's CPU)
    take the 3-D attn_k_b weight but cannot run its batched product, and llama.cpp aborts
    (GGML_ASSERT(*cur_backend_id != -1)) on any file where attn_k_b is not F32, its own converter's
    included. Plain CPU buffers run everything; llama-cpp-python does not expose the switch."""
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    if getattr(default, "patched", False):
        return
    params.patched = True
    low.llama_model_default_params = params


def _llama(path: str, n_ctx: int = 256) -> "llama_cpp.Llama":
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                           n_batch=n_ctx, n_ubatch=n_ctx)


def _isolated(fn, *args):
    """Run ``fn`` in a child process: a GGML_ASSERT in llama.cpp aborts the process it runs in."""
    import concurrent.futures as cf
    import multiprocessing as mp

    # spawn, not fork: a child forked after torch's thread pools started can hang in them
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        try:
            return ex.submit(fn, *args).result()
        except cf.process.BrokenProcessPool:
            return None


def _logprobs(x: np.ndarray) -> np.ndarray:
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per position."""
    lp, lq = _logprobs(p_logits), _logprobs(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def _compare(path: str, ids: list[int], original: np.ndarray) -> dict:
    """llama.cpp and sparseek on the file ``path``; ``original``: the unquantized model's logits."""
    _no_extra_buffers()  # in this (spawned) process too
    llm = _llama(path)
    llm.eval(ids)
    ref = np.array(llm.scores[:len(ids)], dtype=np.float64)
    del llm
    model, _ = sparseek.load(path, dtype="float32", tokenizer=False)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    spread = ref.std()
    rel = np.abs(ref - ours).max(-1) / spread
    kl = _kl(ref, ours)
    return {"rel_max_diff": float(rel.max()), "off": int((rel > 0.01).sum()), "logit_std": float(spread),
            "first_off": [int(i) for i in np.flatnonzero(rel > 0.01)[:8]],
            "top1": float((ref.argmax(-1) == ours.argmax(-1)).mean()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "kl_orig_llama": float(_kl(original, ref).mean()),
            "kl_orig_sparseek": float(_kl(original, ours).mean())}


def _routing_near_ties(model, ids: list[int], eps: float = 1e-4) -> list[int]:
    """Positions where some layer's router ranks its k-th and (k+1)-th expert within ``eps``: there
    a rounding difference can swap an expert."""
    gaps = []

    def hook(gate, inputs, out):
        if gate.hash_routed:
            return
        scores = out[2]
        choice = scores if gate.bias is None else scores + gate.bias
        top = choice.topk(gate.topk + 1, dim=-1).values
        gaps.append((top[:, gate.topk - 1] - top[:, gate.topk]).flatten())

    from sparseek.model.common import Gate

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Gate)]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return [int(i) for i in torch.nonzero(torch.stack(gaps).min(0).values < eps).flatten()]


def _template_check() -> str:
    """The prompts llama-cpp-python's chat formatter renders from ``v4_jinja_template`` against
    sparseek's own V4 encoder, both modes, with tools, tool calls and results."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from sparseek.tokenizer.chat import BOS, EOS, encode_messages, v4_jinja_template

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}}
    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello", "reasoning_content": "greet"}, {"role": "user", "content": "2+2?"}],
             [{"role": "system", "content": "", "tools": [weather]}, {"role": "user", "content": "weather?"},
              {"role": "assistant", "content": "", "reasoning_content": "ask", "tool_calls": [call]},
              {"role": "tool", "content": "sunny"}, {"role": "user", "content": "thanks"}]]
    same = total = 0
    for conv in convs:
        tools = [t for m in conv for t in m.get("tools") or ()] or None
        plain = [{k: v for k, v in m.items() if k != "tools"} for m in conv]
        for thinking in (False, True):
            fmt = Jinja2ChatFormatter(v4_jinja_template(), eos_token=EOS, bos_token=BOS)
            got = fmt(messages=plain, tools=tools, thinking=thinking).prompt
            total += 1
            same += got == encode_messages(conv, thinking_mode="thinking" if thinking else "chat")
    return f"{same}/{total} prompts equal to sparseek's encoder's (2 conversations x chat / thinking)"


def _quantize_with_llama_cpp(src: str, dst: str, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")


def _tokenize(path: str, texts: list[str]) -> tuple[int, int, list[str]]:
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    _, tok = sparseek.load(path, dtype="float32")
    same, bad = 0, []
    for t in texts:
        a = llm.tokenize(t.encode(), add_bos=False, special=True)
        b = tok.encode(t)
        if a == b:
            same += 1
        else:
            bad.append(repr(t[:60]))
    return same, len(texts), bad


_CONVERT = """
import os, runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [os.path.join(root, "gguf-py"), root]
import conversion.base as base
# the converter recognises tokenizers by a hash of known ones; sparseek's byte-level BPE is GPT-2's
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
runpy.run_path(os.path.join(root, "convert_hf_to_gguf.py"), run_name="__main__")
"""


def _converter_diff(src: str, name: str, qtype: str, tmp: str) -> list[str]:
    """Convert ``name`` with llama.cpp's converter and with sparseek; compare the two files. V4's
    converter takes DeepSeek's own layout (FP4 experts, FP8 linears: what ``sparseek quantize``
    writes) and nothing else, so for V4 both sides start from that checkpoint; sparseek reads it
    decoded and writes ``mxfp4`` (FP4 experts, Q8_0 linears), and the MTP draft file (the
    converter's ``--mtp``) is compared too."""
    import subprocess

    from sparseek.quant.convert import quantize_checkpoint

    hf = os.path.join(tmp, f"{name}-hf")
    model, tok = sparseek.load(name)
    v4 = model.args.is_v4
    if v4:
        quantize_checkpoint(name, hf, report=False)
        model, tok = sparseek.load(hf, dtype="float32")
    else:
        sparseek.save(model, hf, tokenizer=tok)
    ours = os.path.join(tmp, f"{name}-ours-{qtype}.gguf")
    files = save_gguf(model, ours, tokenizer=tok, qtype=qtype, mtp=v4)["files"]
    lines = []
    for flag, mine in zip(([], ["--mtp"]), files):
        theirs = os.path.join(tmp, f"{name}-conv-{qtype}{'-mtp' if flag else ''}.gguf")
        proc = subprocess.run([sys.executable, "-c", _CONVERT, src, hf, "--outtype", "f32" if qtype == "mxfp4" else qtype,
                               "--outfile", theirs, *flag], capture_output=True, text=True)
        label = f"{name:<9} {qtype:<5}{' MTP draft file' if flag else ''}"
        if proc.returncode != 0:
            lines.append(f"{label}: the converter failed: {proc.stderr.strip().splitlines()[-1]}")
        else:
            lines.append(f"{label} {_diff_files(mine, theirs)}")
    return lines


def _diff_files(ours: str, theirs: str) -> str:
    a, b = GGUFFile(ours), GGUFFile(theirs)
    same_bytes, same_values, types, values = 0, [], [], []
    for n in b.tensors:
        if n not in a.tensors:
            values.append(n)
        elif a.type_name(n) == b.type_name(n) and np.array_equal(np.asarray(a.tensors[n].data),
                                                                  np.asarray(b.tensors[n].data)):
            same_bytes += 1
        elif a.type_name(n) != b.type_name(n):
            types.append(f"{n} {a.type_name(n)} vs {b.type_name(n)}")
        elif torch.equal(a.read(n), b.read(n)):
            same_values.append(n)
        else:
            values.append(n)
    extra = sorted(set(a.tensors) - set(b.tensors))
    cosmetic = {"general.name", "general.size_label", "general.type", "general.file_type"}
    keys = sorted(k for k in set(a.meta) | set(b.meta) if k not in cosmetic and a.meta.get(k) != b.meta.get(k))
    line = f"{len(b.tensors)} tensors: {same_bytes} identical in type and bytes"
    if same_values:
        kinds = sorted({a.type_name(n) for n in same_values})
        line += f", {len(same_values)} ({'/'.join(kinds)}) identical in decoded values, encoded differently"
    if types:
        line += f", other type (ours vs theirs): {types}"
    if values or extra:
        line += f", DIFFERENT: {values[:4]}, only ours: {extra[:4]}"
    return line + f"; metadata keys differing: {keys if keys else 'none'} (ignoring {', '.join(sorted(cosmetic))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="also write the report here")
    ap.add_argument("--tokens", type=int, default=96, help="tokens per V2 / V3 comparison (V4: 240)")
    ap.add_argument("--llama-cpp-src", default=None, help="a llama.cpp source tree: compare with its converter")
    a = ap.parse_args()
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    _no_extra_buffers()
    say(f"llama-cpp-python {llama_cpp.__version__}; sparseek {sparseek.__version__}; torch {torch.__version__}")
    say("command: python benchmarks/gguf_llamacpp.py" + (" --llama-cpp-src SRC" if a.llama_cpp_src else "")
        + (f" --out {a.out}" if a.out else ""))
    tmp = tempfile.mkdtemp(prefix="gguf-bench-")
    if a.llama_cpp_src:
        say("\n== export vs llama.cpp's converter (convert_hf_to_gguf.py) on the same checkpoint ==")
        for name, qtype in [(n, q) for n in ("debug-v3", "debug-v2") for q in ("f32", "f16", "bf16", "q8_0")] + [
                ("nano", "mxfp4")]:
            for line in _converter_diff(a.llama_cpp_src, name, qtype, tmp):
                say(line)
        say("  (V4: the converter keeps a tensor in its source's type, here the embedding and head in F32; sparseek "
            "writes them in BF16, the official checkpoint's type. swiglu_clamp_shexp: the converter always clamps the "
            "shared expert, sparseek writes 0 unless the model clamps it: DeepSeek's reference does not. It also "
            "embeds llama.cpp's own V4 chat template.)")
    g = torch.Generator().manual_seed(0)
    # V2's layout without q_lora_rank: llama.cpp tells V2-Lite by its 27 layers
    # (title, preset, overrides, tokens, types). V2's layout without q_lora_rank: llama.cpp tells V2-Lite
    # by its 27 layers. V4: llama.cpp rotates indexer keys by Hadamard matrices of 64 and up, so
    # index_head_dim 64 (nano's 32 and debug's 16 abort it); 240 tokens cross debug's 16-token window,
    # its CSA top-8 selection and HCA's 128-token blocks, and nano's 128-token window.
    families = [("V3 debug-v3: q_lora, sigmoid + bias, 4 groups, yarn", "debug-v3", {}, a.tokens,
                 ("f32", "f16", "q8_0", "q4_0")),
                ("V2-Lite shape: debug-v2 at 27 layers, softmax, yarn", "debug-v2", {"num_hidden_layers": 27}, a.tokens,
                 ("f32", "f16", "q8_0", "q4_0")),
                ("V4 debug: SWA/CSA/HCA, 16-token window, top-8, hash", "debug", {"index_head_dim": 64}, 240,
                 ("f32", "q8_0", "mxfp4")),
                ("V4 nano: 6 layers, 128-token window, 16 experts", "nano", {"index_head_dim": 64}, 240,
                 ("f32", "q8_0", "mxfp4"))]
    say("\n== export: the same GGUF file in llama.cpp and in sparseek (logits at every position) ==")
    say("(max|d|/std, >1%, top-1, KL: llama.cpp vs sparseek on the file; KL vs original: each of them vs the "
        "unquantized model run by sparseek, mean over positions)")
    say(f"{'model':<52} {'type':<6} {'tokens':>6} {'max|d|/std':>10} {'>1%':>4} {'top-1':>7} {'KL mean':>9} {'KL max':>9}"
        f"   {'KL vs original: llama.cpp / sparseek':>37}")
    for title, name, over, n_tok, qtypes in families:
        model, tok = _scaled(name, **over)
        ids = torch.randint(2, model.args.vocab_size, (n_tok,), generator=g).tolist()
        with torch.no_grad():
            original = model(torch.tensor([ids]))[0].double().numpy()
        for qtype in qtypes:
            path = os.path.join(tmp, f"{name}-{qtype}.gguf")
            save_gguf(model, path, tokenizer=tok, qtype=qtype)
            r = _isolated(_compare, path, ids, original)
            if r is None:
                say(f"{title:<52} {qtype:<6} llama.cpp aborts")
                continue
            say(f"{title:<52} {qtype:<6} {n_tok:>6} {r['rel_max_diff']:>10.2e} {r['off']:>4} {r['top1']:>7.1%} "
                f"{r['kl_mean']:>9.2e} {r['kl_max']:>9.2e}   {r['kl_orig_llama']:>18.2e} / {r['kl_orig_sparseek']:.2e}")
            if qtype == "f32" and r["off"]:
                say(f"  positions off by >1%: {r['first_off']}; routing near-ties (a layer's k-th and k+1-th expert "
                    f"within 1e-4): {_routing_near_ties(model, ids)}")
        if name in ("debug-v3", "nano"):
            say("  import: files quantized by llama.cpp's llama_model_quantize from the F32 one, read by sparseek")
            f32 = os.path.join(tmp, f"{name}-f32.gguf")
            for label, ftype in (("Q4_K_M", 15), ("Q6_K", 18), ("Q2_K", 10)):
                path = os.path.join(tmp, f"{name}-{label}.gguf")
                _quantize_with_llama_cpp(f32, path, ftype)
                f = GGUFFile(path)
                kinds = sorted({f.type_name(n) for n in f.tensors})
                r = _isolated(_compare, path, ids, original)
                if r is None:
                    say(f"  {label:<7} llama.cpp aborts")
                    continue
                say(f"  {label:<7} types {','.join(kinds):<34} max|d|/std {r['rel_max_diff']:.2e} >1%: {r['off']} "
                    f"top-1 {r['top1']:.1%} KL mean {r['kl_mean']:.2e}; KL vs original: llama.cpp "
                    f"{r['kl_orig_llama']:.2e} / sparseek {r['kl_orig_sparseek']:.2e}")
    say("\n== tokenizers: llama.cpp's tokenization vs sparseek's rebuilt from the same file ==")
    texts = _texts()
    from sparseek.tokenizer import deepseek_v4

    model, tok = sparseek.load("debug-v3")
    cases = [("gpt-2 (sparseek's byte-level BPE)", model, tok)]
    big, _ = sparseek.load("debug-v3", vocab_size=129280, tokenizer=False)
    cases.append(("deepseek-v3 (DeepSeek's 129,280-token vocabulary)", big, deepseek_v4()))
    from sparseek.checkpoint.gguf import _DEEPSEEK_LLM_SPLITS
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    v2 = Tokenizer.from_str(tok.tk.to_str())
    v2.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(s), behavior="isolated")
                                                for s in _DEEPSEEK_LLM_SPLITS]
                                               + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    from sparseek.tokenizer import Tokenizer as SkTokenizer

    cases.append(("deepseek-llm (V2's pre-tokenizer on sparseek's vocabulary)", model, SkTokenizer(v2)))
    for title, m, t in cases:
        path = os.path.join(tmp, "tok.gguf")
        save_gguf(m, path, tokenizer=t, qtype="f32")
        same, n, bad = _tokenize(path, texts)
        say(f"{title:<60} {same}/{n} texts tokenized identically" + (f"; differ: {', '.join(bad[:5])}" if bad else ""))
    say("\n== V4's chat template (written into V4 GGUF files) rendered by llama-cpp-python's Jinja2ChatFormatter ==")
    say(_template_check())
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
