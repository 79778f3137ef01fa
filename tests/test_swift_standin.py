"""The mlx-swift stand-in's op checks cover it: every public function of ``swift_bridge/standin`` is called by
its XCTests, and every fixture case ``swift_bridge.standin_fixtures`` writes is read by them. Runs without a
Swift toolchain (it reads the sources); running the checks is ``tests/test_swift_compile.py``.
"""

from __future__ import annotations

import re

import mlx_video  # noqa: F401  (fast BLAS before mlx)

from swift_bridge import standin_fixtures
from swift_bridge.swiftbuild import STANDIN

# Public functions that are not operations to compare with MLX, and how they are exercised instead.
NOT_OPS = {"_updateInternal": "update(parameters:) uses it (ModuleSemantics)", "eval": "a no-op: the stand-in is eager",
           "clearCache": "a no-op: no buffer cache", "fromFloat": "HasDType conversion behind item/asArray",
           "toQuantized": "called by quantize(model:)", "quantizeSingle": "called by quantize(model:)",
           "children": "the reflection behind leafModules()"}


def _code(path) -> str:
    return re.sub(r"//.*", "", path.read_text())


def test_every_public_standin_function_is_checked():
    sources = "\n".join(_code(p) for p in sorted((STANDIN / "Sources").rglob("*.swift")))
    names = set(re.findall(r"public (?:static )?func `?(\w+)`?", sources))
    tests = "\n".join(_code(p) for p in sorted((STANDIN / "Tests").rglob("*.swift")))
    unchecked = sorted(n for n in names - set(NOT_OPS) if not re.search(rf"(?<![\w.]){n}\(|\.{n}\b", tests))
    assert len(names) > 50 and not unchecked, unchecked


def test_every_fixture_case_is_compared():
    cases = {key.split(".")[0] for key in standin_fixtures.cases()}
    checks = _code(STANDIN / "Tests" / "StandInTests" / "OpChecks.swift")
    missing = sorted(c for c in cases if f'"{c}.' not in checks and f'"{c}"' not in checks
                     and not (c.startswith("quantize_") and '"quantize_\\(bits)_\\(group)"' in checks))
    assert len(cases) >= 25 and not missing, missing
