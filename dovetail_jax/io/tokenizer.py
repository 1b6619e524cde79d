"""Text <-> token ids with the model's own tokenizer and chat template, on `tokenizers` + `jinja2` only.

A GGUF file carries no tokenizer.json, only llama.cpp's vocabulary metadata; `Tokenizer.from_gguf` rebuilds an
equivalent byte-level BPE `tokenizers.Tokenizer`, splitting text the way llama.cpp does for the file's
`tokenizer.ggml.pre` (which is what the vocabulary was trained with).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from dovetail_jax.errors import ConfigError, ModelFormatError

# llama.cpp token types (tokenizer.ggml.token_type).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Split regexes of llama.cpp's pre-tokenizers (llama-vocab.cpp), by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("gpt2", "mpt", "olmo", "jais", "trillion")
# StarCoder-family vocabularies (SmolLM2's included) learned their merges with every digit on its own.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen", "megrez")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_CHARS = _bytes_to_unicode()
_ALPHABET = frozenset(_BYTE_CHARS.values())


def _pre_tokenizer(pre: str) -> tuple[Any, bool]:
    """(pre-tokenizer, ignore_merges) reproducing llama.cpp's split for `tokenizer.ggml.pre`."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in _GPT2_PRE or pre == "default":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in _DIGIT_SPLIT_PRE:
        digits = pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")
        gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        return pre_tokenizers.Sequence([digits, gpt2]), False
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"), byte_level]), True
    if pre in _QWEN2_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), "isolated"), byte_level]), False
    known = sorted({*_GPT2_PRE, *_DIGIT_SPLIT_PRE, *_LLAMA3_PRE, *_QWEN2_PRE})
    raise ModelFormatError(
        f"GGUF pre-tokenizer '{pre}' is not supported (known: {', '.join(known)}); "
        "pass the model's tokenizer.json instead"
    )


def _build_from_gguf(meta: Mapping[str, Any], source: str) -> tuple[HFTokenizer, dict[str, Any]]:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        hint = " (SentencePiece)" if kind == "llama" else ""
        raise ModelFormatError(
            f"{source}: GGUF tokenizer model '{kind}'{hint} is not supported (only byte-level BPE 'gpt2'); "
            "pass the model's tokenizer.json instead"
        )
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    merges: list[str] = list(meta.get("tokenizer.ggml.merges") or [])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if not tokens or len(types) != len(tokens):
        raise ModelFormatError(f"{source}: tokenizer.ggml.tokens/token_type missing or of different lengths")
    try:
        pre, ignore_merges = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    except ModelFormatError as e:
        raise ModelFormatError(f"{source}: {e}") from None

    vocab: dict[str, int] = {}
    for i, (tok, kind_id) in enumerate(zip(tokens, types, strict=True)):  # first spelling wins on duplicates
        if kind_id not in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and not set(tok) <= _ALPHABET:
            tok = "".join(_BYTE_CHARS[b] for b in tok.encode("utf-8"))  # stored as raw text: respell byte-level
        vocab.setdefault(tok, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=True))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == TOKEN_CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == TOKEN_USER_DEFINED])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        specials = [(t, tokens.index(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on and t is not None]
        single = " ".join([*([bos] if add_bos else []), "$A", *([eos] if add_eos else [])])
        tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    eos_ids = [meta[f"tokenizer.ggml.{k}"] for k in ("eos_token_id", "eot_token_id", "eom_token_id")
               if f"tokenizer.ggml.{k}" in meta]
    info = {
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_ids": tuple(dict.fromkeys(int(i) for i in eos_ids)),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return tk, info


def _token_text(x: Any) -> str | None:
    """tokenizer_config.json spells special tokens as a string or as an AddedToken dict."""
    if isinstance(x, dict):
        return x.get("content")
    return x if isinstance(x, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: cannot read JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _ids(x: Any) -> list[int]:
    return [int(i) for i in (x if isinstance(x, list) else [x]) if i is not None]


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox configured like transformers' (same whitespace rules and helpers)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """The model's tokenizer: ids, special tokens and chat template, independent of transformers."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self._tk = tokenizer
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        if bos_token_id is None and bos_token is not None:
            bos_token_id = tokenizer.token_to_id(bos_token)
        self.bos_token_id: int | None = bos_token_id
        eos_ids = list(eos_token_ids)
        if not eos_ids and eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
            eos_ids = [tokenizer.token_to_id(eos_token)]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_ids))
        if self.eos_token is None and self.eos_token_ids:
            self.eos_token = tokenizer.id_to_token(self.eos_token_ids[0])
        self.chat_template: str | None = chat_template

    @classmethod
    def from_gguf(cls, path_or_metadata: str | Path | Mapping[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer from a GGUF file (or its already-read metadata)."""
        if isinstance(path_or_metadata, Mapping):
            meta, source = path_or_metadata, "GGUF metadata"
        else:
            from dovetail_jax.io.gguf import read_gguf_metadata

            meta, source = read_gguf_metadata(path_or_metadata), str(path_or_metadata)
        tk, info = _build_from_gguf(meta, source)
        return cls(tk, **info)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (a file, or a model folder that also holds tokenizer_config.json etc.)."""
        p = Path(path)
        folder, file = (p, p / "tokenizer.json") if p.is_dir() else (p.parent, p)
        if not file.is_file():
            raise ModelFormatError(f"{file}: no such tokenizer file")
        try:
            tk = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ModelFormatError(f"{file}: not a valid tokenizer.json ({e})") from None
        tcfg = _read_json(folder / "tokenizer_config.json")
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        eos_ids = _ids(_read_json(folder / "generation_config.json").get("eos_token_id"))
        mcfg = _read_json(folder / "config.json")
        eos_ids += _ids(mcfg.get("eos_token_id"))
        eos = _token_text(tcfg.get("eos_token"))
        if eos is not None and tk.token_to_id(eos) is not None:
            eos_ids.append(tk.token_to_id(eos))
        bos = _token_text(tcfg.get("bos_token"))
        return cls(
            tk,
            bos_token=bos,
            eos_token=eos,
            pad_token=_token_text(tcfg.get("pad_token")),
            unk_token=_token_text(tcfg.get("unk_token")),
            bos_token_id=tk.token_to_id(bos) if bos is not None else mcfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            chat_template=template if isinstance(template, str) else None,
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Adds BOS/EOS only if the model's metadata asks for it (SmolLM2: never).

        Encode a rendered chat template with `add_special_tokens=False`: templates write their own BOS.
        """
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` with the model's own jinja template (ChatML if the model has none); a template that
        does not compile or render is the model file's fault: ModelFormatError."""
        try:
            template = _compile_template(self.chat_template or CHATML_TEMPLATE)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ModelFormatError(f"the model's chat template has a syntax error (line {e.lineno}: {e.message}); "
                                   "use a raw prompt (no --chat) or fix the template") from None
        context = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            "unk_token": self.unk_token or "",
            "tools": None,
            "documents": None,
            **kwargs,
        }
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.exceptions.TemplateError as e:
            raise ModelFormatError(f"chat template failed: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # a template computing nonsense
            raise ModelFormatError(f"chat template failed: {type(e).__name__}: {e}") from None

    def encode_prompt(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a raw prompt, or of a one-turn chat rendered with the chat template (`system`: its
        system message, None for the template's own)."""
        if not prompt:
            raise ConfigError("the prompt is empty")
        if chat:
            messages: list[dict[str, str]] = []
            if system is not None:
                messages.append({"role": "system", "content": system})
            messages.append({"role": "user", "content": prompt})
            prompt = self.apply_chat_template(messages, add_generation_prompt=True)
        # a rendered template already holds any BOS it wants; raw prompts get the tokenizer's own specials
        ids = self.encode(prompt, add_special_tokens=not chat)
        if not ids:
            raise ConfigError("the prompt encodes to no tokens")
        return ids

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: push ids, get back only newly completed text.

    Text is held back while it ends in an incomplete UTF-8 sequence (an emoji split over byte tokens decodes
    to U+FFFD until its last byte arrives). Decoding a small window that starts at the previously emitted chunk
    keeps tokenizers whose decoders strip a leading space (SentencePiece) from eating word boundaries.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, ids: int | Iterable[int]) -> str:
        """Add token id(s); return the text they complete ('' if it is still an incomplete character)."""
        self._ids.extend([ids] if isinstance(ids, int) else [int(i) for i in ids])
        seen = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        if len(full) <= len(seen) or full.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(seen):]

    def flush(self) -> str:
        """Whatever is left (an incomplete character comes out as U+FFFD); resets the decoder."""
        seen = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        self._ids, self._prefix, self._read = [], 0, 0
        return full[len(seen):]
