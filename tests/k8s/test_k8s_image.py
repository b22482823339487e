"""The runtime image's Dockerfile: pinned base, numeric non-root user, no baked-in secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

IMAGE = Path(__file__).resolve().parents[2] / "k8s" / "image"
SECRETISH = re.compile(r"(KEY|TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL)", re.I)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = (IMAGE / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def build_args() -> dict[str, str]:
    return dict(
        rest.split("=", 1) for word, rest in instructions() if word == "ARG" and "=" in rest
    )


def test_base_image_is_pinned_ray_2_60():
    froms = [rest.split()[0] for word, rest in instructions() if word == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        # Resolve `FROM ${BASE_IMAGE}` through the ARG default.
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: build_args()[m.group(1)], image)
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{image}: no tag"
        assert tag != "latest", f"{image}: latest"
        assert name == "rayproject/ray" and tag.startswith("2.60.0-"), image


def test_final_user_is_numeric_and_not_root():
    users = [rest for word, rest in instructions() if word == "USER"]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}"
    # Matches runAsUser in the manifests, so mounted volumes and HOME line up.
    assert int(uid) == 1000


def test_no_secrets_in_env_or_arg():
    for word, rest in instructions():
        if word not in ("ENV", "ARG"):
            continue
        for name, value in re.findall(r"(\w+)\s*=\s*(\S*)", rest) or [(rest.split()[0], "")]:
            if SECRETISH.search(name):
                pytest.fail(f"{word} {name}: credentials must come from the pod's environment")
            assert not re.search(r"(AKIA[0-9A-Z]{16}|ghp_\w+|-----BEGIN)", value), f"{word} {name}"


def test_installs_from_the_repo_with_constraints_and_prebuilds_deepspeed():
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert "-c constraints.txt" in runs
    assert "DS_BUILD_CPU_ADAM=1" in runs
    copies = [rest for word, rest in instructions() if word == "COPY"]
    assert any("constraints.txt" in c for c in copies)


def test_build_context_excludes_everything_but_sources():
    lines = [
        line.strip()
        for line in (IMAGE / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "deny everything first, then admit the sources"
    assert {"!constraints.txt", "!pyproject.toml", "!stoker/"} <= set(lines)
