"""LLaDA's low-confidence remasking sampler for masked diffusion LMs.

The answer starts as ``answer_length`` mask tokens after the prompt and is decoded block by block, left to
right (semi-autoregressive when ``num_blocks > 1``). Each of a block's ``steps / num_blocks`` steps is one full
forward: every masked position of the current block gets a prediction (argmax, or Gumbel-max when
``temperature > 0``), and the most confident predictions (by the model's softmax probability of the chosen
token) are committed. Committed tokens are never re-masked. The number committed per step is the block's mask
count split evenly over its steps, the remainder going to the first steps, as in LLaDA's reference code.

The states the model sees (``record_steps``) are the denoising trajectory a sampler-based calibration needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["SampleResult", "masked_diffusion_sample", "transfer_schedule"]


@dataclass
class SampleResult:
    """``tokens``: prompt + answer ([P + A], or [B, P + A] for a batched prompt). ``steps``: with
    ``record_steps``, the input of every forward in order (``steps`` tensors shaped like ``tokens``; the first is
    prompt + all masks, the last still has the final step's positions masked), else None."""

    tokens: torch.Tensor
    steps: list[torch.Tensor] | None = None


def transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """How many positions each of ``steps`` steps commits so that ``num_masked`` are all committed."""
    base, remainder = divmod(num_masked, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


def _gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Argmax of ``logits / temperature + Gumbel noise`` (a sample at that temperature); plain argmax at 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-12)))
    return (logits.double() / temperature + gumbel).argmax(dim=-1)


@torch.no_grad()
def masked_diffusion_sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    *,
    answer_length: int,
    steps: int,
    num_blocks: int = 1,
    mask_token_id: int,
    temperature: float = 0.0,
    seed: int = 0,
    record_steps: bool = False,
    logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> SampleResult:
    """Generate ``answer_length`` tokens after ``prompt_ids`` with ``steps`` forwards in ``num_blocks`` blocks.

    ``answer_length`` and ``steps`` must both be divisible by ``num_blocks``. The mask token itself is never
    predicted (its logit is excluded), so the answer holds no masks; mask tokens in the prompt are left as they
    are. Deterministic for a given ``seed``. ``logits(model, x)`` gives the logits that predict each position of
    ``x`` (default: the model's own; a family whose logits lag by a position passes its ``Scoring.token_logits``).
    """
    if answer_length < 1 or steps < 1 or num_blocks < 1:
        raise ValueError("answer_length, steps and num_blocks must be positive")
    if answer_length % num_blocks or steps % num_blocks:
        raise ValueError(
            f"answer_length ({answer_length}) and steps ({steps}) must be divisible by num_blocks ({num_blocks})"
        )
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
    squeeze = prompt.dim() == 1
    if squeeze:
        prompt = prompt[None]
    if prompt.dim() != 2:
        raise ValueError(f"prompt_ids must be [P] or [B, P], got shape {tuple(prompt.shape)}")
    device = next(model.parameters()).device
    batch, prompt_length = prompt.shape
    x = torch.full((batch, prompt_length + answer_length), mask_token_id, dtype=torch.long, device=device)
    x[:, :prompt_length] = prompt.to(device)
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    block_length, steps_per_block = answer_length // num_blocks, steps // num_blocks
    recorded: list[torch.Tensor] | None = [] if record_steps else None
    was_training = model.training
    model.eval()
    try:
        for block in range(num_blocks):
            start = prompt_length + block * block_length
            stop = start + block_length
            remaining = (x[:, start:stop] == mask_token_id).sum(dim=1)
            counts = [transfer_schedule(int(n), steps_per_block) for n in remaining]
            for step in range(steps_per_block):
                if recorded is not None:
                    recorded.append(x.cpu().clone())
                masked = x == mask_token_id
                scores = model(input_ids=x, use_cache=False).logits if logits is None else logits(model, x)
                scores = scores.float()
                scores[..., mask_token_id] = -torch.inf
                prediction = _gumbel_argmax(scores, temperature, generator)
                confidence = torch.softmax(scores, dim=-1).gather(-1, prediction[..., None])[..., 0]
                eligible = torch.zeros_like(masked)
                eligible[:, start:stop] = masked[:, start:stop]  # later blocks wait; prompt masks stay
                confidence = torch.where(eligible, confidence, torch.full_like(confidence, -torch.inf))
                for row in range(batch):
                    k = counts[row][step]
                    if k:
                        chosen = torch.topk(confidence[row], k).indices
                        x[row, chosen] = prediction[row, chosen]
    finally:
        model.train(was_training)
    tokens = x.cpu()
    if squeeze:
        tokens = tokens[0]
        recorded = None if recorded is None else [s[0] for s in recorded]
    return SampleResult(tokens=tokens, steps=recorded)
