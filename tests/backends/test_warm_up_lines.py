"""The warm-up says what it is about to do (compile the decode step, capture graphs, or
only warm up) and how long it took, to a callback; without one it is silent."""

import re
from types import SimpleNamespace

from lmserve.backends.torch.compiled_step import CompiledDecodeStep
from lmserve.backends.torch.factory import EngineConfig, build_engine, warm_up_lines


def test_an_eager_engine_says_it_warms_up_and_how_long_it_took(tiny_model_dir, capfd):
    lines = []
    config = EngineConfig(device="cpu", dtype="float32", cache_max_entry_count=64, cache_block_seq_len=16,
                          enforce_eager=True)
    build_engine(tiny_model_dir, config, announce=lines.append)
    assert lines[0] == "warming up..."
    assert re.fullmatch(r"warmed up in \d+\.\d s", lines[1]) and len(lines) == 2
    build_engine(tiny_model_dir, config)  # no callback: nothing printed
    captured = capfd.readouterr()
    assert "warm" not in captured.out + captured.err


def test_the_lines_name_what_the_warm_up_compiles():
    compiled = SimpleNamespace(decode_graphs=None, decode_step=object())
    before, after = warm_up_lines(compiled)
    assert before.startswith("compiling the decode step (first start: ") and "on-disk cache" in before
    assert after.format(seconds=41.23) == "decode step compiled in 41.2 s"
    graphed = SimpleNamespace(decode_graphs=SimpleNamespace(step=CompiledDecodeStep.__new__(CompiledDecodeStep)),
                              decode_step=None)
    assert warm_up_lines(graphed)[0].startswith("compiling the decode step and capturing its CUDA graphs")
    eager_graphs = SimpleNamespace(decode_graphs=SimpleNamespace(step=object()), decode_step=None)
    assert warm_up_lines(eager_graphs) == ("capturing the decode steps' CUDA graphs...",
                                           "CUDA graphs captured in {seconds:.1f} s")
    eager = SimpleNamespace(decode_graphs=None, decode_step=None)
    assert warm_up_lines(eager) == ("warming up...", "warmed up in {seconds:.1f} s")
