"""Train the bundled reference models: a small masked diffusion LM and its autoregressive twin.

Nothing can be downloaded here and random weights have neither sinks nor quality to lose, so the project trains
its own pair on the permissive corpus of ``benchmarks/corpus.py``:

* a byte-level BPE tokenizer (4096 tokens, trained on the train split) with ``[MASK]``, adding ``[BOS]``;
* (a) ``dlm``: Gemma-3 with ``use_bidirectional_attention`` and a mask token, trained with the masked-diffusion
  objective (``t ~ U(0, 1)`` stratified over the batch, each token masked with probability
  ``(1 - 1e-3) t + 1e-3``, cross-entropy on masked tokens weighted by ``1 / p_mask``, LLaDA's pre-training loss);
* (b) ``ar``: the same config with causal attention and the next-token loss, on the same windows in the same
  order;
* (c) with ``--arch llama``, the masked DLM in LLaDA's own block layout instead of Gemma-3's: transformers' native
  ``EuroBertForMaskedLM`` (a Llama block with bidirectional attention: pre-norm RMSNorm only, no QK-norm, no
  post-sublayer norms, SwiGLU, RoPE), same width, depth, heads, tokenizer, windows, objective and schedule
  (docs/reference-models.md, "A LLaDA-style DLM"). It has no causal twin.

Every training window is ``[BOS]`` + 127 tokens of the packed stream (documents separated by ``[EOS]``); the run
sees each window at most once (about 4M of the 10M training tokens), keeps the weights with the best validation
loss, and writes bf16 checkpoints. Seeded; one CPU thread.

    python benchmarks/train_reference.py                 # corpus, tokenizer, both models (~50 min on 1 core)
    python benchmarks/train_reference.py --ship          # ... and copy the result into sink_modifier/bundled
    python benchmarks/train_reference.py --smoke         # 2-minute check of the whole pipeline
    python benchmarks/train_reference.py --ship-only     # ship what an earlier run left in --out
    python benchmarks/train_reference.py --analyse sink_modifier/bundled   # sink statistics + samples only
    python benchmarks/train_reference.py --arch llama    # the LLaDA-style DLM -> {out}/dlm-llama (~25 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    EuroBertConfig,
    EuroBertForMaskedLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402  (benchmarks/ is not a package)

from sink_modifier import (
    bundled,  # noqa: E402
    families,  # noqa: E402
)
from sink_modifier.calibration.probe import AttentionProbe  # noqa: E402
from sink_modifier.calibration.trajectory import TrajectorySettings, run_trajectory  # noqa: E402
from sink_modifier.evaluation.perplexity import ar_perplexity, elbo_perplexity  # noqa: E402
from sink_modifier.families.sampling import masked_diffusion_sample  # noqa: E402

WORK = corpus.CACHE / "reference"
BUNDLED = bundled.BUNDLED_DIR
assert corpus.DOC_SEPARATOR == bundled.DOC_SEPARATOR  # corpus.py checks no document contains it

SPECIAL_TOKENS = ["[PAD]", "[EOS]", "[BOS]", "[UNK]", "[MASK]"]
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = range(len(SPECIAL_TOKENS))
VOCAB_SIZE = 4096
SEQ_LEN = 128  # BOS + 127 text tokens
MAX_POSITIONS = 512  # the config's limit; the models were trained on SEQ_LEN windows
ARCH = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64)
MASK_EPS = 1e-3  # LLaDA: p_mask = (1 - eps) t + eps
ROPE_THETA = 1_000_000.0  # Gemma-3's default for full-attention layers; the llama arch uses the same
ARCHS = ("gemma3", "llama")  # the block layout: Gemma-3's (the shipped pair) or LLaDA's (Llama, bidirectional)


# --------------------------------------------------------------------------- tokenizer and data


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE (lossless on any text) whose encodings start with [BOS], as the models were trained."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A [EOS] $B", special_tokens=[("[BOS]", BOS_ID), ("[EOS]", EOS_ID)]
    )
    if [backend.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise AssertionError("special tokens must keep ids 0..4")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]",
        mask_token="[MASK]", model_max_length=MAX_POSITIONS,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> np.ndarray:
    """All documents' tokens, each document followed by [EOS] (uint16)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    parts = [np.array(e.ids + [EOS_ID], dtype=np.uint16) for e in encodings]
    return np.concatenate(parts)


def windows(stream: np.ndarray, length: int = SEQ_LEN) -> torch.Tensor:
    """Non-overlapping windows of ``length - 1`` stream tokens, each prefixed with [BOS]: [N, length]."""
    body = length - 1
    count = len(stream) // body
    rows = torch.from_numpy(stream[: count * body].astype(np.int64)).view(count, body)
    return torch.cat([torch.full((count, 1), BOS_ID, dtype=torch.long), rows], dim=1)


def prepare_data(args) -> dict:
    """Corpus -> tokenizer -> token windows, cached under ``benchmarks/.cache/reference``."""
    corpus_dir = corpus.DEFAULT_OUT
    if not (corpus_dir / "manifest.json").exists():
        corpus.build(corpus_dir, corpus.CACHE / "packages")
    tok_dir = WORK / "tokenizer"
    splits = {s: [d["text"] for d in corpus.read_split(s, corpus_dir)] for s in corpus.SPLITS}
    if not (tok_dir / "tokenizer.json").exists():
        start = time.time()
        tokenizer = train_tokenizer(splits["train"])
        tokenizer.save_pretrained(tok_dir)
        print(f"tokenizer: {len(tokenizer)} tokens, trained in {time.time() - start:.0f}s")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    data = {"tokenizer": tokenizer, "texts": splits}
    for split, texts in splits.items():
        cache = WORK / f"tokens_{split}.npy"
        if not cache.exists():
            np.save(cache, token_stream(tokenizer, texts))
        stream = np.load(cache)
        data[split] = windows(stream)
        chars = sum(len(t) for t in texts)
        print(f"{split}: {len(stream) / 1e6:.2f}M tokens ({chars / len(stream):.2f} characters/token), "
              f"{len(data[split])} windows")
    return data


# --------------------------------------------------------------------------- models and objectives


def reference_config(kind: str) -> Gemma3TextConfig:
    """Gemma-3 text config shared by both twins; only the attention direction and the mask token differ."""
    config = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE, **ARCH, query_pre_attn_scalar=ARCH["head_dim"],
        max_position_embeddings=MAX_POSITIONS, sliding_window=MAX_POSITIONS,
        layer_types=["full_attention"] * ARCH["num_hidden_layers"],
        use_bidirectional_attention=kind == "dlm", pad_token_id=PAD_ID, eos_token_id=EOS_ID,
        bos_token_id=BOS_ID, tie_word_embeddings=True, attention_dropout=0.0,
    )
    if kind == "dlm":
        config.mask_token_id = MASK_ID
    return config


def llama_dlm_config() -> EuroBertConfig:
    """LLaDA's block layout with the Gemma-3 DLM's sizes: transformers' EuroBERT, a Llama decoder without the
    causal mask (pre-norm RMSNorm, SwiGLU, RoPE, no QK-norm, no post-sublayer norms, no biases, no embedding
    scaling). Only the block differs from ``reference_config("dlm")``: width, depth, heads, vocabulary, tied
    embeddings, RoPE theta and special tokens are the same."""
    return EuroBertConfig(
        vocab_size=VOCAB_SIZE, **ARCH, hidden_act="silu", max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, rms_norm_eps=1e-5,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID, mask_token_id=MASK_ID,
        tie_word_embeddings=True, attention_dropout=0.0, attention_bias=False, mlp_bias=False,
    )


def build_model(kind: str, arch: str) -> torch.nn.Module:
    if arch == "gemma3":
        return Gemma3ForCausalLM(reference_config(kind))
    if kind != "dlm":
        raise SystemExit(f"--arch {arch} has only a masked DLM (EuroBERT is bidirectional); use --models dlm")
    return EuroBertForMaskedLM(llama_dlm_config())


def out_name(kind: str, arch: str) -> str:
    """Folder of a trained model under --out: ``dlm``/``ar`` for Gemma-3, ``dlm-llama`` for the LLaDA layout."""
    return kind if arch == "gemma3" else f"{kind}-{arch}"


def load_reference(path: Path, dtype=torch.float32) -> torch.nn.Module:
    """A saved reference model as a user loads it: causal-LM class where transformers has one, else masked LM."""
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModelForMaskedLM
    return auto.from_pretrained(path, dtype=dtype)


def dlm_loss(model: Gemma3ForCausalLM, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Masked-diffusion loss per token: sum over masked of CE / p_mask, divided by the scored token count.

    ``t`` is stratified over the batch (a shifted lattice, as MDLM's low-discrepancy sampler); [BOS] is never
    masked nor scored. Only masked positions go through the LM head.
    """
    batch, length = x.shape
    shift = torch.rand((), generator=generator)
    t = (shift + torch.arange(batch) / batch) % 1.0
    p_mask = ((1 - MASK_EPS) * t + MASK_EPS)[:, None].expand(batch, length)
    masked = torch.rand(x.shape, generator=generator) < p_mask
    masked[:, 0] = False
    noisy = torch.where(masked, torch.full_like(x, MASK_ID), x)
    hidden = model.model(input_ids=noisy, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden[masked]).float()
    ce = F.cross_entropy(logits, x[masked], reduction="none")
    return (ce / p_mask[masked]).sum() / (batch * (length - 1))


def ar_loss(model: Gemma3ForCausalLM, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def validate(model, kind: str, val: torch.Tensor, num_mc_samples: int, batch_size: int = 32) -> float:
    """Per-token validation NLL: the ELBO for the DLM (fixed seed: identical masks every time), exact for AR."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if kind == "dlm":
            result = elbo_perplexity(model, val, mask_token_id=MASK_ID, num_mc_samples=num_mc_samples, seed=0,
                                     max_length=SEQ_LEN, batch_size=batch_size)
        else:
            result = ar_perplexity(model, val, max_length=SEQ_LEN, batch_size=batch_size)
    return result.nll_per_token


def train(kind: str, data: dict, args) -> tuple[Gemma3ForCausalLM, dict]:
    """Train one twin; returns the best-validation model (float32) and its training log."""
    torch.manual_seed(args.seed)
    model = build_model(kind, args.arch)
    model.config._attn_implementation = "sdpa"
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order = np.random.default_rng(args.seed).permutation(len(data["train"]))
    needed = args.steps * args.batch_size
    if needed > len(order):
        raise SystemExit(f"{args.steps} steps x {args.batch_size} need {needed} windows, the corpus has "
                         f"{len(order)}: a second epoch would overfit")
    val_rows = np.random.default_rng(args.seed + 1).permutation(len(data["validation"]))[: args.val_windows]
    val = data["validation"][torch.from_numpy(np.sort(val_rows))]
    generator = torch.Generator().manual_seed(args.seed)
    objective = dlm_loss if kind == "dlm" else ar_loss
    log = {"kind": kind, "arch": args.arch, "architecture": type(model).__name__, "parameters": params,
           "curve": []}
    best = (math.inf, -1, None)
    start = time.time()
    recent: list[float] = []
    print(f"[{kind}] {params / 1e6:.2f}M parameters, {args.steps} steps x {args.batch_size} x {SEQ_LEN} tokens")
    for step in range(args.steps):
        model.train()
        x = data["train"][torch.from_numpy(order[step * args.batch_size : (step + 1) * args.batch_size])]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = objective(model, x, generator)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss.item())
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last:
            val_loss = validate(model, kind, val, args.val_mc_samples)
            if val_loss < best[0]:
                best = (val_loss, step + 1, copy.deepcopy(model.state_dict()))
            elapsed = time.time() - start
            point = {"step": step + 1, "tokens": (step + 1) * args.batch_size * SEQ_LEN,
                     "train_loss": sum(recent) / len(recent), "val_loss": val_loss,
                     "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "elapsed_s": elapsed}
            log["curve"].append(point)
            recent = []
            print(f"[{kind}] step {step + 1:5d}  train {point['train_loss']:.3f}  val {val_loss:.3f}  "
                  f"lr {point['lr']:.2e}  |g| {point['grad_norm']:.2f}  {elapsed / 60:5.1f} min  "
                  f"{point['tokens'] / elapsed:.0f} tok/s", flush=True)
    log.update(train_seconds=time.time() - start, best_val_loss=best[0], best_step=best[1],
               final_train_loss=log["curve"][-1]["train_loss"], steps=args.steps, batch_size=args.batch_size,
               seq_len=SEQ_LEN, lr=args.lr, seed=args.seed, threads=torch.get_num_threads())
    model.load_state_dict(best[2])
    return model, log


# --------------------------------------------------------------------------- evaluation and sinks


def save_bf16(model: Gemma3ForCausalLM, tokenizer, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    model = copy.deepcopy(model).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def final_metrics(path: Path, kind: str, data: dict, mc_samples: int) -> dict:
    """Validation and test NLL of the saved (bf16) checkpoint, loaded as a user would (float32)."""
    model = load_reference(path)
    metrics = {}
    for split in ("validation", "test"):
        if kind == "dlm":
            result = elbo_perplexity(model, data[split], mask_token_id=MASK_ID, num_mc_samples=mc_samples,
                                     seed=0, max_length=SEQ_LEN, batch_size=32)
        else:
            result = ar_perplexity(model, data[split], max_length=SEQ_LEN, batch_size=32)
        metrics[split] = result.to_dict()
        print(f"[{kind}] {split}: NLL {result.nll_per_token:.4f} +- {result.stderr:.4f} nats/token, "
              f"perplexity {result.perplexity:.2f} over {result.num_tokens} tokens")
    return metrics


@torch.no_grad()
def sink_statistics(model, tokenizer, samples: torch.Tensor) -> dict:
    """Sink statistics with the package's trajectory phase, plus per-layer attention shares.

    ``attention_share[state]["bos"][l]`` is the fraction of all attention probability (every head and query)
    that lands on position 0 in layer ``l``, and ``["top_other"][l]`` the largest share any other single position
    of the same window gets (averaged over windows). With no sink every position would get about 1/T
    (bidirectional) or H_T/T for position 0 (causal: early keys are seen by more queries).
    """
    model.eval()
    family = families.resolve(model)
    settings = TrajectorySettings()
    result = run_trajectory(model, family, list(samples), settings, progress=False)
    report = result.report(settings, family.name)
    sink_tokens: dict[str, int] = {}
    bos_is_sink = 0
    for sample in result.samples:
        sinks = sample.summary.sinks[0]
        bos_is_sink += 0 in sinks
        for position in sinks:
            token = tokenizer.convert_ids_to_tokens(int(sample.tokens[position]))
            sink_tokens[token] = sink_tokens.get(token, 0) + 1
    length = samples.shape[1]
    states = {"clean": samples}
    if family.name == "masked":
        generator = torch.Generator().manual_seed(0)
        half = torch.rand(samples.shape, generator=generator) < 0.5
        half[:, 0] = False
        states["half_masked"] = torch.where(half, torch.full_like(samples, MASK_ID), samples)
    shares = {}
    with AttentionProbe(model) as probe:
        for name, x in states.items():
            model.model(input_ids=x, use_cache=False)
            mass = probe.pop_masses()  # [B, L, T]
            share = mass / mass.sum(dim=-1, keepdim=True)
            shares[name] = {"bos": share[:, :, 0].mean(0).tolist(),
                            "top_other": share[:, :, 1:].max(dim=-1).values.mean(0).tolist()}
    uniform = 1 / length if family.name == "masked" else sum(1 / (q + 1) for q in range(length)) / length
    aggregate = report["aggregate"]
    return {
        "family": family.name,
        "num_samples": len(result.samples),
        "sample_length": length,
        "attention_share": shares,
        "bos_share_without_sink": uniform,
        "samples_with_bos_sink": bos_is_sink / len(result.samples),
        "sink_tokens": dict(sorted(sink_tokens.items(), key=lambda kv: -kv[1])[:10]),
        **{name: aggregate[name]["mean"][0] for name in (
            "num_sinks", "num_unstable_sinks", "mean_num_sinks", "spatial_variance",
            "centroid_temporal_variance", "dominant_sink_variance")},
    }


def print_sinks(kind: str, stats: dict) -> None:
    print(f"[{kind}] sinks over {stats['num_samples']} windows ({stats['family']} trajectory): "
          f"{stats['num_sinks']:.2f} sinks/sample, {stats['num_unstable_sinks']:.2f} unstable, "
          f"BOS a sink in {100 * stats['samples_with_bos_sink']:.0f}% of samples; "
          f"sink tokens {stats['sink_tokens']}")
    for state, shares in stats["attention_share"].items():
        for name, values in shares.items():
            print(f"[{kind}]   {state:>11} {name:>9} share per layer: " + " ".join(f"{v:.3f}" for v in values)
                  + f"   (no sink: {stats['bos_share_without_sink']:.3f})")


@torch.no_grad()
def generation_samples(path: Path, kind: str, tokenizer, prompts: list[str]) -> list[str]:
    model = load_reference(path).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor(tokenizer(prompt)["input_ids"])
        if kind == "dlm":
            tokens = masked_diffusion_sample(model, ids, answer_length=32, steps=32, num_blocks=2,
                                             mask_token_id=MASK_ID).tokens
        else:
            tokens = model.generate(ids[None], max_new_tokens=32, do_sample=False)[0]
        text = tokenizer.decode(tokens[ids.numel():])
        outputs.append(text)
        print(f"[{kind}] {prompt!r} -> {text!r}")
    return outputs


PROMPTS = ["And God said unto Moses,", "The SELECT statement", "To create a list in Python,"]


def write_eval_slice(test_docs: list[dict], path: Path, budget: int = 48_000, per_doc: int = 1_500) -> None:
    """A fixed slice of the test split for offline checks: the start of test documents, round-robin over
    sources (each cut at a line break), separated by ``corpus.DOC_SEPARATOR`` lines."""
    by_source: dict[str, list[dict]] = {}
    for doc in sorted(test_docs, key=lambda d: (d["source"], d["id"])):
        by_source.setdefault(doc["source"], []).append(doc)
    pieces, total, index = [], 0, 0
    while total < budget and any(index < len(v) for v in by_source.values()):
        for source in sorted(by_source):
            if index >= len(by_source[source]):
                continue
            text = by_source[source][index]["text"]
            if len(text) > per_doc:
                text = text[: text.rfind("\n", 0, per_doc)] if "\n" in text[:per_doc] else text[:per_doc]
            if total + len(text) > budget:
                continue
            pieces.append(text.strip())
            total += len(text)
        index += 1
    path.write_text(f"\n{bundled.DOC_SEPARATOR}\n".join(pieces) + "\n", encoding="utf-8")
    print(f"eval slice: {len(pieces)} documents, {path.stat().st_size / 1e3:.1f} KB -> {path}")


def ship(out: Path, kinds: list[str], arch: str = "gemma3") -> None:
    """Copy trained checkpoints (with their training.json) and a fresh eval slice into the package."""
    for kind in kinds:
        name = out_name(kind, arch)
        shutil.rmtree(BUNDLED / name, ignore_errors=True)
        shutil.copytree(out / name, BUNDLED / name)
        print(f"[{kind}] shipped {out / name} -> {BUNDLED / name}")
    write_eval_slice(corpus.read_split("test"), BUNDLED / "eval_slice.txt")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["dlm", "ar"], default=None,
                        help="default: dlm ar (gemma3), dlm (llama)")
    parser.add_argument("--arch", choices=ARCHS, default="gemma3",
                        help="block layout: gemma3 (the shipped pair) or llama (LLaDA's: EuroBERT, DLM only)")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--val-windows", type=int, default=128)
    parser.add_argument("--val-mc-samples", type=int, default=2)
    parser.add_argument("--final-mc-samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=WORK / "models")
    parser.add_argument("--ship", action="store_true", help="copy checkpoints and eval slice into the package")
    parser.add_argument("--ship-only", action="store_true", help="ship the models already in --out, no training")
    parser.add_argument("--smoke", action="store_true", help="a 2-minute run of the whole pipeline")
    parser.add_argument("--analyse", type=Path, help="only sink statistics and samples of {dir}/dlm, {dir}/ar")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = ["dlm", "ar"] if args.arch == "gemma3" else ["dlm"]
    if args.smoke:
        args.steps, args.eval_every, args.val_windows, args.final_mc_samples = 20, 10, 16, 1
        args.out = WORK / "smoke"
    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args)
    tokenizer = data["tokenizer"]
    sink_rows = np.random.default_rng(args.seed + 2).permutation(len(data["test"]))[:16]
    sink_samples = data["test"][torch.from_numpy(np.sort(sink_rows))]
    if args.ship_only:
        ship(args.out, args.models, args.arch)
        return
    if args.analyse:  # refreshes the "sinks" and "samples" entries of each training.json
        for kind in args.models:
            folder = args.analyse / out_name(kind, args.arch)
            model = load_reference(folder)
            stats = sink_statistics(model, tokenizer, sink_samples)
            print_sinks(kind, stats)
            samples = generation_samples(folder, kind, tokenizer, PROMPTS)
            log_path = folder / "training.json"
            if log_path.exists():
                log = json.loads(log_path.read_text())
                log.update(sinks=stats, samples=dict(zip(PROMPTS, samples, strict=True)))
                log_path.write_text(json.dumps(log, indent=2) + "\n")
        return
    summary = {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
               "corpus": json.loads((corpus.DEFAULT_OUT / "manifest.json").read_text())["sha256"]}
    for kind in args.models:
        model, log = train(kind, data, args)
        out = args.out / out_name(kind, args.arch)
        save_bf16(model, tokenizer, out)
        started = time.time()
        log["final"] = final_metrics(out, kind, data, args.final_mc_samples)
        log["final_eval_seconds"] = time.time() - started
        loaded = load_reference(out)
        log["sinks"] = sink_statistics(loaded, tokenizer, sink_samples)
        print_sinks(kind, log["sinks"])
        log["samples"] = dict(zip(PROMPTS, generation_samples(out, kind, tokenizer, PROMPTS), strict=True))
        log.update(summary)
        (out / "training.json").write_text(json.dumps(log, indent=2) + "\n")
        print(f"[{kind}] {log['train_seconds'] / 60:.1f} min, best val {log['best_val_loss']:.4f} at step "
              f"{log['best_step']}, final train {log['final_train_loss']:.4f} -> {out}")
        del model, loaded
    if args.ship:
        ship(args.out, args.models, args.arch)
    if not args.ship and (BUNDLED / "dlm" / "training.json").exists():
        for kind in args.models:
            name = out_name(kind, args.arch)
            if not (BUNDLED / name / "training.json").exists():
                name = kind  # nothing of this arch shipped: compare with the shipped Gemma-3 model
            shipped = json.loads((BUNDLED / name / "training.json").read_text())["final"]["validation"]
            fresh = json.loads((args.out / out_name(kind, args.arch) / "training.json").read_text())["final"][
                "validation"]
            print(f"[{kind}] validation NLL: this run {fresh['nll_per_token']:.4f}, shipped "
                  f"{shipped['nll_per_token']:.4f} (stderr {shipped['stderr']:.4f})")


if __name__ == "__main__":
    main()
