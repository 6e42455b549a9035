"""``sink_modifier.loading.remote_code``: the load-time repairs of 4.x remote code, on a module built here (so
they are tested where the published code is absent too; ``test_published_loading.py`` runs them on the real
code)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import transformers.modeling_rope_utils as rope
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from sink_modifier.loading import remote_code


@pytest.fixture
def remote_module():
    """A module laid out like a checkpoint's remote code package member (``transformers_modules.<hash>.x``)."""
    name = "transformers_modules.sink_test_0.modeling_fake"
    module = types.ModuleType(name)
    source = '''
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

class FakeModel(PreTrainedModel):
    def tie_weights(self):
        self.tied = True
        return "tied"

    def set_output_embeddings(self, value):
        self.head = value

class FakeGenerationConfig(GenerationConfig):
    def __init__(self, **kwargs):
        self.eps = kwargs.pop("eps", 1e-3)
        super().__init__(**kwargs)

    def validate(self, is_init=False):
        return is_init
'''
    exec(compile(source, name, "exec"), module.__dict__)
    sys.modules[name] = module
    try:
        yield module
    finally:
        del sys.modules[name]


def test_overrides_that_predate_transformers_5_accept_and_ignore_the_new_keywords(remote_module):
    cls = remote_module.FakeModel
    original_set = cls.__dict__["set_output_embeddings"]
    remote_code.repair_remote_code(cls)
    model = object.__new__(cls)
    assert cls.tie_weights(model, missing_keys=None, recompute_mapping=False) == "tied" and model.tied
    assert cls.__dict__["set_output_embeddings"] is original_set  # a renamed required parameter is left alone
    assert remote_module.FakeGenerationConfig.validate(object(), user_set_attributes=set(), strict=True) is False
    remote_code.repair_remote_code(cls)  # idempotent: no second wrapper
    assert getattr(cls.tie_weights, "__wrapped__", None) is not None
    assert not hasattr(cls.tie_weights.__wrapped__, "__wrapped__")
    with pytest.raises(TypeError):  # a keyword no version of transformers passes is still an error
        cls.tie_weights(model, unknown=1)


def test_the_default_rope_is_added_to_the_remote_module_only(remote_module):
    # transformers 5.17 has no "default" entry, but another library imported earlier in the process may have
    # registered one (how the bug hid in the first place): the repair must leave that table as it found it.
    global_table = dict(rope.ROPE_INIT_FUNCTIONS)
    remote_code.repair_remote_code(remote_module.FakeModel)
    assert "default" in remote_module.ROPE_INIT_FUNCTIONS and rope.ROPE_INIT_FUNCTIONS == global_table
    config = PretrainedConfig(hidden_size=64, num_attention_heads=4)
    config.rope_theta = 10000.0
    inv_freq, scaling = remote_module.ROPE_INIT_FUNCTIONS["default"](config, "cpu")
    expected = torch.tensor([1.0 / 10000.0 ** (i / 16) for i in range(0, 16, 2)])
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)
    assert scaling == 1.0
    kwargs_form, _ = remote_module.ROPE_INIT_FUNCTIONS["default"](None, "cpu", base=10000.0, dim=16)
    assert torch.equal(kwargs_form, inv_freq)


def test_a_generation_config_subclass_with_its_own_fields_builds_from_a_model_config(remote_module):
    remote_code.repair_remote_code(remote_module.FakeModel)
    config = PretrainedConfig(bos_token_id=3, eos_token_id=4)
    built = remote_module.FakeGenerationConfig.from_model_config(config)
    assert isinstance(built, remote_module.FakeGenerationConfig)
    assert built.eps == 1e-3 and built.bos_token_id == 3 and built.eos_token_id == 4
    assert "from_model_config" not in vars(GenerationConfig) or \
        GenerationConfig.from_model_config.__func__ is not remote_code._generation_config_from_model_config


def test_generation_keys_dropped_by_transformers_5_are_restored():
    class OldConfig(PretrainedConfig):
        def __init__(self, use_cache: bool = False, **kwargs):
            super().__init__(use_cache=use_cache, **kwargs)

    config = OldConfig()
    assert not hasattr(config, "use_cache")  # transformers 5 pops it: the behaviour repaired
    assert remote_code.restore_generation_keys(config, {}) == ["use_cache"] and config.use_cache is False
    config = OldConfig()
    remote_code.restore_generation_keys(config, {"use_cache": True})
    assert config.use_cache is True
    assert remote_code.restore_generation_keys(config, {}) == []


def test_library_classes_are_never_touched():
    before = dict(vars(PreTrainedModel))
    remote_code.repair_remote_code(transformers_class := PreTrainedModel)
    assert dict(vars(transformers_class)) == before
