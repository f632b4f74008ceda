"""Static checks of Dockerfile.jetson (it cannot be built here: no Docker engine, no arm64)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.jetson"
PYPROJECT = ROOT / "runtime" / "pyproject.toml"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_packages() -> set[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in reqs}


def _pip_installs() -> list[list[str]]:
    """The arguments of every `pip install` in RUN instructions."""
    installs = []
    for word, args in _instructions():
        if word != "RUN":
            continue
        for command in args.split("&&"):
            tokens = shlex.split(command)
            if "pip" in tokens and "install" in tokens:
                installs.append(tokens[tokens.index("install") + 1:])
    return installs


def test_base_image_is_a_pinned_jetpack_6_tag():
    args = dict(a.split("=", 1) for w, a in _instructions() if w == "ARG" and "=" in a)
    image = args["L4T_IMAGE"]
    assert re.fullmatch(r"nvcr\.io/nvidia/l4t-jetpack:r36\.\d+\.\d+", image), image
    assert [a for w, a in _instructions() if w == "FROM"] == ["${L4T_IMAGE}"]
    assert args["JETSON_PIP_INDEX"].startswith("https://pypi.jetson-ai-lab.")
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["ORT_GPU_VERSION"])


def test_copied_paths_exist():
    copies = [shlex.split(a)[:-1] for w, a in _instructions() if w == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"


def test_installed_packages_are_the_runtimes_declared_ones():
    declared = _runtime_packages()
    names, local = set(), []
    for args in _pip_installs():
        skip_next = False
        for token in args:
            if skip_next:
                skip_next = False
                continue
            if token in ("--index-url", "--extra-index-url", "-i"):
                skip_next = True
            elif token.startswith("-"):
                continue
            elif token.startswith("/"):
                local.append(token)
            else:
                names.add(_norm(re.match(r"[A-Za-z0-9._-]+", token).group(0)))
    assert names, "no pip install found"
    assert names <= declared, f"installs packages tledge-runtime does not declare: {sorted(names - declared)}"
    assert {"onnxruntime-gpu", "numpy", "pillow"} <= names
    assert "onnxruntime" not in names and "torch" not in names
    # The local install is the runtime distribution, copied from runtime/.
    copied = {shlex.split(a)[-1].rstrip("/") for w, a in _instructions() if w == "COPY"}
    assert local == ["/opt/tledge/runtime"] and "/opt/tledge/runtime" in copied
    assert tomllib.loads(PYPROJECT.read_text())["project"]["name"] == "tledge-runtime"


def test_entry_points_exist():
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    module, _, func = scripts["tledge-runtime"].partition(":")
    assert callable(getattr(importlib.import_module(module), func))
    health = " ".join(a for w, a in _instructions() if w == "HEALTHCHECK")
    assert "CMD tledge-runtime" in health
    cmd = " ".join(a for w, a in _instructions() if w == "CMD")
    script = re.search(r"/opt/tledge/examples/(\S+\.py)", cmd).group(1)
    assert (ROOT / "runtime" / "examples" / script).is_file()


def test_runs_as_a_non_root_user():
    users = [a for w, a in _instructions() if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(w == "RUN" and "useradd" in a and users[-1] in a for w, a in _instructions())


@pytest.mark.parametrize("instruction", ["HEALTHCHECK", "CMD", "USER"])
def test_required_instructions_present_once(instruction):
    assert [w for w, _ in _instructions()].count(instruction) == 1


def test_serve_example_is_secure_and_the_serve_extra_is_installed():
    text = DOCKERFILE.read_text()
    commands = re.sub(r"\\\n#?\s*", " ", text)  # join continued lines, commented or not
    serving = [line for line in commands.splitlines() if "tledge-runtime serve" in line]
    assert serving, "the Dockerfile shows how to serve"
    for line in serving:
        if "--host 0.0.0.0" in line:  # off loopback: a token (or an explicit --insecure) on the same command
            assert "-e TLEDGE_TOKEN" in line or "--token" in line or "--insecure" in line, line
    serve_extra = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["serve"]
    installed = {_norm(re.match(r"[A-Za-z0-9._-]+", t).group(0)) for args in _pip_installs() for t in args
                 if re.match(r"[A-Za-z0-9]", t) and "://" not in t}
    assert {_norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in serve_extra} <= installed
