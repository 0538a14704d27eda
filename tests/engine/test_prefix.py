"""Prefix caching: a restored snapshot goes on exactly as the prompt prefilled alone, and the
engine reads shared beginnings once (counted in tokens fed to the model)."""

from __future__ import annotations

import pytest
import torch

import sparseek
from sparseek.engine import LLM, SamplingParams
from sparseek.engine.prefix import PrefixCache, prefix_hashes
from sparseek.model import build_model
from sparseek.model.cache import Cache
from tests.conftest import randomize_

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", ["debug", "debug-v3"])
def test_a_restored_snapshot_goes_on_as_the_original_row(name):
    """Snapshot a row after P tokens (P across window, CSA and HCA boundaries of the debug
    preset), restore it into another row of another cache: the next chunk's logits are equal; the
    snapshot keeps stores only up to P, so it grows with P."""
    model = randomize_(build_model(sparseek.preset(name)), 3).eval()
    ids = torch.tensor([_tokens(1, 300)])
    sizes = []
    with torch.no_grad():
        for P in (37, 130, 261):
            a = model.new_cache(1, 512)
            model(ids[:, :P], a)
            snap = a.snapshot(0)
            b = model.new_cache(2, 512)
            model(ids[:, :5], b.select(0))  # the other row holds something else
            b.restore(snap, 1)
            ref = model(ids[:, P:P + 20], a)
            got = model(ids[:, P:P + 20], b.select(1))
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
            sizes.append(sum(t.numel() * t.element_size() for t in snap))
    assert sizes[0] < sizes[1] < sizes[2] < model.new_cache(1, 512).nbytes()


class _Counter:
    """Tokens fed to the model's forward (rows x length, prefill and decode)."""

    def __init__(self, model, monkeypatch):
        self.fed = 0
        forward = type(model).forward

        def counted(m, ids, *a, **kw):
            self.fed += ids.numel()
            return forward(m, ids, *a, **kw)

        monkeypatch.setattr(type(model), "forward", counted)


def _alone(model, tok, prompts, params=GREEDY):
    return [LLM(model, tok, max_batch_size=1, max_seq_len=512, prefix_cache_bytes=0).generate([p], params)[0]
            for p in prompts]


def _same(outs, refs):
    for o, r in zip(outs, refs):
        assert o.token_ids == r.token_ids
        for e, f in zip(o.logprobs, r.logprobs):
            assert e.keys() == f.keys() and all(abs(e[t] - f[t]) < 1e-4 for t in e)


@pytest.mark.parametrize("speculative", [0, 2])
def test_a_shared_preamble_is_read_once(model, tok, speculative, monkeypatch):
    """Four prompts behind one 150-token preamble: the first admission reads the preamble once
    (not four times), a later call reads none of it; every output equals its prompt alone."""
    pre = _tokens(2, 150)
    first = [pre + _tokens(10 + i, 5 + 7 * i) for i in range(4)]
    later = [pre + _tokens(20 + i, 9) for i in range(3)]
    refs = _alone(model, tok, first + later)
    count = _Counter(model, monkeypatch)
    llm = LLM(model, tok, max_batch_size=4, max_seq_len=512, speculative_tokens=speculative)
    _same(llm.generate(first, GREEDY), refs[:4])
    rest = sum(len(p) - 144 for p in first)  # the preamble's whole 16-token blocks are shared
    assert count.fed <= 144 + rest + 4 * Cache.SPARE + 4 * 6 * (speculative + 1)  # rows may read junk to 8 past
    count.fed = 0
    _same(llm.generate(later, GREEDY), refs[4:])
    assert count.fed <= sum(len(p) - 144 for p in later) + 3 * 6 * (speculative + 1)
    # the prompt that made the preamble's snapshot read it: 3 + 3 prompts skipped it
    assert llm.prefix_cache.hits == 6 and llm.prefix_cache.tokens_saved == 6 * 144


def test_the_next_turn_goes_on_from_the_last_prompt(model, tok, monkeypatch):
    """A prompt that extends a previous one (a chat's next turn) reads only the new tokens; the
    same prompt again reads nothing (its last logits are kept)."""
    turn1 = _tokens(3, 60)
    turn2 = turn1 + _tokens(4, 25)
    refs = _alone(model, tok, [turn1, turn2])
    count = _Counter(model, monkeypatch)
    llm = LLM(model, tok, max_batch_size=2, max_seq_len=512)
    out = llm.generate([turn1], GREEDY)
    _same(out, refs[:1])
    count.fed = 0
    out2 = llm.generate([turn2], GREEDY)
    _same(out2, refs[1:])
    assert count.fed == 25 + 5  # the new tokens, then 5 decode steps
    count.fed = 0
    out3 = llm.generate([turn1], GREEDY)
    _same(out3, refs[:1])
    assert count.fed == 5
    # what each request reports the cache spared it (the API's usage.prompt_tokens_details)
    assert [o[0].num_cached_tokens for o in (out, out2, out3)] == [0, 60, 60]


def test_off_and_short_prompts_and_budget(model, tok, monkeypatch):
    pre = _tokens(5, 100)
    prompts = [pre + [7], pre + [8]]
    count = _Counter(model, monkeypatch)
    off = LLM(model, tok, max_batch_size=2, max_seq_len=512, prefix_cache_bytes=0)
    assert off.prefix_cache is None
    refs = off.generate(prompts, GREEDY)
    fed_off, count.fed = count.fed, 0
    on = LLM(model, tok, max_batch_size=2, max_seq_len=512)
    _same(on.generate(prompts, GREEDY), refs)
    assert count.fed < fed_off - 80
    short = LLM(model, tok, max_batch_size=2, max_seq_len=512)
    short.generate([[5] * 20 + [1], [5] * 20 + [2]], GREEDY)  # under 32 tokens: nothing kept
    assert len(short.prefix_cache) == 0
    tiny = LLM(model, tok, max_batch_size=2, max_seq_len=512, prefix_cache_bytes=1000)
    _same(tiny.generate(prompts, GREEDY), refs)  # no snapshot fits: still right
    assert len(tiny.prefix_cache) == 0


def test_eviction_keeps_reused_snapshots():
    pc = PrefixCache(capacity_bytes=3 * 400, min_tokens=2, block=2)

    def put(key):
        t = torch.zeros(100)  # 400 bytes with the logits below counted apart
        return pc.put(key, [t[:50]], t[:50], None, prefix_hashes(key))

    a = put([1, 2, 3])
    put([4, 5, 6])
    put([7, 8, 9])
    pc.touch(a)  # reused once
    put([10, 11, 12])  # evicts the least recently used never-reused one: [4, 5, 6]
    assert pc.longest([1, 2, 3, 9]) is a and pc.longest([4, 5, 6, 9]) is None
    assert pc.longest([7, 8, 9]) is not None
    put([13, 14, 15])
    put([16, 17, 18])
    assert pc.longest([1, 2, 3]) is a  # outlives every snapshot never reused
    assert pc.shared([1, 2, 3, 4, 5], prefix_hashes([1, 2, 3, 4, 5]), {}) == 2
    assert pc.shared([4, 5, 6, 7], prefix_hashes([4, 5, 6, 7]), {}) == 0


def test_snapshots_do_not_outlive_the_weights(tok):
    """After the weights change in place (an optimizer step, load_state_dict), a kept prompt is read
    again with the new weights: the output equals a fresh engine's, not the old weights' one."""
    model = randomize_(build_model(sparseek.preset("debug")), 8).eval()
    prompt = _tokens(6, 70)
    llm = LLM(model, tok, max_batch_size=1, max_seq_len=256)
    before = llm.generate([prompt], GREEDY)[0].token_ids
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(1.7)
    fresh = LLM(model, tok, max_batch_size=1, max_seq_len=256, prefix_cache_bytes=0).generate([prompt], GREEDY)[0]
    assert fresh.token_ids != before
    assert llm.generate([prompt], GREEDY)[0].token_ids == fresh.token_ids


def test_the_next_turn_reuses_the_reply(model, tok, monkeypatch):
    """A finished sequence's row is kept (prompt and reply but its last token): a next turn that
    repeats both reads only the reply's last token and what is new, and decodes as if alone."""
    turn1 = _tokens(7, 50)
    llm = LLM(model, tok, max_batch_size=2, max_seq_len=512)
    reply = llm.generate([turn1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
    turn2 = turn1 + reply + _tokens(8, 20)
    ref = _alone(model, tok, [turn2])
    count = _Counter(model, monkeypatch)
    _same(llm.generate([turn2], GREEDY), ref)
    assert count.fed == 1 + 20 + 5


def test_requests_one_at_a_time_share_a_system_prompt(model, tok, monkeypatch):
    """A server's pattern: requests arrive alone, behind one 100-token system prompt. The first is
    read whole; the second finds the first's kept prompt sharing 96 tokens (whole blocks) with it
    and reads those once more into a snapshot; from the third on only the question is read."""
    system = _tokens(9, 100)
    qs = [system + _tokens(30 + i, 12) for i in range(4)]
    refs = _alone(model, tok, qs)
    llm = LLM(model, tok, max_batch_size=2, max_seq_len=512)
    count = _Counter(model, monkeypatch)
    fed, cached = [], []
    for q, ref in zip(qs, refs):
        count.fed = 0
        out = llm.generate([q], GREEDY)
        _same(out, [ref])
        fed.append(count.fed - 5)  # less the 5 decode steps
        cached.append(out[0].num_cached_tokens)
    assert fed == [112, 96 + 16, 16, 16]
    assert cached == [0, 0, 96, 96]  # the second read the shared 96 itself


def test_a_hash_collision_never_restores_the_wrong_prefix():
    pc = PrefixCache(capacity_bytes=1000, min_tokens=2, block=2)
    fake = [7, 8, 9]  # both keys hash alike
    t = torch.zeros(10)
    pc.put([1, 2, 3], [t], t, None, fake)
    pc.put([4, 5, 6], [t], t, None, fake)
    assert len(pc) == 1 and pc.nbytes == 80
    assert pc.longest([1, 2, 3], fake) is None and pc.longest([4, 5, 6], fake).key == (4, 5, 6)
