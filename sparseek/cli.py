"""``sparseek <verb>``: one command line for the whole project."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
from dataclasses import replace

from sparseek import QUANTIZE


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="nano", help="checkpoint directory or preset name (default: nano)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="keep weights quantized in memory: 'stored' keeps a checkpoint's FP8/FP4 tensors as they are "
                        "(default: dequantized to --dtype on load); fp8 / fp4 also quantize the rest (routed experts "
                        "in that format, linear layers in FP8)")
    p.add_argument("--lora", action="append", default=None, metavar="DIR",
                   help="LoRA adapters (sparseek finetune --lora-rank's output) merged into the weights on load "
                        "(repeatable, applied in order; -m can also name an adapter directory, whose base loads first)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-fp8", action="store_true", default=None,
                   help="FP8 KV cache as DeepSeek's runtime keeps it (V4 models; ~40%% fewer cache bytes)")
    p.add_argument("--index-fp4", action="store_true", default=None,
                   help="the lightning indexer's queries and keys rotated and rounded to FP4 as DeepSeek's runtime "
                        "does (V4 models: its picks are then DeepSeek's own)")
    p.add_argument("--act-fp8", action="store_true", default=None,
                   help="the inputs of the FP8 / FP4 weights' products rounded to FP8 (1x128 blocks) as DeepSeek's "
                        "runtime feeds its GEMMs; with --kv-fp8 --index-fp4: DeepSeek's inference numerics")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (V4; a CUDA graph on a GPU: ~2x tokens/s there; "
                        "the first call compiles for a minute or more)")
    p.add_argument("--cpu-moe", action="store_true",
                   help="keep the routed experts in host memory, the rest on --device (a GPU then holds only the "
                        "attention, shared experts and cache; the CPU runs the picked experts of each decode step, "
                        "long prefill forwards copy each layer's experts to the GPU)")
    p.add_argument("--n-cpu-moe", type=int, default=None, metavar="N",
                   help="as --cpu-moe for the first N MoE blocks only (the rest of the experts on --device)")
    p.add_argument("--generation-config", default="auto", metavar="auto|none|PATH",
                   help="default sampling settings and end tokens: the checkpoint's generation_config.json "
                        "(auto), none, or another folder / file")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    # None: the checkpoint's generation_config.json where it sets the field, else the value shown
    dflt = "(default: the checkpoint's generation_config.json, else %s)"
    p.add_argument("--max-tokens", type=int, default=None, help=dflt % 128)
    p.add_argument("--temperature", type=float, default=None, help=dflt % 0.7)
    p.add_argument("--top-p", type=float, default=None, help=dflt % 0.95)
    p.add_argument("--top-k", type=int, default=None, help=dflt % "0: off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than this times the top one " + dflt % "0: off")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages tokens already seen "
                   + dflt % "1: off")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


_CLI_SAMPLING = {"max_tokens": 128, "temperature": 0.7, "top_p": 0.95, "top_k": 0, "min_p": 0.0,
                 "repetition_penalty": 1.0}


def _sampling(a, llm):
    """The flags given, over the checkpoint's generation_config.json, over the CLI's defaults."""
    given = {k: getattr(a, k) for k in _CLI_SAMPLING if getattr(a, k) is not None}
    return replace(llm.default_sampling_params(**_CLI_SAMPLING), **given, seed=a.seed, stop=a.stop,
                   presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty)


def _cache_census(args) -> dict:
    """Decode-state bytes per token and per sequence at 128K / 1M tokens (bf16; V4 also with
    DeepSeek's FP8 KV and FP4 indexer keys): what a long context costs before loading anything."""
    import dataclasses

    from sparseek.model.cache import cache_bytes

    layouts = {"bf16": {}}
    if args.is_v4:
        layouts.update({"fp8_kv": {"kv_fp8": True}, "fp8_kv_fp4_index": {"kv_fp8": True, "index_fp4": True}})
    out = {}
    for name, switches in layouts.items():
        a = dataclasses.replace(args, **switches)
        out[name] = {"bytes_per_token": round(cache_bytes(a, 1)["bytes_per_token"], 1),
                     **{f"GiB_at_{label}": round(cache_bytes(a, n)["total_bytes"] / 2**30, 2)
                        for label, n in (("128K", 1 << 17), ("1M", 1 << 20))}}
    return out


def cmd_info(a) -> int:
    import sparseek
    from sparseek.config import ModelArgs

    if a.model in sparseek.PRESETS:
        args = sparseek.preset(a.model)
    elif (gguf_path := sparseek._gguf_path(a.model)) is not None:  # metadata only: no tensor is read
        from sparseek.checkpoint.gguf import GGUFFile, args_from_gguf

        f = GGUFFile(gguf_path)
        args = args_from_gguf(f.meta, f.tensors)
    else:
        args = ModelArgs.from_json(a.model)
    counts = args.num_params()
    kinds = [args.layer_kind(i) for i in range(args.num_hidden_layers)]
    info = {
        "model_type": args.model_type,
        "layers": args.num_hidden_layers,
        "layer_kinds": {k: kinds.count(k) for k in ("swa", "csa", "hca") if k in kinds} if args.is_v4 else None,
        "hidden_size": args.hidden_size,
        "experts": f"{args.n_routed_experts} routed (top-{args.num_experts_per_tok}) + {args.n_shared_experts} shared",
        "params_total": counts["total"],
        "params_active_per_token": counts["active"],
        "params_embedding": counts["embedding"],
        "params_mtp": counts["mtp"],
        # what --cpu-moe keeps in host memory (the device holds the rest)
        "params_routed_experts": counts["routed"],
        "kv_cache": _cache_census(args),
    }
    print(json.dumps(info, indent=2))
    return 0


def _engine(a, **llm_kw):
    """The engine ``a`` asks for (``llm_kw``: more ``LLM`` arguments); under torchrun (WORLD_SIZE >
    1) every rank keeps 1/world of the routed experts (``sparseek.parallel.shard_experts_``) and
    runs the same requests, ``a.main`` says whether this rank is the one that writes and
    ``a.share(x)`` gives every rank rank 0's ``x``."""
    from sparseek.engine import LLM

    a.main, a.share = True, lambda x: x
    compile_ = getattr(a, "compile", False)
    switches = {k: getattr(a, k, None) for k in ("kv_fp8", "index_fp4", "act_fp8")}
    switches = {k: v for k, v in switches.items() if v is not None}
    gen_cfg = getattr(a, "generation_config", "auto")
    gen_cfg = None if gen_cfg == "none" else gen_cfg
    cpu_moe = _cpu_moe(a)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return LLM(a.model, dtype=a.dtype, device=a.device, max_seq_len=a.max_seq_len, **switches,
                   compile=compile_, quantize=a.quantize, lora=a.lora, generation_config=gen_cfg, cpu_moe=cpu_moe,
                   **llm_kw)
    import torch.distributed as dist

    import sparseek
    from sparseek.parallel import init_distributed, shard_experts_

    rank, _, device = init_distributed()
    a.main = rank == 0
    if a.device != "cpu":
        a.device = device  # each rank its own GPU
    # sharded on the host, as the checkpoint is read: each rank reads only its experts' bytes and no
    # device ever holds every expert
    model, tok = sparseek.load(a.model, dtype=a.dtype, device="cpu", seed=llm_kw.pop("seed", 0), quantize=a.quantize,
                               lora=a.lora, prepare=shard_experts_, **switches)
    if cpu_moe is not False and str(a.device) != "cpu":
        from sparseek.parallel.offload import offload_experts_

        offload_experts_(model, a.device, layers=cpu_moe)
    else:
        model = model.to(a.device)
    if getattr(a, "seed", 0) is None:  # the ranks must sample alike: one seed for all, drawn on rank 0
        a.seed = _from_rank0(dist, random.randrange(2**31))
    a.share = lambda x: _from_rank0(dist, x)
    if gen_cfg == "auto":
        from sparseek.engine.llm import _generation_source

        gen_cfg = _generation_source(a.model)
    return LLM(model, tok, max_seq_len=a.max_seq_len, **switches, compile=compile_, generation_config=gen_cfg,
               **llm_kw)


def _cpu_moe(a) -> bool | int:
    """--cpu-moe (True) / --n-cpu-moe N (N) / neither (False)."""
    if getattr(a, "cpu_moe", False) and getattr(a, "n_cpu_moe", None) is not None:
        raise SystemExit("error: --cpu-moe keeps every routed expert in host memory, --n-cpu-moe N those of the "
                         "first N MoE blocks: give one of them")
    if getattr(a, "n_cpu_moe", None) is not None:
        if a.n_cpu_moe < 0:
            raise SystemExit(f"error: --n-cpu-moe takes a count of MoE blocks (0 or more), got {a.n_cpu_moe}")
        return a.n_cpu_moe
    return bool(getattr(a, "cpu_moe", False))


def _from_rank0(dist, x):
    box = [x]
    dist.broadcast_object_list(box, 0)
    return box[0]


def cmd_generate(a) -> int:
    llm = _engine(a)
    params = _sampling(a, llm)
    prompt = a.share(a.prompt if a.prompt is not None or not a.main else sys.stdin.read())  # stdin: rank 0's
    out = sys.stdout if a.main else open(os.devnull, "w")  # other ranks run the same steps, silently
    out.write(prompt)
    for delta in llm.stream(prompt, params):
        out.write(delta.text)
        out.flush()
        if delta.finish_reason and a.main:
            print(f"\n[finish: {delta.finish_reason}]", file=sys.stderr)
    out.write("\n")
    return 0


def cmd_chat(a) -> int:
    from sparseek.tokenizer.chat import ContentDelta, ReasoningDelta

    llm = _engine(a)
    llm._need_tokenizer()
    params = _sampling(a, llm)
    params.skip_special_tokens = False  # the parser needs </think> and the DSML markers
    mode = "thinking" if a.thinking else "chat"
    messages = [{"role": "system", "content": a.system}] if a.system else []
    out = sys.stdout if a.main else open(os.devnull, "w")  # other ranks (torchrun) run the same turns, silently
    if a.main:
        print(f"sparseek chat ({a.model}, {mode} mode) - empty line, /exit or Ctrl-D to quit, /clear to start "
              "over", file=sys.stderr)
    while True:
        user = ""
        if a.main:
            try:
                user = input("> ")
            except EOFError:
                pass
        user = a.share(user)  # rank 0 reads the terminal
        if not user.strip() or user.strip() in ("/exit", "/quit", "/bye"):
            break
        if user.strip() == "/clear":  # a new conversation under the same system prompt
            del messages[1 if a.system else 0:]
            if a.main:
                print("\033[2m(conversation cleared)\033[0m", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": user})
        prompt, reply_mode, kept = _chat_fit(llm, messages, a.thinking, params.max_tokens)
        if prompt is None:
            if a.main:
                print(f"that message is too long for the context ({llm.max_seq_len} tokens); try a shorter one",
                      file=sys.stderr)
            messages.pop()
            continue
        if len(kept) < len(messages) and a.main:
            print(f"\033[2m(the context holds {llm.max_seq_len} tokens: the oldest {len(messages) - len(kept)} "
                  "message(s) left the conversation)\033[0m", file=sys.stderr)
        messages[:] = kept
        parser = llm.tokenizer.reply_parser(reply_mode)
        reply = {"reasoning": "", "content": ""}
        try:
            for delta in llm.stream([prompt], params):
                try:
                    events = parser.feed(delta.text) + (parser.finish() if delta.finish_reason else [])
                except ValueError:
                    events = []
                for ev in events:
                    if isinstance(ev, ReasoningDelta):
                        reply["reasoning"] += ev.text
                        out.write(f"\033[2m{ev.text}\033[0m")
                    elif isinstance(ev, ContentDelta):
                        reply["content"] += ev.text
                        out.write(ev.text)
                out.flush()
        except KeyboardInterrupt:  # Ctrl-C ends the reply, not the chat (one process: ranks must agree)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise
            out.write(" [interrupted]")
        out.write("\n")
        messages.append({"role": "assistant", "content": reply["content"], "reasoning_content": reply["reasoning"]})
    return 0


def _chat_fit(llm, messages: list[dict], thinking: bool, reply_tokens: int | None):
    """The prompt of ``messages`` in the checkpoint's chat format (its own template where it has one,
    V3 / R1; else V4's) and the mode its reply is parsed in (R1's template always opens <think>),
    without as many of the oldest exchanges as it takes to leave room for the reply
    (``reply_tokens``, at most a quarter of the context) -> (prompt ids, or None when the newest
    message alone does not fit; reply mode; the messages kept). ``messages`` is left as it is.
    """
    room = min(reply_tokens or 1, llm.max_seq_len // 4)
    first = 1 if messages[0]["role"] == "system" else 0
    kept = list(messages)
    while True:
        text, mode = llm.tokenizer.chat_prompt(kept, thinking=thinking)
        prompt = llm.tokenizer.encode(text)
        if len(prompt) + room <= llm.max_seq_len:
            return prompt, mode, kept
        if len(kept) - first <= 1:  # only the newest message left: it goes if it fits at all
            return (prompt if len(prompt) < llm.max_seq_len else None), mode, kept
        # an exchange at a time: the oldest message and the replies to it
        end = first + 1
        while end < len(kept) - 1 and kept[end]["role"] != "user":
            end += 1
        del kept[first:end]


def _lora_modules(a) -> dict[str, str] | None:
    if not a.lora_modules:
        return None
    bad = [m for m in a.lora_modules if "=" not in m or not m.split("=", 1)[0] or not m.split("=", 1)[1]]
    if bad:
        raise ValueError(f"--lora-modules takes NAME=DIR pairs, got {bad[0]!r}")
    return dict(m.split("=", 1) for m in a.lora_modules)


def cmd_run_batch(a) -> int:
    from sparseek.serve.batch import run_batch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("run-batch runs in one process (serve expert-sharded ranks with torchrun ... serve)")
    modules = _lora_modules(a)
    llm = _engine(a, max_batch_size=a.max_batch_size, **({"lora_modules": modules} if modules else {}))
    if llm.tokenizer is None:
        raise ValueError(f"{a.model} has no tokenizer.json: batch requests are text, so it needs one")
    name = a.served_model_name or os.path.basename(os.path.normpath(a.model))
    try:
        res = run_batch(llm, a.input, a.output, model_name=name, thinking=a.thinking, resume=a.resume)
    except KeyboardInterrupt:
        return 130  # run_batch said where the finished results are kept
    resumed = f" ({res['resumed']} from the interrupted run)" if res["resumed"] else ""
    print(f"{res['requests']} requests{resumed}: {res['succeeded']} succeeded, {res['failed']} failed, "
          f"{res['invalid']} not requests -> {a.output}", file=sys.stderr)
    return 0


def cmd_serve(a) -> int:
    from sparseek.serve import serve

    key = a.api_key if a.api_key is not None else os.environ.get("SPARSEEK_API_KEY")
    modules = _lora_modules(a)
    llm = _engine(a, max_batch_size=a.max_batch_size, speculative_tokens=a.speculative_tokens,
                  prefill_chunk=a.prefill_chunk, interleave_prefill=a.interleave_prefill,
                  **({"lora_modules": modules} if modules else {}))
    if llm.tokenizer is None:
        raise ValueError(f"{a.model} has no tokenizer.json: the server takes text, so it needs one")
    if a.compile:  # compile before the first client waits for it (every rank: the steps are collective)
        from sparseek.engine import SamplingParams

        if a.main:
            print("compiling the decode step (minutes on a CPU)...", file=sys.stderr)
        llm.generate([[llm.tokenizer.bos_id or 0] * 2], SamplingParams(max_tokens=4, ignore_eos=True))
    mirror = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # rank 0 serves; the others run its requests' steps
        from sparseek.parallel.serving import Leader, control_channel, follow

        send, recv = control_channel()
        if not a.main:
            import signal

            # Ctrl-C reaches every rank: rank 0 stops the server and then tells the others, which
            # must keep taking its messages until then (a rank gone early would leave its steps hanging)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            follow(llm, recv)
            return 0
        mirror = Leader(send)
    name = a.served_model_name or os.path.basename(os.path.normpath(a.model))
    if not key and a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"sparseek serve: warning: listening on {a.host} without an API key (--api-key or SPARSEEK_API_KEY)",
              file=sys.stderr)
    print(f"serving {name} at http://{a.host}:{a.port}/v1 (OpenAI API; batch {a.max_batch_size}, context "
          f"{llm.max_seq_len} tokens{', API key required' if key else ''})", file=sys.stderr)
    serve(llm, host=a.host, port=a.port, model_name=name, api_key=key or None, max_waiting=a.max_waiting,
          thinking=a.thinking, stored_responses=a.stored_responses, mirror=mirror, runtime_lora=a.allow_runtime_lora)
    return 0


def _size(text: str | None) -> int | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r}: write a number of bytes, or e.g. 500M, 45G")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def cmd_export_gguf(a) -> int:
    from sparseek.quant.convert import export_gguf

    res = export_gguf(a.model, a.out, qtype=a.type, lora=a.lora, report=not a.no_report, sources=a.eval_data,
                      windows=a.eval_windows, seq_len=a.eval_len, split_max_bytes=_size(a.split_max_size), mtp=a.mtp)
    files = [f for f in res["files"] if not os.path.basename(f).startswith("mtp-")]
    drafts = [f for f in res["files"] if f not in files]
    print(f"{files[0]}{f' (+{len(files) - 1} parts)' if len(files) > 1 else ''}"
          f"{f' and its MTP draft file {drafts[0]}' if drafts else ''}: {res['disk_bytes'] / 1e9:.3f} GB, "
          f"tensors {res['types']}, {res['seconds']:.1f} s")
    if "report" in res:
        r = res["report"]
        print(f"read back vs original on {r['tokens']} tokens ({r['data']}): KL mean {r['kl_mean']:.5f} "
              f"p99 {r['kl_p99']:.5f} nats, top-1 agreement {r['top1_agreement']:.1%}, "
              f"ppl {r['ppl_ref']:.3f} -> {r['ppl_quant']:.3f}")
    print(f"run it with llama.cpp (llama-cli -m {files[0]}) or sparseek (sparseek chat -m {files[0]})")
    return 0


def cmd_quantize(a) -> int:
    from sparseek.quant.convert import quantize_checkpoint

    experts = None if a.experts == "none" else a.experts
    linears = None if a.linears == "none" else a.linears
    res = quantize_checkpoint(a.model, a.out, experts=experts, linears=linears, report=not a.no_report,
                              sources=a.eval_data, windows=a.eval_windows, seq_len=a.eval_len, device=a.device,
                              act_fp8=a.act_fp8)
    gb = 1e9
    line = f"{a.out}: weights {res['bytes_before'] / gb:.3f} GB -> {res['bytes_after'] / gb:.3f} GB in memory"
    if res.get("disk_bytes_after") is not None:
        was = res.get("disk_bytes_before")
        line += f"; files {'' if was is None else f'{was / gb:.3f} GB -> '}{res['disk_bytes_after'] / gb:.3f} GB"
    print(line)
    r = res.get("report")
    if r:
        print(f"quality on {r['tokens']} tokens of {r['data']}: KL mean {r['kl_mean']:.5f} median {r['kl_median']:.5f} "
              f"p99 {r['kl_p99']:.5f} max {r['kl_max']:.4f}; top-1 agreement {100 * r['top1_agreement']:.2f}%; "
              f"perplexity {r['ppl_ref']:.3f} -> {r['ppl_quant']:.3f} ({r['ppl_ratio']:.4f}x)")
    return 0


def cmd_prepare(a) -> int:
    from sparseek.train.data import prepare

    tok = a.tokenizer if a.tokenizer else a.vocab_size
    meta = prepare(a.sources or ["stdlib"], a.out, tokenizer=tok, text_field=a.text_field,
                   val_fraction=a.val_fraction, seed=a.seed, force=a.force)
    print(json.dumps({k: meta[k] for k in ("vocab_size", "n_tokens", "n_docs") if k in meta}, indent=2))
    return 0


def cmd_train(a) -> int:
    import dataclasses

    from sparseek.train.plots import plot_run
    from sparseek.train.trainer import TrainConfig, Trainer, sample_text

    cfg = TrainConfig()
    if a.config:
        with open(a.config, encoding="utf-8") as f:
            cfg = dataclasses.replace(cfg, **json.load(f))
    changes = {k: v for k, v in {
        "preset": a.preset, "data": a.data, "out": a.out, "max_steps": a.max_steps, "resume": a.resume or None,
        "batch_size": a.batch_size, "seq_len": a.seq_len, "lr": a.lr, "optimizer": a.optimizer,
        "balance": a.balance, "device": a.device, "seed": a.seed, "grad_accum": a.grad_accum,
        "tokenizer": a.tokenizer, "compile": a.compile or None, "indexer_loss": a.indexer_loss,
        "indexer_warmup": a.indexer_warmup,
    }.items() if v is not None}
    if a.set:
        for kv in a.set:
            k, _, v = kv.partition("=")
            changes.setdefault("overrides", dict(cfg.overrides))[k] = json.loads(v)
    cfg = dataclasses.replace(cfg, **changes)
    from sparseek.parallel import init_distributed

    rank, world, device = init_distributed()  # torchrun: expert parallel + FSDP2 over all ranks
    if world > 1:
        cfg = dataclasses.replace(cfg, device=str(device))
    trainer = Trainer(cfg, rank=rank, world_size=world)
    if rank != 0:
        trainer.fit(progress=False)
        return 0
    counts = trainer.model.param_counts()
    print(f"training {cfg.preset}: {counts['total'] / 1e6:.1f}M parameters ({counts['active'] / 1e6:.1f}M active "
          f"+ {counts['embedding'] / 1e6:.1f}M embedding), {cfg.max_steps} steps of "
          f"{cfg.batch_size * cfg.grad_accum * cfg.seq_len} tokens -> {cfg.out}", file=sys.stderr)
    result = trainer.fit()
    plots = plot_run(cfg.out)
    print(f"\nvalidation perplexity {result.get('val_ppl', float('nan')):.1f} "
          f"(unigram baseline {result.get('unigram_ppl', float('nan')):.1f})")
    if world == 1:  # a sharded model generates only with every rank taking part: load the checkpoint instead
        print("samples:")
        for text in sample_text(trainer.model, trainer.tokenizer, cfg.samples):
            print("-" * 60 + "\n" + text)
        print("-" * 60)
    print(f"checkpoint: {result['checkpoint']}  (try: sparseek generate -m {result['checkpoint']} -p 'def ')")
    print(f"log: {trainer.log_path}; plots: {', '.join(plots)}")
    return 0


def cmd_finetune(a) -> int:
    import sparseek
    from sparseek.train.sft import SFTConfig, finetune

    if a.quantize:
        raise ValueError("fine-tuning needs the weights unquantized (QLoRA is not built): drop --quantize")
    model, tok = sparseek.load(a.model, dtype=a.dtype or "float32", device=a.device, lora=a.lora)
    if tok is None:
        raise ValueError(f"{a.model} has no tokenizer.json: fine-tuning needs one")
    # new adapters sit on what was loaded: the base alone names it when nothing was merged into it
    base = a.model if not a.lora else None
    cfg = SFTConfig(data=a.data, out=a.out, max_len=a.max_len, batch_size=a.batch_size, max_steps=a.max_steps,
                    lr=a.lr, lora_rank=a.lora_rank, lora_alpha=a.lora_alpha, seed=a.seed, base=base)
    res = finetune(model, tok, cfg, log=lambda s: print(s, file=sys.stderr))
    kind = f"LoRA adapters (rank {a.lora_rank})" if a.lora_rank else "full model"
    print(f"{kind}: {res['trainable'] / 1e6:.2f}M trainable parameters, {res['examples']} conversations, "
          f"loss {res['losses'][0]:.3f} -> {res['final_loss']:.3f}; written to {res['out']}")
    return 0


def cmd_merge(a) -> int:
    import sparseek
    from sparseek.checkpoint import save_model
    from sparseek.checkpoint.adapters import is_adapter_dir

    if not a.lora and not (os.path.isdir(a.model) and is_adapter_dir(a.model)):
        raise ValueError(f"nothing to merge: {a.model} is not an adapter directory and no --lora was given")
    from sparseek.checkpoint.io import side_file

    model, tok = sparseek.load(a.model, dtype=a.dtype, device=a.device, lora=a.lora, quantize=a.quantize)
    gen = side_file(a.model, "generation_config.json")
    save_model(model, a.out, tokenizer=tok, extra_files=[gen] if gen else [])
    print(f"merged model written to {a.out} (try: sparseek chat -m {a.out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparseek", description="DeepSeek-V4-class sparse MoE models in PyTorch")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("info", help="architecture summary and parameter counts of a preset or checkpoint")
    p.add_argument("model")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("generate", help="complete a prompt, streaming to the terminal")
    _add_model_args(p)
    _add_engine_args(p)
    _add_sampling_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt (default: read stdin)")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (DeepSeek-V4's chat format, or the checkpoint's own template)")
    _add_model_args(p)
    _add_engine_args(p)
    _add_sampling_args(p)
    p.add_argument("--thinking", action="store_true", help="thinking mode (<think> reasoning first)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-seq-len", type=int, default=8192)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model_args(p)
    _add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $SPARSEEK_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the directory's)")
    p.add_argument("--max-batch-size", "--max-num-seqs", type=int, default=8,
                   help="sequences decoded together (vLLM's --max-num-seqs)")
    p.add_argument("--max-waiting", type=int, default=256, help="requests queued beyond the batch before 503s")
    p.add_argument("--stored-responses", type=int, default=1024,
                   help="Responses API: responses kept in memory for previous_response_id (0: none)")
    p.add_argument("--max-seq-len", "--max-model-len", type=int, default=8192,
                   help="context per sequence, prompt + completion (vLLM's --max-model-len)")
    p.add_argument("--speculative-tokens", "--num-speculative-tokens", type=int, default=0,
                   help="MTP speculative decoding: drafts per step")
    p.add_argument("--prefill-chunk", "--max-num-batched-tokens", type=int, default=None,
                   help="tokens per prefill forward (default 512 on a CPU, 8192 on a GPU): while requests decode, a "
                        "joining prompt's forwards alternate with their decode steps, so this bounds how long they "
                        "wait for it")
    p.add_argument("--no-interleave-prefill", "--no-enable-chunked-prefill", dest="interleave_prefill",
                   action="store_false",
                   help="prefill a joining prompt whole before the next decode step (its first token comes "
                        "sooner, the running requests' next ones later)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=DIR",
                   help="LoRA adapters served unmerged, each under its own model name (a request's 'model' "
                        "picks one; the base model stays servable)")
    p.add_argument("--allow-runtime-lora", action="store_true",
                   help="POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter change the "
                        "served adapters while running (vLLM's; they read directories on this machine)")
    p.add_argument("--thinking", action="store_true",
                   help="chat requests think by default (they can say otherwise: chat_template_kwargs.thinking)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("run-batch", help="run a file of OpenAI Batch API requests offline (JSONL in, JSONL out)")
    _add_model_args(p)
    _add_engine_args(p)
    p.add_argument("-i", "--input", required=True, help='JSONL: {"custom_id", "method": "POST", "url", "body"} a line')
    p.add_argument("-o", "--output", required=True, help="JSONL of results, in the input's order")
    p.add_argument("--served-model-name", default=None, help="the model's name in the requests (default: the directory's)")
    p.add_argument("--max-batch-size", "--max-num-seqs", type=int, default=8,
                   help="sequences decoded together (vLLM's --max-num-seqs)")
    p.add_argument("--max-seq-len", "--max-model-len", type=int, default=8192,
                   help="context per sequence, prompt + completion (vLLM's --max-model-len)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=DIR",
                   help="LoRA adapters served unmerged, each under its own model name (a request's 'model' picks one)")
    p.add_argument("--thinking", action="store_true", help="chat requests think by default")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted run: keep the results in OUTPUT.partial, run only the rest")
    p.set_defaults(fn=cmd_run_batch)

    p = sub.add_parser("merge", help="merge LoRA adapters into their base model and write a full checkpoint")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(fn=cmd_merge)

    p = sub.add_parser("quantize", help="write a checkpoint in DeepSeek's FP8 / FP4 layout, with a quality report")
    p.add_argument("model", help="checkpoint directory or preset name")
    p.add_argument("out", help="output directory")
    p.add_argument("--experts", choices=["fp4", "fp8", "none"], default="fp4",
                   help="routed experts' format (fp4: V4's MXFP4; fp8: V3's 128x128 blocks; none: keep)")
    p.add_argument("--linears", choices=["fp8", "none"], default="fp8", help="the other linear layers' format")
    p.add_argument("--eval-data", nargs="+", default=None,
                   help="text to compare the models on (default: the Python standard library)")
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=256, help="tokens per window")
    p.add_argument("--no-report", action="store_true", help="skip the comparison with the original")
    p.add_argument("--act-fp8", action="store_true",
                   help="measure the quantized model as DeepSeek's runtime runs it: the inputs of its FP8 / FP4 "
                        "products rounded to FP8 (1x128 blocks)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_quantize)

    from sparseek.checkpoint.gguf import GGUF_TYPES

    p = sub.add_parser("export-gguf", help="write a DeepSeek model as a GGUF file for llama.cpp, with a quality report")
    p.add_argument("model", help="checkpoint directory or preset name (V4, or V2 / V3 / R1)")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="q8_0", choices=GGUF_TYPES,
                   help="tensor type (1-D tensors and the router stay f32, the output head at least q8_0; mxfp4: "
                        "DeepSeek-V4's own layout, FP4 experts and Q8_0 linears)")
    p.add_argument("--lora", nargs="+", default=None, help="LoRA adapter directories merged in first")
    p.add_argument("--split-max-size", default=None,
                   help="split into parts of at most this size (e.g. 45G; llama.cpp loads the first part)")
    p.add_argument("--eval-data", nargs="+", default=None,
                   help="text to compare the models on (default: the Python standard library)")
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=256, help="tokens per window")
    p.add_argument("--mtp", action="store_true",
                   help="V4: also write the MTP block as llama.cpp's draft file, mtp-<name>.gguf beside the model")
    p.add_argument("--no-report", action="store_true", help="skip reading the file back and comparing")
    p.set_defaults(fn=cmd_export_gguf)

    from sparseek.evals.cli import add_eval_parser

    add_eval_parser(sub)

    p = sub.add_parser("prepare", help="tokenize text sources into training shards (default: the stdlib)")
    p.add_argument("sources", nargs="*", help="files, folders, globs, .jsonl/.parquet, 'stdlib', hf:<id>")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json instead of training one")
    p.add_argument("--text-field", default="text")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("train", help="pretrain a model (default: nano on the Python standard library)")
    p.add_argument("--preset", default=None, help="model preset (default nano)")
    p.add_argument("--data", nargs="+", default=None, help="text sources (default: stdlib)")
    p.add_argument("--out", default=None, help="run directory (default runs/nano)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", choices=["muon", "adamw"], default=None)
    p.add_argument("--balance", choices=["aux_free", "aux_loss", "none"], default=None)
    p.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the hot pure-tensor functions")
    p.add_argument("--indexer-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="train the lightning indexers with a KL loss to the main attention (DeepSeek's indexer "
                        "training; on by default, --no-indexer-loss keeps them random)")
    p.add_argument("--indexer-warmup", type=int, default=None, metavar="STEPS",
                   help="with --indexer-loss: the first STEPS steps attend to every compressed entry while the "
                        "indexer learns over all of them (DeepSeek's dense warm-up)")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields")
    p.add_argument("--set", action="append", help="override a model field, e.g. --set n_routed_experts=8")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("finetune", help="supervised fine-tuning on chat JSONL (loss on assistant tokens)")
    _add_model_args(p)
    p.add_argument("--data", required=True, help='JSONL of {"messages": [...]} conversations')
    p.add_argument("--out", required=True)
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_finetune)

    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError, ImportError) as e:
        # bad input: one line naming the problem, not a traceback
        print(f"sparseek {a.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
