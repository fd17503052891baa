"""A server that compiles its decode step says so before it starts compiling and says
how long it took: the first start is otherwise a silent minute or two."""

import re

from conftest import LiveServer


def test_the_server_says_it_compiles_the_decode_step_and_how_long_it_took(tiny_model_dir, tmp_path):
    server = LiveServer(tiny_model_dir, "--no-enforce-eager", startup_timeout=600, log_dir=tmp_path)
    try:
        log = server.log()
    finally:
        server.stop()
    before = log.index("lmserve: compiling the decode step (first start: 1-2 min on a small CPU; "
                       "later starts reuse the on-disk cache)...\n")
    after = re.search(r"^lmserve: decode step compiled in \d+\.\d s$", log, re.MULTILINE)
    assert after is not None, log
    assert log.index("Loading weights") < before < after.start()
