"""A GGUF file's header is parsed once per process, and anew when the file changes."""

from __future__ import annotations

import os

import gguf
from lmserve.backends.torch.gguf_file import gguf_reader

from tests.tiny_models import write_tiny_gguf_model


def write_gguf(path, name: str) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_one_reader_per_file_until_the_file_changes(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, "first")
    reader = gguf_reader(path)
    assert reader.fields["general.name"].contents() == "first"
    assert gguf_reader(str(path)) is reader and gguf_reader(tmp_path / "." / "model.gguf") is reader
    write_gguf(path, "second, longer")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert gguf_reader(path).fields["general.name"].contents() == "second, longer"


def test_the_tokenizer_and_the_weights_share_one_parse(tmp_path, monkeypatch):
    from lmserve.backends.torch.factory import EngineConfig, build_engine
    from lmserve.plugins.tokenizer_files import tokenizer_from_gguf

    tokens = ["<s>", "</s>", *"abcdefghij", *(f"t{i}" for i in range(116))]
    path = write_tiny_gguf_model(tmp_path / "tiny.gguf", tokens=tokens, merges=[], bos_token_id=0,
                                 eos_token_id=1)
    parses = []
    original = gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__",
                        lambda self, *args, **kwargs: parses.append(args) or original(self, *args, **kwargs))
    tokenizer_from_gguf(path)
    build_engine(path, EngineConfig(device="cpu", dtype="float32", cache_max_entry_count=8, enforce_eager=True))
    assert len(parses) == 1
