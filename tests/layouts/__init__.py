"""Stand-ins for remote-code masked diffusion LMs (LLaDA, Dream), laid out like their published code.

Nothing can be downloaded in the test environment, and neither model is native to transformers, so the suite
needs classes with the same module names, attention route and quirks as the real remote code. The builders
save each stand-in's modeling file next to its weights with an ``auto_map``, as the published checkpoints do:
loading then needs ``trust_remote_code=True`` and goes through transformers' dynamic-module machinery, so the
suite fails wherever the published code fails under the pinned transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


def build_id_tokenizer(vocab_size: int, mask_token_id: int) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer whose tokens are ``t<id>`` plus specials, so ids map 1:1.

    oneshot and ``AutoTokenizer`` want a processor next to the weights; the calibration data are token ids,
    so the tokenizer only has to exist, know the mask token and cover the vocabulary exactly.
    """
    specials = {PAD_ID: "[PAD]", EOS_ID: "[EOS]", BOS_ID: "[BOS]", UNK_ID: "[UNK]", mask_token_id: "[MASK]"}
    vocab = {specials.get(i, f"t{i}"): i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        eos_token="[EOS]",
        bos_token="[BOS]",
        unk_token="[UNK]",
        mask_token="[MASK]",
    )


def save_with_list_tied_keys(model, path: Path) -> None:
    """Save a model whose class declares ``_tied_weights_keys`` as a list (LLaDA's and Dream's remote code).

    The list is shadowed by ``{}`` on this instance only while saving, so the fixture can be written; the
    class keeps its list, so a loaded model still shows the real failure.
    """
    model._tied_weights_keys = {}
    try:
        model.save_pretrained(path)
    finally:
        del model._tied_weights_keys


def save_id_tokenizer(path: Path, vocab_size: int, mask_token_id: int) -> None:
    """Save :func:`build_id_tokenizer` next to a model so ``from_pretrained(path)`` finds it."""
    build_id_tokenizer(vocab_size, mask_token_id).save_pretrained(path)


def save_as_remote_code(model, path: Path, auto_classes: tuple[str, ...]) -> Path:
    """Save ``model`` with its modeling file and an ``auto_map`` naming ``auto_classes``, as the published
    checkpoints are, plus an id tokenizer. transformers records one Auto class per model class, so the
    ``auto_map`` is completed afterwards."""
    path = Path(path)
    config = model.config
    type(config).register_for_auto_class()
    type(model).register_for_auto_class(auto_classes[0])
    save_with_list_tied_keys(model, path)
    config_json = path / "config.json"
    saved = json.loads(config_json.read_text())
    target = saved["auto_map"][auto_classes[0]]
    saved["auto_map"].update(dict.fromkeys(auto_classes, target))
    config_json.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    save_id_tokenizer(path, config.vocab_size, config.mask_token_id)
    return path


def build_tiny_llada(path: Path, seed: int = 0, **config_kwargs) -> Path:
    """A random tiny LLaDA checkpoint whose ``auto_map`` names both Auto classes, as LLaDA's does."""
    from .llada import LLaDAConfig

    torch.manual_seed(seed)
    model = build_llada(LLaDAConfig(**config_kwargs))
    return save_as_remote_code(model, path, ("AutoModel", "AutoModelForCausalLM"))


def build_llada(config):
    """The in-memory LLaDA a checkpoint is made from (``post_init`` done by hand: the class never calls it)."""
    from .llada import LLaDAModelLM

    model = LLaDAModelLM(config)
    model.post_init()
    return model.eval()


def build_tiny_dream(path: Path, seed: int = 0, **config_kwargs) -> Path:
    """A random tiny Dream checkpoint whose ``auto_map`` names only ``AutoModel``, as Dream's does."""
    from .dream import DreamConfig, DreamModel

    torch.manual_seed(seed)
    return save_as_remote_code(DreamModel(DreamConfig(**config_kwargs)).eval(), path, ("AutoModel",))
