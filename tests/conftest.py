import mlx_video  # noqa: F401  (fast BLAS must load before any test imports mlx)

import os
import shutil

import pytest


def pytest_sessionstart(session):
    """In CI (CI=true, as .ci/run runs) the Swift checks must run: the machine kind has Swift 6, so a missing
    toolchain is a broken machine, not a reason to skip. Elsewhere the Swift tests skip with that reason."""
    if os.environ.get("CI", "").lower() == "true" and shutil.which("swift") is None:
        pytest.exit("CI=true but `swift` is not on PATH: the export-swift compile checks (issue 14) need Swift 6.x; "
                    "this machine kind ships it at /opt/swift", returncode=1)
