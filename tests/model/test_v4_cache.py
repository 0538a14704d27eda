"""Incremental decoding with a cache equals the full forward, for every layer type and for MTP."""

from __future__ import annotations

import pytest
import torch

import sparseek
from sparseek.model import build_model
from sparseek.model.v4 import PER_ROW_TOKENS
from tests.conftest import randomize_, rel_err

T = 300  # > 2 HCA windows of 128, 75 CSA windows, many 16-token sliding windows


@pytest.fixture(scope="module")
def model():
    m = randomize_(build_model(sparseek.preset("debug")), 7).eval()
    # more candidates than top-k so that the indexer's choice matters
    assert all(l.attn.indexer.topk < T // 4 for l in m.layers if l.attn.indexer is not None)
    return m


@pytest.fixture(scope="module")
def ids(model):
    return torch.randint(0, model.args.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _run_chunks(model, ids, sizes, mtp=False):
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 8)
    out, start = [], 0
    for n in sizes:
        out.append(model(ids[:, start:start + n], cache))
        start += n
    assert start == ids.shape[1] and int(cache.pos[0]) == start
    return torch.cat(out, dim=1)


def test_one_token_at_a_time(model, ids):
    with torch.no_grad():
        full = model(ids)
    assert rel_err(_run_chunks(model, ids, [1] * T), full) < 1e-4


@pytest.mark.parametrize("sizes", [
    [1, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 61],  # odd sizes crossing every boundary
    [127, 1, 129, 43],
    [4, 124, 128, 44],
])
def test_chunked_prefill(model, ids, sizes):
    with torch.no_grad():
        full = model(ids)
    assert rel_err(_run_chunks(model, ids, sizes), full) < 1e-4


def test_rows_at_different_positions(model, ids):
    """Decode steps for rows of different lengths in one batch give each row its own result."""
    lens = (37, 130)
    steps = 140
    with torch.no_grad():
        cache = model.new_cache(2, T + 8)
        for r, n in enumerate(lens):
            model(ids[r:r + 1, :n], cache.select(r))
        assert cache.pos.tolist() == list(lens)
        got = [[], []]
        for i in range(steps):
            nxt = torch.stack([ids[r, lens[r] + i] for r in range(2)])[:, None]
            logits = model(nxt, cache)
            for r in range(2):
                got[r].append(logits[r, 0])
        for r, n in enumerate(lens):
            ref = model(ids[r:r + 1, :n + steps])[0, n:]
            assert rel_err(torch.stack(got[r]), ref) < 1e-4, f"row {r}"


def test_multi_token_chunk_with_rows_apart(model, ids):
    with torch.no_grad():
        cache = model.new_cache(2, T + 8)
        model(ids[0:1, :10], cache.select(0))
        model(ids[1:2, :20], cache.select(1))
        chunk = torch.stack([ids[0, 10:30], ids[1, 20:40]])
        got = model(chunk, cache)
        ref0 = model(ids[0:1, :30])[0, 10:]
        ref1 = model(ids[1:2, :40])[0, 20:]
    assert rel_err(got[0], ref0) < 1e-4 and rel_err(got[1], ref1) < 1e-4


@pytest.mark.parametrize("n,static", [(2, False), (5, False), (PER_ROW_TOKENS, False), (3, True), (PER_ROW_TOKENS, True)])
def test_few_tokens_per_row_with_rows_apart(model, ids, n, static, monkeypatch):
    """Batched speculative verification: rows at different positions feed n tokens each in one
    forward (the per-row path, not row by row), keep some, roll back the rest (junk drafts); the MTP
    block does the same. Each row gets what the one-shot forward gives it. ``static``: the same
    through the fixed-shape steps a compiled engine runs (``verify_step``, ``mtp_step``, whose
    drafts come from one position per row)."""
    monkeypatch.setattr(type(model), "_rowwise", lambda *a, **k: pytest.fail("ran row by row"))
    lens = [123, 29]  # next to the HCA window's end (128) and inside CSA / sliding windows
    junk = torch.randint(0, model.args.vocab_size, (n,), generator=torch.Generator().manual_seed(9))
    got, got_mtp, pos, keeps = [[], []], [[], []], list(lens), [[], []]
    with torch.no_grad():
        cache = model.new_cache(2, T + 8)
        for r, L in enumerate(lens):
            _, h = model(ids[r:r + 1, :L], cache.select(r), return_hidden=True)
            model.forward_mtp(h, ids[r:r + 1, 1:L + 1], cache.select(r))  # MTP in step with the model
        for step in range(12):
            keep = [(step + r) % n + 1 for r in range(2)]
            chunk = torch.stack([torch.cat([ids[r, pos[r]:pos[r] + keep[r]], junk[:n - keep[r]]]) for r in range(2)])
            nxt = torch.stack([ids[r, pos[r] + 1:pos[r] + 1 + n] for r in range(2)])
            if static:
                logits, h = model.verify_step(chunk, cache)
                at = torch.tensor(keep) - 1
                mtp, x = model.mtp_step(h, nxt, cache, at)
                assert x.shape == (2, 1, *h.shape[2:])
            else:
                logits, h = model(chunk, cache, return_hidden=True)
                mtp = model.forward_mtp(h, nxt, cache)
            for r in range(2):
                got[r].append(logits[r, :keep[r]])
                got_mtp[r].append(mtp[r, None] if static else mtp[r, :keep[r]])
                cache.rollback(r, n - keep[r])
                cache.rollback(r, n - keep[r], mtp=True)
                pos[r] += keep[r]
                keeps[r].append(keep[r])
        for r, L in enumerate(lens):
            full, h = model(ids[r:r + 1, :pos[r] + 1], return_hidden=True)
            full_mtp = model.forward_mtp(h[:, :-1], ids[r:r + 1, 1:pos[r] + 1])
            assert rel_err(torch.cat(got[r]), full[0, L:pos[r]]) < 1e-4, f"row {r}"
            want_mtp = full_mtp[0, L:pos[r]]
            if static:  # each step's last kept position
                want_mtp = want_mtp[torch.tensor(keeps[r]).cumsum(0) - 1]
            assert rel_err(torch.cat(got_mtp[r]), want_mtp) < 1e-4, f"row {r}, MTP"
    assert min(pos) > 40 and max(pos) > 128 + n  # windows closed and attended while rows sat apart


def test_mtp_incremental_equals_full(model, ids):
    with torch.no_grad():
        logits, h = model(ids, return_hidden=True)
        full = model.forward_mtp(h[:, :-1], ids[:, 1:])
        cache = model.new_cache(2, T + 8)
        steps = []
        for t in range(T - 1):
            _, ht = model(ids[:, t:t + 1], cache, return_hidden=True)
            steps.append(model.forward_mtp(ht, ids[:, t + 1:t + 2], cache))
    assert full.shape == (2, T - 1, model.args.vocab_size)
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-4
    with torch.no_grad():  # one position per row (speculative decoding's drafts)
        picked = model.forward_mtp(h[:, :-1], ids[:, 1:], at=torch.tensor([3, 250]))
    assert picked.shape == (2, 1, model.args.vocab_size) and rel_err(picked, full[[0, 1], [3, 250]][:, None]) < 1e-5


def test_last_n_logits(model, ids):
    with torch.no_grad():
        assert rel_err(model(ids[:, :50], last_n=1), model(ids[:, :50])[:, -1:]) < 1e-6


def test_bad_inputs_are_named(model, ids):
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[0, model.args.vocab_size]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(2, 3))
    cache = model.new_cache(2, 16)
    with pytest.raises(ValueError, match="too long"):
        model(ids[:, :17], cache)
    with pytest.raises(ValueError, match="batch size"):
        model(ids[:1, :4], cache)


@pytest.mark.parametrize("preset", ["debug", "debug-v3"])
def test_rollback_forgets_rejected_tokens(preset):
    """Feed speculative tokens, roll them back, continue: same as never having fed them."""
    m = randomize_(build_model(sparseek.preset(preset)), 5).eval()
    ids = torch.randint(0, 512, (1, 260), generator=torch.Generator().manual_seed(3))
    junk = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(1, 300)
        out, s = [], 0
        for n in (127, 1, 2, 60, 70):  # rollbacks land on both sides of window/compression boundaries
            out.append(m(ids[:, s:s + n], cache))
            s += n
            k = 1 + (s % 5)
            m(junk[:, :k], cache)  # a draft that gets rejected ...
            cache.rollback(0, k)   # ... and forgotten
            if s % 2:              # also as single decode steps
                for j in range(k):
                    m(junk[:, j:j + 1], cache)
                cache.rollback(0, k)
    assert rel_err(torch.cat(out, 1), full) < 1e-4


def test_static_decode_step_equals_forward(model, ids):
    """The compile-friendly decode step (fixed shapes, no host syncs) computes the same logits."""
    with torch.no_grad():
        a, b = model.new_cache(2, T + 8), model.new_cache(2, T + 8)
        model(ids[0:1, :50], a.select(0))
        model(ids[1:2, :90], a.select(1))
        model(ids[0:1, :50], b.select(0))
        model(ids[1:2, :90], b.select(1))
        for i in range(140):  # crosses CSA, HCA and window boundaries at different steps per row
            tok = torch.stack([ids[0, 50 + i], ids[1, 90 + i]])[:, None]
            ref = model(tok, a)[:, -1]
            got = model.decode_step(tok, b)
            assert rel_err(got, ref) < 1e-5, i
        assert torch.equal(a.pos, b.pos)


def _count_selects(monkeypatch):
    from sparseek.model import v4

    calls = []
    orig = v4.Indexer.select

    def counted(self, *a):
        calls.append(a[2].shape[1])  # how many compressed keys it scored
        return orig(self, *a)

    monkeypatch.setattr(v4.Indexer, "select", counted)
    return calls


def test_indexer_skipped_while_topk_covers_every_entry(model, ids, monkeypatch):
    """While a query sees at most top-k compressed entries the indexer would pick them all: the
    model attends to all of them without scoring (full forward, chunked, static decode), and the
    output equals the scored path forced on."""
    from sparseek.model import v4

    topk = model.args.index_topk
    short = ids[:, :4 * topk]  # exactly top-k CSA entries at the end
    calls = _count_selects(monkeypatch)
    with torch.no_grad():
        fast = model(short)
        assert calls == []
        monkeypatch.setattr(v4.Attention, "_selects", lambda self, n: self.indexer is not None)
        forced = model(short)
    assert calls and rel_err(fast, forced) < 1e-5
    monkeypatch.undo()

    calls = _count_selects(monkeypatch)
    with torch.no_grad():
        model(ids[:, :4 * topk + 4])  # one entry more than top-k: the indexer picks
    assert calls and max(calls) == topk + 1


def test_small_cache_never_stores_indexer_keys(model, ids):
    """A cache that holds at most top-k compressed entries never reads indexer keys, so neither
    prefill nor the static decode step computes them; decoding still equals the full forward."""
    topk = model.args.index_topk
    n = 4 * topk - 2
    with torch.no_grad():
        full = model(ids[:, :n])
        cache = model.new_cache(2, 4 * topk)
        outs = [model(ids[:, :n - 6], cache)]
        for t in range(n - 6, n):
            outs.append(model.decode_step(ids[:, t:t + 1], cache))
    layers = [lc for lc, l in zip(cache.layers, model.layers) if l.attn.indexer is not None]
    assert layers and all(lc.index_keys.abs().sum() == 0 for lc in layers)
    assert rel_err(torch.cat([outs[0], *[o.view(2, 1, -1) for o in outs[1:]]], dim=1), full) < 1e-4


@pytest.mark.parametrize("as_mask", [True, False])
def test_picked_entries_gathered_or_masked_agree(model, ids, monkeypatch, as_mask):
    """CSA attends to the indexer's picks either gathered or as a mask over all visible entries
    (whichever materializes less); forcing either one gives the other's output, one-shot and
    chunked, and the gradients agree too."""
    from sparseek.model import v4

    with torch.no_grad():
        auto = model(ids)
    monkeypatch.setattr(v4.Attention, "_picks_as_mask", staticmethod(lambda *a: as_mask))
    with torch.no_grad():
        forced = model(ids)
        chunked = _run_chunks(model, ids, [100, 1, 63, 136])
    assert rel_err(forced, auto) < 1e-5 and rel_err(chunked, auto) < 1e-4
    x = ids[:1, :160]
    model.zero_grad()
    model(x).float().square().mean().backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "attn.w" in n}
    monkeypatch.setattr(v4.Attention, "_picks_as_mask", staticmethod(lambda *a: not as_mask))
    model.zero_grad()
    model(x).float().square().mean().backward()
    assert g and all(rel_err(p.grad, g[n]) < 1e-4 for n, p in model.named_parameters() if n in g)
    model.zero_grad()


@pytest.mark.parametrize("budget", [3000, 800_000])
def test_blocks_and_groups_of_queries(model, ids, monkeypatch, budget):
    """A smaller memory budget splits the queries into small blocks (3000: blocks of 1-4 queries,
    one per call) or into several calls of several 64-query blocks (800K; the last block padded):
    same logits, one-shot and chunked, and the same gradients, as the default (all blocks of a
    layer in one call here)."""
    from sparseek.model import v4

    ref = ids[:, :200]
    with torch.no_grad():
        full, chunked = model(ref), _run_chunks(model, ref, [70, 130])
    x = torch.randn(2, 200, model.args.hidden_size)

    def grads():
        model.zero_grad()
        with torch.enable_grad():
            model.layers[3].attn(x, model._step(2, 200, None, x.device, False), None).square().sum().backward()
        return [p.grad.clone() for p in model.layers[3].attn.parameters() if p.grad is not None]

    ref_grads = grads()
    calls = []
    attend = v4.attend
    monkeypatch.setattr(v4, "attend", lambda q, *a, **k: calls.append(q.shape[1:3]) or attend(q, *a, **k))
    monkeypatch.setattr(v4, "attn_block_budget", lambda device: budget)
    with torch.no_grad():
        assert rel_err(model(ref), full) < 1e-5
        assert rel_err(_run_chunks(model, ref, [70, 130]), chunked) < 1e-5
    blocks, sizes = zip(*calls)
    assert len(calls) > 2 * len(model.layers)
    assert max(sizes) < 64 if budget < 10_000 else max(blocks) > 1
    for g, r in zip(grads(), ref_grads):
        assert rel_err(g, r) < 1e-5
    model.zero_grad()


def test_span_bounded_decode_step_equals_forward(model, ids, monkeypatch):
    """A static step told a span (``span_L``: every new position lies below its length) scores and
    attends only the compressed entries below it, not a long cache's whole buffer: same logits as
    the forward, with spans from the model's floor up, each shorter than the cache."""
    floor = model.span_floor()
    # at the floor every compressing layer reads an entry, every indexer picks among > top-k
    for layer in model.layers:
        attn = layer.attn
        if attn.compressor is not None:
            assert floor // attn.ratio >= 1
            if attn.indexer is not None and not attn.attend_all:
                assert floor // attn.ratio > attn.indexer.topk
    calls = _count_selects(monkeypatch)
    with torch.no_grad():
        a, b = model.new_cache(2, 4096), model.new_cache(2, 4096)
        for c in (a, b):
            model(ids[0:1, :50], c.select(0))
            model(ids[1:2, :90], c.select(1))
        for i in range(0, 200, 3):  # spans floor .. 2 * floor while positions cross boundaries
            tok = torch.stack([ids[0, 50 + i], ids[1, 90 + i]])[:, None]
            span = max(floor, 1 << int(b.pos.max()).bit_length())
            ref = model(tok, a)[:, -1]
            got = model.decode_step(tok, b, torch.empty(span, dtype=torch.uint8))
            assert rel_err(got, ref) < 1e-5, i
            assert calls and max(calls) <= span // 4, i  # the indexer scored only the span's entries
            calls.clear()
        assert torch.equal(a.pos, b.pos)


def test_short_prompt_attends_without_bands(model, ids, monkeypatch):
    """While every query still sees position 0 (s + T <= window), the window keys are the s + T
    there are, not a band of Qb + window - 1 mostly of padding: same logits as the first positions
    of a long prompt (banded), one-shot and from a cache."""
    from sparseek.model import v4

    win, lengths = model.args.sliding_window, []
    bands = v4.Attention._bands

    def spy(self, *a):
        windows, mask = bands(self, *a)
        lengths.append(windows.shape[2])
        return windows, mask

    with torch.no_grad():
        full = model(ids)
        monkeypatch.setattr(v4.Attention, "_bands", spy)
        assert rel_err(model(ids[:, :win - 3]), full[:, :win - 3]) < 1e-5
        assert set(lengths) == {win - 3}
        # chunks of more than PER_ROW_TOKENS (fewer take the per-row path, which has no bands)
        sizes = [PER_ROW_TOKENS + 1, PER_ROW_TOKENS + 3, 40]
        n_layers = len(model.layers)
        lengths.clear()
        assert rel_err(_run_chunks(model, ids[:, :sum(sizes)], sizes), full[:, :sum(sizes)]) < 1e-5
        assert lengths[:n_layers] == [sizes[0]] * n_layers
        assert min(lengths[n_layers:]) > win  # past the window the band slides
