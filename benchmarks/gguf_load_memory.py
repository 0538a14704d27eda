"""Peak memory of loading a GGUF file (decoded whole, or quantized layer by layer while decoding)
and of writing one from a checkpoint in DeepSeek's FP8 / FP4 layout (from its stored bytes, or decoded).

    python benchmarks/gguf_load_memory.py --preset small --experts 256 --out benchmarks/results/cpu-small-gguf-load-memory.txt

The preset's random weights are written in DeepSeek's own layout (``--type mxfp4``: FP4 experts,
Q8_0 linears); each load then runs in a fresh process, which reports its resident-set high-water
mark (VmHWM), the weights it holds, the seconds it took and its logits' top-1 agreement with the first
row's model on a random prompt (random weights give near-uniform logits, so rounding flips top-1
choices easily: a sanity check, not a quality measure). ``quantize="fp4"`` quantizes each layer as
soon as it is decoded (``load_gguf``), so the model is never held decoded whole: the peak is the
quantized model plus one decoded layer and its quantization's temporaries, plus the fixed costs
(torch, the GGUF reader's metadata, the file's pages).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report at least the
# parent's size at the fork
_CHILD = """
import json, re, sys, time, torch, sparseek
from sparseek.quant import quantized_bytes
path, dtype, quantize = sys.argv[1], sys.argv[2], (sys.argv[3] if sys.argv[3] != "none" else None)
t0 = time.perf_counter()
model, _ = sparseek.load(path, dtype=dtype, quantize=quantize, tokenizer=False)
seconds = time.perf_counter() - t0
held = sum(quantized_bytes(model))
ids = torch.randint(2, model.args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    top1 = model(ids)[0].argmax(-1).tolist()
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"peak_mb": hwm / 1024, "held_mb": held / 2**20,
                  "seconds": seconds, "top1": top1}))
"""


_PEAK = """
import json, re
def done(t0):
    hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
    print(json.dumps({"peak_mb": hwm / 1024, "seconds": time.perf_counter() - t0}))
"""
_EXPORT_STORED = _PEAK + """
import sys, time
from sparseek.quant.convert import export_gguf
t0 = time.perf_counter()
export_gguf(sys.argv[1], sys.argv[2], qtype="mxfp4", report=False)
done(t0)
"""
_EXPORT_DECODED = _PEAK + """
import sys, time, sparseek
from sparseek.checkpoint.gguf import save_gguf
t0 = time.perf_counter()
model, tok = sparseek.load(sys.argv[1], dtype="bfloat16")
save_gguf(model, sys.argv[2], tokenizer=tok, qtype="mxfp4")
done(t0)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--experts", type=int, default=None, help="routed experts per layer (default: the preset's)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import sparseek
    from sparseek.checkpoint.gguf import save_gguf

    tmp = tempfile.mkdtemp(prefix="gguf-mem-")
    path = os.path.join(tmp, f"{a.preset}.gguf")
    over = {"n_routed_experts": a.experts} if a.experts else {}
    model, tok = sparseek.load(a.preset, **over)
    save_gguf(model, path, tokenizer=tok, qtype="mxfp4")
    del model
    lines = [f"command: python benchmarks/gguf_load_memory.py --preset {a.preset}"
             + (f" --experts {a.experts}" if a.experts else "") + (f" --out {a.out}" if a.out else ""),
             f"file: {a.preset}{f' with {a.experts} experts per layer' if a.experts else ''} as GGUF mxfp4 (FP4 experts, Q8_0 linears, bf16 embedding / head), "
             f"{os.path.getsize(path) / 2**20:.1f} MiB", "",
             f"{'load':<44} {'peak RSS MiB':>12} {'weights MiB':>11} {'seconds':>8} {'top-1 = first row':>18}"]
    first = None
    for dtype, quantize in (("float32", "none"), ("bfloat16", "none"), ("float32", "fp4"), ("bfloat16", "fp4")):
        proc = subprocess.run([sys.executable, "-c", _CHILD, path, dtype, quantize], capture_output=True, text=True,
                              check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        first = first or r["top1"]
        agree = sum(x == y for x, y in zip(r["top1"], first)) / len(first)
        label = f"sparseek.load(dtype={dtype}, quantize={quantize})"
        lines.append(f"{label:<44} {r['peak_mb']:>12.0f} {r['held_mb']:>11.0f} {r['seconds']:>8.2f} {agree:>18.0%}")
    # exporting a checkpoint in DeepSeek's FP8 / FP4 layout: from its stored bytes (export-gguf's way),
    # or from the model decoded whole
    from sparseek.quant import quantize_model_

    model, tok = sparseek.load(a.preset, **over)
    quantize_model_(model, experts="fp4")
    ckpt = os.path.join(tmp, "fp4-checkpoint")
    sparseek.save(model, ckpt, tokenizer=tok)
    del model
    lines += ["", f"{'export to GGUF mxfp4 (no report)':<44} {'peak RSS MiB':>12} {'':>11} {'seconds':>8}"]
    for label, code in (("export_gguf(DeepSeek FP4/FP8 checkpoint)", _EXPORT_STORED), ("load decoded (bf16), save_gguf", _EXPORT_DECODED)):
        proc = subprocess.run([sys.executable, "-c", code, ckpt, os.path.join(tmp, "out.gguf")], capture_output=True,
                              text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        lines.append(f"{label:<44} {r['peak_mb']:>12.0f} {'':>11} {r['seconds']:>8.2f}")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
