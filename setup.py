"""Build hook: wheels carry the repository's data/ and the shipped run (runs/embedded/), which the library
reads; a checkout (pip install -e .) reads them in place. Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLED = ("data", "runs/embedded")  # copied to refusal_helpers/_bundled/ in the wheel


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "refusal_helpers" / "_bundled"
        shutil.rmtree(target, ignore_errors=True)  # a reused build/ folder must not keep deleted files
        for folder in BUNDLED:
            shutil.copytree(folder, target / folder)


setup(cmdclass={"build_py": BuildPyWithData})
