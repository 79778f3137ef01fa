// {{header}}

import Foundation
import MLX
import MLXNN
import XCTest

@testable import LightningVideo

/// Golden tests: a small model exported with the same code as the real one (same layer structure, tiny
/// widths, random weights, fp32) and outputs the Python runtime computed from those exact weights and
/// inputs (`Golden/fixtures/*.safetensors`). They need Metal: run them on a Mac (`xcodebuild test`, see
/// README.md), not in the iOS simulator.
final class GoldenTests: XCTestCase {
    static let golden = Bundle.module.url(forResource: "Golden", withExtension: nil)!
    static let modelURL = golden.appendingPathComponent("model")

    /// The package folder (the exported `Model/` lies beside `Tests/`).
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()

    /// Default relative tolerance: 1e-3 (fp32 on the GPU against the CPU reference);
    /// `LIGHTNING_VIDEO_GOLDEN_TOLERANCE` overrides it (`export-swift --verify` uses 1e-4 on the CPU stand-in).
    static let defaultTolerance =
        Float(ProcessInfo.processInfo.environment["LIGHTNING_VIDEO_GOLDEN_TOLERANCE"] ?? "") ?? 1e-3

    func testFolderLoadsWithStrictVerification() throws {
        let folder = try ModelFolder(url: Self.modelURL)
        _ = try folder.loadDiT()
        _ = try folder.loadTextEncoder()
        _ = try folder.loadDecoder()
    }

    func testDiTVelocity() throws {
        let f = try fixture("dit")
        let model = try ModelFolder(url: Self.modelURL).loadDiT()
        let velocity = model(f["latents"]!, timesteps: doubles(f["timesteps"]!), context: f["context"]!)
        assertClose(velocity, f["velocity"]!, "DiT velocity")
    }

    func testTextEncoder() throws {
        let f = try fixture("text_encoder")
        let model = try ModelFolder(url: Self.modelURL).loadTextEncoder()
        let ids = f["ids"]!.asArray(Int32.self).map { Int($0) }
        let lengths = f["lengths"]!.asArray(Int32.self).map { Int($0) }
        let width = f["ids"]!.dim(1)
        let tokens = lengths.enumerated().map { row, length in
            Array(ids[(row * width) ..< (row * width + length)])
        }
        assertClose(model.encode(tokens: tokens), f["embeddings"]!, "UMT5 embeddings")
    }

    func testDecoderStreamingMatchesPython() throws {
        let f = try fixture("decoder")
        let model = try ModelFolder(url: Self.modelURL).loadDecoder()
        let stream = TAEHVDecoderStream(model)
        let latents = f["latents"]!
        var parts = [MLXArray]()
        for t in 0 ..< latents.dim(1) {
            parts.append(stream.push(latents[0..., t ..< (t + 1)]))
        }
        assertClose(concatenated(parts, axis: 1), f["frames"]!, "TAEHV streaming decode")
        assertClose(model.decode(latents), f["frames"]!, "TAEHV parallel decode")
    }

    func testSamplerSchedules() throws {
        let f = try fixture("sampler")
        let folder = try ModelFolder(url: Self.modelURL)
        let config = try XCTUnwrap(folder.configuration.sampler)
        let fewStep = try Sampler.schedule(config)
        XCTAssertEqual(fewStep.timesteps.map { Float($0) }, doubles(f["timesteps"]!).map { Float($0) })
        XCTAssertEqual(fewStep.sigmas.map { Float($0) }, doubles(f["sigmas"]!).map { Float($0) })
        let shift = Double(f["euler_shift"]!.item(Float.self))
        let euler = Sampler.wanSchedule(steps: f["euler_timesteps"]!.dim(0), shift: shift)
        XCTAssertEqual(euler.timesteps.map { Float($0) }, doubles(f["euler_timesteps"]!).map { Float($0) })
        XCTAssertEqual(euler.sigmas.map { Float($0) }, doubles(f["euler_sigmas"]!).map { Float($0) })
    }

    func testOneDenoiseStep() throws {
        let f = try fixture("denoise_step")
        let folder = try ModelFolder(url: Self.modelURL)
        let model = try folder.loadDiT()
        let config = try XCTUnwrap(folder.configuration.sampler)
        let schedule = try Sampler.schedule(config)
        XCTAssertEqual(Float(schedule.timesteps[0]), f["timestep"]!.item(Float.self))
        let x = f["noise"]!
        let velocity = model(x, timesteps: [schedule.timesteps[0]], context: f["context"]!)
        assertClose(velocity, f["velocity"]!, "velocity at step 0")
        let (sigma, nextSigma) = (schedule.sigmas[0], schedule.sigmas[1])
        let next: MLXArray
        if f["sampler"]!.item(Int32.self) == 0 {
            next = Sampler.fewStep(x, velocity: velocity, sigma: sigma, nextSigma: nextSigma, noise: f["renoise"]!)
        } else {
            next = Sampler.eulerStep(x, velocity: velocity, sigma: sigma, nextSigma: nextSigma)
        }
        assertClose(next, f["next_latents"]!, "latents after one denoise step")
    }

    /// The staged pipeline end to end on the golden model: stage 1 (UMT5 on the fixture's ids), stage 2
    /// (`LightningVideoPipeline.denoise`: noise and re-noising drawn from the seed with MLX's PRNG, the
    /// exported sampler, every step), stage 3 (streaming TAEHV decode), each against the Python runtime.
    func testStagedPipelineEndToEnd() throws {
        let f = try fixture("pipeline")
        let pipeline = try LightningVideoPipeline(url: Self.modelURL)
        let encoder = try pipeline.folder.loadTextEncoder()
        let ids = f["ids"]!.asArray(Int32.self).map { Int($0) }
        let context = encoder.encode(tokens: [ids])
        assertClose(context, f["context"]!, "stage 1: prompt embeddings")
        let seed = UInt64(f["seed"]!.item(Int32.self))
        let noise = MLXRandom.normal(f["noise"]!.shape, key: Sampler.noiseKeys(seed: seed, steps: 1).initial)
        assertClose(noise, f["noise"]!, tolerance: 1e-5, "initial noise drawn from the seed")
        let latents = try pipeline.denoise(context: context, latentShape: f["latents"]!.shape, seed: seed)
        assertClose(latents, f["latents"]!, "stage 2: denoised latents")
        var frames = [MLXArray]()
        try pipeline.decode(latents: latents) { frames.append($0) }
        assertClose(concatenated(frames, axis: 1), f["frames"]!, "stage 3: decoded frames")
    }

    /// The exported `Model/` folder (the real weights) loads with `verify: [.all]`: no key missing or
    /// extra, every shape as `config.json` describes it. Skipped above `LIGHTNING_VIDEO_TEST_LOAD_LIMIT`
    /// bytes of weights (default 8 GB).
    func testExportedModelLoadsWithStrictVerification() throws {
        let url = Self.packageRoot.appendingPathComponent("Model")
        guard FileManager.default.fileExists(atPath: url.appendingPathComponent("config.json").path) else {
            throw XCTSkip("no Model/ folder next to the tests")
        }
        let folder = try ModelFolder(url: url)
        let limit = Int(ProcessInfo.processInfo.environment["LIGHTNING_VIDEO_TEST_LOAD_LIMIT"] ?? "") ?? (8 << 30)
        let names = [ModelFiles.dit, ModelFiles.textEncoder, ModelFiles.decoder]
        let bytes = try names.map { url.appendingPathComponent($0) }
            .filter { FileManager.default.fileExists(atPath: $0.path) }
            .reduce(0) { $0 + ((try FileManager.default.attributesOfItem(atPath: $1.path)[.size] as? Int) ?? 0) }
        guard bytes <= limit else {
            throw XCTSkip("Model/ holds \(bytes) bytes of weights, above LIGHTNING_VIDEO_TEST_LOAD_LIMIT \(limit)")
        }
        if folder.configuration.dit != nil { _ = try folder.loadDiT() }
        if folder.configuration.textEncoder != nil { _ = try folder.loadTextEncoder() }
        if folder.configuration.decoder != nil { _ = try folder.loadDecoder() }
    }

    /// The tokenizer fixtures use the real spiece.model in the package's Model folder (skipped without one).
    func exportedTokenizer() throws -> URL {
        let model = Self.packageRoot.appendingPathComponent("Model/spiece.model")
        let fixtureURL = Self.golden.appendingPathComponent("fixtures/tokenizer.safetensors")
        guard FileManager.default.fileExists(atPath: model.path), FileManager.default.fileExists(atPath: fixtureURL.path)
        else {
            throw XCTSkip("no spiece.model was exported")
        }
        return model
    }

    /// `Tokenizer.encode` of the Python runtime: Wan's cleaning (HTML unescaped twice, whitespace collapsed),
    /// sentencepiece, EOS; and truncation to `maxLength` (the first `maxLength - 1` ids, then EOS).
    func testTokenizerMatchesPython() throws {
        let model = try exportedTokenizer()
        let (arrays, metadata) = try fixtureWithMetadata("tokenizer")
        let tokenizer = try UMT5Tokenizer(url: model)
        let defaults = try ["max_length", "pad_id", "eos_id"].map { try XCTUnwrap(Int(try XCTUnwrap(metadata[$0]))) }
        XCTAssertEqual([tokenizer.maxLength, tokenizer.padId, tokenizer.eosId], defaults, "the runtime's defaults")
        var index = 0
        while let prompt = metadata["prompt_\(index)"] {
            XCTAssertEqual(tokenizer.encode(prompt), try ints(arrays["ids_\(index)"]), "prompt \(index): \(prompt)")
            index += 1
        }
        XCTAssertGreaterThan(index, 0)
        let length = try XCTUnwrap(Int(try XCTUnwrap(metadata["truncation_length"])))
        let short = try UMT5Tokenizer(url: model, maxLength: length)
        let prompt = try XCTUnwrap(metadata["truncated_prompt"])
        XCTAssertEqual(short.encode(prompt), try ints(arrays["truncated_ids"]), "truncated to \(length): \(prompt)")
    }

    /// sentencepiece's own ids (no Wan cleaning) for whitespace runs, with the model's normalizer flags
    /// (`add_dummy_prefix`, `remove_extra_whitespaces`, `escape_whitespaces`) left unset, so their
    /// defaults apply, with all three off, and with only the extra whitespace kept; and with user-defined
    /// symbols added (`golden.USER_SYMBOLS`).
    func testTokenizerNormalizerFlagsMatchSentencepiece() throws {
        _ = try exportedTokenizer()
        let (arrays, metadata) = try fixtureWithMetadata("tokenizer_normalizer")
        for variant in ["defaults", "flags_off", "prefix_only", "user_defined"] {
            let file = try XCTUnwrap(metadata["model_\(variant)"])
            let tokenizer = try UMT5Tokenizer(url: Self.golden.appendingPathComponent("fixtures/\(file)"))
            try assertSentencepieceIds(tokenizer, variant, arrays, metadata)
        }
    }
}

/// Fixture reading and comparison, shared by the golden and contract tests.
extension XCTestCase {
    /// The tokenizer's ids of every fixture text (`text_<i>`) equal sentencepiece's (`<variant>_ids_<i>`,
    /// written by `golden._sentencepiece_ids`).
    func assertSentencepieceIds(
        _ tokenizer: UMT5Tokenizer, _ variant: String, _ arrays: [String: MLXArray], _ metadata: [String: String],
        file: StaticString = #filePath, line: UInt = #line
    ) throws {
        var index = 0
        while let text = metadata["text_\(index)"] {
            XCTAssertEqual(tokenizer.encodePieces(text), try ints(arrays["\(variant)_ids_\(index)"]),
                           "\(variant), text \(index): \(text.debugDescription)", file: file, line: line)
            index += 1
        }
        XCTAssertGreaterThan(index, 0, "\(variant): no fixture texts", file: file, line: line)
    }

    func fixture(_ name: String) throws -> [String: MLXArray] {
        try fixtureWithMetadata(name).0
    }

    func fixtureWithMetadata(_ name: String) throws -> ([String: MLXArray], [String: String]) {
        try loadArraysAndMetadata(url: GoldenTests.golden.appendingPathComponent("fixtures/\(name).safetensors"))
    }

    func doubles(_ array: MLXArray) -> [Double] {
        array.asType(.float32).asArray(Float.self).map { Double($0) }
    }

    func ints(_ array: MLXArray?, file: StaticString = #filePath, line: UInt = #line) throws -> [Int] {
        try XCTUnwrap(array, file: file, line: line).asArray(Int32.self).map { Int($0) }
    }

    /// max |actual - expected| <= tolerance * max |expected|.
    func assertClose(
        _ actual: MLXArray, _ expected: MLXArray, tolerance: Float = GoldenTests.defaultTolerance, _ what: String,
        file: StaticString = #filePath, line: UInt = #line
    ) {
        XCTAssertEqual(actual.shape, expected.shape, "\(what): shape", file: file, line: line)
        guard actual.shape == expected.shape else { return }
        let error = abs(actual.asType(.float32) - expected.asType(.float32)).max().item(Float.self)
        let scale = max(abs(expected.asType(.float32)).max().item(Float.self), 1e-6)
        print("GOLDEN \(what): relative error \(error / scale) (tolerance \(tolerance))")
        XCTAssertLessThanOrEqual(error / scale, tolerance, "\(what): relative error \(error / scale)", file: file, line: line)
    }
}
