"""Hugging Face transformers models and tokenizers from local folders, offline.

`hf:path/to/folder` names a folder holding a transformers checkpoint (config.json, weights,
tokenizer files), such as one written by `save_pretrained`. It is loaded with the Auto classes
as a causal language model when its config names one (`...ForCausalLM`, `...LMHeadModel`):
next-token logits per position; otherwise as a sequence classifier for the task's number of
classes (a base model gets a new classifier head, to fine-tune). Never from a hub: every load is
local and offline. `gpt2:layers=N,dim=D,heads=H,vocab=V` builds a fresh GPT-2-style model from
a config, for demos, tests and students. transformers is an
optional dependency: `pip install 'kd-pipeline[hf]'`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from stages.errors import InputError, PipelineError
from stages.runtime import require

log = logging.getLogger(__name__)


def transformers(purpose: str):
    """The transformers package, imported offline and quiet, or a one-line error naming the extra."""
    # Set before the first import: transformers and huggingface_hub read them then.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    module = require("transformers", "hf", purpose)
    # A load that reaches transformers' remote-code question without an answer reads stdin for
    # 15 s (or until a terminal answers); 0 makes it refuse instead. Every load here passes
    # trust_remote_code=False and folders naming code are refused first (refuse_custom_code):
    # this holds for any path through transformers that forgets to pass it on.
    module.dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0
    module.logging.set_verbosity_error()  # its load report and progress bars; what matters is logged here
    module.logging.disable_progress_bar()
    return module


def checkpoint_folder(spec_path: str) -> Path:
    folder = Path(spec_path)
    if not (folder / "config.json").is_file():
        raise InputError(f"hf:{spec_path}: not a transformers checkpoint folder (no config.json in it)")
    refuse_custom_code(folder)
    return folder


# The files in which a folder names Python code of its own for transformers to import
# (`auto_map`: AutoConfig, AutoTokenizer, AutoModel... -> module.Class in the folder or a repo).
CODE_NAMING_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def refuse_custom_code(folder: Path) -> None:
    """Refuse a folder whose config names custom code: this tool never runs code that a folder
    (often one recorded in a cache someone else made) brings along, and never asks whether to."""
    for name in CODE_NAMING_FILES:
        path = folder / name
        try:
            config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, ValueError):  # unreadable: transformers reports it as it loads
            config = None
        if isinstance(config, dict) and "auto_map" in config:
            raise InputError(f"hf:{folder}: {name} names custom code (auto_map), and this tool never runs a folder's own code; "
                             f"use a folder that transformers loads with its built-in classes")


# A folder holds a tokenizer when it has one of these (what tokenizer.save_pretrained writes).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def load_tokenizer(spec_path: str):
    """The tokenizer in a folder (a model checkpoint's, or one that tokenizer.save_pretrained wrote)."""
    folder = Path(spec_path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer that turns every word into its unknown token
        raise InputError(f"hf:{spec_path}: no tokenizer in this folder (none of {', '.join(TOKENIZER_FILES)})")
    refuse_custom_code(folder)
    library = transformers(f"the tokenizer hf:{spec_path}")
    try:
        tokenizer = library.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a folder it cannot read
        raise InputError(f"hf:{spec_path}: cannot load its tokenizer: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token_id is None:
        raise InputError(f"hf:{spec_path}: its tokenizer has no padding token, which padded batches need")
    return tokenizer


def tokenizer_from_spec(spec: str):
    """The tokenizer a dataset spec's `tokenizer=hf:FOLDER` names."""
    from pipeline.specs import FileSpec, parse_spec

    parsed = parse_spec(spec)
    if not (isinstance(parsed, FileSpec) and parsed.kind == "hf" and parsed.path):
        raise InputError(f"tokenizer {spec!r}: give a Hugging Face tokenizer folder as hf:FOLDER")
    return load_tokenizer(parsed.path)


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


class HFCausalLM(nn.Module):
    """A transformers causal language model over token ids: (B, L) int64 -> next-token logits
    (B, L, V), V the model's output size (which may exceed its tokenizer's vocabulary: padded
    embeddings are classes that never occur, and are cached and distilled like the others).

    No attention mask: token rows are right-padded (a corpus's last row), and under causal
    attention no position before a sequence's end sees its padding, so the logits at the valid
    positions are those of the model with the padding masked; the cache zeroes the positions
    past the end."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check(input_ids)
        return self.model(input_ids=input_ids).logits

    def _check(self, input_ids: torch.Tensor) -> None:
        if input_ids.is_floating_point():
            raise InputError("a causal language model needs integer token ids as inputs (a corpus: dataset)")


class HeadApartCausalLM(HFCausalLM):
    """A causal LM whose logits are its output layer applied to its last hidden states, and
    nothing after (no capping, no scale): `hidden_and_head` gives the two apart, so cache-teacher
    computes the logits a piece of the positions at a time (stages.teacher_rows)."""

    def hidden_and_head(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
        self._check(input_ids)
        return self.model.base_model(input_ids=input_ids).last_hidden_state, self.model.get_output_embeddings()


def causal_lm_checkpoint(folder: Path) -> bool:
    """Whether the checkpoint in `folder` is a causal language model, by the architecture its
    config.json names (a base model without one is taken as a classifier's encoder)."""
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise InputError(f"hf:{folder}: cannot read its config.json: {exc}") from exc
    return any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)


def build_causal_lm(spec_path: str, num_classes: int) -> HFCausalLM:
    folder = checkpoint_folder(spec_path)
    library = transformers(f"the model hf:{spec_path}")
    try:
        model = library.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - an unknown model type, damaged weights, a wrong config...
        raise InputError(f"hf:{spec_path}: cannot load the model: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return _causal_lm(model, num_classes, f"hf:{spec_path}")


def build_gpt2(num_classes: int, input_shape: tuple[int, ...], *, layers: int, dim: int, heads: int, vocab: int,
               positions: int = 0) -> HFCausalLM:
    """A fresh GPT-2-style causal LM built from a transformers GPT2Config (nothing downloaded):
    `vocab` output classes (0: the data's number of classes; more pads the embeddings),
    `positions` positions (0: as many as the inputs are long), input and output embeddings tied
    as in GPT-2.

    `positions` 0 stays the row length, although a model written out for use (pipeline.hf.export)
    wants a longer context (give positions=1024): the position table's shape is part of the
    weights (wpe), and is drawn before the blocks, so another default would change every
    existing gpt2: spec's model: weights files and run checkpoints saved from it would no longer
    load, and an untrained teacher recorded in a cache would no longer be the same teacher."""
    if len(input_shape) != 1:
        raise InputError(f"a gpt2 model needs token sequences (length,), got input shape {tuple(input_shape)}")
    if dim % heads:
        raise InputError(f"gpt2: dim ({dim}) must be a multiple of heads ({heads})")
    if positions and positions < input_shape[0]:
        raise InputError(f"gpt2: positions={positions} is fewer than the {input_shape[0]} tokens of the rows")
    library = transformers("the model gpt2")
    # No dropout on the attention probabilities (as Llama, Mistral and Qwen have none): with it, torch's
    # scaled-dot-product attention falls back to computing every (length x length) probability and
    # keeping it for the backward, which at rows of 1,024 took a 1-layer student from 0.5 to 1.5 GB
    # at a batch of 32; without it, a memory-efficient kernel never holds them. The residual and
    # embedding dropouts stay GPT-2's (0.1).
    config = library.GPT2Config(vocab_size=vocab or num_classes, n_positions=positions or input_shape[0], n_embd=dim,
                                n_layer=layers, n_head=heads, bos_token_id=None, eos_token_id=None, attn_pdrop=0.0)
    return _causal_lm(library.GPT2LMHeadModel(config), num_classes, "gpt2")


def _causal_lm(model: nn.Module, num_classes: int, name: str) -> HFCausalLM:
    outputs = model.get_output_embeddings().out_features
    if outputs < num_classes:
        raise InputError(f"{name}: its output layer has {outputs:,} classes, fewer than the {num_classes:,} of the data")
    # Models that scale or cap the logits after the output layer run whole (one piece of logits per batch).
    after_head = any(getattr(model.config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return HFCausalLM(model) if after_head else HeadApartCausalLM(model)


def build_from_folder(spec_path: str, num_classes: int) -> nn.Module:
    """The model in a checkpoint folder: a causal LM as itself (HFCausalLM), any other as a
    sequence classifier for `num_classes` classes (HFClassifier)."""
    folder = checkpoint_folder(spec_path)
    if causal_lm_checkpoint(folder):
        return build_causal_lm(spec_path, num_classes)
    library = transformers(f"the model hf:{spec_path}")
    try:
        model, info = library.AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=num_classes, local_files_only=True, output_loading_info=True, trust_remote_code=False,
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


def export(model: nn.Module, folder: Path, tokenizer: str | None = None) -> Path | None:
    """Write a student built from hf: or gpt2: as a Hugging Face folder at `folder`: the
    transformers model's own config.json and safetensors weights (its names, without this
    tool's wrapper prefix), and the tokenizer of the `tokenizer` spec (hf:FOLDER) beside them, so
    that `AutoModelForCausalLM.from_pretrained(folder)` (or ...ForSequenceClassification for a
    classifier) and `AutoTokenizer.from_pretrained(folder)` load it. Returns the folder, or None
    for a model that is no transformers model (nothing is written).

    Written beside `folder` and renamed into place, so that a kill leaves the previous folder
    whole or none; the tokenizer's end-of-text and padding ids become the model's generation
    defaults where its config has none."""
    inner = getattr(model, "model", None)
    library = transformers("writing the student as a Hugging Face model")
    if not isinstance(inner, library.PreTrainedModel):
        return None
    folder = Path(folder)
    loaded = tokenizer_from_spec(tokenizer) if tokenizer is not None else None
    generation = getattr(inner, "generation_config", None)  # a classifier has none
    if loaded is not None and generation is not None:
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if getattr(generation, key, None) is None and getattr(loaded, key, None) is not None:
                setattr(generation, key, getattr(loaded, key))
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        inner.save_pretrained(partial, safe_serialization=True)
        if loaded is not None:
            loaded.save_pretrained(partial)
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
    except OSError as exc:
        raise PipelineError(f"cannot write the Hugging Face folder {folder}: {exc.strerror or exc}") from exc
    return folder
