"""The versions vr-hf declares are the versions it tests: README's commands install the locked set, CI runs README's
test command as written, and the remote code refuses a Transformers older than the oldest tested."""

import importlib.util
import re
from pathlib import Path

import pytest
import tomllib
import transformers
from packaging.requirements import Requirement

from vr_hf.modeling import configuration_vision_remember_settings


ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
README = (ROOT / "README.md").read_text()


def requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    declared = project["dependencies"] + [
        line for extra in project["optional-dependencies"].values() for line in extra
    ]
    return [Requirement(line) for line in declared if not line.startswith("vr-hf")]


def locked() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {name.lower().replace("_", "-"): version for name, version in pins}


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(pip install torch==2\.13\.0 && .*?)\n```", README)


def test_every_declared_range_has_an_upper_bound_and_admits_the_locked_version():
    versions = locked()
    for requirement in requirements():
        assert any(spec.operator in ("<", "<=", "==") for spec in requirement.specifier), requirement
        name = requirement.name.lower().replace("_", "-")
        if name in versions:
            assert requirement.specifier.contains(versions[name]), (requirement, versions[name])


def test_readme_commands_install_the_locked_versions_and_ci_runs_the_test_command_as_written():
    main, tests = readme_commands()
    assert "-c constraints.txt" in main and "-c constraints.txt" in tests and tests.endswith("python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_the_oldest_supported_transformers_is_the_remote_codes_minimum():
    floor = next(requirement for requirement in requirements() if requirement.name == "transformers")
    minimum = configuration_vision_remember_settings.MINIMUM_TRANSFORMERS
    assert f">={minimum.removesuffix('.0')}" in str(floor.specifier)
    assert f"Transformers {minimum.removesuffix('.0')}" in README


def test_remote_code_refuses_an_older_transformers_and_says_how_to_upgrade(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "5.22.2")
    path = configuration_vision_remember_settings.__file__
    spec = importlib.util.spec_from_file_location("settings_under_an_old_transformers", path)
    with pytest.raises(ImportError, match=r"need Transformers 5\.23\.0 or newer, and this is 5\.22\.2: pip install"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
