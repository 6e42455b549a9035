"""Every upstream internal that ``sink_modifier/compat.py`` relies on, checked against the installed versions.

Each test fails loudly when transformers or llm-compressor moves or changes the internal a workaround uses, so
an upgrade breaks here, named, and not silently in the middle of a pruning run.
"""

from __future__ import annotations

import inspect

import pytest
import torch


def test_attention_registries_are_dicts_we_can_clean_up():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from sink_modifier import compat

    AttentionInterface.register("sink_compat_probe", lambda *a, **k: None)
    AttentionMaskInterface.register("sink_compat_probe", sdpa_mask)
    compat.unregister_attention("sink_compat_probe")
    assert "sink_compat_probe" not in AttentionInterface._global_mapping
    assert "sink_compat_probe" not in AttentionMaskInterface._global_mapping


def test_config_attention_implementation_internals(dlm_path):
    from transformers import AutoConfig

    from sink_modifier import compat

    config = AutoConfig.from_pretrained(dlm_path)
    assert compat.has_attention_implementation(config)
    compat.use_attention_implementation(config, "eager")
    assert compat.attention_implementation(config) == "eager"
    assert "_attn_implementation_internal" in vars(config)  # what set_attention_implementation writes
    compat.set_attention_implementation(config, "sdpa")
    assert compat.attention_implementation(config) == "sdpa"


def test_llmcompressor_all_experts_flag_is_a_module_global():
    from llmcompressor.modeling.moe import context

    from sink_modifier import compat

    assert hasattr(context, "_CALIBRATE_ALL_EXPERTS")
    previous = context._CALIBRATE_ALL_EXPERTS
    context._CALIBRATE_ALL_EXPERTS = True
    try:
        with compat.routed_experts_only():
            assert context.get_calibrate_all_experts_flag() is False
        assert context.get_calibrate_all_experts_flag() is True
    finally:
        context._CALIBRATE_ALL_EXPERTS = previous


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_engine_private_statistics_exist_and_are_never_reduced_upstream(method):
    """The engine attributes compat reads and writes, and llm-compressor 0.14's lack of a cross-rank reduction
    of them (if it starts reducing, ours would reduce twice)."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    cls = WandaPruningModifier if method == "wanda" else SparseGPTModifier
    engine = cls(sparsity=0.5, targets=["Linear"])
    statistics = "_row_scalars" if method == "wanda" else "_hessians"
    for name in (statistics, "_num_samples", "_module_names", "_module_sparsities"):
        assert isinstance(getattr(engine, name), dict), name
    source = inspect.getsource(cls.compress_modules) + inspect.getsource(cls.calibrate_module)
    assert "all_reduce" not in source and "reduce_" not in source


def test_reduce_statistics_across_ranks_is_the_count_weighted_mean(monkeypatch):
    """Two simulated ranks: all_reduce sums over both ranks' contributions."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from sink_modifier import compat

    module = torch.nn.Linear(2, 1)
    engine = SimpleNamespace(_row_scalars={module: torch.tensor([1.0, 3.0])}, _num_samples={module: 2})
    other = {"weighted": torch.tensor([5.0, 5.0]) * 6, "count": torch.tensor(6.0)}

    def fake_all_reduce(tensor, op=None):
        tensor += other["weighted"] if tensor.numel() == 2 else other["count"]

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    compat.reduce_statistics_across_ranks(engine)
    assert torch.allclose(engine._row_scalars[module], torch.tensor([(2 * 1 + 6 * 5) / 8, (2 * 3 + 6 * 5) / 8]))
    assert engine._num_samples[module] == 8


def test_move_child_first_keeps_modules_and_changes_only_the_order():
    from sink_modifier import compat

    parent = torch.nn.Module()
    for name in ("encoder", "decoder", "head"):
        setattr(parent, name, torch.nn.Linear(2, 2))
    modules = dict(parent.named_children())
    compat.move_child_first(parent, "decoder")
    assert [name for name, _ in parent.named_children()] == ["decoder", "encoder", "head"]
    assert all(getattr(parent, name) is module for name, module in modules.items())


def test_same_draw_as_pipeline_replays_llmcompressors_shuffled_sampler():
    """llm-compressor 0.14 shuffles with a generator-less RandomSampler (seeded from torch's global RNG at each
    iteration); a copy read inside ``same_draw_as_pipeline`` draws exactly what the original draws after it."""
    import copy

    from datasets import Dataset
    from llmcompressor.args import DatasetArguments
    from llmcompressor.datasets.utils import _make_sampler
    from torch.utils.data import RandomSampler

    from sink_modifier import compat

    dataset = Dataset.from_dict({"input_ids": [[i] for i in range(50)]})
    sampler = _make_sampler(DatasetArguments(num_calibration_samples=8, shuffle_calibration_samples=True,
                                             batch_size=1), dataset)
    assert isinstance(sampler, RandomSampler) and sampler.generator is None  # what the replay relies on
    modifiers_copy = copy.deepcopy(sampler)
    with compat.same_draw_as_pipeline():
        measured = list(modifiers_copy)
        torch.rand(3)  # the trajectory's own draws must not shift the pipeline's
    assert list(sampler) == measured
    assert list(sampler) != measured  # each iteration draws anew: without the replay the rows would differ


def test_lm_eval_parser_internals_exist():
    """lm-eval 0.4.13: the parser ``HarnessCLI.parse_args`` wraps, and its subcommands (``run`` implied)."""
    from lm_eval._cli.harness import HarnessCLI

    cli = HarnessCLI()
    assert "run" in cli._subparsers.choices
    assert cli._parser.parse_args(["run", "--tasks", "x", "--model", "hf"]).tasks == ["x"]


UPSTREAM_INTERNALS = [
    r"\b_global_mapping\b", r"\._attn_implementation", r"_CALIBRATE_ALL_EXPERTS", r"tqdm\.__init__",
    r"(?<!self)\._modules\b", r"sgpt_base", r"wanda_sparsify", r"\._row_scalars", r"\._hessians\b",
    r"\._num_samples",
    r"\.save_pretrained = ",
]


def test_upstream_internals_are_touched_in_compat_only():
    import re

    pattern = re.compile("|".join(UPSTREAM_INTERNALS))
    offenders = [f"{path.name}:{number}: {line.strip()}"
                 for path in _package_modules() if path.name != "compat.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line) and not line.lstrip().startswith("#")]
    assert not offenders, "\n".join(offenders)


#: compat.py and its part that repairs remote code for transformers 5 (split off for length)
COMPAT_MODULES = ("compat.py", "remote_code.py")


def _package_modules():
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "sink_modifier"
    return sorted(p for p in package.rglob("*.py") if "bundled" not in p.parts)


def test_private_attributes_of_other_libraries_are_read_in_compat_only():
    """Every ``x._name`` outside compat.py names something this package defines itself.

    A private attribute the package never defines belongs to llm-compressor, transformers, compressed-tensors
    or torch (including one reached through ``self`` in a subclass of theirs): reading it elsewhere would break
    silently on their next release, so it must go through a function in compat.py.
    """
    import ast

    trees = {path: ast.parse(path.read_text()) for path in _package_modules()}
    ours = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                ours.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for leaf in ast.walk(target):
                        if isinstance(leaf, ast.Name):
                            ours.add(leaf.id)
                        elif isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) \
                                and leaf.value.id in ("self", "cls"):
                            ours.add(leaf.attr)
            elif isinstance(node, ast.alias):
                ours.add(node.asname or node.name.rpartition(".")[2])
    offenders = [
        f"{path.name}:{node.lineno}: .{node.attr}"
        for path, tree in trees.items() if path.name not in COMPAT_MODULES
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        and node.attr not in ours
    ] + [
        f"{path.name}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})"
        for path, tree in trees.items() if path.name not in COMPAT_MODULES
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1
        and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
        and node.args[1].value.startswith("_") and not node.args[1].value.startswith("__")
        and node.args[1].value not in ours
    ]
    assert not offenders, "\n".join(offenders)
