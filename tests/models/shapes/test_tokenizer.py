"""The project's word-level CLIPTokenizer: every grammar word is exactly one token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qdiff.models.shapes import data
from qdiff.models.shapes.tokenizer import BOS, EOS, MODEL_MAX_LENGTH, build_vocab, load_tokenizer, write_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok")))


def test_files_written(tmp_path: Path) -> None:
    out = write_tokenizer(tmp_path)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert (out / "merges.txt").read_text().startswith("#version: 0.2")


def test_every_grammar_word_is_one_token(tok) -> None:
    for w in data.grammar_words():
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, tok.convert_ids_to_tokens(ids))
        assert tok.convert_ids_to_tokens(ids) == [w + "</w>"]


def test_special_tokens(tok) -> None:
    vocab, _ = build_vocab()
    assert len(tok) == len(vocab)
    assert tok.bos_token == BOS and tok.eos_token == EOS and tok.pad_token == EOS
    assert tok.bos_token_id == vocab[BOS] == len(vocab) - 2
    assert tok.eos_token_id == vocab[EOS] == len(vocab) - 1
    assert tok.model_max_length == MODEL_MAX_LENGTH


def test_caption_round_trip(tok) -> None:
    cap = "a picture of a large crimson pentagram to the left against a light background"
    enc = tok(cap, padding="max_length", max_length=tok.model_max_length, truncation=True)
    ids = enc.input_ids
    assert len(ids) == MODEL_MAX_LENGTH
    n_words = len(cap.split())
    assert ids[0] == tok.bos_token_id and ids[n_words + 1] == tok.eos_token_id
    assert tok.decode(ids[1 : n_words + 1]) == cap


def test_all_captions_fit(tok) -> None:
    longest = max(len(t.split()) for t in data.TRAIN_TEMPLATES + data.HELDOUT_TEMPLATES) + 8
    assert longest + 2 <= MODEL_MAX_LENGTH


def test_unknown_text_still_tokenizes(tok) -> None:
    ids = tok("zebra!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) > 3
