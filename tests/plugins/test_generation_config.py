"""The built-in reader of a model's sampling defaults: an HF generation_config.json, a GGUF
file's general.sampling metadata, and the folder --generation-config DIR names."""

from __future__ import annotations

import json
import logging

import gguf
import pytest

from lmserve.core.model_source import ModelSource
from lmserve.plugins.generation_config import lmserve_sampling_defaults

QWEN3 = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
         "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}


def _hf(directory, content) -> ModelSource:
    directory.mkdir(exist_ok=True)
    (directory / "generation_config.json").write_text(json.dumps(content) if not isinstance(content, str)
                                                      else content)
    return ModelSource("m", directory, "hf", "test")


def test_qwen3s_file_gives_its_three_values(tmp_path):
    defaults = lmserve_sampling_defaults(source=_hf(tmp_path, QWEN3), directory=None)
    assert dict(defaults.values) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert defaults.describe() == ("sampling defaults from the model's generation_config.json: "
                                   "temperature=0.6, top_p=0.95, top_k=20")


def test_max_new_tokens_min_p_and_repetition_penalty_are_read_and_max_length_is_not(tmp_path):
    defaults = lmserve_sampling_defaults(source=_hf(tmp_path, {
        "max_new_tokens": 256, "max_length": 20, "min_p": 0.05, "repetition_penalty": 1.1}), directory=None)
    assert dict(defaults.values) == {"max_tokens": 256, "min_p": 0.05, "repetition_penalty": 1.1}


def test_an_invalid_value_is_skipped_with_a_warning_and_the_rest_kept(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        defaults = lmserve_sampling_defaults(source=_hf(tmp_path, {**QWEN3, "temperature": -1}), directory=None)
    assert dict(defaults.values) == {"top_p": 0.95, "top_k": 20}
    assert "temperature must be in [0, 2], got -1" in caplog.text


def test_do_sample_false_is_not_read_but_said(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        defaults = lmserve_sampling_defaults(source=_hf(tmp_path, {"do_sample": False, "temperature": 0.7}),
                                             directory=None)
    assert dict(defaults.values) == {"temperature": 0.7}
    assert "do_sample false" in caplog.text and "temperature 0" in caplog.text


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_broken_file_gives_no_defaults_and_a_warning_not_a_crash(tmp_path, caplog, content):
    with caplog.at_level(logging.WARNING):
        defaults = lmserve_sampling_defaults(source=_hf(tmp_path, content), directory=None)
    assert dict(defaults.values) == {} and "no sampling defaults from it" in caplog.text


def test_a_model_without_the_file_has_none(tmp_path):
    assert lmserve_sampling_defaults(source=ModelSource("m", tmp_path, "hf", "test"), directory=None) is None


def test_the_named_folder_is_read_instead_of_the_models(tmp_path):
    source = _hf(tmp_path / "model", QWEN3)
    other = tmp_path / "other"
    _hf(other, {"temperature": 0.3})
    defaults = lmserve_sampling_defaults(source=source, directory=other)
    assert dict(defaults.values) == {"temperature": 0.3}
    assert str(other / "generation_config.json") in defaults.describe()


def _gguf(path, add) -> ModelSource:
    writer = gguf.GGUFWriter(str(path), "llama")
    add(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ModelSource("m", path, "gguf", "test")


def test_a_gguf_files_sampling_metadata_is_read_as_the_decimals_it_was_written_from(tmp_path):
    def add(writer):
        writer.add_sampling_temp(0.6)  # float32: 0.6000000238...
        writer.add_sampling_top_p(0.95)
        writer.add_sampling_top_k(20)
        writer.add_sampling_min_p(0.05)
        writer.add_sampling_penalty_repeat(1.1)
        writer.add_sampling_mirostat(2)  # llama.cpp's own sampler: not lmserve's to read

    defaults = lmserve_sampling_defaults(source=_gguf(tmp_path / "m.gguf", add), directory=None)
    assert dict(defaults.values) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05,
                                     "repetition_penalty": 1.1}
    assert "GGUF" in defaults.origin


def test_a_gguf_file_without_sampling_metadata_has_none(tmp_path):
    source = _gguf(tmp_path / "m.gguf", lambda writer: writer.add_name("plain"))
    assert lmserve_sampling_defaults(source=source, directory=None) is None
