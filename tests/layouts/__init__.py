"""Stand-ins for remote-code masked diffusion LMs (LLaDA, Dream), laid out like their published code.

Nothing can be downloaded in the test environment, and neither model is native to transformers, so the suite
needs in-process classes with the same module names, attention route and quirks as the real remote code. The
stand-ins are registered with the ``Auto*`` classes in-process (no ``trust_remote_code``).
"""

from __future__ import annotations

from pathlib import Path

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
