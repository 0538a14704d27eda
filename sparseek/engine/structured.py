"""Structured outputs: completions held to a JSON schema, a regular expression or a structural tag,
token by token.

Each step, the tokens that cannot continue a valid output are masked (their logits set to -inf)
before sampling, so greedy and sampled outputs alike always parse; once the output is complete
only a stop token may follow. The grammar engine is xgrammar (what vLLM and SGLang use), an
optional dependency: ``pip install xgrammar`` (or ``sparseek[structured]``).

The vocabulary is given to xgrammar as the bytes each token stands for
(``Tokenizer.token_bytes``); special tokens (BOS, ``<think>``, the DSML markers, ...) are never
allowed inside a JSON or regex output, only the stop tokens at its end. A structural tag (xgrammar's
layout of a whole reply: reasoning up to ``</think>``, then DSML tool calls whose arguments follow
their schemas, ...) may name special tokens in its text: those, and only those, take their own
text in its vocabulary, so the model writes ``｜DSML｜`` as the one token it was trained on.
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

    def __init__(self, tokenizer, vocab_size: int, stop_ids: tuple[int, ...], markers: tuple[int, ...] = ()):
        xgr = _xgr()
        hidden = set(tokenizer.tk.get_added_tokens_decoder()) - set(markers)
        vocab = [b"" if i in hidden else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
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
    if kind == "tag":
        return compiler.compile_structural_tag(spec)
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

    def mask(self, logits_V: torch.Tensor, drafted=()) -> torch.Tensor:
        """``logits_V`` with the tokens that cannot come next set to -inf; with ``drafted``
        (speculative decoding's draft tokens not yet accepted), the tokens that cannot follow
        them. Past the output's end (a draft finished it, or broke it) nothing here is ever
        emitted, and ``logits_V`` comes back as it is."""
        taken = 0
        try:
            for t in drafted:
                if self.matcher.is_terminated() or not self.matcher.accept_token(t):
                    return logits_V
                taken += 1
            if self.matcher.is_terminated():
                return logits_V
            self.matcher.fill_next_token_bitmask(self.bitmask)
        finally:
            if taken:
                self.matcher.rollback(taken)
        out = logits_V.float().cpu().clone()
        self._xgr.apply_token_bitmask_inplace(out, self.bitmask[0])
        return out.to(logits_V.device)

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} breaks the structured output (a masked token was sampled)")

    @property
    def done(self) -> bool:
        return self.matcher.is_terminated()


def make_guide(tokenizer, vocab_size: int, stop_ids, json_schema=None, regex: str | None = None,
               structural_tag: dict | None = None) -> Guide:
    """A fresh ``Guide`` for ``json_schema`` (a schema dict, or True for any JSON value), ``regex``
    or ``structural_tag`` (xgrammar's JSON form); a bad spec raises ``ValueError`` naming it."""
    if tokenizer is None:
        raise ValueError("structured outputs need the model's tokenizer (the grammar is over its tokens)")
    # keys as given, never sorted: xgrammar writes an object's properties in its schema's order
    if structural_tag is not None:
        kind, spec, what = "tag", json.dumps(structural_tag, ensure_ascii=False), "structural_tag"
    elif regex is not None:
        kind, spec, what = "regex", regex, f"regex {regex!r}"
    else:
        kind, spec, what = "json", json.dumps(json_schema), "json_schema"
    stops = tuple(sorted(stop_ids))
    markers = tuple(sorted(i for i, t in tokenizer.tk.get_added_tokens_decoder().items()
                           if kind == "tag" and t.content in spec and i not in stops))
    key = (vocab_size, stops, markers)
    per_tok = _compilers.setdefault(tokenizer, {})
    if key not in per_tok:
        per_tok[key] = _Compiler(tokenizer, *key)
    try:
        compiled = per_tok[key].get(kind, spec)
    except Exception as e:  # xgrammar's own errors (RuntimeError, InvalidJSONError, InvalidStructuralTagError...)
        raise ValueError(f"{what} cannot be compiled into a grammar: {e}") from None
    return Guide(compiled, vocab_size)
