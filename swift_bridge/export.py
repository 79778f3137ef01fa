"""``mlx-video export-swift MODEL_DIR OUT_DIR``: a Swift package that runs the converted model with mlx-swift.

The package holds generated model code (DiT, UMT5, TAEHV), the sampler, tokenizer, staged pipeline and a
command-line entry point; the weights in the layout mlx-swift loads without remapping; and golden XCTests
whose fixtures the Python runtime computed. Before anything is written to ``OUT_DIR`` the export checks,
on this machine, that every generated ``.swift`` file parses (tree-sitter-swift) and that the parameter
tree the Swift declares equals the exported safetensors keys, with matching ranks. Output is atomic
(a failed export leaves ``OUT_DIR`` untouched) and deterministic (same input, same bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx_video  # noqa: F401  (fast BLAS before MLX)
import mlx.core as mx

from . import codegen, components as C
from .codegen import GenerationError
from mlx_video import fsio
from mlx_video.utils import cast_floating

from .weights import EXPORT_DTYPES, header_dtypes, header_shapes, write_safetensors

LIBRARY = "LightningVideo"
SOURCES = f"Sources/{LIBRARY}"
CLI_SOURCES = "Sources/LightningVideoCLI"
TESTS = f"Tests/{LIBRARY}Tests"
GOLDEN = f"{TESTS}/Golden"
MODEL = "Model"
MANIFEST = "manifest.json"
GENERATOR_ID = "mlx-video export-swift"
MLX_SWIFT = ("https://github.com/ml-explore/mlx-swift", "0.31.4")
SWIFT_SAMPLERS = ("fewstep", "euler")
LARGE_EMBEDDING_BYTES = 1 << 30


class ExportError(Exception):
    """The model folder cannot be exported; the message says why and what to do."""


@dataclass
class Report:
    out: Path
    exported: dict[str, str] = field(default_factory=dict)  # component -> weights file
    missing: dict[str, str] = field(default_factory=dict)  # component -> why
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Reading the source folder
# --------------------------------------------------------------------------------------------------


def _read_source(model_dir: Path, sampler: str | None) -> tuple[dict, dict, object, Path | None, dict]:
    """(configs of present components, missing -> why, sampler config, tokenizer file, raw config)."""
    from mlx_video.utils import ModelFolderError, read_config

    if not model_dir.is_dir():
        raise ModelFolderError(f"{model_dir} is not a folder; give a converted mlx-video model folder "
                               f"(`mlx-video convert ... --mlx-path DIR`)")
    raw = read_config(model_dir)
    for component in C.MODEL_COMPONENTS:
        why = C.available(component)
        if why:
            raise ExportError(f"cannot generate the Swift {component.title}: {why}")
    configs, missing = {}, {}
    for component in C.MODEL_COMPONENTS:
        section = raw.get(component.name)
        if not isinstance(section, dict):
            missing[component.name] = f"config.json has no {component.name} section"
            continue
        name = section.get("weights_file", component.weights_file)
        if not name:
            missing[component.name] = "config.json names no weights file (tokenizer only)"
            continue
        weights = model_dir / name
        if not weights.exists():
            missing[component.name] = f"{name} is missing"
            continue
        config = C.config_from_section(component, section)
        _check_weights(component, config, weights)
        configs[component.name] = (config, weights)
    if not configs:
        raise ModelFolderError(f"{model_dir} holds no exportable component (" + "; ".join(
            f"{k}: {v}" for k, v in missing.items()) + ")")
    tokenizer = None
    te = raw.get("text_encoder") or {}
    candidate = model_dir / te.get("tokenizer_file", "spiece.model")
    if candidate.exists():
        tokenizer = candidate
    elif "text_encoder" in configs:
        missing["tokenizer"] = f"{candidate.name} is missing (the app needs it to tokenize prompts)"
    sampler_config = _sampler(raw.get("sampler"), sampler)
    return configs, missing, sampler_config, tokenizer, raw


def _sampler(section: dict | None, name: str | None):
    from mlx_video.sampling import sampler_config

    try:
        config = sampler_config(section, name=name)
    except ValueError as exc:
        raise ExportError(f"config.json [sampler]: {exc}") from None
    if config.name not in SWIFT_SAMPLERS:
        raise ExportError(f"the model folder's sampler is {config.name!r}; the Swift port has "
                          f"{' and '.join(SWIFT_SAMPLERS)} (distilled few-step models use fewstep): pass "
                          f"--sampler fewstep")
    if config.uses_cfg:
        raise ExportError(f"sampler guidance {config.guidance} > 1 needs classifier-free guidance, which the Swift "
                          f"port leaves out (distilled models run at guidance 1); set guidance 1 in the sampler "
                          f"section")
    if config.sigmas is not None or not config.stochastic or config.noise_scale != 1.0 \
            or config.timestep_dtype != "float32":  # converters/presets.py: rcm, lightx2v-distill
        raise ExportError(f"the model folder's preset {(section or {}).get('preset')!r} samples with explicit sigmas, "
                          f"deterministic Euler steps, a scaled initial noise or bf16 timesteps, which the Swift "
                          f"port does not implement")
    return config


def _check_weights(component: C.Component, config, path: Path) -> None:
    """The file must hold exactly the Python model's parameters (shapes included) for this config."""
    from converters.common import ConversionError

    try:
        found = header_shapes(path)
    except ConversionError as exc:
        raise ExportError(str(exc)) from None
    if component is C.DECODER:
        found = {k: v for k, v in found.items() if not k.startswith("encoder.")}  # decoder-only export
    expected = C.expected_shapes(component, config)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: file {list(found[k])} vs model {list(expected[k])}"
                   for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:8]}" if missing else "", f"unexpected {unexpected[:8]}" if unexpected else "",
                 f"wrong shapes {wrong[:8]}" if wrong else ""]
        hint = ""
        if component is C.TEXT_ENCODER and any(k.endswith(".scales") for k in found) != bool(config.quantization):
            hint = " (quantized tensors and the config's quantization settings disagree)"
        raise ExportError(f"{path}: weights do not match the {component.name} config{hint}: "
                          + "; ".join(p for p in parts if p))
    if component is C.TEXT_ENCODER:
        dtypes = header_dtypes(path)
        bad = sorted(k for k in found if k.endswith(".weight") and f"{k[:-7]}.scales" in found and dtypes[k] != "U32")
        if bad:
            raise ExportError(f"{path}: quantized weights must be packed uint32, got {dtypes[bad[0]]} for {bad[0]}")


# --------------------------------------------------------------------------------------------------
# Swift sources
# --------------------------------------------------------------------------------------------------


def generate_sources(configs: dict[str, object], sampler_config) -> dict[str, str]:
    """Relative path -> Swift text, for the given component configs (all three are always generated)."""
    from mlx_video import sampling
    from mlx_video.tokenizer import TOKENIZER_NAME
    from mlx_video.utils import MLX_VIDEO_FORMAT

    out = {}
    for component in C.MODEL_COMPONENTS:
        config = configs[component.name]
        classes, library = component.python_classes()
        model = C.build_model(component, config, quantized=False)
        codegen.check_library_layers(model, library)
        decls = codegen.class_declarations(model, classes, library, component.unary)
        source = f"{component.config_class.__name__} and the module tree of {component.module_name}"
        head = codegen.header(component.template, [source], C.summary(component, config))
        struct = codegen.configuration_struct(config, component.swift_config, component.name, component.dict_fields)
        out[f"{SOURCES}/{component.swift_file}"] = codegen.expand_template(component.template, head, struct, decls)
    sampler_struct = codegen.configuration_struct(sampler_config, "SamplerConfiguration", "sampler")
    out[f"{SOURCES}/Sampler.swift"] = codegen.expand_template(
        "Sampler.swift", codegen.header("Sampler.swift", [f"SamplerConfig of {sampling.__name__}"]), sampler_struct, {})
    files = {"format": MLX_VIDEO_FORMAT, "dit": C.DIT.weights_file, "textEncoder": C.TEXT_ENCODER.weights_file,
             "decoder": C.DECODER.weights_file, "tokenizer": TOKENIZER_NAME}
    constants = ["/// File names inside an exported model folder (the Python runtime's constants).",
                 "public enum ModelFiles {"]
    constants += [f'    public static let {k} = "{v}"' for k, v in files.items()] + ["}"]
    text = codegen.expand_template("ModelFolder.swift", codegen.header("ModelFolder.swift", [
        "mlx_video.utils (folder format) and the WEIGHTS_NAME constants of the model modules"]), None, {})
    out[f"{SOURCES}/ModelFolder.swift"] = text.replace("// {{constants}}", "\n".join(constants), 1)
    for name, path, source in (("Tokenizer.swift", f"{SOURCES}/Tokenizer.swift", "mlx_video/tokenizer.py"),
                               ("Pipeline.swift", f"{SOURCES}/Pipeline.swift", "mlx_video pipeline stages"),
                               ("main.swift", f"{CLI_SOURCES}/main.swift", "the command-line entry point"),
                               ("GoldenTests.swift", f"{TESTS}/GoldenTests.swift", "swift_bridge/golden.py"),
                               ("ContractTests.swift", f"{TESTS}/ContractTests.swift", "swift_bridge/golden.py")):
        out[path] = codegen.expand_template(name, codegen.header(name, [source]), None, {})
    return out


def package_swift() -> str:
    url, version = MLX_SWIFT
    return f"""// swift-tools-version: 5.9
// GENERATED FILE - do not edit. Regenerate with `mlx-video export-swift MODEL_DIR OUT_DIR`.

import PackageDescription

let package = Package(
    name: "{LIBRARY}",
    platforms: [.iOS(.v17), .macOS(.v14)],
    products: [
        .library(name: "{LIBRARY}", targets: ["{LIBRARY}"])
    ],
    dependencies: [
        // 0.31.5+ needs a Swift 6.3 toolchain (Xcode); with an older Xcode pin `exact: "{version}"`.
        .package(url: "{url}", .upToNextMinor(from: "{version}"))
    ],
    targets: [
        .target(
            name: "{LIBRARY}",
            dependencies: [
                .product(name: "MLX", package: "mlx-swift"),
                .product(name: "MLXNN", package: "mlx-swift"),
            ]
        ),
        .executableTarget(
            name: "lightning-video",
            dependencies: ["{LIBRARY}"],
            path: "{CLI_SOURCES}"
        ),
        .testTarget(
            name: "{LIBRARY}Tests",
            dependencies: ["{LIBRARY}"],
            resources: [.copy("Golden")]
        ),
    ]
)
"""


# --------------------------------------------------------------------------------------------------
# Verification (runs on Linux: no Swift toolchain needed)
# --------------------------------------------------------------------------------------------------


def verify_package(out: Path) -> list[str]:
    """Syntax of every ``.swift`` file, then Swift-declared parameters vs every exported weight file
    (the real ``Model/`` and the golden model). Returns the problems (empty: all good)."""
    from .swiftcheck import SwiftParseError, SwiftSources, compare_parameters, syntax_problems

    problems = []
    swift_files = sorted(out.rglob("*.swift"))
    for path in swift_files:
        problems += syntax_problems(path.read_bytes(), str(path.relative_to(out)))
    if problems:
        return problems
    try:
        sources = SwiftSources.from_paths(p for p in swift_files if p.is_relative_to(out / SOURCES))
    except SwiftParseError as exc:
        return [str(exc)]
    for folder in (out / MODEL, out / GOLDEN / "model"):
        if not (folder / "config.json").exists():
            continue
        config = json.loads((folder / "config.json").read_text())
        for component in C.MODEL_COMPONENTS:
            section = config.get(component.name)
            if not isinstance(section, dict):
                continue
            path = folder / section["weights_file"]
            exported = header_shapes(path)
            try:
                declared = sources.declared_parameters(component.swift_root, section, component.swift_config,
                                                       quantized=lambda p, e=exported: f"{p}.scales" in e)
            except SwiftParseError as exc:
                problems.append(f"{path.relative_to(out)}: {exc}")
                continue
            problems += compare_parameters(declared, exported, str(path.relative_to(out)))
    return problems


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def _section(component: C.Component, config, dtype: str) -> dict:
    return {**dataclasses.asdict(config), "weights_file": component.weights_file, "dtype": dtype}


def _write_weights(component: C.Component, src: Path, dst: Path, dtype: mx.Dtype) -> None:
    arrays = mx.load(str(src))
    if component is C.DECODER:
        arrays = {k: v for k, v in arrays.items() if not k.startswith("encoder.")}
    tensors = cast_floating(arrays, dtype, component.keep_fp32)
    del arrays
    write_safetensors(dst, tensors, {"exported_by": GENERATOR_ID}, consume=True)


def _export_problem(out: Path) -> str | None:
    """None if ``out`` is a previous export (our manifest, and only the files it lists plus Swift's build
    folders); otherwise why it may not be replaced."""
    manifest = fsio.read_marker(out / MANIFEST)
    if manifest is None or manifest.get("generator") != GENERATOR_ID or not isinstance(manifest.get("files"), dict):
        return "is not a previous export-swift output"
    listed = {rel.split("/")[0] for rel in manifest["files"]} | {MANIFEST, ".build", ".swiftpm"}
    return fsio.unlisted_entries(out, listed, "export-swift")


def _prepare_out(out: Path) -> Path:
    """A fresh temporary folder beside ``out``; ``out`` itself may only be absent, empty or a previous export
    (anything else: ``fsio.OutputRefused``, exit 2)."""
    fsio.check_folder_target(out, _export_problem, "export folder", create_parents=True)
    return fsio.make_temp_folder(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export(model_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float16",
           sampler: str | None = None, say=lambda msg: None, check=None) -> Report:
    """Export ``model_dir`` as a Swift package in ``out_dir`` (see the module docstring). ``check(folder)``, if
    given, runs on the finished package before it replaces ``out_dir`` and raises ``ExportError`` to refuse it
    (``--verify``: compile and golden tests), so a package that fails it is never written."""
    from mlx_video.tokenizer import TOKENIZER_NAME

    from . import golden

    model_dir, out = Path(model_dir), Path(out_dir).absolute()
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    configs, missing, sampler_config, tokenizer, _ = _read_source(model_dir, sampler)
    report = Report(out=out, missing=missing)
    if dtype == "bfloat16":
        report.warnings.append("bfloat16 weights crash on older Apple GPUs and on the CPU path; float16 is safer")
    full = {c.name: configs[c.name][0] if c.name in configs else C.default_config(c) for c in C.MODEL_COMPONENTS}
    tmp = _prepare_out(out)
    try:
        say("generating Swift sources")
        files = generate_sources(full, sampler_config)
        files["Package.swift"] = package_swift()
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)

        (tmp / MODEL).mkdir()
        from mlx_video.utils import MLX_VIDEO_FORMAT

        model_config = {"format": MLX_VIDEO_FORMAT}
        for component in C.MODEL_COMPONENTS:
            if component.name not in configs:
                continue
            config, src = configs[component.name]
            say(f"exporting {component.title} weights ({dtype})")
            _write_weights(component, src, tmp / MODEL / component.weights_file, EXPORT_DTYPES[dtype])
            model_config[component.name] = _section(component, config, dtype)
            report.exported[component.name] = f"{MODEL}/{component.weights_file}"
            if component is C.TEXT_ENCODER:
                q = config.quantization or {}
                rows = config.vocab_size * config.dim * (4 if dtype == "float32" else 2)
                if not q.get("embedding") and rows > LARGE_EMBEDDING_BYTES:
                    report.warnings.append(
                        f"the text encoder's token embedding is not quantized ({rows / 2**30:.1f} GiB in {dtype}) and "
                        f"is loaded whole on the phone; re-convert with `-q --q-embedding` for the 8 GB iPhone")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / MODEL / TOKENIZER_NAME)  # the name the Swift loader reads
            report.exported["tokenizer"] = f"{MODEL}/{TOKENIZER_NAME}"
        model_config["sampler"] = dataclasses.asdict(sampler_config)
        (tmp / MODEL / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")

        say("writing the golden model and fixtures (Python runtime)")
        tiny = {c.name: C.golden_config(c, full[c.name]) for c in C.MODEL_COMPONENTS}
        golden.write_golden_model(tmp / GOLDEN / "model", tiny, dataclasses.asdict(sampler_config))
        fixtures = golden.write_fixtures(tmp / GOLDEN / "model", tmp / GOLDEN / "fixtures",
                                         tmp / MODEL / TOKENIZER_NAME if tokenizer is not None else None)

        say("checking the Swift (tree-sitter) against the exported weights")
        problems = verify_package(tmp)
        if problems:
            raise ExportError("the generated Swift does not match the exported weights:\n  "
                              + "\n  ".join(problems[:30]))

        (tmp / "README.md").write_text(readme(full, configs, report, sampler_config, dtype, fixtures, tokenizer))
        listing = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        manifest = {"generator": GENERATOR_ID, "generator_version": codegen.GENERATOR_VERSION,
                    "mlx_video": mlx_video.__version__, "dtype": dtype, "exported": report.exported,
                    "missing": report.missing,
                    "files": {rel: _sha256(tmp / rel) for rel in listing}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        report.files = listing + [MANIFEST]
        if check is not None:
            check(tmp)
        fsio.replace_folder(tmp, out)
    except BaseException:
        fsio.discard(tmp)
        raise
    return report


# --------------------------------------------------------------------------------------------------
# README of the generated package
# --------------------------------------------------------------------------------------------------


def readme(full: dict, configs: dict, report: Report, sampler_config, dtype: str, fixtures: list[str],
           tokenizer: Path | None) -> str:
    lines = [f"# {LIBRARY}: Lightning Video text-to-video with mlx-swift", "",
             "Generated by `mlx-video export-swift` (do not edit; regenerate instead). It runs the same pipeline "
             "as the Python runtime: UMT5 text encoder, Wan2.1 DiT with the few-step sampler, TAEHV streaming "
             "decoder.", "", "## Contents", "",
             "| Path | What |", "| --- | --- |",
             f"| `Package.swift` | library `{LIBRARY}` (iOS 17 / macOS 14) on mlx-swift {MLX_SWIFT[1]}+ (`MLX`, "
             f"`MLXNN`), the `lightning-video` command, the `{LIBRARY}Tests` golden tests |",
             f"| `{SOURCES}/WanDiT.swift` | DiT: per-layer head counts and FFN widths from `config.json`; 3D RoPE "
             f"tables on the host (not parameters); eval after each block |",
             f"| `{SOURCES}/UMT5.swift` | UMT5 encoder; INT-N layers declared as `Linear`/`Embedding` and swapped by "
             f"`quantize(model:)` where the file has `.scales` |",
             f"| `{SOURCES}/TAEHV.swift` | TAEHV decoder, parallel and streaming (`TAEHVDecoderStream`) |",
             f"| `{SOURCES}/Sampler.swift` | few-step list with warping, Euler; schedules bit-exact with Python |",
             f"| `{SOURCES}/Tokenizer.swift` | UMT5 sentencepiece tokenizer in Swift (reads `spiece.model`) |",
             f"| `{SOURCES}/ModelFolder.swift` | `config.json` decoding, strict loading (`verify: [.all]`) |",
             f"| `{SOURCES}/Pipeline.swift` | staged pipeline with iPhone memory settings |",
             f"| `{CLI_SOURCES}/main.swift` | `lightning-video MODEL_DIR PROMPT --frames 21 --out frames` |",
             f"| `{MODEL}/` | exported weights ({dtype}; norms, modulation and time embedding stay fp32) and "
             f"`config.json` |",
             f"| `{GOLDEN}/` | tiny golden model (same structure, fp32) and Python-computed fixtures |", "",
             "## Exported model", ""]
    for component in C.MODEL_COMPONENTS:
        if component.name in configs:
            lines += [f"- {s}" for s in C.summary(component, configs[component.name][0])]
    lines.append(f"- Sampler: `{sampler_config.name}`, shift {sampler_config.shift}, steps "
                 f"{sampler_config.denoising_step_list if sampler_config.name == 'fewstep' else sampler_config.steps}"
                 f"{', warped' if sampler_config.name == 'fewstep' and sampler_config.warp else ''}, guidance 1.")
    if report.missing:
        lines += ["", "**Not in this export** (the code is generated anyway; add the files to `Model/` with a "
                  "matching `config.json` section):", ""]
        lines += [f"- {k}: {v}" for k, v in report.missing.items()]
    if report.warnings:
        lines += ["", "**Warnings:**", ""] + [f"- {w}" for w in report.warnings]
    lines += [
        "", "## Using it in an app", "",
        "```swift",
        "import LightningVideo",
        "",
        "LightningVideoPipeline.configureMemory()  // Memory.memoryLimit / Memory.cacheLimit for an 8 GB iPhone",
        "let pipeline = try LightningVideoPipeline(url: modelFolderURL)  // a copy of Model/",
        "let request = GenerationRequest(prompt: \"a corgi on a beach\", frames: 21, height: 480, width: 832)",
        "let context = try pipeline.encodePrompt(request.prompt)  // stage 1, encoder freed",
        "let latents = try pipeline.denoise(context: context, latentShape: try pipeline.latentShape(for: request),",
        "                                   seed: 0)  // stage 2, DiT freed",
        "try pipeline.decode(latents: latents) { frames in /* [1, n, H, W, 3] in [0, 1] */ }  // stage 3, streamed",
        "```", "",
        "- Memory: `configureMemory()` caps MLX at 4.5 GB (or what `os_proc_available_memory()` reports minus "
        "512 MB) with a 20 MB buffer cache, and each stage frees its model before the next loads. Add the "
        "`com.apple.developer.kernel.increased-memory-limit` entitlement to the app.",
        "- Weights: ship `Model/` in the app bundle or download it; `ModelFolder(url:)` reads it. Loading is strict: "
        "a missing, extra or mis-shaped tensor throws.",
        "- Tokenizer route: the package reads the same `spiece.model` the Python runtime uses and implements "
        "sentencepiece's unigram algorithm in Swift (`Tokenizer.swift`, no extra dependency). Wan's prompt cleaning "
        "is ported except `ftfy` (mojibake repair).",
        "- The iOS simulator cannot run MLX (no Metal GPU family): use a device or \"Mac (Designed for iPad)\".",
        "- `MLXArray` and `Module` are not `Sendable`: keep a pipeline on one task and pass evaluated arrays out.",
        "- Benchmarks: `pipeline.measurements` holds each stage's wall time, `Memory.peakMemory` and the process "
        "footprint; `pipeline.benchmarkJSON(request:label:)` (or `lightning-video ... --bench-json run.json --label "
        "\"iPhone 16 Pro\"`) writes them as `mlx-video bench` JSON, and `mlx-video bench --import run.json` puts "
        "the device rows beside a machine's own.",
        "", "## Golden tests (run on a Mac)", "",
        f"`{TESTS}` loads the golden model in `{GOLDEN}/model` (the exported structure at tiny widths, random fp32 "
        f"weights) and compares with outputs the Python runtime computed from the same weights and inputs "
        f"(`{GOLDEN}/fixtures`: {', '.join(f'`{n}.safetensors`' for n in fixtures)}): DiT velocity, UMT5 "
        f"embeddings, TAEHV decode (streaming and parallel), sampler schedules, one full denoise step"
        + (", and tokenizer ids for the exported `spiece.model`." if tokenizer is not None else "."),
        "",
        "They need Metal, so they run on a Mac, not on Linux and not in the simulator. SwiftPM on the command line "
        "cannot build MLX's Metal shaders, so use Xcode or:", "",
        "```sh",
        "xcodebuild test -scheme LightningVideo-Package -destination 'platform=macOS'",
        "```", "",
        "## What was checked where", "",
        "- At export (Linux, no Swift toolchain): every `.swift` file parses with tree-sitter-swift with no error "
        "nodes; the parameter key paths and ranks declared in the Swift (read from the parse tree) equal the keys "
        "of every exported safetensors file; the weights match the Python model's shapes; the export is "
        "deterministic (same input, same bytes; hashes in `manifest.json`).",
        "- With `mlx-video export-swift ... --verify` (or `--verify-only OUT_DIR` later; needs `swift` 6.x): the "
        "package compiled with warnings as errors against a CPU stand-in for mlx-swift (same module names and API, "
        "itself checked op by op against Python MLX), and every XCTest above run and passed, including the strict "
        "load of `Model/` and the staged pipeline end to end. The Package.swift shipped here is unchanged: it "
        "depends on the real mlx-swift.",
        "- On a Mac: compilation against the real mlx-swift, Metal, and the same golden tests.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    from mlx_video.cli import HelpFormatter, add_model_arguments

    p = subparsers.add_parser(
        "export-swift", help="export an mlx-swift package (code, weights, golden tests)",
        description="Write a Swift package (mlx-swift) for a converted model folder: generated model code for the "
        "DiT, UMT5 text encoder and TAEHV decoder, sampler, tokenizer, staged pipeline and CLI, the weights in the "
        "layout mlx-swift loads without remapping, and golden XCTests with Python-computed fixtures. The generated "
        "Swift is parsed and checked against the exported weights before anything is written to OUT_DIR.",
        epilog="example: mlx-video export-swift --model lightning-video-mlx LightningVideoSwift",
        formatter_class=HelpFormatter)
    add_model_arguments(p, "converted mlx-video model folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created; a previous export is replaced)")
    p.add_argument("--dtype", choices=list(EXPORT_DTYPES), default="float16",
                   help="weight dtype (norms, modulation and the time embedding stay float32)")
    p.add_argument("--sampler", choices=list(SWIFT_SAMPLERS), default=None,
                   help="sampler for the app (default: the model folder's)")
    p.add_argument("--verify", action="store_true",
                   help="after exporting, compile the package with `swift` against the mlx-swift stand-in "
                   "(warnings as errors) and run its golden tests; exit 1 if anything fails")
    p.add_argument("--verify-only", action="store_true",
                   help="re-check an existing export OUT_DIR as it is on disk (file hashes, Swift vs weights, "
                   "compile, golden tests) without exporting; no model needed")
    p.set_defaults(func=run)


def run(args) -> int:
    from mlx_video.cli import model_argument
    from mlx_video.utils import ModelFolderError

    def say(msg):
        print(msg, file=sys.stderr)

    if getattr(args, "verify_only", False):
        from .verify import run_verify_only

        return run_verify_only(args, say)
    check = None
    if getattr(args, "verify", False):
        from .verify import SwiftBuildUnavailable, swift_check

        try:
            check = swift_check(say)  # before any work
        except SwiftBuildUnavailable as exc:
            print(f"mlx-video export-swift: error: {exc}", file=sys.stderr)
            return 1
    try:
        report = export(model_argument(args), args.out_dir, args.dtype, args.sampler, say=say, check=check)
    except (ExportError, GenerationError, C.UnsupportedQuantization, ModelFolderError) as exc:
        print(f"mlx-video export-swift: error: {exc}", file=sys.stderr)
        return 1
    for name, path in report.exported.items():
        say(f"exported {name}: {path}")
    for name, why in report.missing.items():
        say(f"not exported: {name} ({why})")
    for warning in report.warnings:
        say(f"warning: {warning}")
    say(f"wrote {report.out} ({len(report.files)} files)" + (
        "; compiled and golden tests passed (Swift stand-in)" if check else
        "; golden tests: --verify here (needs swift) or on a Mac (README.md)"))
    return 0
