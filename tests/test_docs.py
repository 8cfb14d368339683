"""What README.md, docs/ and the packaging files claim, checked against the code: commands that parse,
versions that agree, a license that is the one declared, every environment variable documented."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the source tree of these tests


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8", errors="replace") as f:
        return f.read()


@pytest.fixture(scope="module")
def pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _version():
    return re.search(r'__version__ = "([^"]+)"', _read("lepton_core", "_version.py")).group(1)


# ---------------------------------------------------------------------------------------------------
# Packaging: license, URLs, classifiers, extras, changelog
# ---------------------------------------------------------------------------------------------------
def test_license_file_is_the_declared_apache_2_0(pyproject):
    text = _read("LICENSE")
    assert pyproject["license"] == {"text": "Apache-2.0"}
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    for section in range(1, 10):  # all nine sections, not a summary
        assert re.search(rf"^   {section}\. \w", text, re.M), section
    assert "License :: OSI Approved :: Apache Software License" in pyproject["classifiers"]


def test_project_urls_and_classifiers(pyproject):
    urls = pyproject["urls"]
    assert urls["Homepage"] == urls["Source"] == "https://github.com/lepton-core/lepton_core"
    assert urls["Issues"] == "https://github.com/lepton-core/lepton_core/issues"
    lowest = pyproject["requires-python"].removeprefix(">=")
    versions = [c.rsplit(" :: ", 1)[1] for c in pyproject["classifiers"]
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert versions and min(versions, key=lambda v: tuple(map(int, v.split(".")))) == lowest


def test_train_and_test_extras_bring_torch(pyproject):
    extras = pyproject["optional-dependencies"]
    torch_req = extras["torch"]
    assert [r for r in torch_req if r.startswith("torch")]
    for name in ("train", "test"):
        reqs = extras[name]
        assert "lepton_core[torch]" in reqs or any(r in reqs for r in torch_req), name


def test_changelog_names_the_current_version():
    text = _read("CHANGELOG.md")
    assert re.search(rf"^## {re.escape(_version())} \(\d{{4}}-\d\d-\d\d\)$", text, re.M)
    assert text.index("## Unreleased") < text.index(f"## {_version()}")


def test_cmake_asks_for_the_python_pyproject_requires(pyproject):
    lowest = pyproject["requires-python"].removeprefix(">=")
    assert re.search(r"^find_package\(Python (\S+) REQUIRED", _read("CMakeLists.txt"), re.M).group(1) == lowest


# ---------------------------------------------------------------------------------------------------
# docs/environment.md: every environment variable the package reads
# ---------------------------------------------------------------------------------------------------
_NAME = r"([A-Z][A-Z0-9_]*)"
_ENV_READS = [re.compile(p.format(n=_NAME)) for p in (
    r'os\.environ\.get\(\s*"{n}"',      # Python
    r'os\.environ\[\s*"{n}"\s*\]',
    r'"{n}"\s+in\s+os\.environ',
    r'getenv\(\s*"{n}"',                # Python os.getenv, C/C++ std::getenv
    r'_env_int\(\s*"{n}"',              # the trainer's helper
    r'\$ENV\{{{n}\}}',                  # CMake
    r'\benv\s*=\s*"{n}"',               # pyproject.toml: cmake.define from the environment
    r'\$\{{{n}:-',                      # shell: ${NAME:-default}
)]


def _source_files():
    for top in ("lepton_core", "csrc", "tools"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if name.endswith((".py", ".cc", ".h", ".cu", ".cuh", ".sh", ".txt")):
                    yield os.path.join(dirpath, name)
    yield os.path.join(ROOT, "CMakeLists.txt")
    yield os.path.join(ROOT, "pyproject.toml")


def _documented_names():
    names = set()
    for line in _read("docs", "environment.md").splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", line.split(" | ", 1)[0]))
    return names


def test_every_environment_variable_read_is_documented():
    read, lepton_names = set(), set()
    for path in _source_files():
        text = _read(path)
        for pattern in _ENV_READS:
            read.update(pattern.findall(text))
        lepton_names.update(re.findall(r"\bLEPTON_[A-Z0-9_]+\b", text))  # CMake options included
    # the grep itself must keep finding the variables we know are read
    assert {"LEPTON_CPU_ISA", "LEPTON_HOST_POOL_MB", "LEPTON_TRANSPORT", "LEPTON_HOST_ID", "LEPTON_CUDA",
            "OMP_NUM_THREADS"} <= read
    assert {"LEPTON_MAX_ISA", "LEPTON_CUDA_ARCHS"} <= lepton_names
    documented = _documented_names()
    assert not (read | lepton_names) - documented, "read but not in docs/environment.md"


def test_environment_page_lists_no_stale_lepton_variable():
    sources = "\n".join(_read(p) for p in _source_files())
    tests = "\n".join(_read(dirpath, n) for dirpath, _, names in os.walk(os.path.join(ROOT, "tests"))
                      for n in names if n.endswith(".py"))
    for name in _documented_names():
        if name.startswith("LEPTON_"):
            assert name in sources or (name.startswith("LEPTON_TEST_") and name in tests), name


def test_readme_links_the_environment_page():
    assert "(docs/environment.md)" in _read("README.md")


# ---------------------------------------------------------------------------------------------------
# README.md: the set-up commands, versions, build facts, every command line it shows
# ---------------------------------------------------------------------------------------------------
def _section(title):
    text = _read("README.md")
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _code_blocks(text, lang="bash"):
    return [b.strip("\n") for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S)]


def test_set_up_is_two_commands_and_ci_runs_the_readme_test_command():
    blocks = _code_blocks(_section("Set-up (two commands on a fresh machine)"))
    assert len(blocks) == 2 and all("\n" not in b for b in blocks), blocks
    ci = re.search(r"^TEST_CMD='(.*)'$", _read(".ci", "run"), re.M).group(1)
    assert blocks[1] == ci == ('python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 ".[test]" && '
                               '.venv/bin/pytest -q')


def test_readme_python_and_torch_versions(pyproject):
    text = _read("README.md")
    lowest = pyproject["requires-python"].removeprefix(">=")
    assert set(re.findall(r"Python >= (\d+\.\d+)", text)) == {lowest}
    pins = set(re.findall(r"torch==(\S+?)[\s`\"]", text))
    assert len(pins) == 1, pins  # one torch version everywhere (set-up, tests, CPU-only hint, developing)


def test_readme_says_how_long_the_build_takes_and_how_to_skip_cuda_wheels():
    setup = _section("Set-up (two commands on a fresh machine)")
    assert re.search(r"first install takes about [\d.]+ minutes", setup)
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup


def test_readme_and_build_tell_about_openmp():
    text = _read("README.md")
    assert "OpenMP" in text and "one thread" in text and "`lepton info` says `OpenMP on` or `off`" in text
    assert re.search(r'message\(WARNING "OpenMP not found: .*one thread', _read("CMakeLists.txt"))


def test_developing_command_installs_what_the_dev_build_runs():
    [install, *_] = _code_blocks(_section("Developing"))[0].splitlines()
    packages = install.split("pip install", 1)[1].split()
    script = _read("tools", "dev_build.sh")
    for tool, package in (("cmake ", "cmake"), ("ninja ", "ninja"), ("-m pybind11", "pybind11")):
        assert tool in script and package in packages, package


def test_amx_level_is_automatic_as_the_readme_says():
    """README: the amx level is the automatic choice where the CPU has AMX, and its kernels also run on
    the tile model; the code: no cap below amx, the AMX table and its model build exist."""
    text = " ".join(_read("README.md").split())
    assert "The `amx` level is the automatic choice on a CPU with AMX" in text
    assert "software model of the tile instructions" in text
    assert "LP_ISA_AVX512" not in _read("csrc", "common", "cpu_features.cc").split("int cpu_isa_active()")[1]
    for name in ("gemm_amx.cc", "gemm_amx_model_avx2.cc", "gemm_amx_kernels.h", "amx_tile_model.h"):
        assert os.path.exists(os.path.join(ROOT, "csrc", "cpu", "gemm", name)), name


def _readme_command_lines():
    """Every `lepton ...` / `torchrun ... -m lepton_core.train ...` command README shows, inline or in a
    code block; an optional [part] gives two forms: without it and with it."""
    text = _read("README.md")
    found = re.findall(r"`((?:lepton|torchrun) [^`]*)`", text)
    found += [line for block in _code_blocks(text) for line in block.splitlines()
              if line.startswith("torchrun ")]
    found += [line.rsplit("&& .venv/bin/", 1)[1] for block in _code_blocks(text) for line in block.splitlines()
              if "&& .venv/bin/lepton" in line]
    lines = []
    for cmd in found:
        cmd = cmd.replace("...", "").replace("fp32|bf16|fp16", "bf16").replace("none|int8", "int8")
        lines.append(re.sub(r"\s+", " ", re.sub(r"\[[^\]]*\]", "", cmd)).strip())
        lines.append(re.sub(r"\s+", " ", cmd.replace("[", "").replace("]", "")).strip())
    return sorted(set(lines))


def test_every_readme_command_line_parses():
    from lepton_core import cli
    from lepton_core.train import cli as train_cli

    lines = _readme_command_lines()
    for expect in ("lepton bench", "lepton bench gemm quant allreduce train infer --quick --threads 2 --json FILE "
                   "--markdown FILE", "lepton info", "lepton train", "lepton train --help", "lepton --version"):
        assert expect in lines
    for line in lines:
        words = line.split()
        if words[0] == "torchrun":
            train_cli.build_parser().parse_args(words[words.index("lepton_core.train") + 1:])
        elif "--help" in words or "--version" in words:
            with pytest.raises(SystemExit) as exc:
                cli.build_parser().parse_args(words[1:])
            assert exc.value.code == 0, line
        else:
            assert cli.build_parser().parse_args(words[1:]).command, line


def test_readme_train_options_exist():
    from lepton_core.train import cli as train_cli

    text = _read("README.md")
    paragraph = text[text.index("`lepton train --help` lists the options"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    listed = set(re.findall(r"`(--[a-z-]+)", paragraph))
    known = {s for a in train_cli.build_parser()._actions for s in a.option_strings}
    assert len(listed) >= 10 and listed <= known, listed - known


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)\)", _read("README.md")):
        if "://" not in target:
            assert os.path.exists(os.path.join(ROOT, target)), target


def test_contributing_names_real_files():
    """CONTRIBUTING.md's layout table and checklists name files that exist: a path must exist as
    written, a bare file name somewhere in the source tree (placeholders like <isa> are skipped)."""
    with open(os.path.join(ROOT, "CONTRIBUTING.md")) as f:
        text = f.read()
    names = set(re.findall(r"`([A-Za-z0-9_./-]+\.(?:h|cc|cu|cuh|inc|py|md|txt|toml))`", text))
    assert len(names) > 30, "the pattern no longer finds the file names"
    tree = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("build", "__pycache__")]
        tree.update(filenames)
    missing = sorted(n for n in names
                     if not (os.path.exists(os.path.join(ROOT, n)) if "/" in n else n in tree))
    assert not missing, f"CONTRIBUTING.md names files that do not exist: {missing}"
