// {{header}}

import Foundation
import MLX
import MLXNN

#if os(iOS)
import os
#endif
#if canImport(Darwin)
import Darwin
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
    /// Wall time and peak memory of every stage run so far, in order (see `benchmarkJSON`).
    public private(set) var measurements: [StageMeasurement] = []

    /// Defaults for an 8 GB iPhone 16 Pro Max. With the `com.apple.developer.kernel.increased-memory-limit`
    /// entitlement an app may use well above half of the RAM; MLX is kept below 4.5 GB (and below what the
    /// OS says is available, minus 512 MB of headroom for the app and the frames being shown, but not below
    /// 1 GB). A small buffer cache keeps freed stage memory from lingering between stages. The figures come
    /// from the generator (`swift_bridge/codegen.py`, `PHONE_MEMORY`).
    public static let defaultMemoryLimit = {{constant:phone_memory_limit}}
    public static let memoryHeadroom = {{constant:phone_memory_headroom}}
    public static let minimumMemoryLimit = {{constant:phone_minimum_memory_limit}}
    public static let defaultCacheLimit = {{constant:phone_cache_limit}}

    public init(folder: ModelFolder) {
        self.folder = folder
    }

    public convenience init(url: URL) throws {
        self.init(folder: try ModelFolder(url: url))
    }

    /// Set `Memory.memoryLimit` and `Memory.cacheLimit` (call once at startup, before loading a model).
    public static func configureMemory(memoryLimit: Int? = nil, cacheLimit: Int = defaultCacheLimit) {
        Memory.memoryLimit = memoryLimit ?? Self.memoryLimit(available: availableMemory())
        Memory.cacheLimit = cacheLimit
    }

    /// The limit `configureMemory()` sets when given none, for `available` bytes the OS says the app may
    /// still allocate (0: the OS does not say): `defaultMemoryLimit`, lowered to `available - memoryHeadroom`
    /// but not below `minimumMemoryLimit`.
    public static func memoryLimit(available: Int) -> Int {
        guard available > 0 else { return defaultMemoryLimit }
        return min(defaultMemoryLimit, max(available - memoryHeadroom, minimumMemoryLimit))
    }

    /// What the OS says the app may still allocate (iOS `os_proc_available_memory`); 0 elsewhere.
    static func availableMemory() -> Int {
        #if os(iOS)
        return Int(os_proc_available_memory())
        #else
        return 0
        #endif
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
        guard request.height > 0, request.width > 0,
              request.height % (space * patch[1]) == 0, request.width % (space * patch[2]) == 0 else {
            throw LightningVideoError.invalidRequest(
                "height and width must be positive multiples of \(space * patch[1]), got \(request.height)x\(request.width)")
        }
        return [1, (request.frames + decoder.framesToTrim) / up, request.height / space, request.width / space, dit.inChannels]
    }

    /// Run one stage, recording its wall time, MLX's peak memory during it and the process footprint.
    func measured<T>(_ stage: String, _ body: () throws -> T) rethrows -> T {
        Memory.peakMemory = 0  // resets the peak counter (the value is ignored)
        let start = DispatchTime.now().uptimeNanoseconds
        let value = try body()
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        measurements.append(StageMeasurement(
            stage: stage, seconds: seconds, peakMemoryBytes: Memory.peakMemory, footprintBytes: processFootprintBytes()))
        return value
    }

    /// Stage 1: prompt -> UMT5 embeddings `[1, textLen, dim]` (fp32). The encoder is freed on return.
    public func encodePrompt(_ prompt: String) throws -> MLXArray {
        try measured("encode") { try encodePromptUnmeasured(prompt) }
    }

    func encodePromptUnmeasured(_ prompt: String) throws -> MLXArray {
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
        try measured("denoise") {
            try denoiseUnmeasured(context: context, latentShape: latentShape, seed: seed, progress: progress)
        }
    }

    func denoiseUnmeasured(
        context: MLXArray, latentShape: [Int], seed: UInt64, progress: ((Int, Int, Double) -> Void)?
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
        try measured("decode") { try decodeUnmeasured(latents: latents, onFrames: onFrames) }
    }

    func decodeUnmeasured(latents: MLXArray, onFrames: (MLXArray) throws -> Void) throws {
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
        return Self.video(frames)
    }

    /// The `[1, n, H, W, 3]` pieces `decode(latents:onFrames:)` streams, as one video `[F, H, W, 3]`.
    static func video(_ pieces: [MLXArray]) -> MLXArray {
        concatenated(pieces, axis: 1)[0]
    }
}

/// Wall time and peak memory of one pipeline stage.
public struct StageMeasurement: Sendable {
    public var stage: String
    public var seconds: Double
    /// `Memory.peakMemory` over the stage (MLX's allocator high-water mark; weights loaded in it included).
    public var peakMemoryBytes: Int
    /// The process footprint when the stage ended (iOS/macOS `phys_footprint`, what jetsam counts; Linux RSS).
    public var footprintBytes: Int
}

/// The process's memory footprint in bytes (0 when the OS does not say).
public func processFootprintBytes() -> Int {
    #if canImport(Darwin)
    var info = task_vm_info_data_t()
    var count = mach_msg_type_number_t(MemoryLayout<task_vm_info_data_t>.size / MemoryLayout<integer_t>.size)
    let result = withUnsafeMutablePointer(to: &info) {
        $0.withMemoryRebound(to: integer_t.self, capacity: Int(count)) {
            task_info(mach_task_self_, task_flavor_t(TASK_VM_INFO), $0, &count)
        }
    }
    return result == KERN_SUCCESS ? Int(info.phys_footprint) : 0
    #else
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return 0 }
    return residentBytes(procStatus: status)
    #endif
}

/// The `VmRSS` of a Linux `/proc/PID/status` text in bytes (0 when it has none).
func residentBytes(procStatus: String) -> Int {
    for line in procStatus.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
    }
    return 0
}

extension LightningVideoPipeline {
    /// The measurements of a run as `mlx-video bench` JSON (schema `mlx-video-bench/1`): one row per stage
    /// (`model:encode`, `model:denoise`, `model:decode`) and `model:end_to_end`, for
    /// `mlx-video bench --import FILE` to put beside the machine's own rows.
    public func benchmarkJSON(request: GenerationRequest, label: String? = nil, command: String = "") throws -> Data {
        var system = utsname()
        uname(&system)
        let machine = withUnsafeBytes(of: &system.machine) { raw in
            String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
        let info = ProcessInfo.processInfo
        let video = [request.height, request.width, request.frames]
        let shape = "custom"  // the request's size is in `video`
        let model = folder.url.lastPathComponent
        let method = "lightning-video (Swift, mlx-swift) staged pipeline on \(label ?? machine); one run, models "
            + "loaded inside their stage"
        func row(_ stage: String, _ seconds: Double, _ peak: Int, _ footprint: Int) -> [String: Any] {
            let time: [String: Any] = ["median_s": seconds, "min_s": seconds, "max_s": seconds, "spread": 0.0,
                                       "stdev_s": 0.0, "repeats": 1, "samples_s": [seconds]]
            return ["stage": "model:\(stage)", "model": model, "shape": shape, "video": video, "method": method,
                    "mlx": ["time": time, "full_model_time_s": seconds,
                            "memory": ["mlx_peak_bytes": peak, "footprint_bytes": footprint]] as [String: Any]]
        }
        var rows = measurements.map { row($0.stage, $0.seconds, $0.peakMemoryBytes, $0.footprintBytes) }
        rows.append(row("end_to_end", measurements.reduce(0) { $0 + $1.seconds },
                        measurements.map(\.peakMemoryBytes).max() ?? 0,
                        measurements.map(\.footprintBytes).max() ?? 0))
        let document: [String: Any] = [
            "schema": "mlx-video-bench/1", "mode": "device", "command": command,
            "created": ISO8601DateFormatter().string(from: Date()),
            "machine": ["label": label ?? machine, "machine": machine, "platform": info.operatingSystemVersionString,
                        "cpus": info.activeProcessorCount, "memory_bytes": Int(info.physicalMemory)] as [String: Any],
            "backend": ["mlx_device": "mlx-swift on \(machine)"],
            "versions": ["lightning-video": ModelFiles.format], "stages": rows, "notes": [String](),
        ]
        return try JSONSerialization.data(withJSONObject: document, options: [.prettyPrinted, .sortedKeys])
    }
}
