"""The model's sampling defaults: which values are taken, what the startup line says, and
how ``--generation-config`` chooses where they come from."""

from __future__ import annotations

import json

import pytest

from lmserve.core import hookimpl
from lmserve.core.config import ServeConfig
from lmserve.core.model_source import ModelSource
from lmserve.core.plugins import create_plugin_manager
from lmserve.core.sampling_defaults import SamplingDefaults, resolve_sampling_defaults


def test_values_a_request_could_send_are_taken_and_the_others_skipped_with_a_warning():
    warnings = []
    defaults = SamplingDefaults.from_file(
        {"temperature": -1, "top_p": 0.95, "top_k": 20, "min_p": 2.0, "repetition_penalty": True,
         "max_tokens": 0, "do_sample": True, "length_penalty": 3.0, "seed": None},
        "the file", warn=warnings.append)
    assert dict(defaults.values) == {"top_p": 0.95, "top_k": 20}
    # One warning per bad value, naming the file and the field; fields outside the list are not ours to judge.
    assert len(warnings) == 4 and all(w.startswith("the file: ") for w in warnings)
    assert any("temperature" in w for w in warnings) and any("max_new_tokens" in w for w in warnings)
    assert any("min_p" in w for w in warnings) and any("repetition_penalty" in w for w in warnings)


def test_a_top_k_written_as_a_float_or_a_nan_temperature_is_skipped():
    defaults = SamplingDefaults.from_file({"top_k": 20.5, "temperature": float("nan"), "top_p": 0.5}, "f",
                                          warn=lambda _: None)
    assert dict(defaults.values) == {"top_p": 0.5}


def test_the_constructor_refuses_what_a_plugin_should_not_hand_over():
    with pytest.raises(ValueError, match="temperature"):
        SamplingDefaults({"temperature": 5.0}, "x")
    with pytest.raises(ValueError, match="do_sample"):
        SamplingDefaults({"do_sample": False}, "x")


def test_the_startup_line_lists_the_values_in_a_fixed_order_or_says_none():
    defaults = SamplingDefaults({"top_k": 20, "temperature": 0.6, "top_p": 0.95}, "the model's generation_config.json")
    assert defaults.describe() == ("sampling defaults from the model's generation_config.json: "
                                   "temperature=0.6, top_p=0.95, top_k=20")
    assert SamplingDefaults(origin="--generation-config none").describe() == (
        "sampling defaults: none from --generation-config none; requests get this server's own")


class _Recorder:
    """A plugin that answers the hook and remembers what it was asked."""

    def __init__(self):
        self.calls = []

    @hookimpl(tryfirst=True)
    def lmserve_sampling_defaults(self, source, directory, config):
        self.calls.append(directory)
        return SamplingDefaults({"temperature": 0.5}, "the recorder")


@pytest.fixture
def recorder():
    pm = create_plugin_manager(load_entry_points=False)
    plugin = _Recorder()
    pm.register(plugin)
    return pm, plugin


def _config(generation_config=None) -> ServeConfig:
    options = {} if generation_config is None else {"generation_config": str(generation_config)}
    return ServeConfig(model="m", options=options)


@pytest.mark.parametrize("choice", ["none", "vllm", "lmdeploy"])
def test_none_vllm_and_lmdeploy_ask_no_plugin(recorder, tmp_path, choice):
    pm, plugin = recorder
    defaults = resolve_sampling_defaults(pm, _config(choice), ModelSource("m", tmp_path, "hf", "test"))
    assert dict(defaults.values) == {} and plugin.calls == []
    assert f"--generation-config {choice}" in defaults.describe()


def test_auto_and_an_absent_option_ask_the_plugins_for_the_models_own(recorder, tmp_path):
    pm, plugin = recorder
    source = ModelSource("m", tmp_path, "hf", "test")
    for config in (_config("auto"), _config()):  # a ServeConfig built by hand may lack the key
        assert dict(resolve_sampling_defaults(pm, config, source).values) == {"temperature": 0.5}
    assert plugin.calls == [None, None]


def test_a_folder_is_checked_before_any_plugin_is_asked(recorder, tmp_path):
    pm, plugin = recorder
    source = ModelSource("m", tmp_path, "hf", "test")
    with pytest.raises(ValueError, match="is not a folder"):
        resolve_sampling_defaults(pm, _config(tmp_path / "missing"), source)
    with pytest.raises(ValueError, match="has no generation_config.json"):
        resolve_sampling_defaults(pm, _config(tmp_path), source)
    assert plugin.calls == []
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7}))
    resolve_sampling_defaults(pm, _config(tmp_path), source)
    assert plugin.calls == [tmp_path]


def test_a_model_without_defaults_gets_none(tmp_path):
    pm = create_plugin_manager(load_entry_points=False)
    defaults = resolve_sampling_defaults(pm, _config("auto"), ModelSource("m", tmp_path, "hf", "test"))
    assert dict(defaults.values) == {}
    assert defaults.describe().startswith("sampling defaults: none from the model")
