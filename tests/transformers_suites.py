"""Transformers' own common test suites, taken from the source distribution of the Transformers under test.

The suites move with the library, so this repository holds no copy of them: the first run fetches the installed
version's source distribution from the package index (as `pip` fetches any package), keeps the Python files of its
`tests/` folder under `~/.cache/vr-hf/transformers-tests/<version>/`, and imports them as the package
`transformers_tests`.

The archive does not ship every module those files import. Each missing one is replaced by a stand-in from
`STAND_INS`, which says what therefore does not run; a class from a stand-in carries one test that skips with that
reason, so every test report says it.
"""

import importlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
from pathlib import Path

import transformers


PACKAGE = "transformers_tests"
CACHE = Path(os.environ.get("VR_HF_CACHE", Path.home() / ".cache" / "vr-hf")) / "transformers-tests"
TESTS_IN_ARCHIVE = re.compile(r"transformers-[^/]+/tests/(.+\.py)")


def missing_mixin(name: str, module: str, consequence: str) -> type:
    """A mixin standing in for `name` of `module`: it adds one test, which skips and says why."""

    def test_stand_in(self):
        raise unittest.SkipTest(
            f"{name} ({module}) is not in Transformers {transformers.__version__}'s source distribution: {consequence}"
        )

    return type(name, (), {f"test_{name}_is_not_in_the_source_distribution": test_stand_in})


STAND_INS = {
    "exporters.test_export": {
        "ExportTesterMixin": missing_mixin(
            "ExportTesterMixin", "tests/exporters/test_export.py", "the torch.export tests do not run"
        )
    },
    "generation.test_utils": {
        "GenerationTesterMixin": missing_mixin(
            "GenerationTesterMixin",
            "tests/generation/test_utils.py",
            "its generation tests do not run; tests/test_contract.py covers every decoding path",
        )
    },
    # Read only by `ConfigTester.check_config_arguments_init`, which returns before reading it for composite configs.
    "utils.test_configuration_utils": {"config_common_kwargs": {}},
}


def fetch(version: str) -> Path:
    """The folder holding the package `transformers_tests`: the `tests/` of Transformers `version`'s source
    distribution, fetched from the package index once."""
    root = CACHE / version
    if (root / PACKAGE / "test_modeling_common.py").exists():
        return root
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", "--dest"]
        result = subprocess.run([*command, download, f"transformers=={version}"], capture_output=True, text=True)
        archives = list(Path(download).glob("transformers-*.tar.gz"))
        if result.returncode or not archives:
            raise RuntimeError(
                f"Transformers' common tests come from the source distribution of the installed Transformers "
                f"({version}), and pip could not fetch it:\n{result.stderr.strip()}\nRun the tests with a "
                "Transformers release from the package index, reachable from this machine."
            )
        CACHE.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=CACHE))
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                if member.isfile() and (match := TESTS_IN_ARCHIVE.fullmatch(member.name)):
                    target = staging / PACKAGE / match[1]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.extractfile(member).read())
    for folder in (staging / PACKAGE).rglob("*"):
        if folder.is_dir():
            (folder / "__init__.py").touch()
    (staging / PACKAGE / "__init__.py").touch()
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return root


def install_stand_ins(root: Path):
    """Register a stand-in module for each module of `STAND_INS` the archive lacks."""
    for name, attributes in STAND_INS.items():
        if (root / PACKAGE / f"{name.replace('.', '/')}.py").exists():
            continue
        *packages, _ = name.split(".")
        for depth in range(1, len(packages) + 1):
            package = ".".join(packages[:depth])
            if not (root / PACKAGE / package.replace(".", "/")).is_dir():
                stand_in = sys.modules.setdefault(f"{PACKAGE}.{package}", types.ModuleType(f"{PACKAGE}.{package}"))
                stand_in.__path__ = []
        module = types.ModuleType(f"{PACKAGE}.{name}", "Stand-in: not in Transformers' source distribution.")
        module.__dict__.update(attributes)
        sys.modules[module.__name__] = module


def load(suite: str) -> types.ModuleType:
    """`transformers_tests.<suite>` (e.g. `test_modeling_common`) of the installed Transformers."""
    root = fetch(transformers.__version__)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    install_stand_ins(root)
    return importlib.import_module(f"{PACKAGE}.{suite}")
