"""The command line: each verb runs end to end and bad input is one clear line, not a traceback."""

from __future__ import annotations

import json

import pytest

from sparseek.cli import main


def test_info(capsys):
    assert main(["info", "v4-pro"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layer_kinds"] == {"csa": 30, "hca": 31} and info["params_active_per_token"] > 40e9
    kv = info["kv_cache"]  # the analytic counts (tests/model/test_cache_size.py), three layouts
    assert kv["bf16"]["bytes_per_token"] == 9848 and round(kv["fp8_kv_fp4_index"]["bytes_per_token"]) == 5024
    assert kv["fp8_kv"]["GiB_at_1M"] < kv["bf16"]["GiB_at_1M"]
    import sparseek

    a = sparseek.preset("v4-pro")  # what --cpu-moe keeps in host memory: every routed expert, MTP's too
    experts = (a.num_hidden_layers + a.num_nextn_predict_layers) * a.n_routed_experts * 3 * a.hidden_size \
        * a.moe_intermediate_size
    assert info["params_routed_experts"] == experts < info["params_total"]


def test_generate_streams_a_completion(capsys):
    assert main(["generate", "--model", "debug", "--prompt", "def f(x):", "--max-tokens", "8", "--seed", "1"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def f(x):") and len(out.out) > len("def f(x):") and "finish" in out.err


def test_bad_model_is_one_line(capsys):
    assert main(["generate", "--model", "/no/such/dir", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "neither a checkpoint directory nor a preset" in err and "Traceback" not in err


def test_unusable_device_is_one_line(monkeypatch, capsys):
    """A device this machine cannot use is refused by name before any tensor is moved there."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--model", "debug", "--prompt", "x", "--device", "cuda"]) == 2
    assert main(["train", "--preset", "debug", "--device", "cuda:1", "--max-steps", "1", "--out", "unused"]) == 2
    assert main(["generate", "--model", "debug", "--prompt", "x", "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("'cuda") == 2 and "not available" in err and "unknown device 'gpu'" in err
    assert "Traceback" not in err


def test_engine_flags_reach_the_engine(monkeypatch, capsys):
    """--compile, --kv-fp8 and --index-fp4 are passed to LLM (compiling itself is tested in tests/engine)."""
    import sparseek.engine

    seen = {}

    class Fake:
        def __init__(self, model, **kw):
            seen.update(kw, model=model)
            raise SystemExit(0)

    monkeypatch.setattr(sparseek.engine, "LLM", Fake)
    for verb in ("generate", "chat", "eval"):
        seen.clear()
        try:
            flags = ["--model", "debug", "--compile", "--kv-fp8", "--index-fp4"]
            main([verb, *flags, "--prompt", "x"] if verb == "generate" else [verb, *flags])
        except SystemExit:
            pass
        assert seen["compile"] is True and seen["kv_fp8"] is True and seen["index_fp4"] is True
        assert seen["model"] == "debug"


def test_train_indexer_flags_reach_the_trainer(monkeypatch):
    """The indexer loss is on by default, --no-indexer-loss turns it off, --indexer-warmup sets the
    dense warm-up."""
    import sparseek.train.trainer

    seen = []

    class Fake:
        def __init__(self, cfg, **kw):
            seen.append(cfg)
            raise SystemExit(0)

    monkeypatch.setattr(sparseek.train.trainer, "Trainer", Fake)
    for flags in ([], ["--no-indexer-loss"], ["--indexer-warmup", "7"]):
        try:
            main(["train", "--max-steps", "1", *flags])
        except SystemExit:
            pass
    assert [(c.indexer_loss, c.indexer_warmup) for c in seen] == [(True, 0), (False, 0), (True, 7)]


def test_serve_builds_the_server_from_flags(monkeypatch, capsys):
    """``sparseek serve``: the engine from the model flags, the key from the flag or the environment,
    the name from the model; a missing model is one line."""
    import sparseek.serve

    seen = {}
    monkeypatch.setattr(sparseek.serve, "serve", lambda llm, **kw: seen.update(llm=llm, **kw))
    assert main(["serve", "--model", "debug", "--port", "9123", "--max-batch-size", "3", "--max-seq-len", "300",
                 "--thinking"]) == 0
    assert seen["model_name"] == "debug" and seen["port"] == 9123 and seen["api_key"] is None and seen["thinking"]
    assert seen["llm"].max_batch_size == 3 and seen["llm"].max_seq_len == 300 and seen["llm"].tokenizer is not None
    assert seen["llm"].prefill_chunk == 512 and seen["llm"].interleave_prefill  # the CPU's default
    from sparseek.engine.llm import default_prefill_chunk

    assert default_prefill_chunk("cuda") == 8192 and default_prefill_chunk("cpu") == 512
    assert main(["serve", "--model", "debug", "--prefill-chunk", "64", "--no-interleave-prefill"]) == 0
    assert seen["llm"].prefill_chunk == 64 and not seen["llm"].interleave_prefill
    # vLLM's flag names work too
    assert main(["serve", "--model", "debug", "--max-num-seqs", "5", "--max-model-len", "200",
                 "--max-num-batched-tokens", "32", "--no-enable-chunked-prefill"]) == 0
    llm = seen["llm"]
    assert (llm.max_batch_size, llm.max_seq_len, llm.prefill_chunk, llm.interleave_prefill) == (5, 200, 32, False)
    assert main(["serve", "--model", "debug", "--prefill-chunk", "0"]) == 2
    assert "prefill_chunk must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("SPARSEEK_API_KEY", "from-env")
    assert main(["serve", "--model", "debug", "--served-model-name", "tiny"]) == 0
    assert seen["api_key"] == "from-env" and seen["model_name"] == "tiny"
    assert main(["serve", "--model", "debug", "--api-key", "flag", "--host", "0.0.0.0"]) == 0
    assert seen["api_key"] == "flag" and seen["host"] == "0.0.0.0"
    assert main(["serve", "--model", "/no/such/dir"]) == 2
    err = capsys.readouterr().err
    assert "neither a checkpoint directory nor a preset" in err and "Traceback" not in err


@pytest.mark.parametrize("template", [False, True])
def test_chat_turns_in_the_checkpoint_s_format(tmp_path, monkeypatch, capsys, template):
    """`sparseek chat` on a checkpoint: each turn's prompt in its chat format (V4's, or its own
    template, R1 style), the reply's reasoning shown apart from the answer, the history kept."""
    import torch

    import sparseek
    from sparseek.engine import llm as engine_llm
    from sparseek.model import build_model
    from sparseek.tokenizer import default_tokenizer
    from tests.conftest import randomize_
    from tests.tokenizer.test_template import R1_STYLE

    tok = default_tokenizer(512)
    tok.chat_template = R1_STYLE if template else None
    sparseek.save(randomize_(build_model(sparseek.preset("debug")), 1), str(tmp_path / "ck"), tokenizer=tok)
    script = tok.encode("Add.</think>4") + [tok.eos_id]
    prompts, step = [], [0]

    def sample(logits, params, generators):  # "samples" the script, from its start for each turn
        step[0] += 1
        return torch.tensor([script[min(step[0] - 1, len(script) - 1)]] * logits.shape[0])

    real_requests = engine_llm.LLM._requests

    def spy(self, p, params):
        prompts.append(self.tokenizer.decode(p[0]))  # stream() passes [ids]
        step[0] = 0
        return real_requests(self, p, params)

    monkeypatch.setattr(engine_llm, "sample", sample)
    monkeypatch.setattr(engine_llm.LLM, "_requests", spy)
    answers = iter(["2+2?", "and 3+3?", ""])
    monkeypatch.setattr("builtins.input", lambda _: next(answers))
    flags = [] if template else ["--thinking"]
    assert main(["chat", "-m", str(tmp_path / "ck"), "--dtype", "float32", "--max-tokens", "40", *flags]) == 0
    out = capsys.readouterr().out
    # the reasoning dimmed (delta by delta), then the answer
    assert out.replace("\033[2m", "").replace("\033[0m", "") == "Add.4\nAdd.4\n" and out.count("\033[0m4\n") == 2
    opening = "<｜Assistant｜><think>\n" if template else "<｜Assistant｜><think>"
    assert len(prompts) == 2 and all(p.endswith(opening) for p in prompts)
    assert "<｜User｜>2+2?" in prompts[1] and "4<｜end▁of▁sentence｜>" in prompts[1]


def test_chat_keeps_going_past_the_context_and_ctrl_c(monkeypatch, capsys):
    """A conversation outgrowing the context drops its oldest exchanges (the system message stays)
    and says so; a message too long on its own is refused in one line and the chat goes on; Ctrl-C
    ends the reply being written, not the chat; /clear starts over (under the system message),
    /exit ends it."""
    from sparseek.engine import llm as engine_llm

    prompts, stream = [], engine_llm.LLM.stream
    calls = [0]

    def spy(self, p, params):
        prompts.append(self.tokenizer.decode(p[0]))
        calls[0] += 1
        for i, delta in enumerate(stream(self, p, params)):
            if calls[0] == 3 and i == 2:
                raise KeyboardInterrupt
            yield delta

    monkeypatch.setattr(engine_llm.LLM, "stream", spy)
    words = lambda tag, n: " ".join(f"{tag}{i}" for i in range(n))  # noqa: E731
    answers = iter([words("a", 60), words("b", 60), words("huge", 400), words("c", 60), "last?", "/clear", "new",
                    "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda _: next(answers))
    assert main(["chat", "-m", "debug", "--max-seq-len", "400", "--max-tokens", "8", "--seed", "0",
                 "--system", "be brief"]) == 0
    cap = capsys.readouterr()
    assert "too long for the context (400 tokens)" in cap.err and "left the conversation" in cap.err
    assert len(prompts) == 5 and all("be brief" in p for p in prompts)
    assert "new" in prompts[4] and "c0" not in prompts[4] and "(conversation cleared)" in cap.err
    assert "a0" in prompts[0] and "a0" not in prompts[2] and "b0" in prompts[2] and "huge0" not in "".join(prompts)
    # the chat went on after the interrupted reply, which stays in the history
    assert cap.out.count(" [interrupted]\n") == 1 and "c0" in prompts[3] and "last?" in prompts[3]


def test_serve_lora_modules_take_name_dir_pairs(capsys):
    assert main(["serve", "-m", "debug", "--lora-modules", "no-equals-sign"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err


def test_serve_passes_allow_runtime_lora(monkeypatch):
    import sparseek.serve

    seen = {}
    monkeypatch.setattr(sparseek.serve, "serve", lambda llm, **kw: seen.update(kw))
    assert main(["serve", "-m", "debug", "--allow-runtime-lora"]) == 0
    assert seen["runtime_lora"] is True
    assert main(["serve", "-m", "debug"]) == 0 and seen["runtime_lora"] is False
