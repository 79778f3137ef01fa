// {{header}}

import Foundation
import MLX
import MLXNN

#if os(iOS)
import os
#endif

/// One text-to-video request. `frames` must be `4k + 1` (the decoder makes 4 frames per latent after
/// the first); `height` and `width` multiples of 16 (8x decoder upscale, 2x2 DiT patches).
public struct GenerationRequest: Sendable {
    public var prompt: String
    public var frames: Int
    public var height: Int
    public var width: Int
    public var seed: UInt64

    public init(prompt: String, frames: Int = 21, height: Int = 480, width: Int = 832, seed: UInt64 = 0) {
        self.prompt = prompt
        self.frames = frames
        self.height = height
        self.width = width
        self.seed = seed
    }
}

/// The staged pipeline for a phone: each stage loads its model, runs, and frees it before the next one
/// loads, so the peak is the largest stage (DiT weights + activations), not the sum:
///
/// 1. tokenizer + UMT5 encoder -> prompt embeddings (encoder freed),
/// 2. DiT + few-step sampler -> latents (DiT freed; the graph is evaluated after every block),
/// 3. TAEHV streaming decode -> frames, one latent frame at a time.
///
/// `MLXArray` and `Module` are not `Sendable`: run a pipeline on one task/actor and hand out evaluated
/// arrays (or pixel buffers) only.
public final class LightningVideoPipeline {
    public let folder: ModelFolder

    /// Defaults for an 8 GB iPhone 16 Pro Max. With the `com.apple.developer.kernel.increased-memory-limit`
    /// entitlement an app may use well above half of the RAM; MLX is kept below 4.5 GB (and below what the
    /// OS says is available, minus 512 MB of headroom for the app and the frames being shown). A small
    /// buffer cache keeps freed stage memory from lingering between stages.
    public static let defaultMemoryLimit = 4_608 * 1024 * 1024
    public static let defaultCacheLimit = 20 * 1024 * 1024

    public init(folder: ModelFolder) {
        self.folder = folder
    }

    public convenience init(url: URL) throws {
        self.init(folder: try ModelFolder(url: url))
    }

    /// Set `Memory.memoryLimit` and `Memory.cacheLimit` (call once at startup, before loading a model).
    public static func configureMemory(memoryLimit: Int? = nil, cacheLimit: Int = defaultCacheLimit) {
        var limit = memoryLimit ?? defaultMemoryLimit
        #if os(iOS)
        let available = Int(os_proc_available_memory())
        if memoryLimit == nil && available > 0 {
            limit = min(limit, max(available - 512 * 1024 * 1024, 1024 * 1024 * 1024))
        }
        #endif
        Memory.memoryLimit = limit
        Memory.cacheLimit = cacheLimit
    }

    /// Drop what a finished stage left in MLX's buffer cache.
    static func endStage() {
        Memory.clearCache()
    }

    /// Latent shape `[1, T, H/8, W/8, C]` for a request.
    public func latentShape(for request: GenerationRequest) throws -> [Int] {
        guard let decoder = folder.configuration.decoder, let dit = folder.configuration.dit else {
            throw LightningVideoError.missingComponent("DiT or decoder", folder.url)
        }
        let up = decoder.timeUpscale
        guard request.frames >= 1, (request.frames + decoder.framesToTrim) % up == 0 else {
            throw LightningVideoError.invalidRequest("frames must be \(up)k + 1, got \(request.frames)")
        }
        let space = decoder.spaceUpscale
        let patch = dit.patchSize
        guard request.height % (space * patch[1]) == 0, request.width % (space * patch[2]) == 0 else {
            throw LightningVideoError.invalidRequest(
                "height and width must be multiples of \(space * patch[1]), got \(request.height)x\(request.width)")
        }
        return [1, (request.frames + decoder.framesToTrim) / up, request.height / space, request.width / space, dit.inChannels]
    }

    /// Stage 1: prompt -> UMT5 embeddings `[1, textLen, dim]` (fp32). The encoder is freed on return.
    public func encodePrompt(_ prompt: String) throws -> MLXArray {
        let tokenizer = try folder.loadTokenizer()
        let ids = tokenizer.encode(prompt)
        let context: MLXArray
        do {
            let encoder = try folder.loadTextEncoder()
            context = encoder.encode(tokens: [ids])
            eval(context)
        }
        Self.endStage()
        return context
    }

    /// Stage 2: embeddings -> clean latents with the exported sampler. The DiT is freed on return.
    public func denoise(
        context: MLXArray, latentShape: [Int], seed: UInt64,
        progress: ((Int, Int, Double) -> Void)? = nil
    ) throws -> MLXArray {
        guard let samplerConfig = folder.configuration.sampler else {
            throw LightningVideoError.missingComponent("sampler section", folder.url)
        }
        let latents: MLXArray
        do {
            let dit = try folder.loadDiT()
            let text = dit.prepareText(context)
            eval(text.flatMap { [$0.0, $0.1] })
            let keys = Sampler.noiseKeys(seed: seed, steps: 1)
            let noise = MLXRandom.normal(latentShape, key: keys.initial)
            latents = try Sampler.sample(samplerConfig, noise: noise, seed: seed, velocity: { x, t in
                dit(x, timesteps: [t], text: text)
            }, progress: progress)
            eval(latents)
        }
        Self.endStage()
        return latents
    }

    /// Stage 3: latents -> RGB frames in [0, 1], streamed: `onFrames` gets `[1, n, H, W, 3]` per latent
    /// frame (evaluated) as soon as it is decoded.
    public func decode(latents: MLXArray, onFrames: (MLXArray) throws -> Void) throws {
        do {
            let stream = TAEHVDecoderStream(try folder.loadDecoder())
            for t in 0 ..< latents.dim(1) {
                try onFrames(stream.push(latents[0..., t ..< (t + 1)]))
            }
        }
        Self.endStage()
    }

    /// All three stages; returns the frames `[F, H, W, 3]` in [0, 1] (fp32). For long videos prefer
    /// calling `decode(latents:onFrames:)` and consuming frames as they arrive.
    public func generate(
        _ request: GenerationRequest, progress: ((Int, Int, Double) -> Void)? = nil
    ) throws -> MLXArray {
        let shape = try latentShape(for: request)
        let context = try encodePrompt(request.prompt)
        let latents = try denoise(context: context, latentShape: shape, seed: request.seed, progress: progress)
        var frames = [MLXArray]()
        try decode(latents: latents) { frames.append($0.asType(.float32)) }
        return concatenated(frames, axis: 1)[0]
    }
}
