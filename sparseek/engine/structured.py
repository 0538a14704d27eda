"""Structured outputs: completions held to a JSON schema or a regular expression, token by token.

Each step, the tokens that cannot continue a valid output are masked (their logits set to -inf)
before sampling, so greedy and sampled outputs alike always parse; once the output is complete
only a stop token may follow. The grammar engine is xgrammar (what vLLM and SGLang use), an
optional dependency: ``pip install xgrammar`` (or ``sparseek[structured]``).

The vocabulary is given to xgrammar as the bytes each token stands for
(``Tokenizer.token_bytes``); special tokens (BOS, ``<think>``, the DSML markers, ...) are never
allowed inside a structured output, only the stop tokens at its end.
"""

from __future__ import annotations

import json
import weakref

import torch

_compilers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _xgr():
    try:
        import xgrammar
    except ImportError as e:
        raise ImportError("structured outputs (json_schema / regex) need xgrammar: pip install xgrammar "
                          "(or sparseek[structured])") from e
    return xgrammar


class _Compiler:
    """xgrammar's compiler for one tokenizer and vocabulary, with its last 64 grammars kept."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: tuple[int, ...]):
        xgr = _xgr()
        added = set(tokenizer.tk.get_added_tokens_decoder())
        vocab = [b"" if i in added else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
        self.compiler = xgr.GrammarCompiler(info)
        self.grammars: dict[tuple[str, str], object] = {}

    def get(self, kind: str, spec: str):
        if (kind, spec) not in self.grammars:
            if len(self.grammars) >= 64:
                self.grammars.pop(next(iter(self.grammars)))
            self.grammars[kind, spec] = _compile(self.compiler, kind, spec)
        return self.grammars[kind, spec]


def _compile(compiler, kind: str, spec: str):
    if kind == "regex":
        return compiler.compile_regex(spec)
    schema = json.loads(spec)
    if schema is True:
        return compiler.compile_builtin_json_grammar()
    # compact JSON: a model may not pad it with whitespace without end
    return compiler.compile_json_schema(schema, any_whitespace=False)


class Guide:
    """The grammar state of one sequence: ``mask`` the logits of the next token, ``accept`` the
    token chosen. ``done`` once the output is complete and a stop token has followed it."""

    def __init__(self, compiled, vocab_size: int):
        xgr = _xgr()
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits_V: torch.Tensor) -> torch.Tensor:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        out = logits_V.float().cpu().clone()
        self._xgr.apply_token_bitmask_inplace(out, self.bitmask[0])
        return out.to(logits_V.device)

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} breaks the structured output (a masked token was sampled)")

    @property
    def done(self) -> bool:
        return self.matcher.is_terminated()


def make_guide(tokenizer, vocab_size: int, stop_ids, json_schema=None, regex: str | None = None) -> Guide:
    """A fresh ``Guide`` for ``json_schema`` (a schema dict, or True for any JSON value) or
    ``regex``; a bad schema or pattern raises ``ValueError`` naming it."""
    if tokenizer is None:
        raise ValueError("structured outputs need the model's tokenizer (the grammar is over its tokens)")
    key = (vocab_size, tuple(sorted(stop_ids)))
    per_tok = _compilers.setdefault(tokenizer, {})
    if key not in per_tok:
        per_tok[key] = _Compiler(tokenizer, *key)
    kind, spec = ("regex", regex) if regex is not None else ("json", json.dumps(json_schema, sort_keys=True))
    try:
        compiled = per_tok[key].get(kind, spec)
    except Exception as e:  # xgrammar's own errors (RuntimeError, InvalidJSONError, ...)
        what = f"regex {regex!r}" if regex is not None else "json_schema"
        raise ValueError(f"{what} cannot be compiled into a grammar: {e}") from None
    return Guide(compiled, vocab_size)
