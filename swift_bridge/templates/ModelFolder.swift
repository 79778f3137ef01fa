// {{header}}

import Foundation
import MLX
import MLXNN

/// Quantization settings of a component (`text_encoder.quantization` in config.json): mlx-swift-lm's
/// `{"group_size", "bits", "mode"}` plus mlx-video's `keep` (layers left in full precision) and
/// `embedding` (whether the token table is quantized). Which layers are quantized is read from the weight
/// file itself: a layer is quantized exactly when `<path>.scales` is there.
public struct QuantizationConfiguration: Codable, Sendable {
    public var groupSize: Int
    public var bits: Int
    public var mode: String?
    public var keep: [String]?
    public var embedding: Bool?

    enum CodingKeys: String, CodingKey {
        case groupSize = "group_size"
        case bits
        case mode
        case keep
        case embedding
    }

    /// The `quantize(model:filter:)` settings; only affine is exported.
    func settings() throws -> (groupSize: Int, bits: Int, mode: QuantizationMode) {
        guard (mode ?? "affine") == "affine" else {
            throw LightningVideoError.unsupportedQuantization("mode \(mode ?? "")")
        }
        return (groupSize, bits, .affine)
    }
}

/// The whole `config.json` of an exported model folder (`"format": "mlx-video/1"`). Components the
/// export did not include are nil.
public struct ModelConfiguration: Codable, Sendable {
    public var format: String
    public var dit: WanDiTConfiguration?
    public var textEncoder: UMT5Configuration?
    public var decoder: TAEHVConfiguration?
    public var sampler: SamplerConfiguration?

    enum CodingKeys: String, CodingKey {
        case format
        case dit
        case textEncoder = "text_encoder"
        case decoder
        case sampler
    }
}

public enum LightningVideoError: Error, CustomStringConvertible {
    case notAModelFolder(URL, String)
    case missingComponent(String, URL)
    case unsupportedQuantization(String)
    case invalidRequest(String)

    public var description: String {
        switch self {
        case .notAModelFolder(let url, let why):
            return "\(url.path) is not an exported mlx-video model folder: \(why)"
        case .missingComponent(let name, let url):
            return "\(url.path) has no \(name); export a model folder that includes it"
        case .unsupportedQuantization(let what):
            return "unsupported quantization: \(what) (the export writes affine 2/4/8-bit)"
        case .invalidRequest(let why):
            return why
        }
    }
}

// {{constants}}

/// An exported model folder: `config.json`, one safetensors file per component, `spiece.model`.
/// Each `load...` builds the module from its configuration, quantizes the layers that are quantized on
/// disk, and loads the weights with `verify: [.all]` (missing, unexpected or mis-shaped keys throw).
public struct ModelFolder: Sendable {
    public let url: URL
    public let configuration: ModelConfiguration

    public init(url: URL) throws {
        self.url = url
        let configURL = url.appendingPathComponent("config.json")
        guard FileManager.default.fileExists(atPath: configURL.path) else {
            throw LightningVideoError.notAModelFolder(url, "no config.json")
        }
        let data = try Data(contentsOf: configURL)
        let configuration = try JSONDecoder().decode(ModelConfiguration.self, from: data)
        guard configuration.format == ModelFiles.format else {
            throw LightningVideoError.notAModelFolder(url, "format \(configuration.format), expected \(ModelFiles.format)")
        }
        self.configuration = configuration
    }

    func file(_ name: String, component: String) throws -> URL {
        let file = url.appendingPathComponent(name)
        guard FileManager.default.fileExists(atPath: file.path) else {
            throw LightningVideoError.missingComponent(component, url)
        }
        return file
    }

    public func loadDiT() throws -> WanDiTModel {
        guard let config = configuration.dit else {
            throw LightningVideoError.missingComponent("DiT (config.json has no dit section)", url)
        }
        let model = WanDiTModel(config)
        try loadWeights(model, url: try file(ModelFiles.dit, component: "DiT weights"), quantization: nil)
        return model
    }

    public func loadTextEncoder() throws -> UMT5EncoderModel {
        guard let config = configuration.textEncoder else {
            throw LightningVideoError.missingComponent("text encoder (config.json has no text_encoder section)", url)
        }
        let model = UMT5EncoderModel(config)
        try loadWeights(
            model, url: try file(ModelFiles.textEncoder, component: "text-encoder weights"),
            quantization: config.quantization)
        return model
    }

    public func loadDecoder() throws -> TAEHVDecoder {
        guard let config = configuration.decoder else {
            throw LightningVideoError.missingComponent("decoder (config.json has no decoder section)", url)
        }
        let model = TAEHVDecoder(config)
        try loadWeights(model, url: try file(ModelFiles.decoder, component: "decoder weights"), quantization: nil)
        return model
    }

    public func loadTokenizer() throws -> UMT5Tokenizer {
        let textLen = configuration.textEncoder?.textLen ?? 512
        return try UMT5Tokenizer(url: try file(ModelFiles.tokenizer, component: "tokenizer"), maxLength: textLen)
    }
}

/// The canonical mlx-swift loading pattern: quantize the layers that are quantized on disk (their
/// `.scales` are in the file), then `update(parameters:verify: [.all])`. Arrays keep their stored dtype
/// (fp16 weights, fp32 norms and modulation, uint32 packed INT4). `eval` reads them from disk now.
public func loadWeights(_ model: Module, url: URL, quantization: QuantizationConfiguration?) throws {
    let weights = try loadArrays(url: url)
    if let quantization {
        let settings = try quantization.settings()
        quantize(model: model) { path, _ in
            weights["\(path).scales"] != nil ? settings : nil
        }
    }
    try model.update(parameters: ModuleParameters.unflattened(weights), verify: [.all])
    eval(model)
}
