// Stand-in for mlx-swift's MLXArray, DType and HasDType (test double, never shipped).
// API after ml-explore/mlx-swift Source/MLX/MLXArray.swift, Source/MLX/DType.swift,
// Source/MLX/MLXArray+Init.swift and Source/MLX/Factory.swift.
//
// Storage: every element is a Float (floating dtypes are rounded to their dtype after each op, so fp16
// and bf16 arrays hold fp16/bf16 values; integers are exact up to 2^24). `uint32` arrays (packed
// quantized weights) keep their words in `words` instead, bit for bit. Everything is eager.

import Foundation

/// Source/MLX/DType.swift: `public enum DType`.
public enum DType: Hashable, Sendable, CustomStringConvertible {
    case bool, uint8, uint16, uint32, uint64, int8, int16, int32, int64, float16, float32, bfloat16, complex64
    case float64

    /// Source/MLX/DType.swift: `size` (bytes per element).
    public var size: Int {
        switch self {
        case .bool, .uint8, .int8: return 1
        case .uint16, .int16, .float16, .bfloat16: return 2
        case .uint32, .int32, .float32: return 4
        case .uint64, .int64, .float64, .complex64: return 8
        }
    }

    /// Source/MLX/DType.swift: `isFloatingPoint`.
    public var isFloatingPoint: Bool {
        switch self {
        case .float16, .float32, .bfloat16, .float64: return true
        default: return false
        }
    }

    public var description: String { name }

    var name: String {
        switch self {
        case .bool: return "bool"
        case .uint8: return "uint8"
        case .uint16: return "uint16"
        case .uint32: return "uint32"
        case .uint64: return "uint64"
        case .int8: return "int8"
        case .int16: return "int16"
        case .int32: return "int32"
        case .int64: return "int64"
        case .float16: return "float16"
        case .float32: return "float32"
        case .bfloat16: return "bfloat16"
        case .complex64: return "complex64"
        case .float64: return "float64"
        }
    }

    /// Round a Float to a value this dtype can hold (what storing it in the dtype does).
    func represent(_ v: Float) -> Float {
        switch self {
        case .float32, .float64, .complex64: return v
        case .float16: return Float(Float16(v))
        case .bfloat16: return bfloat16Round(v)
        case .bool: return v != 0 ? 1 : 0
        case .uint8, .uint16, .uint32, .uint64, .int8, .int16, .int32, .int64:
            return v.isFinite ? v.rounded(.towardZero) : 0  // C++ static_cast truncates
        }
    }
}

/// Round-to-nearest-even to bfloat16 (the top 16 bits of a Float).
func bfloat16Round(_ v: Float) -> Float {
    if v.isNaN { return v }
    let bits = v.bitPattern
    let rounded = (bits &+ 0x7FFF &+ ((bits >> 16) & 1)) & 0xFFFF_0000
    return Float(bitPattern: rounded)
}

/// mlx's type promotion (mlx/dtype.cpp `promote_types`) for the dtypes the stand-in meets.
func promote(_ a: DType, _ b: DType) -> DType {
    if a == b { return a }
    if a.isFloatingPoint && b.isFloatingPoint {
        if a == .float64 || b == .float64 { return .float64 }
        if a == .float32 || b == .float32 { return .float32 }
        return .float32  // float16 with bfloat16
    }
    if a.isFloatingPoint { return a }
    if b.isFloatingPoint { return b }
    if a == .bool { return b }
    if b == .bool { return a }
    return a.size >= b.size ? a : b
}

/// Source/MLX/DType.swift: `public protocol HasDType` (scalar types with an MLX dtype).
public protocol HasDType {
    static var dtype: DType { get }
    var asFloat: Float { get }
    static func fromFloat(_ v: Float) -> Self
}

extension Float: HasDType {
    public static var dtype: DType { .float32 }
    public var asFloat: Float { self }
    public static func fromFloat(_ v: Float) -> Float { v }
}

extension Float16: HasDType {
    public static var dtype: DType { .float16 }
    public var asFloat: Float { Float(self) }
    public static func fromFloat(_ v: Float) -> Float16 { Float16(v) }
}

extension Double: HasDType {
    public static var dtype: DType { .float64 }
    public var asFloat: Float { Float(self) }
    public static func fromFloat(_ v: Float) -> Double { Double(v) }
}

extension Int32: HasDType {
    public static var dtype: DType { .int32 }
    public var asFloat: Float { Float(self) }
    public static func fromFloat(_ v: Float) -> Int32 { Int32(v) }
}

extension Int: HasDType {
    public static var dtype: DType { .int64 }
    public var asFloat: Float { Float(self) }
    public static func fromFloat(_ v: Float) -> Int { Int(v) }
}

extension UInt8: HasDType {
    public static var dtype: DType { .uint8 }
    public var asFloat: Float { Float(self) }
    public static func fromFloat(_ v: Float) -> UInt8 { UInt8(Swift.max(0, Swift.min(255, v))) }
}

extension UInt32: HasDType {
    public static var dtype: DType { .uint32 }
    public var asFloat: Float { Float(self) }
    public static func fromFloat(_ v: Float) -> UInt32 { UInt32(Swift.max(0, v)) }
}

extension Bool: HasDType {
    public static var dtype: DType { .bool }
    public var asFloat: Float { self ? 1 : 0 }
    public static func fromFloat(_ v: Float) -> Bool { v != 0 }
}

/// Source/MLX/MLXArray.swift: `public final class MLXArray`.
public final class MLXArray {
    /// Elements in row-major order (empty for `uint32`, see `words`).
    var storage: [Float]
    /// `uint32` elements, bit for bit (packed quantized weights); nil for every other dtype.
    var words: [UInt32]?
    public private(set) var shape: [Int]
    public private(set) var dtype: DType
    private var accountedBytes = 0

    init(storage: [Float], shape: [Int], dtype: DType) {
        precondition(storage.count == shape.reduce(1, *), "stand-in: \(storage.count) values for shape \(shape)")
        precondition(dtype != .uint32, "stand-in: uint32 arrays are built from words")
        self.storage = dtype == .float32 ? storage : storage.map { dtype.represent($0) }
        self.words = nil
        self.shape = shape
        self.dtype = dtype
        account()
    }

    init(words: [UInt32], shape: [Int]) {
        precondition(words.count == shape.reduce(1, *), "stand-in: \(words.count) words for shape \(shape)")
        self.storage = []
        self.words = words
        self.shape = shape
        self.dtype = .uint32
        account()
    }

    deinit {
        Memory.release(accountedBytes)
    }

    private func account() {
        Memory.release(accountedBytes)
        accountedBytes = size * dtype.size
        Memory.allocate(accountedBytes)
    }

    /// Replace the contents in place: what mlx-swift's `update(parameters:)` does to a module's arrays
    /// (Source/MLXNN/Module.swift, via `MLXArray._updateInternal`).
    public func _updateInternal(_ other: MLXArray) {
        storage = other.storage
        words = other.words
        shape = other.shape
        dtype = other.dtype
        account()
    }

    // MARK: Initializers (Source/MLX/MLXArray+Init.swift)

    /// `public convenience init<T: HasDType>(_ value: T)`: a scalar.
    public convenience init<T: HasDType>(_ value: T) {
        if T.dtype == .uint32 {
            self.init(words: [value as! UInt32], shape: [])
        } else {
            self.init(storage: [value.asFloat], shape: [], dtype: T.dtype == .int64 ? .int32 : T.dtype)
        }
    }

    /// `public convenience init<T: HasDType>(_ value: [T], _ shape: [Int]? = nil)`.
    public convenience init<T: HasDType>(_ value: [T], _ shape: [Int]? = nil) {
        let shape = shape ?? [value.count]
        if T.dtype == .uint32 {
            self.init(words: value.map { $0 as! UInt32 }, shape: shape)
        } else {
            if !T.dtype.isFloatingPoint {
                precondition(value.allSatisfy { abs($0.asFloat) <= 16_777_216 }, "stand-in: integers beyond 2^24")
            }
            self.init(storage: value.map(\.asFloat), shape: shape, dtype: T.dtype == .int64 ? .int32 : T.dtype)
        }
    }

    // MARK: Factory (Source/MLX/Factory.swift)

    /// `static public func zeros(_ shape: some Collection<Int>, dtype: DType = .float32, ...)`.
    public static func zeros(_ shape: [Int], dtype: DType = .float32) -> MLXArray {
        full(shape, 0, dtype)
    }

    /// `static public func ones(_ shape: some Collection<Int>, dtype: DType = .float32, ...)`.
    public static func ones(_ shape: [Int], dtype: DType = .float32) -> MLXArray {
        full(shape, 1, dtype)
    }

    static func full(_ shape: [Int], _ value: Float, _ dtype: DType) -> MLXArray {
        let n = shape.reduce(1, *)
        if dtype == .uint32 {
            return MLXArray(words: [UInt32](repeating: UInt32(value), count: n), shape: shape)
        }
        return MLXArray(storage: [Float](repeating: value, count: n), shape: shape, dtype: dtype)
    }

    // MARK: Properties (Source/MLX/MLXArray.swift)

    public var ndim: Int { shape.count }
    public var size: Int { shape.reduce(1, *) }
    public var nbytes: Int { size * dtype.size }

    /// `public func dim(_ dim: Int) -> Int` (negative axes count from the end).
    public func dim(_ dim: Int) -> Int { shape[normalizeAxis(dim, ndim)] }

    public var shape2: (Int, Int) {
        precondition(ndim == 2, "shape2 of a \(ndim)-d array")
        return (shape[0], shape[1])
    }

    public var shape3: (Int, Int, Int) {
        precondition(ndim == 3, "shape3 of a \(ndim)-d array")
        return (shape[0], shape[1], shape[2])
    }

    public var shape4: (Int, Int, Int, Int) {
        precondition(ndim == 4, "shape4 of a \(ndim)-d array")
        return (shape[0], shape[1], shape[2], shape[3])
    }

    /// `public func item<T: HasDType>(_ type: T.Type) -> T`.
    public func item<T: HasDType>(_ type: T.Type) -> T {
        precondition(size == 1, "item() of an array with \(size) elements")
        if let words { return T.fromFloat(Float(words[0])) }
        return T.fromFloat(storage[0])
    }

    /// `public func asArray<T: HasDType>(_ type: T.Type) -> [T]`.
    public func asArray<T: HasDType>(_ type: T.Type) -> [T] {
        if let words {
            if T.self == UInt32.self { return words.map { $0 as! T } }
            return words.map { T.fromFloat(Float($0)) }
        }
        if T.dtype.isFloatingPoint {
            return storage.map { T.fromFloat($0) }
        }
        return storage.map { T.fromFloat(T.dtype.represent($0)) }
    }

    /// `public func asType(_ type: DType, stream: StreamOrDevice = .default) -> MLXArray`.
    public func asType(_ type: DType) -> MLXArray {
        if type == dtype { return self }
        if type == .uint32 {
            return MLXArray(words: storage.map { UInt32(Swift.max(0, $0.rounded(.towardZero))) }, shape: shape)
        }
        if let words {
            return MLXArray(storage: words.map { Float($0) }, shape: shape, dtype: type)
        }
        return MLXArray(storage: storage, shape: shape, dtype: type)
    }

    /// `public func asType<T: HasDType>(_ type: T.Type, ...) -> MLXArray`.
    public func asType<T: HasDType>(_ type: T.Type) -> MLXArray { asType(T.dtype) }

    /// Floats of a non-uint32 array (internal helper).
    var floats: [Float] {
        if let words { return words.map { Float($0) } }
        return storage
    }
}

extension MLXArray: CustomStringConvertible {
    public var description: String { "MLXArray(shape: \(shape), dtype: \(dtype.name))" }
}

func normalizeAxis(_ axis: Int, _ ndim: Int) -> Int {
    let a = axis < 0 ? axis + ndim : axis
    precondition(a >= 0 && a < Swift.max(ndim, 1), "axis \(axis) out of range for \(ndim) dimensions")
    return a
}

func stridesOf(_ shape: [Int]) -> [Int] {
    var strides = [Int](repeating: 1, count: shape.count)
    var s = 1
    for i in stride(from: shape.count - 1, through: 0, by: -1) {
        strides[i] = s
        s *= shape[i]
    }
    return strides
}
