"""The Swift export compiled and run on this machine, against the mlx-swift stand-in (``swift_bridge/standin``).

- The stand-in's own XCTests compare every operation with Python MLX (``swift_bridge.standin_fixtures``).
- ``export-swift --verify`` builds the exported package (warnings as errors) and runs its golden XCTests:
  DiT, UMT5 INT4, TAEHV (streaming and parallel), sampler schedules, one denoise step, the staged pipeline
  end to end with MLX's PRNG, the tokenizer, and the strict load of the exported ``Model/``; and its contract
  XCTests (``ContractTests.swift``: code the golden configuration does not run, and the pipeline's stated
  behaviour).
- ``--verify-only`` fails on a corrupted export: a changed weight, a renamed key, a wrong shape in the config.

One build workspace serves the whole session (``swift_workspace``): the stand-in and the export compile
once; each corrupted copy only re-copies resources. Needs ``swift`` on PATH (skipped otherwise; CI on the
machine kind that has one fails instead, see ``swift_bridge/check_toolchain.sh``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import mlx_video  # noqa: F401  (fast BLAS before mlx)
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_video import cli
from swift_bridge import standin_fixtures
from swift_bridge.swiftbuild import (STANDIN, WORKSPACE_MARKER, _mirror, build_and_test, claim_workspace,
                                     manifest_problems, override_manifest, runner_path, swift_executable)
from swift_bridge.verify import verify_export
from swift_bridge.weights import header_dtypes
from tests.test_swift_bridge import QUANT, make_model_folder, spiece  # noqa: F401  (spiece: a module fixture)

pytestmark = pytest.mark.skipif(
    swift_executable() is None,
    reason="no Swift toolchain: `swift` is not on PATH (compiling the export needs Swift 6.x; "
    "swift_bridge/check_toolchain.sh says what is missing)")

GOLDEN_TESTS = {"testDiTVelocity", "testTextEncoder", "testDecoderStreamingMatchesPython", "testSamplerSchedules",
                "testOneDenoiseStep", "testStagedPipelineEndToEnd", "testTokenizerMatchesPython",
                "testTokenizerNormalizerFlagsMatchSentencepiece", "testFolderLoadsWithStrictVerification",
                "testExportedModelLoadsWithStrictVerification"}
CONTRACT_TESTS = {"testFeedForwardChunksFitTheBudget", "testChunkedFeedForwardMatchesPython",
                  "testRoPETablesMatchPython", "testMaskedQKNormMatchesPython", "testPatchifyMatchesPython",
                  "testBatchSharesOneTimestep", "testRelativePositionBucketsMatchPython",
                  "testFloat16ProjectionClampsLikePython", "testDecoderVariantMatchesPython",
                  "testDecoderComputesInItsWeightsDType", "testPixelShuffleMatchesItsDefinition",
                  "testSamplerRunsMatchPython", "testFlowMatchTableMatchesPython",
                  "testSamplerRefusesWhatIsNotPorted", "testRequestsAreValidatedLikeThePythonRuntime",
                  "testDefaultRequestIsValid", "testNonSquarePatchesCheckHeightAndWidthSeparately",
                  "testMemorySettingsAreTheGenerators", "testMemoryLimitFollowsTheAvailableMemory",
                  "testConfigureMemorySetsTheLimits", "testStreamedPiecesMakeOneVideo", "testStagesAreMeasured",
                  "testBenchmarkJSONEndToEndRow", "testResidentBytesReadsVmRSS",
                  "testTokenizerNeedsPadAndEOSPieces", "testCraftedTokenizerModelsMatchSentencepiece",
                  "testTruncatedTokenizerModelsNeverReadPastTheEnd", "testPromptCleaningMatchesPython",
                  "testMalformedTokenizerModelsAreRefused"}


@pytest.fixture(scope="session")
def swift_workspace(tmp_path_factory) -> Path:
    return claim_workspace(tmp_path_factory.mktemp("swift-workspace"))


@pytest.fixture(scope="module")
def source_folder(tmp_path_factory, spiece) -> Path:  # noqa: F811
    return make_model_folder(tmp_path_factory.mktemp("swift-source") / "model", spiece)


@pytest.fixture(scope="module")
def verified(tmp_path_factory, source_folder, swift_workspace, monkeypatch_module):
    """An export made and verified through the CLI (`export-swift --model SRC OUT --verify`)."""
    monkeypatch_module.setenv("MLX_VIDEO_SWIFT_BUILD", str(swift_workspace))
    out = tmp_path_factory.mktemp("swift-export") / "LightningVideo"
    code = cli.main(["export-swift", "--model", str(source_folder), str(out), "--verify"])
    return out, code


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_standin_ops_match_python_mlx(tmp_path, swift_workspace):
    fixtures = tmp_path / "standin_ops.safetensors"
    cases = standin_fixtures.write(fixtures)
    package = swift_workspace / "standin-tests"
    _mirror(STANDIN, package)
    out = subprocess.run([swift_executable(), "test", "-Xswiftc", "-warnings-as-errors"], cwd=package,
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "STANDIN_FIXTURES": str(fixtures)})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    checks = [(name, float(err), float(tol)) for name, err, tol in re.findall(r"OPCHECK (\S+) (\S+) (\S+)", log)]
    assert cases >= 20 and len(checks) >= 70, checks
    assert all(err <= tol for _, err, tol in checks)
    assert "skipped" not in log.lower().replace("0 skipped", "")  # every check ran
    worst = max(checks, key=lambda c: c[1])
    print(f"stand-in: {len(checks)} op checks against Python MLX, worst relative error {worst[1]:.3g} ({worst[0]})")


def test_export_compiles_and_golden_tests_pass(verified, capsys):
    out, code = verified
    assert code == 0
    assert not (out / ".build").exists()  # the export itself is never built in place


def test_verify_only_passes_on_the_export_as_written(verified, swift_workspace, capsys):
    out, _ = verified
    report = verify_export(out, workspace=swift_workspace)
    assert report.ok, report.problems
    ran = {t.split(".")[-1] for t in report.swift.passed}
    assert ran == GOLDEN_TESTS | CONTRACT_TESTS and not report.swift.failed and not report.swift.skipped
    assert report.swift.swift_lines > 2000
    print(f"compiled {report.swift.swift_lines} lines of generated Swift; {len(report.swift.passed)} XCTests "
          f"passed (build {report.swift.build_seconds:.0f} s, tests {report.swift.test_seconds:.0f} s)")


@pytest.fixture(scope="module")
def device_run(verified, swift_workspace, tmp_path_factory):
    """The exported runner, as built by the verification, run on the export's Model/ with --bench-json."""
    out, _ = verified
    work = tmp_path_factory.mktemp("device-run")
    bench = work / "device.json"
    run = subprocess.run([str(runner_path(swift_workspace)), str(out / "Model"), "a cat on the beach", "--frames", "5",
                          "--height", "32", "--width", "48", "--out", str(work / "frames"), "--bench-json", str(bench),
                          "--label", "stand-in"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return bench, work / "frames", run.stdout


def test_runner_reports_each_stage_as_bench_json(device_run):
    from benchmarks.common import SCHEMA

    bench, frames, stdout = device_run
    doc = json.loads(bench.read_text())
    assert doc["schema"] == SCHEMA and doc["mode"] == "device" and doc["machine"]["label"] == "stand-in"
    rows = {r["stage"]: r for r in doc["stages"]}
    assert list(rows) == ["model:encode", "model:denoise", "model:decode", "model:end_to_end"]
    for row in rows.values():
        assert row["video"] == [32, 48, 5] and row["mlx"]["time"]["median_s"] > 0
        assert row["mlx"]["memory"]["mlx_peak_bytes"] > 0 and row["mlx"]["memory"]["footprint_bytes"] > 0
    stages = sum(rows[f"model:{s}"]["mlx"]["time"]["median_s"] for s in ("encode", "denoise", "decode"))
    assert rows["model:end_to_end"]["mlx"]["time"]["median_s"] == pytest.approx(stages)
    assert len(list(frames.glob("frame_*.safetensors"))) == 5  # Linux: frames as safetensors (no ImageIO)
    assert "denoise: " in stdout and "MLX peak" in stdout


def test_bench_imports_the_runner_json(device_run, tmp_path):
    bench, _, _ = device_run
    out = tmp_path / "bench"
    assert cli.main(["bench", "--quick", "--stages", "matmul", "--no-reference", "--import", str(bench),
                     "--out", str(out)]) == 0
    results = json.loads((out / "bench.json").read_text())
    rows = [s for s in results["stages"] if s.get("device") == "stand-in"]
    assert [r["stage"] for r in rows] == ["model:encode", "model:denoise", "model:decode", "model:end_to_end"]
    assert "Model @ stand-in" in (out / "bench.md").read_text()


def _corrupt(src: Path, dst: Path, file: str, change) -> None:
    shutil.copytree(src, dst)
    path = dst / file
    if path.suffix == ".json":
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "mlx"})


def _rename(tensors: dict, old: str, new: str) -> None:
    tensors[new] = tensors.pop(old)


def _widen_ffn(config: dict) -> None:
    config["dit"]["ffn_dim"][0] += 32


@pytest.mark.parametrize("what, file, change, failing_test", [
    ("changed golden weight", "Tests/LightningVideoTests/Golden/model/dit.safetensors",
     lambda t: t.update({"head.linear.weight": t["head.linear.weight"] * np.float32(1.1)}), "testDiTVelocity"),
    ("renamed key", "Model/dit.safetensors",
     lambda t: _rename(t, "blocks.0.cross_attn.norm_q.weight", "blocks.0.cross_attn.q_norm.weight"),
     "testExportedModelLoadsWithStrictVerification"),
    ("wrong shape in the generated config", "Model/config.json", _widen_ffn,
     "testExportedModelLoadsWithStrictVerification"),
], ids=["weight", "key", "config-shape"])
def test_verify_only_fails_on_a_corrupted_export(verified, swift_workspace, tmp_path, capsys, monkeypatch,
                                                 what, file, change, failing_test):
    out, _ = verified
    broken = tmp_path / "LightningVideo"
    _corrupt(out, broken, file, change)
    monkeypatch.setenv("MLX_VIDEO_SWIFT_BUILD", str(swift_workspace))
    assert cli.main(["export-swift", "--verify-only", str(broken)]) == 1
    err = capsys.readouterr().err
    assert f"verify failed [manifest]: {file}: contents changed" in err
    # The compiled Swift catches it on its own, not only the hash: the named XCTest fails.
    assert re.search(rf"verify failed \[swift\]: .*{failing_test}", err), err[-3000:]


def test_a_changed_real_weight_is_caught_by_its_hash(verified, tmp_path):
    """Changed values in Model/ (no fixture was computed from the real weights) fail the manifest check."""
    out, _ = verified
    broken = tmp_path / "LightningVideo"
    _corrupt(out, broken, "Model/decoder.safetensors", lambda t: t.update(
        {k: v + np.asarray(1, v.dtype) for k, v in t.items() if k.endswith("bias")}))
    assert manifest_problems(broken) == [
        "Model/decoder.safetensors: contents changed since the export (sha256 differs from manifest.json)"]


def test_override_manifest_points_at_the_standin(verified):
    out, _ = verified
    text = (out / "Package.swift").read_text()
    assert '.package(url: "https://github.com/ml-explore/mlx-swift"' in text  # the user's manifest is untouched
    assert '.package(path: "../mlx-swift")' in override_manifest(text)
    with pytest.raises(ValueError, match="does not depend on"):
        override_manifest(text.replace("ml-explore/mlx-swift", "example/other"))


def test_a_package_failing_verify_is_not_written(source_folder, tmp_path, capsys, monkeypatch):
    from swift_bridge import verify

    monkeypatch.setattr(verify, "verify_export", lambda folder, **kw: verify.Verification(
        out=folder, problems={"swift": ["GoldenTests.testDiTVelocity : relative error 0.05"]}))
    out = tmp_path / "LightningVideo"
    assert cli.main(["export-swift", "--model", str(source_folder), str(out), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "failed verification (nothing was written)" in err and "testDiTVelocity" in err
    assert not out.exists() and not list(tmp_path.glob(".LightningVideo.partial-*"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.main(["export-swift", "--model", str(source_folder), str(out), "--verify"]) == 1
    assert "`swift` is not on PATH" in capsys.readouterr().err and not out.exists()


def test_a_foreign_build_workspace_is_refused_before_any_work(source_folder, tmp_path, capsys, monkeypatch):
    """The build mirrors exports into $MLX_VIDEO_SWIFT_BUILD and deletes what the export lacks: a folder we
    did not make (no marker) is refused, its files kept, and nothing is exported."""
    foreign = tmp_path / "my-folder"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    monkeypatch.setenv("MLX_VIDEO_SWIFT_BUILD", str(foreign))
    out = tmp_path / "LightningVideo"
    assert cli.main(["export-swift", "--model", str(source_folder), str(out), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "holds files mlx-video did not make" in err and "MLX_VIDEO_SWIFT_BUILD" in err
    assert (foreign / "thesis.tex").read_text() == "precious" and sorted(p.name for p in foreign.iterdir()) == [
        "thesis.tex"]
    assert not out.exists() and not list(tmp_path.glob(".LightningVideo.partial-*"))
    empty = tmp_path / "new-workspace"
    assert claim_workspace(empty) == empty.absolute() and (empty / WORKSPACE_MARKER).is_file()
    assert claim_workspace(empty) == empty.absolute()  # ours now: accepted again


def test_verify_only_usage_and_missing_toolchain(verified, tmp_path, capsys, monkeypatch):
    out, _ = verified
    assert cli.main(["export-swift", "--verify-only", "--model", str(tmp_path), str(out)]) == 2
    assert "give only OUT_DIR" in capsys.readouterr().err
    assert cli.main(["export-swift", "--verify-only", str(tmp_path)]) == 1
    assert "not an export-swift output" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.main(["export-swift", "--verify-only", str(out)]) == 1
    assert "`swift` is not on PATH" in capsys.readouterr().err


def test_int4_token_embedding_runs_in_swift(spiece, swift_workspace, tmp_path, capsys, monkeypatch):  # noqa: F811
    """`-q --q-embedding` exports: the Swift side swaps Embedding for QuantizedEmbedding and still matches."""
    monkeypatch.setenv("MLX_VIDEO_SWIFT_BUILD", str(swift_workspace))
    source = make_model_folder(tmp_path / "model", spiece, quantization={**QUANT, "embedding": True})
    out = tmp_path / "LightningVideo"
    assert cli.main(["export-swift", "--model", str(source), str(out), "--verify"]) == 0
    golden = out / "Tests/LightningVideoTests/Golden/model/text_encoder.safetensors"
    assert header_dtypes(golden)["token_embedding.weight"] == "U32"
    assert f"{len(GOLDEN_TESTS | CONTRACT_TESTS)} XCTests passed, 0 failed" in capsys.readouterr().err


# Last in the file: these rebuild the shared workspace with a broken source (the next verification rebuilds it).
@pytest.mark.parametrize("file, old, new, failing", [
    ("Sources/LightningVideo/WanDiT.swift", "crossAttn(norm3(h.asType(.float32)), keyValues: crossKeyValues)",
     "crossAttn(h.asType(.float32), keyValues: crossKeyValues)",
     {"testDiTVelocity", "testOneDenoiseStep", "testStagedPipelineEndToEnd",
      "testBatchSharesOneTimestep"}),
    ("Sources/LightningVideo/Sampler.swift", "let x0 = x - Float(sigma) * velocity", "let x0 = x + Float(sigma) * velocity",
     {"testOneDenoiseStep", "testStagedPipelineEndToEnd", "testSamplerRunsMatchPython"}),
], ids=["cross-attention-without-its-norm", "flipped-sampler-sign"])
def test_golden_tests_catch_a_planted_bug(verified, swift_workspace, tmp_path, file, old, new, failing):
    out, _ = verified
    broken = tmp_path / "LightningVideo"
    shutil.copytree(out, broken)
    text = (broken / file).read_text()
    assert text.count(old) == 1
    (broken / file).write_text(text.replace(old, new))
    result = build_and_test(broken, workspace=swift_workspace)
    assert {t.split(".")[-1] for t in result.failed} == failing, result.problems
