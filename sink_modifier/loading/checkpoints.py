"""Load a DLM checkpoint the way a pruning run needs it: through transformers, repaired, and checked.

``load_model(path_or_hub_id)`` is what the CLI uses and what Python users should call before ``oneshot``:

* it resolves the source first, so a typo'd local path fails in milliseconds instead of being retried as a Hub
  id, and an offline machine fails at once with one line;
* it picks the class the checkpoint declares (remote code only with ``trust_remote_code=True``; Dream maps
  only ``AutoModel``) or the one a family names (``FamilySpec.model_class``: DiffusionGemma's);
* it applies the repairs in ``sink_modifier.compat`` and ``sink_modifier.loading.remote_code`` that the published
  LLaDA / MMaDA / Dream code needs under transformers 5 (missing ``post_init``, 4.x method signatures, the
  removed ``"default"`` RoPE, non-persistent rotary buffers, dropped config keys, list-style tied keys, CUDA
  init), all scoped to the classes the checkpoint brings, then each family's ``on_load`` (Dream's mask
  adapter); remote code that still fails is reported in one line (``LoadError``) naming model and cause;
* it runs one forward on a short probe input and refuses a model whose logits are not finite, naming the
  cause (uninitialised weights, or the first module that overflows in its dtype).
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from loguru import logger

from sink_modifier import compat
from sink_modifier.errors import one_line
from sink_modifier.loading import remote_code
from sink_modifier.loading.sources import LoadError, resolve_source

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["LoadError", "load_model", "load_model_and_tokenizer", "resolve_source"]


def _hub_offline() -> bool:
    """Whether the Hub cannot be used: offline mode, or its endpoint does not answer within 3 s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError:
        return True
    return False


def _in_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _model_class(config, trust_remote_code: bool):
    """The Auto class (or the one a family names) that loads this config, and the concrete class to repair."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    from sink_modifier.families import registry

    own = registry.model_class(config)
    if own is not None:
        return own, own
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:
        # Dream's checkpoint maps only AutoModel; LLaDA's maps both.
        for auto in (AutoModelForCausalLM, AutoModel):
            if auto.__name__ in auto_map:
                return auto, get_class_from_dynamic_module(auto_map[auto.__name__], compat.name_or_path(config))
    for auto, mapping in ((AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING), (AutoModel, MODEL_MAPPING)):
        if type(config) in mapping:
            return auto, mapping[type(config)]
    raise LoadError(f"{type(config).__name__} ({config.model_type}) is neither a causal LM nor a base model that "
                    "transformers can load")


def _config_and_class(source, trust_remote_code: bool, kwargs: dict):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                        local_files_only=kwargs.get("local_files_only", False))
    return (config, *_model_class(config, trust_remote_code))


def _is_remote(cls: type) -> bool:
    """Code that transformers does not ship (remote code, or a class registered in-process)."""
    return not cls.__module__.startswith("transformers.")


def load_model(
    name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, dtype: str | torch.dtype = "auto",
    check_forward: bool = True, **kwargs,
) -> PreTrainedModel:
    """Load, repair and check a model (see the module docstring). ``kwargs`` go to ``from_pretrained``."""
    model, _ = _load(name_or_path, trust_remote_code=trust_remote_code, dtype=dtype,
                     check_forward=check_forward, tokenizer=False, **kwargs)
    return model


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, dtype: str | torch.dtype = "auto",
    check_forward: bool = True, **kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_model` plus the checkpoint's tokenizer."""
    return _load(name_or_path, trust_remote_code=trust_remote_code, dtype=dtype, check_forward=check_forward,
                 tokenizer=True, **kwargs)


def _remote_failure(cls: type, name_or_path, config, error: Exception) -> LoadError:
    """One line naming the model, the versions and the cause, for remote code that fails under this transformers
    although ``compat.repair_remote_code`` ran (a transformers release that breaks it in a new way)."""
    import transformers

    written = getattr(config, "transformers_version", None)
    cause = f"{type(error).__name__}: {one_line(error)}"
    return LoadError(f"{cls.__name__} ({name_or_path}) fails in its own modeling code"
                     f"{f' (written for transformers {written})' if written else ''} under transformers "
                     f"{transformers.__version__}, after sink_modifier's repairs: {cause}")


def _load(name_or_path, *, trust_remote_code, dtype, check_forward, tokenizer, **kwargs):
    from transformers import AutoTokenizer

    from sink_modifier.families import registry

    source, hub = resolve_source(name_or_path)
    if hub and _hub_offline():
        if not _in_cache(source):
            raise LoadError(f"could not load {source} from the Hugging Face Hub: it cannot be reached from this "
                            "machine and the model is not in the local cache; pass a local directory")
        kwargs["local_files_only"] = True
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    remote = None  # the checkpoint's own class, once known: its failures are reported as such
    try:
        with compat.removed_import_helpers():  # remote code imports them while its classes are resolved
            config, auto, cls = _config_and_class(source, trust_remote_code, kwargs)
        compat.cpu_init_device(config)
        if _is_remote(cls):
            remote = cls
            remote_code.repair_remote_code(cls)
            saved, _ = type(config).get_config_dict(source, local_files_only=kwargs.get("local_files_only", False))
            remote_code.restore_generation_keys(config, saved)
        registry.prepare_to_load(config)
        with compat.calls_post_init(cls) if remote else contextlib.nullcontext(), compat.removed_import_helpers():
            model = auto.from_pretrained(source, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
                                         **kwargs)
        if remote:
            compat.restore_non_persistent_buffers(model, config)
        loaded_tokenizer = (AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                          local_files_only=kwargs.get("local_files_only", False))
                            if tokenizer else None)
    except LoadError:
        raise
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise LoadError(f"{name_or_path} ships its own modeling code; pass trust_remote_code=True "
                            "(--trust-remote-code) if you trust it") from error
        if remote is None:
            raise
        raise _remote_failure(remote, name_or_path, config, error) from error
    except OSError as error:
        raise LoadError(f"could not load {name_or_path}: {str(error).splitlines()[0]}") from error
    except Exception as error:
        if remote is None:
            raise
        raise _remote_failure(remote, name_or_path, config, error) from error
    compat.make_saveable(model)
    registry.prepare_loaded(model)
    model.eval()
    if check_forward:
        try:
            check_finite_forward(model)
        except LoadError:
            raise
        except Exception as error:
            if remote is None:
                raise
            raise _remote_failure(remote, name_or_path, config, error) from error
    count = sum(p.numel() for p in model.parameters())
    size = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"
    logger.info(f"Loaded {type(model).__name__} from {source} ({size} parameters)")
    return model, loaded_tokenizer


def _probe_inputs(model: torch.nn.Module) -> dict:
    from sink_modifier.families import registry

    vocab = int(getattr(model.config.get_text_config(), "vocab_size", 16) or 16)
    ids = (torch.arange(8) * 7 + 5) % vocab
    device = next(model.parameters()).device
    return {name: value.to(device) for name, value in registry.probe_inputs(model, ids[None]).items()}


@torch.no_grad()
def check_finite_forward(model: torch.nn.Module) -> None:
    """One forward on 8 tokens; non-finite logits are refused with their cause named."""
    records: list[str] = []

    def watch(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple | list) else output
            if not records and isinstance(out, torch.Tensor) and out.is_floating_point() \
                    and not torch.isfinite(out).all():
                records.append(name)
        return hook

    handles = [m.register_forward_hook(watch(n)) for n, m in model.named_modules() if n and not list(m.children())]
    try:
        output = model(**_probe_inputs(model), use_cache=False) if "use_cache" in _parameters(model) else \
            model(**_probe_inputs(model))
    finally:
        for handle in handles:
            handle.remove()
    logits = output.logits if hasattr(output, "logits") else output[0]
    if torch.isfinite(logits).all():
        return
    bad = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
           if t.is_floating_point() and not torch.isfinite(t).all()]
    dtype = next(model.parameters()).dtype
    if bad:
        cause = (f"{len(bad)} weight(s)/buffer(s) hold non-finite values ({', '.join(bad[:3])}"
                 f"{', ...' if len(bad) > 3 else ''}): the checkpoint is damaged or incompletely loaded")
    elif dtype == torch.float16:
        cause = (f"{records[0] if records else 'a module'} overflows in float16; load the model in bfloat16 or "
                 "float32 (dtype=)")
    else:
        cause = (f"{records[0] if records else 'a module'} produces non-finite values in {dtype} although every "
                 "weight is finite; check the checkpoint and the model code")
    raise LoadError(f"a check forward of {type(model).__name__} gives non-finite logits: {cause}")


def _parameters(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
