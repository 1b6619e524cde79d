"""Our GGUF-built tokenizer against transformers' (same file), streaming decode, chat templates, bad metadata.

SmolLM2's `tokenizer.ggml.pre` is "smollm": llama.cpp isolates every digit (\\p{N}) before GPT-2's split, as the
original StarCoder-style tokenizer.json does (Digits + ByteLevel). transformers' GGUF converter uses GPT-2's split
only, so the two differ exactly when a run of whitespace precedes a digit ("\\n\\n1." -> ĊĊ 1 vs Ċ Ċ 1) or a
non-digit number character follows a space; those strings are tested separately against llama.cpp's rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dovetail_jax.errors import ModelFormatError
from dovetail_jax.io.tokenizer import Tokenizer

SAME_AS_TRANSFORMERS = [
    "def fibonacci(n):", "12345", "3.14159", "pi = 3.14159", "x = 1000000", "Hello, world!", "  leading spaces",
    "trailing spaces   ", "\n", "\n\n", "line1\nline2\n", "tabs\tand\ttabs", "naïve café résumé", "Ünïcödé Ωμέγα",
    "日本語のテキスト", "中文字符测试", "한국어 텍스트",
    "emoji 🎉🚀 and 👨‍👩‍👧", "🙂", "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>",
    "<repo_name>foo<file_sep>", "if (a && b) { return c; }", "    for i in range(10):\n        print(i)",
    "I'm you're it's we've they'll", "$100.00 & 50% off!", "https://example.com/path?q=1&r=2", "", " ", "a", "   ",
    "user@example.com", "SELECT * FROM t WHERE id=42;", "\u00a0nbsp", "mixed   multiple    spaces",
    "The year 2024 was 1st.", "x² + y² = z²", "<|im_end|><|im_end|>\n",
]
# llama.cpp's "smollm" split (digits isolated first), where transformers' GGUF tokenizer differs.
DIGIT_SPLIT = {
    "\n\n1. First": ["ĊĊ", "1", ".", "ĠFirst"],
    "x=  1": ["x", "=", "ĠĠ", "1"],
    "a\n  2": ["a", "ĊĠĠ", "2"],
}
STREAM_TEXTS = ["héllo 🌍 世界 👨‍👩‍👧 done", "日本語のテキスト🙂🙂", "emoji at end 🎉", "ok <|im_end|> x"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "x3?"}],
    [{"role": "system", "content": "Be nice 🙂"}, {"role": "user", "content": "日本語で\n二行"}],
]


@pytest.fixture(scope="module")
def meta(smollm2_metadata: dict[str, Any]) -> dict[str, Any]:
    return smollm2_metadata


@pytest.fixture(scope="module")
def tok(meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf(meta)


def test_known_ids_and_specials(tok: Tokenizer) -> None:
    assert tok.encode("def fibonacci(n):") == [1604, 3987, 46477, 24, 94, 727]
    assert (tok.bos_token_id, tok.eos_token_ids, tok.vocab_size) == (1, (2,), 49152)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1  # specials stay whole; no BOS added


def test_ids_equal_transformers(tok: Tokenizer, hf_smollm2_tokenizer: Any) -> None:
    assert len(SAME_AS_TRANSFORMERS) >= 30
    for text in SAME_AS_TRANSFORMERS:
        assert tok.encode(text) == hf_smollm2_tokenizer.encode(text), repr(text)


def test_digit_split_like_llama_cpp(tok: Tokenizer, meta: dict[str, Any], hf_smollm2_tokenizer: Any) -> None:
    for text, pieces in DIGIT_SPLIT.items():
        assert [tok.id_to_token(i) for i in tok.encode(text)] == pieces, repr(text)
    # With the GPT-2 split the same vocabulary reproduces transformers' ids: the pre-tokenizer is the only difference.
    gpt2 = Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "gpt2"})
    for text in DIGIT_SPLIT:
        assert gpt2.encode(text) == hf_smollm2_tokenizer.encode(text), repr(text)


def test_decode_round_trip(tok: Tokenizer) -> None:
    for text in SAME_AS_TRANSFORMERS + list(DIGIT_SPLIT):
        assert tok.decode(tok.encode(text)) == text, repr(text)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    sd = tok.stream_decoder()
    pieces = [sd.push(i) for i in ids]
    assert "".join(pieces) + sd.flush() == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    if any(ord(c) > 0xFFFF for c in text):  # emoji span several byte tokens: held back mid-character
        assert "" in pieces
    sd2 = tok.stream_decoder(skip_special_tokens=True)
    chunked = sd2.push(ids[:3]) + sd2.push(ids[3:]) + sd2.flush()
    assert chunked == tok.decode(ids, skip_special_tokens=True)


def test_stream_decoder_flush_incomplete(tok: Tokenizer) -> None:
    ids = tok.encode("🎉")
    assert len(ids) > 1
    sd = tok.stream_decoder()
    assert sd.push(ids[:-1]) == ""
    rest = sd.flush()  # an unfinished character comes out as U+FFFD, then the decoder starts afresh
    assert rest and set(rest) == {"\ufffd"}
    assert sd.push(ids) == "🎉" and sd.flush() == ""


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(tok: Tokenizer, hf_smollm2_tokenizer: Any,
                                           add_generation_prompt: bool) -> None:
    for messages in CONVERSATIONS:
        ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        ref = hf_smollm2_tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)
        assert ours == ref
    assert tok.apply_chat_template(CONVERSATIONS[0]).startswith("<|im_start|>system\nYou are a helpful AI")


def test_from_file_equals_from_gguf(tok: Tokenizer, hf_smollm2_tokenizer: Any, tmp_path: Path) -> None:
    hf_smollm2_tokenizer.save_pretrained(tmp_path)
    exported = Tokenizer.from_file(tmp_path)
    for text in SAME_AS_TRANSFORMERS:
        assert exported.encode(text) == tok.encode(text), repr(text)
    assert exported.eos_token_ids == (2,) and exported.bos_token_id == 1
    assert exported.apply_chat_template(CONVERSATIONS[1]) == tok.apply_chat_template(CONVERSATIONS[1])
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").encode("hi") == tok.encode("hi")


def test_add_bos_from_metadata(meta: dict[str, Any]) -> None:
    with_bos = Tokenizer.from_gguf({**meta, "tokenizer.ggml.add_bos_token": True})
    assert with_bos.encode("hi") == [1, *with_bos.encode("hi", add_special_tokens=False)]


def test_other_pre_tokenizers_build(meta: dict[str, Any]) -> None:
    text = "Hello world 12345 and\n\n  spaces"
    for pre in ("gpt2", "llama-bpe", "qwen2", "starcoder"):
        t = Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": pre})
        assert t.decode(t.encode(text)) == text, pre


def test_unsupported_tokenizers(meta: dict[str, Any]) -> None:
    with pytest.raises(ModelFormatError, match="'llama' \\(SentencePiece\\).*tokenizer.json"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ModelFormatError, match="pre-tokenizer 'mystery'.*tokenizer.json"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(ModelFormatError, match="no such tokenizer file"):
        Tokenizer.from_file("/nonexistent/tokenizer.json")


def test_chatml_fallback_and_template_errors(meta: dict[str, Any]) -> None:
    plain = Tokenizer.from_gguf({k: v for k, v in meta.items() if k != "tokenizer.chat_template"})
    assert plain.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    strict = Tokenizer.from_gguf({**meta, "tokenizer.chat_template": "{{ raise_exception('no system role') }}"})
    with pytest.raises(ModelFormatError, match="no system role"):
        strict.apply_chat_template([{"role": "system", "content": "x"}])
    sandboxed = Tokenizer.from_gguf({**meta, "tokenizer.chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(ModelFormatError, match="unsafe|access"):  # the sandbox refuses attribute escapes
        sandboxed.apply_chat_template([{"role": "user", "content": "x"}])
