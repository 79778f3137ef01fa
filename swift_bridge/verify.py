"""``export-swift --verify`` and ``--verify-only``: check an export as it stands on disk.

Three independent checks, all run (so a report names every layer that caught a problem):

1. ``manifest``: every file still has the sha256 the export recorded in ``manifest.json`` (``--verify-only``
   only; right after an export the hashes are fresh by construction);
2. ``weights``: every ``.swift`` file parses and the parameter tree the Swift declares equals the keys and
   ranks of every exported safetensors file (:func:`swift_bridge.export.verify_package`);
3. ``swift``: the package compiles against the mlx-swift stand-in with warnings as errors and its XCTests
   pass: the golden tests (Swift vs the Python runtime on the golden model) and the strict load of the
   exported ``Model/`` folder (``verify: [.all]``: a renamed key or a shape that disagrees with
   ``config.json`` fails it) (:mod:`swift_bridge.swiftbuild`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .swiftbuild import SwiftBuildUnavailable, SwiftResult, SwiftToolchainMissing, build_and_test, manifest_problems


@dataclass
class Verification:
    out: Path
    problems: dict[str, list[str]] = field(default_factory=dict)  # check -> problems
    swift: SwiftResult | None = None

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())


def verify_export(out: str | Path, say=lambda msg: None, check_hashes: bool = True,
                  workspace: Path | None = None) -> Verification:
    """Run the checks above on the export in ``out``. Raises ``SwiftBuildUnavailable`` without ``swift`` or a usable workspace."""
    from .export import verify_package

    out = Path(out).absolute()
    report = Verification(out=out)
    if check_hashes:
        say("checking file hashes against manifest.json")
        report.problems["manifest"] = manifest_problems(out)
    say("checking the Swift (tree-sitter) against the exported weights")
    try:
        report.problems["weights"] = verify_package(out)
    except (OSError, ValueError, KeyError) as exc:
        report.problems["weights"] = [f"cannot read the export: {exc}"]
    report.swift = build_and_test(out, workspace=workspace, say=say)
    report.problems["swift"] = report.swift.problems
    return report


def report_verification(report: Verification, say, final: bool = True) -> int:
    """Print the outcome; 0 when every check passed, 1 otherwise (``final=False``: the caller reports failures)."""
    s = report.swift
    if s is not None and (s.passed or s.failed):
        say(f"swift: compiled {s.swift_lines} lines of generated Swift ({s.build_seconds:.0f} s build), "
            f"{len(s.passed)} XCTests passed, {len(s.failed)} failed, {len(s.skipped)} skipped "
            f"({s.test_seconds:.0f} s)")
    if s is not None and s.golden:
        worst = max(s.golden, key=lambda g: g[1] / g[2] if g[2] else g[1])
        say(f"swift: {len(s.golden)} golden comparisons with the Python runtime; worst relative error "
            f"{worst[1]:.2g} ({worst[0]}, tolerance {worst[2]:g})")
    for test in (s.skipped if s is not None else []):
        say(f"swift: skipped {test} (see the test log for why)")
    if report.ok:
        say(f"verified {report.out if final else 'the package'}: " + ("hashes, " if "manifest" in report.problems else "")
            + "Swift vs weights, compile and golden tests all pass")
        return 0
    if not final:
        return 1
    for check, problems in report.problems.items():
        for problem in problems[:20]:
            say(f"verify failed [{check}]: {problem}")
    say(f"mlx-video export-swift: error: {report.out} failed verification")
    return 1


def swift_check(say):
    """``export-swift --verify``: a check for ``export(check=...)`` that verifies the finished package before it
    replaces OUT_DIR (hashes are fresh by construction) and refuses it with the problems found."""
    from .export import ExportError
    from .swiftbuild import claim_workspace, default_workspace, swift_executable

    if swift_executable() is None:
        raise SwiftToolchainMissing("`swift` is not on PATH: --verify compiles the export with a Swift toolchain "
                                    "(swift.org, 6.x); export without --verify, or install one")
    claim_workspace(default_workspace())

    def check(folder: Path) -> None:
        report = verify_export(folder, say=say, check_hashes=False)
        if report_verification(report, say, final=False) != 0:
            problems = [f"[{k}] {p}" for k, ps in report.problems.items() for p in ps]
            raise ExportError("the exported package failed verification (nothing was written):\n  "
                              + "\n  ".join(problems[:30]))

    return check


def run_verify_only(args, say) -> int:
    """``export-swift --verify-only OUT_DIR``."""
    from mlx_video.cli import UsageError

    if getattr(args, "model", None) or getattr(args, "model_dir", None):
        raise UsageError("--verify-only checks an existing export: give only OUT_DIR")
    out = Path(args.out_dir)
    if not (out / "manifest.json").is_file():
        say(f"mlx-video export-swift: error: {out} is not an export-swift output (no manifest.json)")
        return 1
    try:
        report = verify_export(out, say=say)
    except SwiftBuildUnavailable as exc:
        say(f"mlx-video export-swift: error: {exc}")
        return 1
    return report_verification(report, say)
