"""A small CLIP BPE tokenizer that is written to disk and loaded without the model hub.

The vocabulary follows the layout of the published CLIP vocabulary: the 256 byte-level symbols, the
same symbols with the end-of-word marker ``</w>``, then the products of the merges, then
``<|startoftext|>`` and ``<|endoftext|>`` (the last two ids). Optional whole words get merges that
build them left to right, so that ``"cat"`` becomes the single token ``"cat</w>"``.

Note (transformers 5): ``CLIPTokenizer(vocab_file=...)`` silently builds a 3-token tokenizer; the
folder + ``CLIPTokenizer.from_pretrained(folder, local_files_only=True)`` route used here does not.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from qdiff.errors import QdiffError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Words that the CLIP pre-tokenizer keeps whole: one or more letters (after lower-casing).
_WORD = re.compile(r"^[a-z]+$")


@lru_cache(maxsize=1)
def byte_symbols() -> tuple[str, ...]:
    """The 256 printable stand-ins of GPT-2/CLIP byte-level BPE, indexed by byte value.

    Bytes that are printable (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the others
    are mapped, in byte order, to the code points 256, 257, ...
    """
    printable = (
        set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    )
    symbols = []
    extra = 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return tuple(symbols)


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Merges that assemble ``word`` into ``word</w>`` from its characters, left to right."""
    chars = list(word)
    chars[-1] = chars[-1] + END_OF_WORD
    merges = []
    current = chars[0]
    for nxt in chars[1:]:
        merges.append((current, nxt))
        current = current + nxt
    return merges


def _vocab_and_merges(extra_words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = byte_symbols()
    tokens: list[str] = list(symbols) + [s + END_OF_WORD for s in symbols]
    merges: list[tuple[str, str]] = []
    seen_tokens = set(tokens)
    seen_merges: set[tuple[str, str]] = set()
    for raw in extra_words:
        word = raw.strip().lower()
        if not _WORD.match(word):
            raise QdiffError(f"tokenizer extra word {raw!r} must be a single run of ASCII letters a-z")
        for left, right in _word_merges(word):
            if (left, right) in seen_merges:
                continue
            seen_merges.add((left, right))
            merges.append((left, right))
            merged = left + right
            if merged not in seen_tokens:
                seen_tokens.add(merged)
                tokens.append(merged)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_tokenizer(directory: str | Path, extra_words: Sequence[str] = (), model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and ``tokenizer_config.json``.

    The folder loads with ``CLIPTokenizer.from_pretrained(directory, local_files_only=True)``. The
    vocabulary size is ``512 + (number of merge products) + 2``; BOS and EOS are the last two ids, and
    padding uses EOS (as Stable Diffusion 1.x does).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges(extra_words)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": int(model_max_length),
        "do_lower_case": True,
        "errors": "replace",
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def build_clip_tokenizer(extra_words: Sequence[str] = (), model_max_length: int = 77):
    """Write a tokenizer folder to a temporary directory and load it as a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="qdiff-clip-tok-") as tmp:
        write_clip_tokenizer(tmp, extra_words, model_max_length=model_max_length)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
    tokenizer.model_max_length = int(model_max_length)
    return tokenizer
