"""Tokenizers of the real classes (CLIP, T5, Qwen2, Llama, Gemma...) with tiny vocabularies built in code.

Byte-level vocabularies (256 symbols, no merges) encode and decode any text losslessly, so a tiny
model's generate() output can always be decoded; special tokens are appended after the bytes.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from functools import lru_cache

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer, T5Tokenizer


@lru_cache(maxsize=1)
def byte_level_alphabet() -> tuple[str, ...]:
    """The 256 printable symbols that byte-level BPE uses for the 256 byte values."""
    return tuple(sorted(ByteLevel.alphabet()))


def byte_level_vocab(special_tokens: Sequence[str] = ()) -> dict[str, int]:
    """Byte symbols first (ids 0-255), then ``special_tokens`` in order."""
    vocab = {symbol: i for i, symbol in enumerate(byte_level_alphabet())}
    for token in special_tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP BPE tokenizer: byte symbols, their end-of-word forms, start/end tokens (514 ids)."""
    vocab = byte_level_vocab()
    for symbol in byte_level_alphabet():
        vocab[symbol + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 64) -> T5Tokenizer:
    """T5 (SentencePiece unigram) tokenizer over printable ASCII characters; ids 0-2 are pad, eos, unk."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.printable if not c.isspace()]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _named_special_tokens(kwargs: dict) -> list[str]:
    """String values of ``*_token`` keyword arguments (bos_token, pad_token, image_token...), in order."""
    return [str(v) for k, v in kwargs.items() if k.endswith("_token") and v is not None]


def _byte_fallback_vocab(leading: Sequence[str], pieces: Sequence[str], special_tokens: Sequence[str]) -> dict[str, int]:
    """SentencePiece-BPE vocabulary: ``leading`` (ids 0...), the 256 byte-fallback pieces ``<0x00>``...``<0xFF>``,
    ``pieces``, printable ASCII, then ``special_tokens``.

    With no merges every character is its own piece and any other character falls back to its UTF-8
    bytes, so encoding and decoding are lossless.
    """
    vocab = {token: i for i, token in enumerate(leading)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    printable = [char for char in string.printable if not char.isspace()]
    for token in [*pieces, *printable, *special_tokens]:
        vocab.setdefault(token, len(vocab))
    return vocab


def llama_byte_vocab(special_tokens: Sequence[str] = ()) -> dict[str, int]:
    """Llama vocabulary: ``<unk>``, ``<s>``, ``</s>`` (ids 0-2), the 256 byte-fallback pieces, the
    word-boundary piece ``▁``, printable ASCII, then ``special_tokens`` (see :func:`_byte_fallback_vocab`)."""
    return _byte_fallback_vocab(("<unk>", "<s>", "</s>"), ("\u2581",), special_tokens)


def gemma_byte_vocab(special_tokens: Sequence[str] = ()) -> dict[str, int]:
    """Gemma vocabulary: ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>``, ``<mask>`` (ids 0-4, as in Gemma), the
    256 byte-fallback pieces, ``▁`` (Gemma's normalizer writes spaces as ``▁``), ``\\n``, printable ASCII,
    then ``special_tokens`` (see :func:`_byte_fallback_vocab`)."""
    return _byte_fallback_vocab(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"), ("\u2581", "\n"), special_tokens)


def _tokenizer(cls, vocab_of, special_tokens: Sequence[str], kwargs: dict, **defaults):
    """``cls`` over ``vocab_of(special_tokens + the values of *_token kwargs)``, with no merges.

    ``special_tokens`` become ``extra_special_tokens`` (never split); ``*_token`` keyword arguments
    (``pad_token="<pad>"``, ``image_token="<image>"``: the latter become tokenizer attributes, as on
    the hub) are added to the vocabulary too. ``defaults`` fill keyword arguments the caller left out.
    """
    extra = list(special_tokens)
    vocab = vocab_of([*extra, *_named_special_tokens(kwargs)])
    for key, value in defaults.items():
        kwargs.setdefault(key, value)
    return cls(vocab=vocab, merges=[], extra_special_tokens=extra, **kwargs)


# SentencePiece tokenizers (Llama, Gemma) add a BOS and no EOS; all tiny tokenizers pad on the left.
_BOS_LEFT_PADDED = dict(add_bos_token=True, add_eos_token=False, padding_side="left")


def llama_tokenizer(special_tokens: Sequence[str] = (), **kwargs):
    """A ``LlamaTokenizer`` over :func:`llama_byte_vocab` (adds ``<s>``, pads on the left).

    ``special_tokens`` and the values of ``*_token`` keyword arguments (``pad_token="<pad>"``,
    ``image_token="<image>"``: the latter become tokenizer attributes, as on the hub) are appended to the
    vocabulary and never split.
    """
    from transformers import LlamaTokenizer

    return _tokenizer(LlamaTokenizer, llama_byte_vocab, special_tokens, kwargs, **_BOS_LEFT_PADDED)


def qwen2_tokenizer(special_tokens: Sequence[str] = (), **kwargs):
    """A ``Qwen2Tokenizer`` over :func:`byte_level_vocab`: bytes, ``<|endoftext|>`` (id 256), then
    ``special_tokens`` and the values of ``*_token`` keyword arguments; pads on the left.

    Special tokens are never split (``<|im_start|>``, ``<|image_pad|>``...).
    """
    from transformers import Qwen2Tokenizer

    def vocab_of(tokens):
        return byte_level_vocab(["<|endoftext|>", *tokens])

    extra = [t for t in special_tokens if t != "<|endoftext|>"]
    return _tokenizer(Qwen2Tokenizer, vocab_of, extra, kwargs, padding_side="left")


def gemma_tokenizer(special_tokens: Sequence[str] = (), **kwargs):
    """A ``GemmaTokenizer`` over :func:`gemma_byte_vocab` (adds ``<bos>``, pads with ``<pad>`` on the left).

    ``special_tokens`` and the values of ``*_token`` keyword arguments (``boi_token="<start_of_image>"``,
    ``image_token="<image>"``: the latter become tokenizer attributes, as on the hub) are appended to the
    vocabulary and never split.
    """
    from transformers import GemmaTokenizer

    return _tokenizer(GemmaTokenizer, gemma_byte_vocab, special_tokens, kwargs, **_BOS_LEFT_PADDED)
