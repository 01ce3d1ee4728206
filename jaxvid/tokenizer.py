"""Prompt -> token ids for the T5 / umT5 text encoders, read from a checkpoint's `tokenizer/` folder.

Reproduces what the reference pipelines get from transformers' `T5Tokenizer` called with
`padding="max_length", truncation=True, add_special_tokens=True`:

- CogVideoX (diffusers' `CogVideoXPipeline._get_t5_prompt_embeds`): the prompt as given, 226 tokens.
- LongCat-Video (upstream `LongCatVideoPipeline._get_t5_prompt_embeds`): `prompt_clean` first, 512 tokens.

Each prompt becomes its sentencepiece ids, cut to `max_length - 1`, then `</s>`, then `<pad>` up to
`max_length`; the mask is 1 on the ids and `</s>`, 0 on padding. Special tokens written in the
prompt (`</s>`, `<extra_id_0>`, ...) are kept whole, as transformers does.

The folder is read through `spiece.model` (sentencepiece) when it has one, else through
`tokenizer.json` (the `tokenizers` library, installed with transformers).
"""
from __future__ import annotations

import html
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

log = logging.getLogger(__name__)

COGVIDEOX_MAX_LENGTH = 226
LONGCAT_MAX_LENGTH = 512
_DEFAULT_EXTRA_IDS = 100  # transformers' T5Tokenizer default


class Tokens(NamedTuple):
    """input_ids: int32 [B, L]; attention_mask: int32 [B, L] (1 = token incl. `</s>`, 0 = padding)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


class _Backend(Protocol):
    def encode(self, text: str) -> list[int]: ...  # ids without any special token appended
    def token_id(self, token: str) -> int | None: ...


class _SentencePieceBackend:
    """spiece.model plus the added special tokens, split out of the text before sentencepiece runs."""

    def __init__(self, model_file: Path, special_tokens: dict[str, int]):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        specials = dict(special_tokens)
        for piece_id in (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id()):
            if piece_id >= 0:
                specials.setdefault(self._sp.id_to_piece(piece_id), piece_id)
        self._specials = specials
        # longest first, so '<extra_id_10>' is not read as '<extra_id_1>' + '0>'
        names = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")") if names else None

    @property
    def piece_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return list(self._sp.encode(text))
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def token_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        piece_id = self._sp.piece_to_id(token)
        return None if piece_id == self._sp.unk_id() and token != self._sp.id_to_piece(piece_id) else piece_id


class _TokenizersBackend:
    """tokenizer.json through the `tokenizers` library (special tokens are its added tokens)."""

    def __init__(self, tokenizer_file: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - tokenizers ships with transformers
            raise ValueError(
                f"{tokenizer_file.parent}: has tokenizer.json but no spiece.model, and the 'tokenizers' package is "
                "not installed; install it or add the checkpoint's spiece.model"
            ) from e
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        self._tok.no_truncation()
        self._tok.no_padding()

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def _token_content(value: object) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as {"content": ...} dicts
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _added_tokens(folder: Path, config: dict, piece_size: int) -> dict[str, int]:
    """Special tokens beyond the sentencepiece pieces, with their ids, as transformers assigns them."""
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict) and decoder:
        found = {}
        for index, entry in decoder.items():
            content = _token_content(entry)
            if content is not None:
                found[content] = int(index)
        return found
    added_file = folder / "added_tokens.json"
    if added_file.is_file():
        return {str(k): int(v) for k, v in _read_json(added_file).items()}
    # T5Tokenizer appends the sentinels after the pieces, in reverse: <extra_id_0> is the last id.
    n_extra = int(config.get("extra_ids", _DEFAULT_EXTRA_IDS))
    return {f"<extra_id_{i}>": piece_size + n_extra - 1 - i for i in range(n_extra)}


class TextTokenizer:
    """Fixed-length T5 tokenization of a batch of prompts (see the module docstring)."""

    def __init__(
        self,
        backend: _Backend,
        *,
        max_length: int,
        eos_id: int,
        pad_id: int,
        clean: Callable[[str], str] | None = None,
    ):
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r}: expected an int >= 2 (room for one token and </s>)")
        self._backend = backend
        self.max_length = max_length
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.clean = clean

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        *,
        max_length: int,
        clean: Callable[[str], str] | None = None,
    ) -> "TextTokenizer":
        """Read a HF tokenizer folder (spiece.model [+ tokenizer_config.json, added_tokens.json] or tokenizer.json)."""
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"tokenizer path={str(folder)!r}: not a folder; expected the checkpoint's tokenizer/ folder")
        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        if (folder / "spiece.model").is_file():
            import sentencepiece

            piece_size = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model")).get_piece_size()
            backend: _Backend = _SentencePieceBackend(folder / "spiece.model", _added_tokens(folder, config, piece_size))
        elif (folder / "tokenizer.json").is_file():
            backend = _TokenizersBackend(folder / "tokenizer.json")
        else:
            raise ValueError(f"tokenizer folder {str(folder)!r}: has neither spiece.model nor tokenizer.json")
        ids = {}
        for role, default in (("eos_token", "</s>"), ("pad_token", "<pad>")):
            token = _token_content(config.get(role)) or default
            token_id = backend.token_id(token)
            if token_id is None:
                raise ValueError(f"tokenizer folder {str(folder)!r}: {role}={token!r} is not in the vocabulary")
            ids[role] = token_id
        return cls(backend, max_length=max_length, eos_id=ids["eos_token"], pad_id=ids["pad_token"], clean=clean)

    def __call__(self, prompts: str | Sequence[str]) -> Tokens:
        """prompts: one string or a list of B strings -> Tokens with int32 [B, max_length] arrays."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts={prompts!r}: expected a string or a list of strings")
        if len(prompts) == 0:
            raise ValueError("prompts=[]: expected at least one prompt")
        ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), self.max_length), np.int32)
        for row, prompt in enumerate(prompts):
            text = self.clean(prompt) if self.clean is not None else prompt
            tokens = self._backend.encode(text)[: self.max_length - 1] + [self.eos_id]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return Tokens(ids, mask)


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        log.warning("ftfy is not installed: prompt cleaning skips ftfy.fix_text (mojibake repair) and keeps the rest")
        return text
    return ftfy.fix_text(text)


def prompt_clean(text: str) -> str:
    """LongCat-Video's prompt cleaning: ftfy.fix_text, HTML-unescape twice, collapse whitespace, strip.

    Without ftfy installed, the fix_text step is skipped (a warning is logged): prompts that are
    plain, correctly encoded text come out the same; mojibake is left unrepaired.
    """
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def cogvideox_tokenizer(path: str | os.PathLike, *, max_length: int = COGVIDEOX_MAX_LENGTH) -> TextTokenizer:
    """CogVideoX's T5 tokenizer: prompts as given, 226 tokens."""
    return TextTokenizer.from_folder(path, max_length=max_length)


def longcat_tokenizer(path: str | os.PathLike, *, max_length: int = LONGCAT_MAX_LENGTH) -> TextTokenizer:
    """LongCat-Video's umT5 tokenizer: `prompt_clean`, then 512 tokens."""
    return TextTokenizer.from_folder(path, max_length=max_length, clean=prompt_clean)
