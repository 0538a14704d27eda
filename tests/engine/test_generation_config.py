"""A checkpoint's generation_config.json: its recommended sampling fills what a call, a request or
a command line leaves out (as vLLM applies it), its eos_token_id ids end sequences, and it stays
with the model through quantize / merge."""

from __future__ import annotations

import argparse
import json

import pytest

import sparseek
from sparseek.engine import LLM, SamplingParams
from sparseek.engine.sampling import read_generation_config

PROMPT = [5, 9, 200, 17]


def test_read_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 40, "eos_token_id": [1, 7],
         "bos_token_id": 0, "transformers_version": "4.46.3"}))
    assert read_generation_config(str(tmp_path)) == (
        {"temperature": 0.6, "top_p": 0.95, "max_tokens": 40}, [1, 7])
    assert read_generation_config({"do_sample": False, "temperature": 0.6, "eos_token_id": 1}) == (
        {"temperature": 0.0}, [1])  # transformers' meaning: greedy
    (tmp_path / "empty").mkdir()
    assert read_generation_config(str(tmp_path / "empty")) == ({}, [])  # a checkpoint without one
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(ValueError, match=r"bad.json: top_p must be in \(0, 1\]"):
        read_generation_config(str(bad))
    bad.write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="eos_token_id must be"):
        read_generation_config(str(bad))
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_generation_config(str(bad))


def test_defaults_fill_what_the_call_leaves_out_and_eos_ids_stop(model, tok):
    plain = LLM(model, tok, max_seq_len=256)
    greedy = plain.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    llm = LLM(model, tok, max_seq_len=256, generation_config={"do_sample": False, "max_new_tokens": 12})
    assert llm.default_sampling_params() == SamplingParams(max_tokens=12, temperature=0.0)
    out = llm.generate([PROMPT])[0]  # no params: the checkpoint's greedy, 12 tokens
    assert out.token_ids[:len(greedy.token_ids)] == greedy.token_ids[:len(out.token_ids)]
    # an id of generation_config's eos_token_id list ends the sequence where it first appears
    stop_at = greedy.token_ids[5]
    llm = LLM(model, tok, max_seq_len=256, generation_config={"eos_token_id": [tok.eos_id, stop_at]})
    out = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids == greedy.token_ids[:greedy.token_ids.index(stop_at) + 1]
    ignored = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert ignored.token_ids == greedy.token_ids
    assert LLM(model, tok, generation_config=None).default_sampling_params() == SamplingParams()


def test_a_checkpoint_s_file_is_found_kept_and_followed_by_the_cli(tmp_path, model, tok):
    from sparseek.checkpoint.adapters import save_adapters
    from sparseek.cli import _sampling, main
    from sparseek.model.lora import add_lora

    ck = tmp_path / "ck"
    sparseek.save(model, str(ck), tokenizer=tok)
    (ck / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "eos_token_id": 1}))
    llm = LLM(str(ck), dtype="float32", max_seq_len=128)
    assert llm.sampling_defaults == {"temperature": 0.6, "top_p": 0.9}
    # the CLI: flags given > the checkpoint's file > the CLI's own defaults
    a = argparse.Namespace(max_tokens=None, temperature=None, top_p=0.5, top_k=None, min_p=None,
                           repetition_penalty=None, presence_penalty=0.0, frequency_penalty=0.0, seed=3, stop=None)
    p = _sampling(a, llm)
    assert (p.temperature, p.top_p, p.max_tokens, p.seed) == (0.6, 0.5, 128, 3)
    assert _sampling(a, LLM(str(ck), generation_config=None, max_seq_len=128)).temperature == 0.7
    # quantize and merge write it beside the new weights; an adapter directory follows its base's
    from sparseek.quant.convert import quantize_checkpoint

    quantize_checkpoint(str(ck), str(tmp_path / "q"), report=False)
    assert json.loads((tmp_path / "q" / "generation_config.json").read_text())["temperature"] == 0.6
    m, _ = sparseek.load(str(ck), dtype="float32", tokenizer=False)
    add_lora(m, rank=2)
    save_adapters(m, str(tmp_path / "ad"), base=str(ck), tokenizer=tok)
    assert LLM(str(tmp_path / "ad"), max_seq_len=128).sampling_defaults["top_p"] == 0.9
    assert main(["merge", "-m", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "generation_config.json").read_text() == (ck / "generation_config.json").read_text()
