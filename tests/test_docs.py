"""What README.md, docs/ and the packaging files claim, checked against the code: commands that parse,
versions that agree, a license that is the one declared, every environment variable documented."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the source tree of these tests


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
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
