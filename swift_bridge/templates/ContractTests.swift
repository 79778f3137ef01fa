// {{header}}

import Foundation
import MLX
import MLXNN
import XCTest

@testable import LightningVideo

/// What the golden model's forward passes leave out, each against an independent source: code the exported
/// configuration does not run (FFN chunking, RoPE at a real head width, pixel shuffle, the Euler and
/// unwarped few-step samplers) against the Python runtime or NumPy (`Golden/fixtures`), and the pipeline's
/// stated contract (request validation, memory settings, stage measurements, benchmark JSON).
final class ContractTests: XCTestCase {
    static let modelURL = GoldenTests.modelURL

    func metadataInt(_ metadata: [String: String], _ key: String) throws -> Int {
        try XCTUnwrap(Int(try XCTUnwrap(metadata[key], key)), key)
    }

    // MARK: DiT

    /// A chunk is the most tokens whose fp32 activation and GELU copy (8 bytes an element) fit in the
    /// budget, and at least one token; the budget is the Python runtime's.
    func testFeedForwardChunksFitTheBudget() throws {
        let (_, metadata) = try fixtureWithMetadata("ffn")
        let budget = WanFeedForward.activationBudget
        XCTAssertEqual(budget, try metadataInt(metadata, "activation_budget"))
        for hidden in [96, 8_960, 13_824, 1 << 24] {
            let chunk = WanFeedForward.chunkTokens(hidden: hidden, budget: budget)
            XCTAssertLessThanOrEqual(chunk * hidden * 8, budget, "hidden \(hidden)")
            XCTAssertGreaterThan((chunk + 1) * hidden * 8, budget, "hidden \(hidden)")
        }
        XCTAssertEqual(WanFeedForward.chunkTokens(hidden: budget, budget: budget), 1)  // one token is over budget
    }

    func testChunkedFeedForwardMatchesPython() throws {
        let (f, metadata) = try fixtureWithMetadata("ffn")
        let budget = try metadataInt(metadata, "budget")
        let ffn = try ModelFolder(url: Self.modelURL).loadDiT().blocks[0].ffn
        XCTAssertEqual(ffn.chunkTokens(budget: budget), try metadataInt(metadata, "chunk_tokens"))
        let x = try XCTUnwrap(f["x"])
        assertClose(ffn(x, budget: budget), try XCTUnwrap(f["y"]), "FFN in chunks")
        assertClose(ffn(x), try XCTUnwrap(f["y"]), "FFN in one piece")
    }

    func testBatchSharesOneTimestep() throws {
        let f = try fixture("dit_batch")
        let model = try ModelFolder(url: Self.modelURL).loadDiT()
        let velocity = model(try XCTUnwrap(f["latents"]), timesteps: doubles(try XCTUnwrap(f["timesteps"])),
                             context: try XCTUnwrap(f["context"]))
        assertClose(velocity, try XCTUnwrap(f["velocity"]), "DiT velocity, batch of 2, one timestep")
    }

    /// The q/k norm of a model whose pruned heads were zeroed (`qk_norm: "masked"`): the mean runs over the
    /// full width, as in Python's `QKNorm`.
    func testMaskedQKNormMatchesPython() throws {
        let (f, metadata) = try fixtureWithMetadata("qk_norm")
        let weight = try XCTUnwrap(f["weight"])
        let eps = try XCTUnwrap(Double(try XCTUnwrap(metadata["eps"])))
        let norm = WanQKNorm(width: weight.dim(0), eps: eps, fullWidth: try metadataInt(metadata, "full_width"))
        try norm.update(parameters: ModuleParameters.unflattened(["weight": weight]), verify: [.all])
        assertClose(norm(try XCTUnwrap(f["x"])), try XCTUnwrap(f["y"]), "masked q/k RMSNorm")
    }

    /// Latents to tokens and head output to latents with a 2x1x3 patch, as Python's `patchify`/`unpatchify`.
    func testPatchifyMatchesPython() throws {
        let (f, metadata) = try fixtureWithMetadata("patchify")
        let json = Data(try XCTUnwrap(metadata["config"]).utf8)
        let config = try JSONDecoder().decode(WanDiTConfiguration.self, from: json)
        let expectedGrid = try JSONDecoder().decode([Int].self, from: Data(try XCTUnwrap(metadata["grid"]).utf8))
        let model = WanDiTModel(config)
        let (tokens, grid) = model.patchify(try XCTUnwrap(f["x"]))
        XCTAssertEqual([grid.0, grid.1, grid.2], expectedGrid)
        assertClose(tokens, try XCTUnwrap(f["tokens"]), tolerance: 0, "patchify")
        assertClose(model.unpatchify(try XCTUnwrap(f["head_out"]), grid: grid), try XCTUnwrap(f["video"]), tolerance: 0,
                    "unpatchify")
    }

    func testRoPETablesMatchPython() throws {
        let (f, metadata) = try fixtureWithMetadata("rope")
        let grid = try JSONDecoder().decode([Int].self, from: Data(try XCTUnwrap(metadata["grid"]).utf8))
        let theta = try XCTUnwrap(Double(try XCTUnwrap(metadata["theta"])))
        let headDim = try metadataInt(metadata, "head_dim")
        let rope = WanRoPE3D(grid: (grid[0], grid[1], grid[2]), headDim: headDim, theta: theta)
        assertClose(rope.cosTable, try XCTUnwrap(f["cos"]), "RoPE cos, head width \(headDim)")
        assertClose(rope.sinTable, try XCTUnwrap(f["sin"]), "RoPE sin, head width \(headDim)")
        assertClose(rope.apply(try XCTUnwrap(f["x"])), try XCTUnwrap(f["rotated"]), "RoPE rotation")
    }

    // MARK: UMT5

    /// Buckets out to 3x `max_distance` (the golden prompts only reach the exact range below `numBuckets / 4`).
    func testRelativePositionBucketsMatchPython() throws {
        let (f, metadata) = try fixtureWithMetadata("umt5_numerics")
        let numBuckets = try metadataInt(metadata, "num_buckets")
        let maxDistance = try metadataInt(metadata, "max_distance")
        let buckets = try ints(f["relative"]).map {
            umt5RelativePositionBucket($0, numBuckets: numBuckets, maxDistance: maxDistance)
        }
        XCTAssertEqual(buckets, try ints(f["buckets"]))
    }

    /// A float16 projection clamps its input and output to the float16 range (Wan's `fp16_clamp`), so an
    /// overflow gives +-65504, never inf.
    func testFloat16ProjectionClampsLikePython() throws {
        let f = try fixture("umt5_numerics")
        let weight = try XCTUnwrap(f["weight"])
        let layer = Linear(weight.dim(1), weight.dim(0), bias: false)
        try layer.update(parameters: ModuleParameters.unflattened(["weight": weight]), verify: [.all])
        let y = umt5Linear(layer, try XCTUnwrap(f["x"]))
        XCTAssertEqual(y.dtype, .float16)
        assertClose(y, try XCTUnwrap(f["y"]), "float16 projection, clamped")
    }

    // MARK: Tokenizer

    /// A sentencepiece model must hold the pad (0) and EOS (1) ids: with one piece it is refused, with two
    /// it loads.
    func testTokenizerNeedsPadAndEOSPieces() throws {
        func piece(_ text: String) -> [UInt8] {  // ModelProto.pieces: piece, score 0, type CONTROL
            let body: [UInt8] = [0x0A, UInt8(text.utf8.count)] + Array(text.utf8) + [0x15, 0, 0, 0, 0, 0x18, 3]
            return [0x0A, UInt8(body.count)] + body
        }
        let folder = FileManager.default.temporaryDirectory
            .appendingPathComponent("lightning-video-spm-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let one = folder.appendingPathComponent("one.model")
        let two = folder.appendingPathComponent("two.model")
        try Data(piece("<pad>")).write(to: one)
        try Data(piece("<pad>") + piece("</s>")).write(to: two)
        XCTAssertThrowsError(try UMT5Tokenizer(url: one))
        XCTAssertEqual(try UMT5Tokenizer(url: two).encode(""), [1])
    }

    /// Wan's prompt cleaning as the Python runtime does it (`mlx_video.tokenizer.clean`).
    func testPromptCleaningMatchesPython() throws {
        let (_, metadata) = try fixtureWithMetadata("tokenizer_clean")
        var index = 0
        while let text = metadata["text_\(index)"] {
            XCTAssertEqual(UMT5Tokenizer.clean(text), try XCTUnwrap(metadata["clean_\(index)"]), text.debugDescription)
            index += 1
        }
        XCTAssertGreaterThan(index, 0)
    }

    func craftedModel(_ variant: String) throws -> URL {
        let (_, metadata) = try fixtureWithMetadata("tokenizer_crafted")
        return GoldenTests.golden.appendingPathComponent("fixtures/\(try XCTUnwrap(metadata["model_\(variant)"]))")
    }

    /// sentencepiece's own ids on the hand-made models (`golden.CRAFTED_PIECES`): a tie, unknown characters
    /// against pieces that cover them, an unused piece, user-defined symbols, byte fallback, no charsmap.
    func testCraftedTokenizerModelsMatchSentencepiece() throws {
        let (arrays, metadata) = try fixtureWithMetadata("tokenizer_crafted")
        for variant in ["crafted", "crafted_bytes"] {
            let tokenizer = try UMT5Tokenizer(url: try craftedModel(variant))
            try assertSentencepieceIds(tokenizer, variant, arrays, metadata)
        }
    }

    /// A field that claims more bytes than its message holds is refused: a score cut inside a piece, a varint
    /// cut inside a piece.
    func testMalformedTokenizerModelsAreRefused() throws {
        let folder = FileManager.default.temporaryDirectory
            .appendingPathComponent("lightning-video-malformed-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let cases: [[UInt8]] = [
            [0x0A, 0x03, 0x15, 0x00, 0x00], [0x0A, 0x02, 0x18, 0x80], [0x0A, 0x03, 0x0A, 0x05, 0x61],
        ]
        for (index, bytes) in cases.enumerated() {
            let url = folder.appendingPathComponent("malformed-\(index).model")
            try Data(bytes).write(to: url)
            XCTAssertThrowsError(try UMT5Tokenizer(url: url), "\(bytes)")
        }
    }

    /// A model file cut short anywhere either loads (a cut between pieces) or throws: it is never read past
    /// its end. Cut inside its first field, it throws.
    func testTruncatedTokenizerModelsNeverReadPastTheEnd() throws {
        let data = try Data(contentsOf: try craftedModel("crafted"))
        let folder = FileManager.default.temporaryDirectory
            .appendingPathComponent("lightning-video-cut-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        var refused = 0
        for length in 1 ..< data.count {
            let url = folder.appendingPathComponent("cut-\(length).model")
            try data.prefix(length).write(to: url)
            if (try? UMT5Tokenizer(url: url)) == nil {
                refused += 1
            }
        }
        XCTAssertGreaterThan(refused, data.count / 2)
        for length in [1, 2, 5] {
            let url = folder.appendingPathComponent("cut-\(length).model")
            XCTAssertThrowsError(try UMT5Tokenizer(url: url), "cut at \(length) bytes")
        }
    }

    // MARK: TAEHV

    /// A decoder with patch 2, no spatial upsampling and time upscale 4 from two of three stages, built from its
    /// configuration (the Python model's weights load strictly), decoding as the Python runtime does, in
    /// parallel and streamed (frames 2 pixels high: fewer rows than frames trimmed).
    func testDecoderVariantMatchesPython() throws {
        let (f, metadata) = try fixtureWithMetadata("decoder_variant")
        let json = Data(try XCTUnwrap(metadata["config"]).utf8)
        let config = try JSONDecoder().decode(TAEHVConfiguration.self, from: json)
        let model = TAEHVDecoder(config)
        let weights = GoldenTests.golden.appendingPathComponent("fixtures/decoder_variant_weights.safetensors")
        try loadWeights(model, url: weights, quantization: nil)
        let latents = try XCTUnwrap(f["latents"])
        let frames = try XCTUnwrap(f["frames"])
        assertClose(model.decode(latents), frames, "decoder variant, parallel")
        let stream = TAEHVDecoderStream(model)
        let pieces = (0 ..< latents.dim(1)).map { stream.push(latents[0..., $0 ..< ($0 + 1)]) }
        assertClose(concatenated(pieces, axis: 1), frames, "decoder variant, streamed")
        stream.reset()
        assertClose(stream.push(latents), frames, "decoder variant, streamed after a reset, all latents in one push")
        let counts = try JSONDecoder().decode([Int].self, from: Data(try XCTUnwrap(metadata["num_frames"]).utf8))
        XCTAssertEqual(counts.indices.map { config.numFrames(latentFrames: $0) }, counts)
        XCTAssertEqual(config.numFrames(latentFrames: latents.dim(1)), frames.dim(1))
    }

    /// The decoder computes in its weights' dtype (float16 in an export; the golden model is float32).
    func testDecoderComputesInItsWeightsDType() throws {
        let model = try ModelFolder(url: Self.modelURL).loadDecoder()
        XCTAssertEqual(model.computeDType, .float32)
        let half = model.parameters().flattened().map { ($0.0, $0.1.asType(.float16)) }
        try model.update(parameters: ModuleParameters.unflattened(half), verify: [.all])
        XCTAssertEqual(model.computeDType, .float16)
    }

    func testPixelShuffleMatchesItsDefinition() throws {
        let (f, metadata) = try fixtureWithMetadata("pixel_shuffle")
        let x = try XCTUnwrap(f["x"])
        let patch = try metadataInt(metadata, "patch")
        assertClose(pixelShuffle(x, patch: patch), try XCTUnwrap(f["y"]), tolerance: 0, "pixel shuffle, patch \(patch)")
        assertClose(pixelShuffle(x, patch: 1), x, tolerance: 0, "pixel shuffle, patch 1")
    }

    // MARK: Sampler

    func samplerConfig(_ metadata: [String: String], _ index: Int) throws -> SamplerConfiguration {
        let json = try XCTUnwrap(metadata["config_\(index)"])
        return try JSONDecoder().decode(SamplerConfiguration.self, from: Data(json.utf8))
    }

    func testFlowMatchTableMatchesPython() throws {
        let (f, metadata) = try fixtureWithMetadata("flow_table")
        let table = Sampler.flowMatchTable(shift: try XCTUnwrap(Double(try XCTUnwrap(metadata["shift"]))))
        XCTAssertEqual(table.sigmas, try XCTUnwrap(f["sigmas"]).asArray(Float.self))
        XCTAssertEqual(table.timesteps, try XCTUnwrap(f["timesteps"]).asArray(Float.self))
    }

    /// `sampling.sample` of the Python runtime with `golden.toy_velocity` in place of the DiT: Euler
    /// (3 steps, 1 step), the few-step sampler unwarped, and warped from a list ending in 0.
    func testSamplerRunsMatchPython() throws {
        let (f, metadata) = try fixtureWithMetadata("sampler_runs")
        let noise = try XCTUnwrap(f["noise"])
        var index = 0
        while metadata["config_\(index)"] != nil {
            let config = try samplerConfig(metadata, index)
            let seed = UInt64(try metadataInt(metadata, "seed_\(index)"))
            var reported = [Double]()
            let latents = try Sampler.sample(config, noise: noise, seed: seed, velocity: { x, t in
                x * Float(t / 1000) - 0.25
            }, progress: { _, _, t in reported.append(t) })
            assertClose(latents, try XCTUnwrap(f["latents_\(index)"]), "\(config.name) run \(index)")
            let schedule = try Sampler.schedule(config)
            let timesteps = try XCTUnwrap(f["timesteps_\(index)"]).asArray(Float.self)
            XCTAssertEqual(schedule.timesteps.map { Float($0) }, timesteps, "run \(index): timesteps")
            let sigmas = try XCTUnwrap(f["sigmas_\(index)"]).asArray(Float.self)
            XCTAssertEqual(schedule.sigmas.map { Float($0) }, sigmas, "run \(index): sigmas")
            XCTAssertEqual(reported, schedule.timesteps, "run \(index): progress per step")
            index += 1
        }
        XCTAssertGreaterThan(index, 0)
    }

    /// What the Python runtime refuses too (guidance without a negative prompt, no Euler steps, warped steps
    /// off the 1000-step grid), and samplers the Swift port leaves out.
    func testSamplerRefusesWhatIsNotPorted() throws {
        let (f, metadata) = try fixtureWithMetadata("sampler_runs")
        let noise = try XCTUnwrap(f["noise"])
        var config = try samplerConfig(metadata, 0)
        config.guidance = 1.5
        XCTAssertThrowsError(try Sampler.sample(config, noise: noise, seed: 0, velocity: { x, _ in x }))
        config = try samplerConfig(metadata, 0)
        config.steps = 0
        XCTAssertThrowsError(try Sampler.schedule(config))
        config.name = "unipc"
        config.steps = 3
        XCTAssertThrowsError(try Sampler.schedule(config))
        var fewStep = try samplerConfig(metadata, 2)
        fewStep.warp = true
        for steps in [[1000, 937.5], [1001, 500]] {
            fewStep.denoisingStepList = steps
            XCTAssertThrowsError(try Sampler.schedule(fewStep), "\(steps)")
        }
    }

    // MARK: Pipeline

    func testRequestsAreValidatedLikeThePythonRuntime() throws {
        let (arrays, metadata) = try fixtureWithMetadata("requests")
        let pipeline = try LightningVideoPipeline(url: Self.modelURL)
        var index = 0
        while let json = metadata["request_\(index)"] {
            let r = try JSONDecoder().decode([String: Int].self, from: Data(json.utf8))
            let request = GenerationRequest(
                prompt: "x", frames: try XCTUnwrap(r["frames"]), height: try XCTUnwrap(r["height"]),
                width: try XCTUnwrap(r["width"]))
            if let expected = arrays["latent_shape_\(index)"] {
                XCTAssertEqual(try pipeline.latentShape(for: request), try ints(expected), json)
            } else {
                XCTAssertThrowsError(try pipeline.latentShape(for: request), json) { error in
                    guard case LightningVideoError.invalidRequest = error else {
                        return XCTFail("\(json): \(error)")
                    }
                }
            }
            index += 1
        }
        XCTAssertGreaterThan(index, 0)
    }

    /// The default request is one the exported model accepts, with the Python runtime's default seed.
    func testDefaultRequestIsValid() throws {
        let (_, metadata) = try fixtureWithMetadata("requests")
        let request = GenerationRequest(prompt: "x")
        XCTAssertEqual(request.seed, UInt64(try metadataInt(metadata, "default_seed")))
        XCTAssertNoThrow(try LightningVideoPipeline(url: Self.modelURL).latentShape(for: request))
    }

    /// Height and width are checked against their own patch sizes (`patch_size` is [t, h, w]).
    func testNonSquarePatchesCheckHeightAndWidthSeparately() throws {
        let folder = FileManager.default.temporaryDirectory
            .appendingPathComponent("lightning-video-patch-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let data = try Data(contentsOf: Self.modelURL.appendingPathComponent("config.json"))
        var config = try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
        var dit = try XCTUnwrap(config["dit"] as? [String: Any])
        dit["patch_size"] = [1, 1, 4]
        config["dit"] = dit
        try JSONSerialization.data(withJSONObject: config).write(to: folder.appendingPathComponent("config.json"))
        let pipeline = try LightningVideoPipeline(url: folder)
        let space = try XCTUnwrap(pipeline.folder.configuration.decoder).spaceUpscale
        let wide = GenerationRequest(prompt: "x", frames: 1, height: space, width: 4 * space)
        XCTAssertEqual(Array(try pipeline.latentShape(for: wide)[2 ... 3]), [1, 4])
        let tall = GenerationRequest(prompt: "x", frames: 1, height: 4 * space, width: space)
        XCTAssertThrowsError(try pipeline.latentShape(for: tall))
    }

    func testMemorySettingsAreTheGenerators() throws {
        let (_, metadata) = try fixtureWithMetadata("requests")
        typealias P = LightningVideoPipeline
        XCTAssertEqual(P.defaultMemoryLimit, try metadataInt(metadata, "phone_memory_limit"))
        XCTAssertEqual(P.memoryHeadroom, try metadataInt(metadata, "phone_memory_headroom"))
        XCTAssertEqual(P.minimumMemoryLimit, try metadataInt(metadata, "phone_minimum_memory_limit"))
        XCTAssertEqual(P.defaultCacheLimit, try metadataInt(metadata, "phone_cache_limit"))
    }

    /// With no limit given: the default, lowered to what the OS reports available minus the headroom but not
    /// below the minimum; an OS that reports nothing (0) leaves the default.
    func testMemoryLimitFollowsTheAvailableMemory() {
        typealias P = LightningVideoPipeline
        XCTAssertEqual(P.memoryLimit(available: 0), P.defaultMemoryLimit)
        let plenty = P.defaultMemoryLimit + P.memoryHeadroom + (1 << 30)
        XCTAssertEqual(P.memoryLimit(available: plenty), P.defaultMemoryLimit)
        XCTAssertEqual(P.memoryLimit(available: P.defaultMemoryLimit + P.memoryHeadroom), P.defaultMemoryLimit)
        let some = 256 << 20
        let between = P.minimumMemoryLimit + P.memoryHeadroom + some
        XCTAssertEqual(P.memoryLimit(available: between), P.minimumMemoryLimit + some)
        XCTAssertEqual(P.memoryLimit(available: P.memoryHeadroom), P.minimumMemoryLimit)
        XCTAssertEqual(P.memoryLimit(available: 1), P.minimumMemoryLimit)
    }

    func testConfigureMemorySetsTheLimits() {
        typealias P = LightningVideoPipeline
        let saved = (Memory.memoryLimit, Memory.cacheLimit)
        defer {
            Memory.memoryLimit = saved.0
            Memory.cacheLimit = saved.1
        }
        P.configureMemory(memoryLimit: 3 << 30, cacheLimit: 5 << 20)
        XCTAssertEqual(Memory.memoryLimit, 3 << 30)
        XCTAssertEqual(Memory.cacheLimit, 5 << 20)
        P.configureMemory()
        XCTAssertEqual(Memory.memoryLimit, P.memoryLimit(available: P.availableMemory()))
        XCTAssertEqual(Memory.cacheLimit, P.defaultCacheLimit)
        #if !os(iOS)
        XCTAssertEqual(P.availableMemory(), 0)  // only iOS reports it
        #endif
    }

    /// `generate` hands back the streamed pieces as one `[F, H, W, 3]` video.
    func testStreamedPiecesMakeOneVideo() throws {
        let f = try fixture("decoder")
        let stream = TAEHVDecoderStream(try ModelFolder(url: Self.modelURL).loadDecoder())
        let latents = try XCTUnwrap(f["latents"])
        let pieces = (0 ..< latents.dim(1)).map { stream.push(latents[0..., $0 ..< ($0 + 1)]) }
        assertClose(LightningVideoPipeline.video(pieces), try XCTUnwrap(f["frames"])[0], "frames [F, H, W, 3]")
    }

    func testStagesAreMeasured() throws {
        let pipeline = try LightningVideoPipeline(url: Self.modelURL)
        let pause = 0.05
        let start = Date()
        let size = pipeline.measured("first") { () -> Int in
            Thread.sleep(forTimeInterval: pause)
            let x = MLXArray.zeros([1 << 18])  // 1 MiB of fp32, live during the stage
            eval(x)
            return x.size
        }
        let elapsed = Date().timeIntervalSince(start)
        pipeline.measured("second") {}
        XCTAssertEqual(size, 1 << 18)
        let stages = pipeline.measurements
        XCTAssertEqual(stages.map(\.stage), ["first", "second"])
        XCTAssertGreaterThanOrEqual(stages[0].seconds, pause)
        XCTAssertLessThanOrEqual(stages[0].seconds, elapsed)
        XCTAssertGreaterThanOrEqual(stages[0].peakMemoryBytes, 4 << 18)
        XCTAssertGreaterThan(stages[0].footprintBytes, 0)
    }

    func number(_ value: Any?) -> Double? {
        switch value {
        case let n as NSNumber: return n.doubleValue
        case let i as Int: return Double(i)
        case let d as Double: return d
        default: return nil
        }
    }

    /// The end-to-end row: the stages' summed time, their highest peak and footprint (all 0 before any stage).
    func testBenchmarkJSONEndToEndRow() throws {
        let pipeline = try LightningVideoPipeline(url: Self.modelURL)
        let request = GenerationRequest(prompt: "x", frames: 5, height: 32, width: 48)
        func document() throws -> [String: Any] {
            let data = try pipeline.benchmarkJSON(request: request)
            return try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
        }
        func rows() throws -> [(stage: String, seconds: Double?, peak: Double?, footprint: Double?)] {
            try XCTUnwrap(try document()["stages"] as? [[String: Any]]).map { row in
                let mlx = row["mlx"] as? [String: Any]
                let memory = mlx?["memory"] as? [String: Any]
                return (row["stage"] as? String ?? "", number(mlx?["full_model_time_s"]),
                        number(memory?["mlx_peak_bytes"]), number(memory?["footprint_bytes"]))
            }
        }
        let empty = try rows()
        XCTAssertEqual(empty.map(\.stage), ["model:end_to_end"])
        XCTAssertEqual(empty[0].seconds, 0)
        XCTAssertEqual(empty[0].peak, 0)
        XCTAssertEqual(empty[0].footprint, 0)
        pipeline.measured("a") {
            Thread.sleep(forTimeInterval: 0.01)
            eval(MLXArray.zeros([1 << 16]))
        }
        pipeline.measured("b") { eval(MLXArray.zeros([1 << 18])) }
        let stages = pipeline.measurements
        let full = try rows()
        XCTAssertEqual(full.map(\.stage), ["model:a", "model:b", "model:end_to_end"])
        let total = try XCTUnwrap(full[2].seconds)
        XCTAssertEqual(total, stages.reduce(0) { $0 + $1.seconds }, accuracy: 1e-9)
        XCTAssertGreaterThan(total, 0.01 * 0.99)
        XCTAssertEqual(full[2].peak, Double(try XCTUnwrap(stages.map(\.peakMemoryBytes).max())))
        XCTAssertEqual(full[2].footprint, Double(try XCTUnwrap(stages.map(\.footprintBytes).max())))
        let machine = try XCTUnwrap((try document()["machine"] as? [String: Any])?["machine"] as? String)
        XCTAssertFalse(machine.isEmpty)
        XCTAssertFalse(machine.unicodeScalars.contains { $0.value == 0 }, machine.debugDescription)
    }

    func testResidentBytesReadsVmRSS() {
        let status = "Name:\tlightning-video\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nVmData:\t  56 kB\n"
        XCTAssertEqual(residentBytes(procStatus: status), 1234 * 1024)
        XCTAssertEqual(residentBytes(procStatus: "Name:\tlightning-video\n"), 0)
    }
}
