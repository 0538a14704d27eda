"""Our log-likelihoods equal transformers' for the same weights; scoring paths agree with each other."""

from __future__ import annotations

import pytest
import torch

import sparseek
from sparseek.evals.model import EngineModel, rolling_windows
from tests.conftest import randomize_

REQUESTS = [
    ("The capital of France is", " Paris"),
    ("Question: 2 + 2 =", " 4"),
    ("def add(a, b):\n    return ", "a + b"),
    ("trailing space moves ", "to the continuation"),
    ("", "an empty context is scored after BOS"),
    ("import os\nimport sys\n", "import json\n"),
    ("x" * 300, " and a context longer than the model's window"),
]


class _Req:  # what lm-eval hands a model: an object with .args
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("v3")
    from sparseek.tokenizer import default_tokenizer

    model = randomize_(sparseek.build_model(sparseek.preset("debug-v3")), 11).eval()
    sparseek.save(model, str(d), tokenizer=default_tokenizer(512))
    return d


def reference_loglikelihoods(d, requests, max_len):
    """transformers' model and tokenizer, lm-eval's convention, computed here independently."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    bos = tok.convert_tokens_to_ids("<｜begin▁of▁sentence｜>")
    out = []
    for ctx, cont in requests:
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        c = enc(ctx) if ctx else []
        x = enc(ctx + cont)[len(c):] if ctx else enc(cont)
        ids = ([bos] + c + x)[-(max_len + 1):]
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids[:-1]])).logits[0].float(), -1)
        tgt = torch.tensor(ids[-len(x):])
        rows = lp[-len(x):]
        out.append((float(rows.gather(-1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all())))
    return out


def test_adapter_loglikelihoods_equal_transformers(checkpoint):
    pytest.importorskip("lm_eval")
    from sparseek.evals.lm_eval_adapter import SparseekLM

    lm = SparseekLM(pretrained=str(checkpoint), max_length=256)
    assert lm.model.llm.tokenizer.bos_id is not None
    # plus a continuation that greedy decoding produces, so is_greedy is exercised both ways
    ctx = "The capital of France is"
    greedy = lm.generate_until([_Req(ctx, {"until": [], "max_gen_toks": 2})], disable_tqdm=True)[0]
    requests = REQUESTS + [(ctx, greedy)]
    ours = lm.loglikelihood([_Req(c, x) for c, x in requests], disable_tqdm=True)
    ref = reference_loglikelihoods(checkpoint, requests, 256)
    for (c, _), (a, ga), (b, gb) in zip(requests, ours, ref):
        assert a == pytest.approx(b, abs=1e-3), c[:30]
        assert ga == gb
    assert ours[-1][1] is True and not all(g for _, g in ours)
    # rolling = the whole text after BOS when it fits in one window
    text = "def f(x):\n    return x * 2\n"
    roll = lm.loglikelihood_rolling([_Req(text)], disable_tqdm=True)[0]
    whole = reference_loglikelihoods(checkpoint, [("", text)], 256)[0][0]
    assert roll == pytest.approx(whole, abs=2e-3)


def test_shared_scorer_equals_engine_scorer():
    llm = sparseek.LLM("debug", max_seq_len=128)
    shared, engine = EngineModel(llm, progress=False), EngineModel(llm, progress=False, scorer="engine")
    reqs = [(c, x) for c, x in REQUESTS[:6]] + [("Answer:", " A"), ("Answer:", " B"), ("Answer:", " C")]
    a, b = shared.loglikelihood(reqs), engine.loglikelihood(reqs)
    for (sa, ga), (sb, gb) in zip(a, b):
        assert sa == pytest.approx(sb, abs=1e-3) and ga == gb


def test_rolling_windows_score_every_token_once():
    ids = list(range(100, 137))
    for max_len in (5, 8, 64):
        wins = rolling_windows(ids, [0], max_len)
        scored = [t for _, cont in wins for t in cont]
        assert scored == ids
        assert all(len(c) + len(x) <= max_len and c for c, x in wins)
        if len(wins) > 1:  # the last window carries as much context as fits
            c, x = wins[-1]
            assert len(c) + len(x) == max_len and c == ids[len(ids) - len(x) - len(c):len(ids) - len(x)]
    assert rolling_windows([], [0], 8) == []


def test_generation_truncates_long_prompts_on_the_left():
    llm = sparseek.LLM("debug", max_seq_len=64)
    em = EngineModel(llm, progress=False)
    out = em.generate(["word " * 200, "short"], sparseek.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_contexts_that_begin_alike_read_their_beginning_once(monkeypatch):
    """Few-shot contexts (a 120-token preamble, then questions; 4 one-token answers and a
    multi-token one each) score as the engine scores them one by one, while the model reads the
    preamble once; contexts without it are scored as before, in the same call."""
    llm = sparseek.LLM("debug", max_seq_len=512)
    g = torch.Generator().manual_seed(0)
    pre = torch.randint(3, 500, (120,), generator=g).tolist()
    pairs = []
    for q in range(5):
        ctx = pre + torch.randint(3, 500, (10 + 3 * q,), generator=g).tolist()
        pairs += [(ctx, [t]) for t in (7, 8, 9, 10)] + [(ctx, [11, 12, 13])]
    pairs += [(torch.randint(3, 500, (40,), generator=g).tolist(), [5, 6]) for _ in range(3)]
    fed = [0]
    forward = type(llm.model).forward
    monkeypatch.setattr(type(llm.model), "forward", lambda m, ids, *a, **kw: fed.__setitem__(0, fed[0] + ids.numel())
                        or forward(m, ids, *a, **kw))
    shared = EngineModel(llm, progress=False).score_ids(pairs)
    read = fed[0]
    engine = EngineModel(llm, progress=False, scorer="engine").score_ids(pairs)
    for (sa, ga), (sb, gb) in zip(shared, engine):
        assert sa == pytest.approx(sb, abs=1e-4) and ga == gb
    # the preamble once, then the 10 distinct inputs' rests padded to the longest (144 - 120), and
    # the 3 others whole; scored one by one, the engine reads every input whole
    assert read == 120 + 10 * 24 + 3 * 41 and fed[0] - read > 5 * 130 * 5
