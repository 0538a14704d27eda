"""Sampling controls beyond temperature / top-k / top-p: min-p, repetition / presence / frequency
penalties, logit bias and min_tokens -- against transformers' logits processors where it has them,
against the definition otherwise, and through the engine (plain, batched, speculative)."""

from __future__ import annotations

import math

import pytest
import torch

from sparseek.engine import LLM, SamplingParams
from sparseek.engine.sampling import adjust, probs
from sparseek.model.cache import Cache


PROMPT = [7, 7, 30, 31, 7, 200, 201, 5]


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 3
    prompt, out = [1, 4, 4, 9], [9, 17, 30]
    got = adjust(logits, SamplingParams(repetition_penalty=1.7), prompt, out)
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + out]), logits[None].clone())[0]
    torch.testing.assert_close(got, ref)
    assert not torch.equal(got, logits)


def test_min_p_matches_transformers():
    from transformers.generation.logits_process import MinPLogitsWarper

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, generator=g) * 2
    p = SamplingParams(min_p=0.1, temperature=0.8)
    warped = MinPLogitsWarper(0.1)(None, (logits / 0.8)[None])[0]
    ref = warped.softmax(-1)
    got = probs(logits, p)
    torch.testing.assert_close(got, ref)
    kept = int((got > 0).sum())
    assert 1 < kept < 200  # the filter bites and keeps more than the top token


def test_presence_frequency_bias_and_min_tokens_by_definition():
    logits = torch.linspace(-1, 1, 20)
    out = [3, 3, 3, 8]
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={"12": 4.0, 2: -1.5}, min_tokens=6)
    got = adjust(logits, p, prompt_ids=[8, 9], output_ids=out, stop_ids=[19, 0])
    ref = logits.clone()
    ref[3] -= 0.5 + 0.25 * 3  # OpenAI: presence once, frequency per occurrence, output tokens only
    ref[8] -= 0.5 + 0.25 * 1
    ref[12] += 4.0
    ref[2] -= 1.5
    ref[19] = ref[0] = float("-inf")  # stop tokens masked while the output is shorter than min_tokens
    torch.testing.assert_close(got, ref)
    # once the output is long enough, stop tokens are allowed again; nothing set: logits untouched
    assert torch.isfinite(adjust(logits, p, [8, 9], out + [1, 1], stop_ids=[19, 0])).all()
    assert adjust(logits, SamplingParams(), [1], [2]) is logits


@pytest.mark.parametrize("bad", [dict(min_p=1.5), dict(repetition_penalty=0), dict(presence_penalty=3),
                                 dict(frequency_penalty=-2.5), dict(min_tokens=9, max_tokens=8),
                                 dict(logit_bias={"x": 1}), dict(logit_bias={1: float("nan")})])
def test_bad_values_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad)) if "max_tokens" not in bad else "min_tokens"):
        SamplingParams(**bad)


def _penalized_reference(model, prompt, n, rep, pres, freq):
    """Greedy decoding with the penalties applied by hand to the uncached model's logits."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            x = model(torch.tensor([ids]))[0, -1].float()
            x = RepetitionPenaltyLogitsProcessor(rep)(torch.tensor([ids]), x[None])[0]
            out = ids[len(prompt):]
            for t in set(out):
                x[t] -= pres + freq * out.count(t)
            ids.append(int(x.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("speculative", [0, 2])
def test_penalized_greedy_decoding_matches_the_reference(model, tok, speculative, monkeypatch):
    """The engine's penalized greedy tokens equal a hand-penalized loop over the uncached model,
    batched with other prompts, and under speculative decoding (drafts right except at every fourth or fifth position:
    verification must penalize each position with the drafts before it counted as output)."""
    rep, pres, freq = 1.3, 0.4, 0.3
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=rep,
                            presence_penalty=pres, frequency_penalty=freq)
    prompts = [PROMPT, list(range(40, 70))]
    refs = [_penalized_reference(model, p, 16, rep, pres, freq) for p in prompts]
    plain = LLM(model, tok, max_batch_size=2, max_seq_len=256).generate(
        prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert any(o.token_ids != r for o, r in zip(plain, refs))  # the penalties change the output
    if speculative:
        def oracle(self, s, logits):
            i = len(s.out.token_ids) + len(s.drafts)
            good = refs[s.out.index][i] if i < len(refs[s.out.index]) else 0
            return (good if i % (4 + s.out.index) != 1 else (good + 1) % 512), None

        monkeypatch.setattr(LLM, "_propose", oracle)
    outs = LLM(model, tok, max_batch_size=2, max_seq_len=256, speculative_tokens=speculative).generate(prompts, params)
    assert [o.token_ids for o in outs] == refs
    if speculative:
        assert all(0 < o.accepted < o.drafted for o in outs), [(o.accepted, o.drafted) for o in outs]


def test_logit_bias_and_its_token_range(model, tok):
    llm = LLM(model, tok, max_batch_size=1, max_seq_len=128)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0.8, seed=0, ignore_eos=True,
                                                 logit_bias={42: 100.0}))[0]
    assert out.token_ids == [42] * 6
    with pytest.raises(ValueError, match="logit_bias has token ids outside"):
        llm.generate([PROMPT], SamplingParams(logit_bias={512: 1.0}))
    with pytest.raises(ValueError, match="stop_token_ids has token ids outside"):
        llm.generate([PROMPT], SamplingParams(stop_token_ids=[-1]))


def test_min_tokens_holds_back_stop_tokens_and_strings(model, tok):
    llm = LLM(model, tok, max_batch_size=1, max_seq_len=128)
    free = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    stop_tok = free.token_ids[1]
    early = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_tok]))[0]
    assert len(early.token_ids) <= 2 and early.finish_reason == "stop"
    held = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_tok],
                                                 min_tokens=8))[0]
    assert len(held.token_ids) >= 8 and stop_tok not in held.token_ids[:8]
    # a stop string inside the first min_tokens tokens' text does not end the output
    pieces = [tok.decode([t]) for t in free.token_ids]
    i = next(i for i in range(1, 10) if pieces[i].isascii() and pieces[i].isprintable() and pieces[i]
             and pieces[i] not in "".join(pieces[:i]))
    stop = pieces[i]
    cut = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and len(cut.token_ids) == i + 1
    late = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop],
                                                 min_tokens=i + 5))[0]
    assert len(late.token_ids) >= i + 5 and late.token_ids[:i + 5] == free.token_ids[:i + 5]


def test_min_p_sampling_keeps_only_likely_tokens(model, tok):
    """Every sampled token is at least min_p times as likely as the top token (temperature 1, so the
    reported log-probabilities are the distribution sampled from); without min_p some are not."""
    def worst(min_p):
        p = SamplingParams(max_tokens=40, temperature=1.0, min_p=min_p, seed=3, ignore_eos=True, logprobs=1)
        outs = LLM(model, tok, max_batch_size=2, max_seq_len=128).generate([PROMPT, [9, 8, 7]], p)
        return min(e[t] - max(e.values()) for o in outs for e, t in zip(o.logprobs, o.token_ids))

    assert worst(0.2) >= math.log(0.2) - 1e-4
    assert worst(0.0) < math.log(0.2)


def test_n_completions_per_prompt(model, tok):
    """n > 1: one output per prompt with its n completions in ``.outputs``; the first is what n = 1
    gives with the same seed, the others differ and are reproducible; streaming tags each delta
    with its sample and reassembles into the same texts."""
    llm = LLM(model, tok, max_batch_size=4, max_seq_len=128)
    p3 = SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True, n=3)
    outs = llm.generate([PROMPT, [9, 8, 7]], p3)
    assert len(outs) == 2 and [len(o.outputs) for o in outs] == [3, 3]
    assert all(c.index == i and c.sample == j for i, o in enumerate(outs) for j, c in enumerate(o.outputs))
    assert outs[0].outputs[0] is outs[0]
    one = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True))[0]
    assert one.token_ids == outs[0].token_ids and one.outputs == [one]
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) == 3
    again = llm.generate([PROMPT, [9, 8, 7]], p3)
    assert [[c.token_ids for c in o.outputs] for o in again] == [[c.token_ids for c in o.outputs] for o in outs]
    texts = {}
    for d in llm.stream([PROMPT, [9, 8, 7]], p3):
        texts[d.index, d.sample] = texts.get((d.index, d.sample), "") + d.text
    assert texts == {(i, j): c.text for i, o in enumerate(outs) for j, c in enumerate(o.outputs)}
    with pytest.raises(ValueError, match="SamplingParams.n"):
        SamplingParams(n=0)


@pytest.mark.parametrize("speculative", [0, 2])
def test_a_repeated_prompt_is_prefilled_once(model, tok, speculative, monkeypatch):
    """n completions (and a prompt given twice) read the prompt in one row; the copies' caches --
    the MTP block's too under speculative decoding -- continue exactly as a prompt prefilled alone."""
    long = list(range(3, 140))
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    alone = [LLM(model, tok, max_batch_size=1, max_seq_len=256).generate([p], greedy)[0].token_ids
             for p in (long, PROMPT)]
    rows = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda m, ids, *a, **kw: rows.append(tuple(ids.shape))
                        or forward(m, ids, *a, **kw))
    llm = LLM(model, tok, max_batch_size=6, max_seq_len=256, speculative_tokens=speculative)
    outs = llm.generate([long, PROMPT, long], SamplingParams(**{**greedy.__dict__, "n": 2}))
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[alone[0]] * 2, [alone[1]] * 2, [alone[0]] * 2]
    prefill = [r for r in rows if r[1] > Cache.SPARE + 1]
    assert prefill and max(r[0] for r in prefill) == 2  # the two distinct prompts, not six rows


def test_allowed_token_ids_by_definition_and_in_the_engine(model, tok):
    """Every token outside the allowed set is masked (sampled or greedy, plain or speculative);
    ids outside the vocabulary and an empty set are refused by name."""
    logits = torch.linspace(-1, 1, 20)
    got = adjust(logits, SamplingParams(allowed_token_ids=[3, 17, 3]), [1], [])
    assert torch.isinf(got).sum() == 18 and got[3] == logits[3] and got[17] == logits[17]
    allowed = [11, 42, 97, 300]
    for k in (0, 2):
        llm = LLM(model, tok, max_batch_size=2, max_seq_len=256, speculative_tokens=k)
        outs = llm.generate([PROMPT, list(range(40, 70))], [
            SamplingParams(max_tokens=12, temperature=0.9, seed=1, ignore_eos=True, allowed_token_ids=allowed),
            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, allowed_token_ids=allowed)])
        assert all(set(o.token_ids) <= set(allowed) for o in outs) and len(set(outs[0].token_ids)) > 1
    with pytest.raises(ValueError, match="allowed_token_ids has token ids outside"):
        llm.generate([PROMPT], SamplingParams(allowed_token_ids=[512]))
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])


def test_bad_words_are_never_generated(model, tok):
    """A word the model writes greedily, banned: its tokens (alone or after a space) never end the
    output's tokens again, one-token words are masked outright, and the rest of the text is free."""
    llm = LLM(model, tok, max_batch_size=1, max_seq_len=256)
    free = llm.generate([PROMPT], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    # a multi-token stretch of what it wrote, and a single token of it, as words
    word = tok.decode(free.token_ids[4:7]).strip()
    single = tok.decode(free.token_ids[1:2]).strip()
    assert word and single
    out = llm.generate([PROMPT], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                bad_words=[word, single]))[0]
    assert out.token_ids != free.token_ids
    for w in (word, single):
        for form in (w, " " + w):
            seq = tok.encode(form, add_bos=False)
            n = len(seq)
            assert not any(out.token_ids[i:i + n] == seq for i in range(len(out.token_ids) - n + 1)), form
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=[""])
    with pytest.raises(ValueError, match="no tokenizer"):
        LLM(model, None, max_batch_size=1, max_seq_len=64).generate([PROMPT], SamplingParams(bad_words=["x"]))


def test_stop_string_kept_with_include_stop_str_in_output(model, tok):
    llm = LLM(model, tok, max_batch_size=1, max_seq_len=256)
    free = llm.generate([PROMPT], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    stop = free.text[10:13]
    assert stop and stop not in free.text[:12]
    cut = llm.generate([PROMPT], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=stop))[0]
    kept = llm.generate([PROMPT], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=stop,
                                                 include_stop_str_in_output=True))[0]
    i = free.text.index(stop)
    assert cut.text == free.text[:i] and kept.text == free.text[:i + len(stop)]
    assert cut.stop_reason == kept.stop_reason == stop
    streamed = "".join(d.text for d in llm.stream([PROMPT], SamplingParams(
        max_tokens=30, temperature=0, ignore_eos=True, stop=stop, include_stop_str_in_output=True)))
    assert streamed == kept.text


def test_truncate_prompt_tokens_keeps_the_end(model, tok):
    llm = LLM(model, tok, max_batch_size=1, max_seq_len=64)
    long_prompt = list(range(3, 103))  # longer than the context
    with pytest.raises(ValueError, match="too long"):
        llm.generate([long_prompt], SamplingParams(max_tokens=4))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    out = llm.generate([long_prompt], SamplingParams(**{**params.__dict__, "truncate_prompt_tokens": 40}))[0]
    ref = llm.generate([long_prompt[-40:]], params)[0]
    assert out.prompt_token_ids == long_prompt[-40:] and out.token_ids == ref.token_ids
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)
