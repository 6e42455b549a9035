"""Exact per-key attention mass, recorded for every attention layer on every forward.

Sink-aware pruning ranks key positions by how much attention they receive. Fused kernels never
materialise the probabilities, so the probe recomputes them (float32, in query chunks) next to the
real attention call and leaves the model's own output untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sink_modifier import compat

__all__ = ["AttentionProbe", "AttentionProbeError", "attention_key_mass"]

_ROUTES = ("auto", "interface", "sdpa")
_BYPASS_HINT = (
    "attention bypassed the probe: flash/flex attention or a hand-written softmax; "
    "use attn_implementation='sdpa' or 'eager'"
)
_probe_ids = itertools.count()


class AttentionProbeError(RuntimeError):
    """Raised instead of handing back statistics that would be silently wrong or incomplete."""


def _mask_for_query_groups(mask: torch.Tensor | None, heads: int, kv_heads: int) -> torch.Tensor | None:
    """Bring a broadcastable SDPA mask to [B, Hkv, G, Q, K] so it lines up with grouped queries.

    Float entries at or below the dtype's minimum are treated as -inf: transformers uses
    ``finfo.min`` as its "masked" value, and a row made only of those is a fully masked row.
    """
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dtype != torch.bool:
        mask = mask.float().masked_fill(mask <= torch.finfo(mask.dtype).min, float("-inf"))
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    if mask.shape[1] == heads:
        return mask.unflatten(1, (kv_heads, heads // kv_heads))
    raise AttentionProbeError(f"mask with {mask.shape[1]} heads cannot broadcast to {heads}")


def _probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool,
    softcap: float | None,
    chunk_size: int,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, P[B, Hkv, G, chunk, K]) so that peak memory is one query chunk."""
    if query.dim() != 4 or key.dim() != 4:
        raise AttentionProbeError("expected query/key shaped [batch, heads, seq, head_dim]")
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise AttentionProbeError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    scale = dim**-0.5 if scaling is None else scaling
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, q_len, dim)
    keys_t = key.float().unsqueeze(2).transpose(-1, -2)  # [B, Hkv, 1, D, K]: shared by the group
    mask = _mask_for_query_groups(attn_mask, heads, kv_heads)
    key_pos = torch.arange(k_len, device=query.device)
    for start in range(0, q_len, chunk_size):
        stop = min(start + chunk_size, q_len)
        scores = torch.matmul(grouped[:, :, :, start:stop].float(), keys_t) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            m = mask if mask.shape[-2] == 1 else mask[..., start:stop, :]
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
        if is_causal:  # top-left aligned, like torch's SDPA
            q_pos = torch.arange(start, stop, device=query.device)
            scores = scores.masked_fill(key_pos > q_pos[:, None], float("-inf"))
        dead = scores.amax(dim=-1, keepdim=True) == float("-inf")  # fully masked rows: no NaN
        probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
        yield start, stop, probs


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    attn_mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    is_causal: bool = False,
    softcap: float | None = None,
    query_mask: torch.Tensor | None = None,
    chunk_size: int = 256,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mass [B, K] and, when ``value`` is given, the eager output [B, Q, H, Dv] in one pass."""
    mass = torch.zeros(query.shape[0], key.shape[2], dtype=torch.float32, device=query.device)
    weights = None if query_mask is None else query_mask.to(query.device, torch.float32)
    outputs = []
    for start, stop, probs in _probabilities(
        query, key, attn_mask, scaling, is_causal, softcap, chunk_size
    ):
        counted = probs.detach()
        if weights is not None:
            counted = counted * weights[:, None, None, start:stop, None]
        mass += counted.sum(dim=(1, 2, 3))
        if value is not None:
            probs = nn.functional.dropout(probs, p=dropout) if dropout > 0 else probs
            outputs.append(torch.matmul(probs.to(value.dtype), value.unsqueeze(2)).flatten(1, 2))
    if value is None:
        return mass, None
    return mass, torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def attention_key_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    is_causal: bool = False,
    softcap: float | None = None,
    query_mask: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Float32 [B, K] attention each key receives, summed over heads and valid query rows.

    Follows SDPA's conventions (bool mask True = attend, additive float mask, top-left causal,
    GQA via grouped query heads) so it can sit beside any SDPA call; fully masked rows give 0.
    """
    with torch.no_grad():
        mass, _ = _attend(
            query, key, None, attn_mask, scaling=scaling, is_causal=is_causal, softcap=softcap,
            query_mask=query_mask, chunk_size=chunk_size,
        )
    return mass


def discover_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Outermost modules named "*Attention": the HF and remote-code naming convention."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Attention") and not any(
            name.startswith(f"{outer}.") for outer in found
        ):
            found[name] = module
    return found


def _configs(model: nn.Module) -> list[Any]:
    """Every config reachable from the model, sub-configs included, each once."""
    seen: dict[int, Any] = {}
    pending = [m.config for m in model.modules() if getattr(m, "config", None) is not None]
    while pending:
        config = pending.pop()
        if id(config) in seen or not compat.has_attention_implementation(config):
            continue
        seen[id(config)] = config
        pending.extend(getattr(config, k, None) for k in getattr(config, "sub_configs", {}) or {})
    return list(seen.values())


def _auto_route(model: nn.Module) -> str:
    from transformers import PreTrainedModel

    native = (
        isinstance(model, PreTrainedModel)
        and type(model).__module__.startswith("transformers.models.")
        and compat.has_attention_implementation(model.config)
    )
    return "interface" if native else "sdpa"


class AttentionProbe:
    """Context manager that records, per forward, the attention mass every key position receives.

    Attention layers default to every module whose class name ends with "Attention" that is not
    nested in another such module; pass ``attention_modules`` (name -> module, in layer order)
    when a model names them otherwise (e.g. LLaDA's blocks compute attention inline).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        route: str = "auto",
        query_chunk_size: int = 256,
        attention_modules: dict[str, nn.Module] | None = None,
    ) -> None:
        if route not in _ROUTES:
            raise ValueError(f"route must be one of {_ROUTES}, got {route!r}")
        if query_chunk_size < 1:
            raise ValueError("query_chunk_size must be positive")
        modules = dict(attention_modules) if attention_modules is not None else discover_attention_modules(model)
        if not modules:
            raise AttentionProbeError("no attention modules found; pass attention_modules=")
        self.model = model
        self.route = _auto_route(model) if route == "auto" else route
        self.query_chunk_size = query_chunk_size
        self.query_mask: torch.Tensor | None = None
        self.layer_names: list[str] = list(modules)
        self._modules = modules
        self._names_by_id = {id(m): n for n, m in modules.items()}
        self._records: dict[str, list[torch.Tensor]] = {n: [] for n in self.layer_names}
        self._undo: list[Callable[[], Any]] = []
        self._active: list[str] = []
        self._mode: _SdpaRecorder | None = None
        self._installed = False

    def __enter__(self) -> AttentionProbe:
        if self._installed:
            raise AttentionProbeError("probe is already installed")
        self._installed = True
        try:
            self._install_interface() if self.route == "interface" else self._install_sdpa()
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._uninstall()

    def pop_records(self, names: list[str] | None = None) -> dict[str, list[torch.Tensor]]:
        """Each layer's [B, K] masses since the last pop (any K), after the same strict checks as pop_masses.

        ``names`` pops only those layers (a forward that runs part of the model, e.g. one of two streams).
        """
        names = self.layer_names if names is None else names
        records = {n: self._records[n] for n in names}
        self._records.update({n: [] for n in names})
        missing = [n for n in names if not records[n]]
        repeated = [n for n in names if len(records[n]) > 1]
        problems = []
        if missing:
            problems.append(f"no attention record from layers {missing}: {_BYPASS_HINT}")
        if repeated:
            problems.append(f"layers {repeated} recorded more than once since the last pop")
        if problems:
            raise AttentionProbeError("; ".join(problems))
        return {n: [m.float().cpu() for m in records[n]] for n in names}

    @contextlib.contextmanager
    def stopping_after_last_layer(self) -> Iterator[None]:
        """End a measuring forward as soon as the last probed layer has attended.

        A measuring forward only needs attention masses: the layers after the last attention, the final norm
        and, for models whose backbone computes logits (LLaDA's ``LLaDAModel``), the LM head are skipped. That
        head is about two decoder layers' worth of compute at LLaDA-8B's vocabulary.
        """
        last = self._modules[self.layer_names[-1]]

        def stop(*_):
            raise _AllLayersMeasured

        handle = last.register_forward_hook(stop)
        try:
            yield
        except _AllLayersMeasured:
            pass
        finally:
            handle.remove()

    def pop_masses(self) -> torch.Tensor:
        """Float32 [B, L, K] on CPU; strict so a bypassed or repeated layer can't skew the stats."""
        records = self.pop_records()
        masses = [records[n][0] for n in self.layer_names]
        if len({m.shape for m in masses}) > 1:
            shapes = [tuple(m.shape) for m in masses]
            raise AttentionProbeError(f"layers recorded different shapes {shapes}")
        return torch.stack(masses, dim=1)

    # -- installation -------------------------------------------------------------------------

    def _uninstall(self) -> None:
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as err:  # keep restoring the rest
                errors.append(err)
        self._active.clear()
        self._installed = False
        if errors:
            raise errors[0]

    def _install_interface(self) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        name = f"sink_probe_{next(_probe_ids)}"
        AttentionInterface.register(name, self._interface_forward)
        # Unregistered names make transformers silently skip mask creation (padding, sliding).
        AttentionMaskInterface.register(name, sdpa_mask)
        self._undo.append(partial(compat.unregister_attention, name))
        configs = _configs(self.model)
        saved = [(c, compat.attention_implementation(c)) for c in configs]
        self._undo.append(partial(_restore_configs, saved))
        for config in configs:
            compat.use_attention_implementation(config, name)

    def _install_sdpa(self) -> None:
        """Record every SDPA call made inside a probed module, and only those.

        Remote code calls ``torch.nn.functional.scaled_dot_product_attention`` directly, so there is no
        per-model interface to plug into. A ``TorchFunctionMode`` (torch's public interception API; its mode
        stack is per thread) is pushed when a probed module starts and popped when it returns: SDPA calls of
        any other model or thread, and everything outside the probed modules, never see the probe.
        """
        for name, module in self._modules.items():
            self._undo.append(module.register_forward_pre_hook(partial(self._enter, name)).remove)
            self._undo.append(module.register_forward_hook(self._leave, always_call=True).remove)
        self._undo.append(self._leave_all)

    def _enter(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.route == "sdpa" and not self._active:
            self._mode = _SdpaRecorder(self)
            self._mode.__enter__()
        self._active.append(name)

    def _leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._active:
            self._active.pop()
        if not self._active and self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def _leave_all(self) -> None:
        while self._active:
            self._leave(None, (), None)

    # -- recording ----------------------------------------------------------------------------

    def _query_mask(self, query: torch.Tensor) -> torch.Tensor | None:
        if self.query_mask is None:
            return None
        if tuple(self.query_mask.shape) != (query.shape[0], query.shape[2]):
            raise AttentionProbeError(
                f"query_mask {tuple(self.query_mask.shape)} does not match batch/query "
                f"({query.shape[0]}, {query.shape[2]})"
            )
        return self.query_mask.to(device=query.device, dtype=torch.bool)

    def _record(self, name: str, query: torch.Tensor, key: torch.Tensor,
                mask: torch.Tensor | None, scaling: float | None, is_causal: bool) -> None:
        mass = attention_key_mass(
            query, key, mask, scaling=scaling, is_causal=is_causal,
            query_mask=self._query_mask(query), chunk_size=self.query_chunk_size,
        )
        self._records[name].append(mass)

    def _interface_forward(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
        softcap: float | None = None, is_causal: bool | None = None, **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        from transformers.integrations.sdpa_attention import (
            create_position_bias_mask,
            sdpa_attention_forward,
        )

        name = self._names_by_id.get(id(module))
        if name is None:
            raise AttentionProbeError(f"{type(module).__name__} is not among the probed modules")
        if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
            raise AttentionProbeError(f"{name} uses learned attention sinks (not modelled)")
        # Same causal decision as sdpa_attention_forward, so mass matches the output it produces.
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
        mask = attention_mask
        if kwargs.get("position_bias") is not None:
            mask = create_position_bias_mask(kwargs["position_bias"], mask, causal, query, key)
            causal = False
        if softcap is None:
            out, _ = sdpa_attention_forward(
                module, query, key, value, attention_mask,
                dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs,
            )
            self._record(name, query, key, mask, scaling, causal)
            return out, None
        # SDPA cannot soft-cap logits: produce the output the eager way from the same probabilities.
        mass, out = _attend(
            query, key, value, mask, scaling=scaling, is_causal=causal, softcap=softcap,
            query_mask=self._query_mask(query), chunk_size=self.query_chunk_size, dropout=dropout,
        )
        self._records[name].append(mass.detach())
        return out, None


class _SdpaRecorder(TorchFunctionMode):
    """Inside one probed module: run SDPA as called and record its attention mass for that module."""

    def __init__(self, probe: AttentionProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.scaled_dot_product_attention:
            call = _SDPA_SIGNATURE.bind(*args, **kwargs).arguments
            self.probe._record(self.probe._active[-1], call["query"], call["key"], call.get("attn_mask"),
                               call.get("scale"), bool(call.get("is_causal", False)))
        return out


def _sdpa_reference(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """SDPA's signature (the builtin has none that ``inspect`` can read)."""


_SDPA_SIGNATURE = inspect.signature(_sdpa_reference)


class _AllLayersMeasured(Exception):
    """Raised after the last probed layer to end a measuring forward early (never escapes the probe)."""


def _restore_configs(saved: list[tuple[Any, Any]]) -> None:
    for config, value in saved:
        compat.set_attention_implementation(config, value)
