"""Tokenizers (tokenizer.json only) and the DeepSeek-V4 chat format."""

from sparseek.tokenizer.chat import (ChatFormatError, StreamingChatParser, encode_messages,
                                     parse_completion)
from sparseek.tokenizer.tokenizer import (IncrementalDecoder, Tokenizer, deepseek_v4, default_tokenizer,
                                          stdlib_texts, train_bpe)

__all__ = ["Tokenizer", "IncrementalDecoder", "deepseek_v4", "default_tokenizer", "train_bpe", "stdlib_texts",
           "encode_messages", "parse_completion", "StreamingChatParser", "ChatFormatError"]
