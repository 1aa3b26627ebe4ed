"""Put peft's own test suite, for the installed peft, next to the virtual environment: ``<venv>/peft_tests``.

petuning's suite runs peft's generic tests (``tests/peft_suite``) against every petuning method. peft does not ship
its tests in the wheel, but its source distribution on PyPI holds them; this script fetches that archive once (at
set-up, while the network is there) and extracts ``tests/`` as the package ``peft_tests``, so that the test run
itself stays offline. Usage: ``python scripts/fetch_peft_tests.py [DEST]`` (default: ``<sys.prefix>/peft_tests``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path


def main() -> None:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(sys.prefix) / "peft_tests"
    release = version("peft")
    marker = dest / "PEFT_VERSION"
    if marker.is_file() and marker.read_text().strip() == release:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                scratch,
                f"peft=={release}",
            ],
            check=True,
        )
        with tarfile.open(next(Path(scratch).glob("peft-*.tar.gz"))) as archive:
            members = [m for m in archive.getmembers() if m.isfile() and m.name.split("/")[1:2] == ["tests"]]
            archive.extractall(scratch, members=members, filter="data")
        tests = Path(scratch) / f"peft-{release}" / "tests"
        (tests / "__init__.py").touch()
        (tests / "PEFT_VERSION").write_text(release + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        tests.rename(dest)
    print(f"peft {release}'s tests are in {dest}")


if __name__ == "__main__":
    main()
