"""Hugging Face transformers models and tokenizers from local folders, offline.

`hf:path/to/folder` names a folder holding a transformers checkpoint (config.json, weights,
tokenizer files), such as one written by `save_pretrained`. It is loaded with the Auto classes
as a sequence classifier for the task's number of classes (a base model gets a new classifier
head, to fine-tune), and never from a hub: every load is local and offline. transformers is an
optional dependency: `pip install 'kd-pipeline[hf]'`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from stages.errors import InputError
from stages.runtime import require

log = logging.getLogger(__name__)


def transformers(purpose: str):
    """The transformers package, imported offline and quiet, or a one-line error naming the extra."""
    # Set before the first import: transformers and huggingface_hub read them then.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    module = require("transformers", "hf", purpose)
    module.logging.set_verbosity_error()  # its load report and progress bars; what matters is logged here
    module.logging.disable_progress_bar()
    return module


def checkpoint_folder(spec_path: str) -> Path:
    folder = Path(spec_path)
    if not (folder / "config.json").is_file():
        raise InputError(f"hf:{spec_path}: not a transformers checkpoint folder (no config.json in it)")
    return folder


def load_tokenizer(spec_path: str):
    folder = checkpoint_folder(spec_path)
    library = transformers(f"the tokenizer hf:{spec_path}")
    try:
        tokenizer = library.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a folder it cannot read
        raise InputError(f"hf:{spec_path}: cannot load its tokenizer: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token_id is None:
        raise InputError(f"hf:{spec_path}: its tokenizer has no padding token, which padded batches need")
    return tokenizer


class HFClassifier(nn.Module):
    """A transformers sequence classifier over padded token ids: (B, L) int64 -> logits (B, C).

    The attention mask is `input_ids != pad_token_id`, so the inputs are the token ids alone, as
    the text datasets make them (padded with the same tokenizer's padding id). Its features, for
    feature targets, are the last hidden state averaged over the unmasked tokens (B, H)."""

    def __init__(self, model: nn.Module, pad_token_id: int):
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=self._mask(input_ids)).logits

    def logits_and_features(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self._mask(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        weights = mask.unsqueeze(-1).to(out.hidden_states[-1].dtype)
        pooled = (out.hidden_states[-1] * weights).sum(1) / weights.sum(1).clamp(min=1)
        return out.logits, pooled

    def _mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.is_floating_point():
            raise InputError("an hf: model needs integer token ids as inputs (a text: dataset)")
        return (input_ids != self.pad_token_id).long()


def build_classifier(spec_path: str, num_classes: int) -> HFClassifier:
    folder = checkpoint_folder(spec_path)
    library = transformers(f"the model hf:{spec_path}")
    try:
        model, info = library.AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=num_classes, local_files_only=True, output_loading_info=True,
            ignore_mismatched_sizes=True,  # a classifier for another class count gets a new head
        )
    except Exception as exc:  # noqa: BLE001 - an unknown model type, damaged weights, a wrong config...
        raise InputError(f"hf:{spec_path}: cannot load the model: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if info.get("missing_keys") or info.get("mismatched_keys"):
        log.info("hf:%s: classifier head for %d classes newly initialised; fine-tune it (train-teacher)", spec_path, num_classes)
    pad = model.config.pad_token_id
    if pad is None:
        raise InputError(f"hf:{spec_path}: its config has no pad_token_id, which the attention mask is made from")
    return HFClassifier(model, pad)
