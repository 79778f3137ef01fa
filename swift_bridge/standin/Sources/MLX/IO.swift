// Stand-in for ml-explore/mlx-swift Source/MLX/IO.swift (test double): safetensors only.
// `loadArrays(url:)`, `loadArraysAndMetadata(url:)`, `save(arrays:metadata:url:)`. Float16 and bfloat16
// tensors are converted to Float on load (and keep their dtype); uint32 words are kept bit for bit.

import Foundation

/// Source/MLX/IO.swift: errors of the loaders (mlx reports them as `MLXError`).
public enum IOError: Error, CustomStringConvertible {
    case unableToOpen(URL, String)
    case unsupportedFormat(String)

    public var description: String {
        switch self {
        case .unableToOpen(let url, let why): return "unable to open \(url.path): \(why)"
        case .unsupportedFormat(let what): return what
        }
    }
}

private let safetensorsDTypes: [String: DType] = [
    "F32": .float32, "F16": .float16, "BF16": .bfloat16, "U32": .uint32, "I32": .int32, "U8": .uint8,
    "I8": .int8, "I64": .int64, "BOOL": .bool, "U16": .uint16, "I16": .int16,
]

/// `public func loadArrays(url: URL, stream: StreamOrDevice = .cpu) throws -> [String: MLXArray]`.
public func loadArrays(url: URL) throws -> [String: MLXArray] {
    try loadArraysAndMetadata(url: url).0
}

/// `public func loadArraysAndMetadata(url: URL, stream: StreamOrDevice = .cpu) throws
/// -> ([String: MLXArray], [String: String])`.
public func loadArraysAndMetadata(url: URL) throws -> ([String: MLXArray], [String: String]) {
    guard url.pathExtension == "safetensors" else {
        throw IOError.unsupportedFormat("stand-in loads .safetensors only, not \(url.lastPathComponent)")
    }
    let data: Data
    do {
        data = try Data(contentsOf: url)
    } catch {
        throw IOError.unableToOpen(url, "\(error)")
    }
    let bytes = [UInt8](data)
    guard bytes.count >= 8 else { throw IOError.unableToOpen(url, "truncated header") }
    var headerLength = 0
    for i in 0 ..< 8 { headerLength |= Int(bytes[i]) << (8 * i) }
    guard 8 + headerLength <= bytes.count,
        let header = try JSONSerialization.jsonObject(with: Data(bytes[8 ..< 8 + headerLength])) as? [String: Any]
    else {
        throw IOError.unableToOpen(url, "bad safetensors header")
    }
    let base = 8 + headerLength
    var arrays = [String: MLXArray]()
    var metadata = [String: String]()
    for (key, value) in header {
        if key == "__metadata__" {
            for (k, v) in value as? [String: Any] ?? [:] { metadata[k] = "\(v)" }
            continue
        }
        guard let info = value as? [String: Any], let code = info["dtype"] as? String,
            let dtype = safetensorsDTypes[code], let shape = info["shape"] as? [Int],
            let offsets = info["data_offsets"] as? [Int], offsets.count == 2
        else {
            throw IOError.unableToOpen(url, "bad header entry for \(key)")
        }
        let count = shape.reduce(1, *)
        let start = base + offsets[0]
        guard offsets[1] - offsets[0] == count * dtype.size, base + offsets[1] <= bytes.count else {
            throw IOError.unableToOpen(url, "\(key): data size does not match its shape")
        }
        func uint(_ i: Int, _ width: Int) -> UInt64 {
            var v: UInt64 = 0
            for b in 0 ..< width { v |= UInt64(bytes[start + i * width + b]) << (8 * UInt64(b)) }
            return v
        }
        if dtype == .uint32 {
            arrays[key] = MLXArray(words: (0 ..< count).map { UInt32(uint($0, 4)) }, shape: shape)
            continue
        }
        let values: [Float] = (0 ..< count).map { i in
            switch dtype {
            case .float32: return Float(bitPattern: UInt32(uint(i, 4)))
            case .float16: return Float(Float16(bitPattern: UInt16(uint(i, 2))))
            case .bfloat16: return Float(bitPattern: UInt32(uint(i, 2)) << 16)
            case .int32: return Float(Int32(bitPattern: UInt32(uint(i, 4))))
            case .int64: return Float(Int64(bitPattern: uint(i, 8)))
            case .int16: return Float(Int16(bitPattern: UInt16(uint(i, 2))))
            case .int8: return Float(Int8(bitPattern: UInt8(uint(i, 1))))
            case .uint8, .uint16, .bool: return Float(uint(i, dtype.size))
            default: return 0
            }
        }
        arrays[key] = MLXArray(storage: values, shape: shape, dtype: dtype)
    }
    return (arrays, metadata)
}

/// `public func save(arrays: [String: MLXArray], metadata: [String: String] = [:], url: URL) throws`.
public func save(arrays: [String: MLXArray], metadata: [String: String] = [:], url: URL) throws {
    var header = [String: Any]()
    if !metadata.isEmpty { header["__metadata__"] = metadata }
    var body = [UInt8]()
    func append(_ v: UInt64, _ width: Int) {
        for b in 0 ..< width { body.append(UInt8((v >> (8 * UInt64(b))) & 0xFF)) }
    }
    for key in arrays.keys.sorted() {
        let a = arrays[key]!
        let start = body.count
        let code: String
        switch a.dtype {
        case .uint32:
            code = "U32"
            for w in a.words! { append(UInt64(w), 4) }
        case .float16:
            code = "F16"
            for v in a.storage { append(UInt64(Float16(v).bitPattern), 2) }
        case .bfloat16:
            code = "BF16"
            for v in a.storage { append(UInt64(v.bitPattern >> 16), 2) }
        case .int32:
            code = "I32"
            for v in a.storage { append(UInt64(UInt32(bitPattern: Int32(v))), 4) }
        case .uint8, .bool:
            code = a.dtype == .bool ? "BOOL" : "U8"
            for v in a.storage { append(UInt64(v), 1) }
        default:
            code = "F32"
            for v in a.storage { append(UInt64(v.bitPattern), 4) }
        }
        header[key] = ["dtype": code, "shape": a.shape, "data_offsets": [start, body.count]]
    }
    var json = [UInt8](try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys]))
    while json.count % 8 != 0 { json.append(0x20) }
    var out = [UInt8]()
    for b in 0 ..< 8 { out.append(UInt8((UInt64(json.count) >> (8 * UInt64(b))) & 0xFF)) }
    try Data(out + json + body).write(to: url, options: .atomic)
}
