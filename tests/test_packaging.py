"""The library outside a checkout: a wheel carries data/ and the shipped run; a bare copy says what is missing."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import refusal_helpers
from refusal_helpers.data import load_instructions

ROOT = Path(refusal_helpers.__file__).resolve().parent.parent
PROBE = """
import refusal_helpers
from refusal_helpers.data import load_instructions
from refusal_helpers.embedded import adapter_dir
from refusal_helpers.runs import load_direction
print(refusal_helpers.__file__)
for name, fn in [("instructions", lambda: len(load_instructions("harmful", "train"))),
                 ("direction", lambda: tuple(load_direction()[0].shape)),
                 ("adapter", lambda: (adapter_dir() / "adapter_model.safetensors").is_file())]:
    try:
        print(name, fn())
    except FileNotFoundError as err:
        print(name, "error:", err)
"""


def probe(site: Path) -> str:
    """Import refusal_helpers from `site` alone (as an installed copy), outside any checkout."""
    return subprocess.run([sys.executable, "-c", PROBE], cwd=site, capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout


def test_a_wheel_carries_the_data_and_the_shipped_run(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("refusal_helpers-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for tracked in ("data/instructions/harmful.jsonl", "data/organism/adapter_model.safetensors",
                    "runs/embedded/direction.safetensors", "runs/embedded/selection.json"):
        assert f"refusal_helpers/_bundled/{tracked}" in names, tracked
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")

    out = probe(tmp_path / "site")
    assert out.startswith(str(tmp_path / "site")), out  # the installed copy, not the checkout
    assert f"instructions {len(load_instructions('harmful', 'train'))}" in out and "direction (576,)" in out and "adapter True" in out, out


def test_a_copy_of_the_package_without_the_data_says_what_is_missing(tmp_path):
    shutil.copytree(ROOT / "refusal_helpers", tmp_path / "refusal_helpers",
                    ignore=shutil.ignore_patterns("_bundled", "__pycache__"))
    out = probe(tmp_path)
    assert out.count("error:") == 3 and out.count("from a checkout (git clone, then pip install -e .)") == 3, out
