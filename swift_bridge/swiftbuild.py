"""Compile and run an exported Swift package on this machine, against the mlx-swift stand-in.

``export-swift --verify`` / ``--verify-only`` call :func:`verify_export`. The export itself is never
touched: its files are mirrored into a build workspace outside the repository (a temp folder, or
``$MLX_VIDEO_SWIFT_BUILD``) beside a copy of ``swift_bridge/standin`` (a test double of mlx-swift with the
same module names and API, plain CPU Swift), with ``Package.swift``'s mlx-swift dependency pointed at that
copy. Then ``swift build --build-tests`` and ``swift test`` run with warnings as errors, so the code the
iOS engineers receive compiles cleanly and its golden tests (Swift vs the Python runtime) pass.

Mirroring only rewrites files whose bytes changed, so one workspace serves every export of the same code
and rebuilds are incremental (a corrupted weight or config only re-copies resources).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

STANDIN = Path(__file__).parent / "standin"
STANDIN_PACKAGE = "mlx-swift"  # the folder name is the package identity SwiftPM matches products against
PACKAGE_DIR = "LightningVideo"
# The exported manifest's dependency line (export.package_swift): replaced by the stand-in's path.
MLX_SWIFT_DEPENDENCY = re.compile(r'\.package\(\s*url:\s*"https://github\.com/ml-explore/mlx-swift"[^\n]*\)')
SWIFT_FLAGS = ["-Xswiftc", "-warnings-as-errors"]
GOLDEN_LINE = re.compile(r"GOLDEN (.+?): relative error (\S+) \(tolerance (\S+)\)")
TEST_CASE = re.compile(r"Test Case '(?:-\[)?([\w.]+?)(?:\s(\w+))?\]?' (passed|failed|skipped)")


class SwiftBuildUnavailable(RuntimeError):
    """The export cannot be compiled here (reported before any work)."""


class SwiftToolchainMissing(SwiftBuildUnavailable):
    """No ``swift`` on PATH."""


class ForeignWorkspace(SwiftBuildUnavailable):
    """The build workspace holds files this tool did not make: mirroring would delete them."""


# Written into a workspace we created; mirroring (which deletes files the export lacks) runs only where it is.
WORKSPACE_MARKER = ".mlx-video-swift-workspace"


@dataclass
class SwiftResult:
    problems: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    golden: list[tuple[str, float, float]] = field(default_factory=list)  # (comparison, error, tolerance)
    swift_lines: int = 0
    build_seconds: float = 0.0
    test_seconds: float = 0.0
    log: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def swift_executable() -> str | None:
    return shutil.which("swift")


def swift_version() -> str | None:
    exe = swift_executable()
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def default_workspace() -> Path:
    root = os.environ.get("MLX_VIDEO_SWIFT_BUILD")
    return Path(root) if root else Path(tempfile.gettempdir()) / f"mlx-video-swift-{os.getuid()}"


def claim_workspace(workspace: Path) -> Path:
    """Create ``workspace`` or check that it is ours (empty, or holding our marker); returns it absolute."""
    workspace = workspace.absolute()
    if workspace.is_symlink() or (workspace.exists() and not workspace.is_dir()):
        raise ForeignWorkspace(f"the Swift build workspace {workspace} is not a plain folder; set "
                               "MLX_VIDEO_SWIFT_BUILD to an empty or new folder")
    workspace.mkdir(parents=True, exist_ok=True)
    marker = workspace / WORKSPACE_MARKER
    if not marker.is_file():
        # A workspace from before the marker existed holds only our two packages: adopt it.
        ours = {".lock", STANDIN_PACKAGE, PACKAGE_DIR}
        legacy = (workspace / STANDIN_PACKAGE / "Package.swift").is_file()
        if any(p.name not in ours or not legacy for p in workspace.iterdir() if p.name != ".lock"):
            raise ForeignWorkspace(f"the Swift build workspace {workspace} holds files mlx-video did not make "
                                   f"(no {WORKSPACE_MARKER}); builds there would delete them. Set "
                                   "MLX_VIDEO_SWIFT_BUILD to an empty or new folder")
        marker.write_text("mlx-video export-swift build workspace: files here are rewritten and deleted\n")
    return workspace


def _mirror(src: Path, dst: Path, keep: tuple[str, ...] = (".build",)) -> None:
    """Make ``dst`` hold exactly ``src``'s files, rewriting only files whose bytes differ."""
    dst.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if rel.parts[0] in keep:
            continue
        wanted.add(rel)
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        if target.is_file():
            a, b = path.stat(), target.stat()
            if a.st_size == b.st_size and (a.st_mtime_ns == b.st_mtime_ns or _same_bytes(path, target)):
                continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    for path in sorted(dst.rglob("*"), reverse=True):
        rel = path.relative_to(dst)
        if rel.parts[0] in keep or rel in wanted:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def override_manifest(text: str) -> str:
    """The exported ``Package.swift`` with its mlx-swift dependency pointed at the stand-in copy."""
    if not MLX_SWIFT_DEPENDENCY.search(text):
        raise ValueError("Package.swift does not depend on https://github.com/ml-explore/mlx-swift by URL")
    return MLX_SWIFT_DEPENDENCY.sub(f'.package(path: "../{STANDIN_PACKAGE}")', text, count=1)


# The stand-in holds every weight as Float32 in memory: the strict load of a big Model/ is skipped above this
# many bytes of weight files (the golden tests still run; the Python-side key/shape check covers Model/).
STANDIN_LOAD_LIMIT = 2 << 30
# Golden comparisons on the fp32 CPU stand-in agree with the Python runtime to ~2e-6 (relative to the largest
# value); 1e-4 leaves margin and still catches small mistakes that the Mac's 1e-3 (GPU vs CPU) would let by.
GOLDEN_TOLERANCE = 1e-4


def _run(cmd: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    env = {"LIGHTNING_VIDEO_TEST_LOAD_LIMIT": str(STANDIN_LOAD_LIMIT),
           "LIGHTNING_VIDEO_GOLDEN_TOLERANCE": str(GOLDEN_TOLERANCE), **os.environ, "NO_COLOR": "1"}
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        return 124, f"{' '.join(cmd)}: timed out after {timeout:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}"
    return out.returncode, out.stdout + out.stderr


def _diagnostics(log: str, limit: int = 12) -> list[str]:
    lines = [ln.strip() for ln in log.splitlines()
             if re.search(r"\b(error|warning):", ln) and not ln.lstrip().startswith(("|", "`"))]
    seen, out = set(), []
    for ln in lines:
        if ln not in seen:
            seen.add(ln)
            out.append(ln)
    return out[:limit]


def swift_lines(package: Path) -> int:
    return sum(len(p.read_text(errors="replace").splitlines())
               for sub in ("Sources", "Tests") for p in (package / sub).rglob("*.swift"))


def build_and_test(package: Path, workspace: Path | None = None, timeout: float = 1200,
                   say=lambda msg: None) -> SwiftResult:
    """Mirror ``package`` (an export) into ``workspace``, build it against the stand-in, run its tests."""
    exe = swift_executable()
    if exe is None:
        raise SwiftToolchainMissing("`swift` is not on PATH: install a Swift toolchain (swift.org, 6.x) to compile "
                                    "the export on this machine")
    result = SwiftResult(swift_lines=swift_lines(package))
    workspace = claim_workspace(workspace or default_workspace())
    with open(workspace / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per workspace at a time
        _mirror(STANDIN, workspace / STANDIN_PACKAGE)
        target = workspace / PACKAGE_DIR
        _mirror(package, target, keep=(".build", "Model"))
        # Model/ (the real weights, possibly GBs) is no build input: the strict-load test reads it through a link.
        link = target / "Model"
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        if (package / "Model").is_dir():
            link.symlink_to((package / "Model").absolute(), target_is_directory=True)
        try:
            (target / "Package.swift").write_text(override_manifest((package / "Package.swift").read_text()))
        except (OSError, ValueError) as exc:
            result.problems.append(f"Package.swift: {exc}")
            return result
        say(f"swift build (against the mlx-swift stand-in, warnings as errors) in {target}")
        start = time.perf_counter()
        rc, log = _run([exe, "build", "--build-tests", *SWIFT_FLAGS], target, timeout)
        result.build_seconds = time.perf_counter() - start
        result.log = log
        if rc != 0:
            result.problems += [f"swift build: {d}" for d in _diagnostics(log)] or [f"swift build failed (exit {rc})"]
            return result
        say("swift test")
        start = time.perf_counter()
        rc, log = _run([exe, "test", "--skip-build", *SWIFT_FLAGS], target, timeout)
        result.test_seconds = time.perf_counter() - start
        result.log += log
    result.golden = [(what, float(err), float(tol)) for what, err, tol in GOLDEN_LINE.findall(log)]
    for name, method, status in TEST_CASE.findall(log):
        test = f"{name}.{method}" if method else name
        {"passed": result.passed, "failed": result.failed, "skipped": result.skipped}[status].append(test)
    # XCTest failures ("FILE:LINE: error: Suite.test : message") and crashes inside a test (stand-in preconditions).
    failures = [ln.strip() for ln in log.splitlines()
                if re.search(r"error: \w+\.\w+ : ", ln) or re.search(r"(Fatal error|Precondition failed)", ln)]
    if rc != 0 or result.failed:
        details = failures[:12] or _diagnostics(log) or [log.strip().splitlines()[-1] if log.strip() else ""]
        result.problems += [f"swift test: {d}" for d in details]
        if not result.failed:
            result.problems.append(f"swift test failed (exit {rc})")
    elif not result.passed:
        result.problems.append("swift test ran no tests")
    return result


def runner_path(workspace: Path | None = None) -> Path:
    """The exported command-line runner (`lightning-video`) as the last verification built it."""
    return (workspace or default_workspace()).absolute() / PACKAGE_DIR / ".build" / "debug" / "lightning-video"


def manifest_problems(package: Path) -> list[str]:
    """Files that differ from, or are missing against, the hashes the export wrote into manifest.json."""
    path = package / "manifest.json"
    if not path.exists():
        return ["manifest.json is missing (not an export-swift output?)"]
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return [f"manifest.json is unreadable: {exc}"]
    problems = []
    for rel, digest in sorted(files.items()):
        target = package / rel
        if not target.is_file():
            problems.append(f"{rel}: missing (listed in manifest.json)")
            continue
        h = hashlib.sha256()
        with open(target, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != digest:
            problems.append(f"{rel}: contents changed since the export (sha256 differs from manifest.json)")
    return problems
