"""A word-level ``CLIPTokenizer`` for the Shapes grammar, written by the project (no download).

The vocabulary holds the 256 byte-level symbols (alone and with ``</w>``, so any text still tokenizes), one
token per grammar word, the intermediate symbols of the merges that build those words, and
``<|startoftext|>`` / ``<|endoftext|>`` last (as in real CLIP). Merges are derived word by word with a BPE
simulation: each new word gets merges appended *after* all earlier ones, joining whatever symbols the
existing merges leave. A finished word is a single symbol, so later (lower-priority) merges can never split
it — this avoids the merge-order trap ("ri" from "right" splitting "triangle").

Load with :func:`load_tokenizer` (``CLIPTokenizer.from_pretrained(dir, local_files_only=True)``; in
transformers 5 ``CLIPTokenizer(vocab_file=...)`` silently builds a 3-token tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import grammar_words

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 20


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP reversible byte -> printable unicode character table (256 entries)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to a symbol list, as CLIP does."""
    word = list(symbols)
    while len(word) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word[:-1], word[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        a, b = word[i], word[i + 1]
        merged, j = [], 0
        while j < len(word):
            if j < len(word) - 1 and word[j] == a and word[j + 1] == b:
                merged.append(a + b)
                j += 2
            else:
                merged.append(word[j])
                j += 1
        word = merged
    return word


def _word_symbols(word: str) -> list[str]:
    enc = bytes_to_unicode()
    chars = [enc[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + "</w>"]


def build_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token -> id) and ordered merges such that every word in ``words`` is exactly one token."""
    words = grammar_words() if words is None else words
    base = list(bytes_to_unicode().values())
    tokens: list[str] = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        syms = _bpe(_word_symbols(w), ranks)
        while len(syms) > 1:  # join left to right with new, lowest-priority merges
            pair = (syms[0], syms[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in tokens:
                tokens.append(pair[0] + pair[1])
            syms = [pair[0] + pair[1]] + syms[2:]
        assert _bpe(_word_symbols(w), ranks) == [w + "</w>"], w
    seen: dict[str, int] = {}
    for t in tokens + [BOS, EOS]:
        seen.setdefault(t, len(seen))
    return seen, merges


def write_tokenizer(out_dir: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return out


def load_tokenizer(directory: str | Path):
    """Load the tokenizer written by :func:`write_tokenizer` as a ``transformers.CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)


def vocab_size() -> int:
    """Number of tokens (including BOS/EOS), for the text encoder's embedding table."""
    return len(build_vocab()[0])
