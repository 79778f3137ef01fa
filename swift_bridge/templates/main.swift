// {{header}}

import Foundation
import LightningVideo
import MLX

#if canImport(ImageIO)
import CoreGraphics
import ImageIO
import UniformTypeIdentifiers
#endif

let usageText = """
    usage: lightning-video MODEL_DIR PROMPT [--frames 21] [--height 480] [--width 832] [--seed 0] [--out frames]
                           [--bench-json FILE] [--label NAME]

    Runs the staged pipeline (text encoder, DiT with the exported sampler, streaming TAEHV decode) and writes
    one PNG per frame into --out. MODEL_DIR is the package's Model folder (or any exported model folder).
    --bench-json FILE writes each stage's wall time and peak memory (Memory.peakMemory and the process
    footprint) as `mlx-video bench` JSON, for `mlx-video bench --import FILE`; --label names the device.
    """

struct Options {
    var model = URL(fileURLWithPath: ".")
    var request = GenerationRequest(prompt: "")
    var output = URL(fileURLWithPath: "frames")
    var benchJSON: URL? = nil
    var label: String? = nil
}

enum CommandLineError: Error, CustomStringConvertible {
    case usage(String)

    var description: String {
        switch self {
        case .usage(let message): return message + "\n\n" + usageText
        }
    }
}

func parseOptions(_ arguments: [String]) throws -> Options {
    var options = Options()
    var positional = [String]()
    var index = 0
    func value(_ name: String) throws -> String {
        index += 1
        guard index < arguments.count else { throw CommandLineError.usage("\(name) needs a value") }
        return arguments[index]
    }
    func integer(_ name: String) throws -> Int {
        let text = try value(name)
        guard let number = Int(text) else { throw CommandLineError.usage("\(name): not an integer: \(text)") }
        return number
    }
    while index < arguments.count {
        let argument = arguments[index]
        switch argument {
        case "--frames": options.request.frames = try integer(argument)
        case "--height": options.request.height = try integer(argument)
        case "--width": options.request.width = try integer(argument)
        case "--seed": options.request.seed = UInt64(try integer(argument))
        case "--out": options.output = URL(fileURLWithPath: try value(argument))
        case "--bench-json": options.benchJSON = URL(fileURLWithPath: try value(argument))
        case "--label": options.label = try value(argument)
        case "-h", "--help": throw CommandLineError.usage("")
        default: positional.append(argument)
        }
        index += 1
    }
    guard positional.count == 2 else {
        throw CommandLineError.usage("expected MODEL_DIR and PROMPT, got \(positional.count) arguments")
    }
    options.model = URL(fileURLWithPath: positional[0])
    options.request.prompt = positional[1]
    return options
}

func writePNG(_ frame: MLXArray, to url: URL) throws {
    #if canImport(ImageIO)
    let (height, width, _) = frame.shape3
    let bytes = round(clip(frame, min: 0, max: 1) * 255).asType(.uint8).asArray(UInt8.self)
    let provider = CGDataProvider(data: Data(bytes) as CFData)!
    let image = CGImage(
        width: width, height: height, bitsPerComponent: 8, bitsPerPixel: 24, bytesPerRow: width * 3,
        space: CGColorSpaceCreateDeviceRGB(), bitmapInfo: CGBitmapInfo(rawValue: 0), provider: provider,
        decode: nil, shouldInterpolate: false, intent: .defaultIntent)!
    guard let destination = CGImageDestinationCreateWithURL(url as CFURL, UTType.png.identifier as CFString, 1, nil)
    else {
        throw CommandLineError.usage("cannot write \(url.path)")
    }
    CGImageDestinationAddImage(destination, image, nil)
    CGImageDestinationFinalize(destination)
    #else
    try save(arrays: ["frame": frame], url: url.deletingPathExtension().appendingPathExtension("safetensors"))
    #endif
}

do {
    let options = try parseOptions(Array(CommandLine.arguments.dropFirst()))
    LightningVideoPipeline.configureMemory()
    let pipeline = try LightningVideoPipeline(url: options.model)
    let shape = try pipeline.latentShape(for: options.request)
    try FileManager.default.createDirectory(at: options.output, withIntermediateDirectories: true)
    let start = Date()
    let context = try pipeline.encodePrompt(options.request.prompt)
    print("text encoded in \(String(format: "%.1f", Date().timeIntervalSince(start))) s")
    let latents = try pipeline.denoise(context: context, latentShape: shape, seed: options.request.seed) { i, n, t in
        print("step \(i + 1)/\(n) (t = \(t)) at \(String(format: "%.1f", Date().timeIntervalSince(start))) s")
    }
    var written = 0
    try pipeline.decode(latents: latents) { frames in
        for k in 0 ..< frames.dim(1) {
            try writePNG(frames[0, k].asType(.float32), to: options.output.appendingPathComponent(String(format: "frame_%04d.png", written)))
            written += 1
        }
    }
    print("wrote \(written) frames to \(options.output.path) in \(String(format: "%.1f", Date().timeIntervalSince(start))) s")
    for m in pipeline.measurements {
        print("\(m.stage): \(String(format: "%.2f", m.seconds)) s, MLX peak \(m.peakMemoryBytes / 1_048_576) MB, "
            + "footprint \(m.footprintBytes / 1_048_576) MB")
    }
    if let url = options.benchJSON {
        let command = (["lightning-video"] + CommandLine.arguments.dropFirst()).joined(separator: " ")
        try pipeline.benchmarkJSON(request: options.request, label: options.label, command: command)
            .write(to: url, options: .atomic)
        print("wrote \(url.path) (import with `mlx-video bench --import \(url.lastPathComponent)`)")
    }
} catch {
    FileHandle.standardError.write("lightning-video: \(error)\n".data(using: .utf8)!)
    exit(1)
}
