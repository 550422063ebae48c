"""Fixtures shared by the CLI-side tests of real model and data sources: a small text corpus, and
a small BERT written to a folder the way save_pretrained writes any checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

TEXTS = {
    "train": [("the cat sat on the mat", "animals"), ("a dog ran in the park", "animals"),
              ("stocks fell as markets closed", "money"), ("the bank raised its rates", "money"),
              ("the cat chased a dog", "animals"), ("markets rose on bank news", "money")] * 4,
    "test": [("a cat and a dog", "animals"), ("rates and stocks", "money")],
}
WORDS = sorted({word for rows in TEXTS.values() for text, _ in rows for word in text.split()})


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory):
    """A 2-layer BERT classifier for 2 classes and its tokenizer, saved as a checkpoint folder."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("bert")
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = transformers.BertTokenizerFast(vocab={word: number for number, word in enumerate(vocabulary)})
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text, "label": label, "split": split}) + "\n"
                            for split, rows in TEXTS.items() for text, label in rows))
    return path
