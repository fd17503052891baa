"""The torch engine's settings are written once: EngineConfig's defaults are the flags'
defaults, and EngineConfig.from_options reads the parsed flags."""

import argparse
import dataclasses
import subprocess
import sys

import pytest

from lmserve.backends.torch import factory, plugin
from lmserve.backends.torch.engine_config import EngineConfig
from lmserve.core.config import SERVE_API_SERVER, ServeConfig


def parsed_options(*args: str) -> dict:
    parser = argparse.ArgumentParser()
    plugin.lmserve_add_cli_options(command=SERVE_API_SERVER, parser=parser)
    return vars(parser.parse_args(list(args)))


def test_the_flags_defaults_are_engine_configs():
    options = parsed_options()
    assert EngineConfig.from_options(ServeConfig(model="m", options=options)) == EngineConfig()
    from_serve_config = ("device", "dtype", "session_len", "model_families")
    names = [field.name for field in dataclasses.fields(EngineConfig) if field.name not in from_serve_config]
    flags = {name: options["tp" if name == "tensor_parallel_size" else name] for name in names}
    assert flags == {name: getattr(EngineConfig, name) for name in names}


def test_from_options_reads_every_flag_and_the_serve_config():
    options = parsed_options("--tp", "3", "--cache-max-entry-count", "16", "--enable-prefix-caching",
                             "--quantization", "int8", "--no-enforce-eager", "--master-port", "29500")
    config = ServeConfig(model="m", device="cpu", dtype="bfloat16", session_len=512, options=options)
    families = [object()]
    engine = EngineConfig.from_options(config, families)
    assert (engine.device, engine.dtype, engine.session_len) == ("cpu", "bfloat16", 512)
    assert engine.tensor_parallel_size == 3 and engine.cache_max_entry_count == 16
    assert engine.enable_prefix_caching and engine.quantization == "int8" and not engine.enforce_eager
    assert engine.master_port == 29500 and engine.model_families == tuple(families)


def test_absent_or_none_options_take_the_defaults():
    config = ServeConfig(model="m", options={"max_batch_size": None, "unrelated": 7})
    assert EngineConfig.from_options(config) == EngineConfig()


def test_from_options_validates_with_the_flags_names():
    with pytest.raises(ValueError, match="--tp must be at least 1"):
        EngineConfig.from_options(ServeConfig(model="m", options={"tp": 0}))
    with pytest.raises(ValueError, match="--quantization must be one of"):
        EngineConfig.from_options(ServeConfig(model="m", options={"quantization": "int3"}))


def test_the_factory_re_exports_it():
    assert factory.EngineConfig is EngineConfig


def test_the_config_and_the_plugins_options_import_no_torch():
    code = ("import sys\nimport lmserve.backends.torch.engine_config, lmserve.backends.torch.plugin\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
