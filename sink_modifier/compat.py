"""Repairs for published remote-code DLMs under the transformers versions llm-compressor 0.14 pins (5.15-5.17).

Each function works around one documented behaviour; ``sink_modifier.loading.checkpoints.load_model`` applies them
when it loads a checkpoint, and the modifier applies :func:`make_saveable` again at initialize for models loaded
some other way.

* LLaDA's (and MMaDA's, which subclasses it) ``LLaDAModelLM.__init__`` never calls ``post_init()``.
  transformers 5 sets ``all_tied_weights_keys`` (and more) there, and ``from_pretrained`` reads it, so even an
  untouched checkpoint fails with ``AttributeError: 'LLaDAModelLM' object has no attribute
  'all_tied_weights_keys'``. :func:`calls_post_init` completes the construction while the class is loaded.
* Dream (Qwen2 of transformers 4.46) computes ``rotary_emb.inv_freq`` in ``__init__`` as a non-persistent
  buffer. transformers 5 builds models on the meta device, then re-creates non-persistent buffers with
  ``torch.empty_like`` and relies on ``_init_weights`` to fill them; Dream's own ``_init_weights`` does not,
  so the frequencies are uninitialised memory. :func:`restore_non_persistent_buffers` recomputes every such
  buffer by running the class's own ``__init__`` with parameters on the meta device (no weight memory).
* LLaDA and Dream declare ``_tied_weights_keys`` as a list (transformers 4.x); transformers 5 calls ``.keys()``
  on it while saving, so ``save_pretrained`` fails after calibration and pruning are done
  (:func:`make_saveable`).
* Some copies of LLaDA's code pass ``config.init_device`` (``"cuda"``) to every parameter; on a machine
  without CUDA the model cannot even be built (:func:`cpu_init_device`).
* transformers 5 (5.0 through 5.17 at least) calls base-class hooks with keywords that 4.x overrides do not
  take: ``PreTrainedModel.init_weights`` calls ``tie_weights(recompute_mapping=False)`` (LLaDA's published
  ``def tie_weights(self)``), ``GenerationConfig.__init__`` calls ``validate(user_set_attributes=...)`` (Dream's
  Hub ``DreamGenerationConfig.validate(self, is_init=False)``). ``remote_code.repair_remote_code`` adapts any such
  override in the checkpoint's own modules to ignore the keywords it predates (``loading.remote_code``).
* transformers 5.17's ``GenerationConfig.from_model_config`` fails for subclasses with fields of their own
  (Dream's ``DreamGenerationConfig``, used by its ``diffusion_generate``); the remote subclass gets a version
  without the failing comparison (``remote_code.repair_remote_code``).
* transformers 5 removed the ``"default"`` entry of ``modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (each model
  computes default RoPE itself now); Dream's and LLaDA-MoE's code (transformers 4.46) look it up:
  ``KeyError: 'default'``. ``remote_code.repair_remote_code`` gives the remote module its own copy of the
  table with 4.46's default computation added; the library's table is left alone.
* transformers 5 pops generation keys (``use_cache``, ...) from the keywords a 4.x config class passes to
  ``PreTrainedConfig.__init__``; LLaDA's forward reads ``config.use_cache``
  (``remote_code.restore_generation_keys``).

The repairs of the last four points live in ``sink_modifier.loading.remote_code`` (this module's length).
The remote-code repairs edit only the classes and modules transformers loaded from the checkpoint (they belong
to that checkpoint), never a library's globals, and they are idempotent.

The other workarounds of upstream internals, each where no public API serves:

* llm-compressor 0.14 (the engines' statistics, the all-experts flag, the layer types): see each function.
* llm-compressor 0.14's shuffled calibration sampler gives no way to know which dataset row a batch is:
  :func:`same_draw_as_pipeline` replays its draw from torch's global RNG (snapshotted and restored), and the
  modifier matches rows by their token ids.
* lm-eval 0.4.13's command line reads only ``sys.argv``: :func:`run_lm_eval_command_line` hands its parser an
  explicit list instead of swapping ``sys.argv``.
* transformers 5.17 has no weight conversion for ``diffusion_gemma`` checkpoints with per-expert keys: the
  family registers one (:func:`load_only_weight_converter`), where a DiffusionGemma is loaded or prepared, never
  at import.

Nothing here replaces another library's function or class attribute for the whole process: the attention probe
uses a scoped ``TorchFunctionMode``, and the command line's progress bars use tqdm's ``TQDM_DISABLE`` and the
libraries' public switches (``cli/console.py``), not an edit of tqdm's class.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

# The base class of llm-compressor 0.14's pruning modifiers and the layer types they prune live in a deep module
# that has moved between releases; the package imports them from here only (re-exported).
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import (  # noqa: F401
    PRUNABLE_LAYER_TYPES,
    SparsityModifierBase,
)

# Wanda's statistics and mask selection (structured importance accumulates its column moments; the diagnostic
# reruns its selection with and without sink weights), likewise a deep module.
from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import (  # noqa: F401
    accumulate_row_scalars,
    make_empty_row_scalars,
    sparsify_weight,
)
from loguru import logger


def _actually_tied(module: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """The listed parameters that really share storage with another parameter, mapped to that parameter.

    Only those may be declared tied: saving drops declared tied weights from the checkpoint, so declaring an
    untied LM head (LLaDA unties by default) would silently lose it.
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    owners: dict[int, str] = {}
    for name, param in params.items():
        owners.setdefault(param.data_ptr(), name)
    tied = {}
    for name in names:
        param = params.get(name)
        if param is not None and owners[param.data_ptr()] != name:
            tied[name] = owners[param.data_ptr()]
    return tied


def make_saveable(model: torch.nn.Module) -> None:
    """Turn list-style ``_tied_weights_keys`` into the mapping transformers 5 saves with."""
    for name, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None)
        if isinstance(keys, list | tuple):
            mapping = _actually_tied(module, list(keys))
            module._tied_weights_keys = mapping  # instance attribute: the class is left alone
            logger.warning(
                f"{type(module).__name__}{' (' + name + ')' if name else ''} declares _tied_weights_keys as a "
                f"list, which transformers 5 cannot save; using {mapping or '{}'} (the weights that really "
                "share storage) so the checkpoint can be written"
            )


@contextlib.contextmanager
def calls_post_init(cls: type) -> Iterator[None]:
    """While active, instances of ``cls`` whose ``__init__`` skipped ``post_init()`` get it called.

    The class is restored on exit, so nothing outlives the load; models that call ``post_init`` themselves
    are untouched (the check is whether it ran).
    """
    own = cls.__dict__.get("__init__")
    original = cls.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # only once construction is complete: not inside a subclass's own __init__ that calls this one
        if type(self).__init__ is init and not hasattr(self, "all_tied_weights_keys"):
            logger.info(f"{cls.__name__}.__init__ does not call post_init() (transformers 4.x remote code); "
                        "calling it so transformers 5 can load the model")
            self.post_init()

    cls.__init__ = init
    try:
        yield
    finally:
        if own is None:
            del cls.__init__
        else:
            cls.__init__ = own


def cpu_init_device(config) -> None:
    """Build on the CPU a model whose config asks for CUDA parameters when there is no CUDA device."""
    device = getattr(config, "init_device", None)
    if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
        logger.info(f"config.init_device is {device!r} and this machine has no CUDA device; building on the CPU "
                    "(from_pretrained places the loaded weights)")
        config.init_device = "cpu"


def _non_persistent_buffers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str]]:
    for module_name, module in model.named_modules():
        for buffer_name in module._non_persistent_buffers_set:
            if getattr(module, buffer_name, None) is not None:
                yield f"{module_name}.{buffer_name}".lstrip("."), module, buffer_name


@torch.no_grad()
def restore_non_persistent_buffers(model: torch.nn.Module, config) -> list[str]:
    """Recompute the non-persistent buffers of a loaded remote-code model from its own ``__init__``.

    A skeleton of the same class is built with parameters on the meta device (accelerate's
    ``init_empty_weights(include_buffers=False)``), so its buffers are computed for real exactly as the
    published code computes them, at no weight memory. Buffers that differ from the loaded model's are copied
    over; their names are returned.
    """
    from accelerate import init_empty_weights

    buffers = list(_non_persistent_buffers(model))
    if not buffers:
        return []
    cls = type(model)
    with init_empty_weights(include_buffers=False), calls_post_init(cls):
        skeleton = cls(config)
    reference = {name: getattr(module, attr) for name, module, attr in _non_persistent_buffers(skeleton)}
    repaired = []
    for name, module, attr in buffers:
        expected = reference.get(name)
        current = getattr(module, attr)
        if expected is None or expected.is_meta or expected.shape != current.shape:
            continue
        expected = expected.to(device=current.device, dtype=current.dtype)
        if not torch.equal(current, expected):
            current.copy_(expected)
            repaired.append(name)
    if repaired:
        logger.info(f"Recomputed {len(repaired)} non-persistent buffer(s) that transformers left uninitialised "
                    f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in repaired}))})")
    return repaired


#: Helpers transformers 5 removed from ``transformers.utils.import_utils`` that published 4.x remote code imports
#: at module level (LLaDA2.0's ``modeling_llada2_moe.py``: ``ImportError: cannot import name
#: 'is_torch_fx_available'``), with what 4.x returned for every torch llm-compressor 0.14 supports (True).
_REMOVED_IMPORT_HELPERS = {"is_torch_fx_available": lambda: True}


@contextlib.contextmanager
def removed_import_helpers() -> Iterator[None]:
    """While a checkpoint's remote code is imported, ``transformers.utils.import_utils`` offers the helpers
    transformers 5 removed; the imported module keeps its own reference, and the names go again on exit."""
    from transformers.utils import import_utils

    added = [name for name in _REMOVED_IMPORT_HELPERS if not hasattr(import_utils, name)]
    for name in added:
        setattr(import_utils, name, _REMOVED_IMPORT_HELPERS[name])
    try:
        yield
    finally:
        for name in added:
            delattr(import_utils, name)


# ---- transformers: attention implementations (5.15-5.17) ---------------------------------------------


def unregister_attention(name: str) -> None:
    """Remove an attention function and its mask function registered under ``name``.

    transformers 5.17's ``AttentionInterface`` / ``AttentionMaskInterface`` offer ``register`` but no way to
    unregister; their ``_global_mapping`` dict holds the registrations.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def has_attention_implementation(config) -> bool:
    """Whether ``config`` selects an attention implementation (transformers 5: the ``_attn_implementation``
    property of ``PretrainedConfig``; there is no public getter on configs)."""
    return hasattr(config, "_attn_implementation")


def attention_implementation(config) -> str | None:
    return getattr(config, "_attn_implementation", None)


def use_attention_implementation(config, value: str | None) -> None:
    """Select ``value`` on ``config`` and, through the property's setter, on its sub-configs."""
    config._attn_implementation = value


def set_attention_implementation(config, value: str | None) -> None:
    """Set one config's implementation without the recursive setter: in transformers 5.17 the property setter
    also rewrites every sub-config, so parent/child restore order could clobber a sub-config; the stored
    value is ``_attn_implementation_internal`` when the config has it."""
    if "_attn_implementation_internal" in vars(config):
        config._attn_implementation_internal = value
    else:
        config._attn_implementation = value


# ---- llm-compressor 0.14.0.1 ------------------------------------------------------------------------------


@contextlib.contextmanager
def routed_experts_only() -> Iterator[None]:
    """Turn off llm-compressor's all-experts calibration flag, which oneshot sets for the whole run.

    llm-compressor 0.14 keeps the flag in the module global ``llmcompressor.modeling.moe.context.
    _CALIBRATE_ALL_EXPERTS`` and offers only a getter. It matters only for statistics (every expert sees every
    token: about E / top-k times the expert compute); the trajectory phase needs none.
    """
    from llmcompressor.modeling.moe import context

    previous, context._CALIBRATE_ALL_EXPERTS = context._CALIBRATE_ALL_EXPERTS, False
    try:
        yield
    finally:
        context._CALIBRATE_ALL_EXPERTS = previous


def reduce_statistics_across_ranks(engine) -> None:
    """Combine every rank's Wanda row statistics or SparseGPT Hessians into the all-data mean.

    llm-compressor 0.14 splits calibration data across ranks but its Wanda and SparseGPT modifiers never reduce
    their statistics (``_row_scalars`` / ``_hessians``, running means over ``_num_samples``), so each rank would
    prune from its own shard. The global mean is ``sum_r n_r mean_r / sum_r n_r``; every rank then selects the
    same mask from the same statistics. ``tests/test_compat.py`` fails if llm-compressor starts reducing itself.
    """
    import torch.distributed as dist

    stats = engine._row_scalars if hasattr(engine, "_row_scalars") else engine._hessians
    for module in list(engine._num_samples):
        count = torch.tensor(float(engine._num_samples[module]), device=stats[module].device)
        total = count.clone()
        weighted = stats[module] * count
        dist.all_reduce(weighted, op=dist.ReduceOp.SUM)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        stats[module] = weighted / total
        engine._num_samples[module] = int(total.item())



def replace_save_pretrained(model: torch.nn.Module, save_pretrained) -> None:
    """Install ``save_pretrained`` on this model instance only.

    ``oneshot`` saves through the model's own ``save_pretrained`` (llm-compressor 0.14 wraps it the same way)
    and tells modifiers nothing about the output directory, so the instance method is the one hook that sees it.
    """
    model.save_pretrained = save_pretrained


def move_child_first(module: torch.nn.Module, name: str) -> None:
    """Make ``name`` the first registered child of ``module`` (children are named in registration order),
    with torch's public ``delattr`` / ``setattr`` only."""
    children = list(module.named_children())
    if not children or children[0][0] == name:
        return
    for child_name, _ in children:
        delattr(module, child_name)
    for child_name, child in sorted(children, key=lambda item: item[0] != name):
        setattr(module, child_name, child)


@contextlib.contextmanager
def same_draw_as_pipeline() -> Iterator[None]:
    """Read a copy of the pipeline's dataloader so that it yields the rows the pipeline will calibrate on.

    llm-compressor 0.14 hands modifiers a deep copy of the pipeline's dataloader and, with
    ``shuffle_calibration_samples`` (the default), samples it with a ``RandomSampler`` built without a generator
    (``datasets.utils._make_sampler``), which seeds itself from torch's global RNG each time it is iterated; its
    pipelines iterate right after ``calibration_start``, where the modifier's pre-pass runs. No public API says
    which dataset row a batch is (batches carry no index, and the sampler takes no seed), so the pre-pass
    replays the draw: it snapshots torch's global RNG and restores it afterwards, and the modifier finds each
    batch's rows again by their token ids (``calibration.scales.SampleScales``), checking after the first layer
    that the rows calibrated on are exactly the rows measured (``SampleScales.verify``), so an upstream change
    fails loudly rather than weighting the wrong rows. The ``diffusion`` pipeline needs none of this: it builds
    its own dataloader in a fixed order.
    """
    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def run_lm_eval_command_line(argv: list[str]) -> None:
    """lm-eval's own command line (``lm-eval`` / ``python -m lm_eval``) on the explicit argument list ``argv``.

    lm-eval 0.4.13 offers no entry that takes arguments: ``lm_eval.__main__.cli_evaluate()`` has no parameter and
    ``HarnessCLI.parse_args()`` reads (and edits) ``sys.argv``. The parser it wraps, the private
    ``HarnessCLI._parser``, is the one place that parses a given list, so it is used here, with ``parse_args``'s
    one rewrite (arguments without a subcommand mean ``run``) repeated, instead of swapping ``sys.argv``.
    """
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    cli = HarnessCLI()
    argv = list(argv)
    if len(argv) > 1 and argv[0] not in cli._subparsers.choices:
        argv.insert(0, "run")
    elif argv == ["run"]:
        cli._subparsers.choices["run"].print_help()
        raise SystemExit(0)
    cli.execute(cli._parser.parse_args(argv))


def name_or_path(config) -> str | None:
    """Where a config was loaded from (transformers 5.17 keeps it in the private ``_name_or_path``)."""
    return getattr(config, "_name_or_path", None) or None


def load_only_weight_converter(name: str) -> type:
    """A transformers ``WeightConverter`` whose reverse (applied when saving) is the identity.

    transformers 5.17 reverses every load conversion in ``save_pretrained``; a converter that only repairs
    checkpoints on load must save the model's native layout. The reverse keeps the original target patterns
    (the private ``_original_target_patterns``) as both source and target.
    """
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    def reverse_transform(self):
        targets = list(self._original_target_patterns)
        identity = WeightRenaming(source_patterns=targets, target_patterns=targets)
        identity.scope_prefix, identity.base_model_prefix = self.scope_prefix, self.base_model_prefix
        return identity

    return type(name, (WeightConverter,), {"reverse_transform": reverse_transform, "__module__": __name__})
