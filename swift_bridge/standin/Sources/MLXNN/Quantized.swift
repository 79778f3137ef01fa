// Stand-in for ml-explore/mlx-swift Source/MLXNN/Quantized.swift (test double, never shipped):
// `Quantizable`, `Quantized`, `QuantizedLinear`, `QuantizedEmbedding`, `quantizeSingle`, and both
// `quantize(model:...)` forms. Keys: `weight` (packed uint32), `scales`, `biases`, plus `bias` of Linear.

import Foundation
import MLX

/// `public protocol Quantizable`: layers `quantize(model:)` can replace.
public protocol Quantizable {
    func toQuantized(groupSize: Int, bits: Int, mode: QuantizationMode) -> Module
}

/// `public protocol Quantized: Module`.
public protocol Quantized: Module {
    var groupSize: Int { get }
    var bits: Int { get }
    var mode: QuantizationMode { get }
}

/// `open class QuantizedLinear: Linear, Quantized`.
open class QuantizedLinear: Linear, Quantized {
    public let groupSize: Int
    public let bits: Int
    public let mode: QuantizationMode
    public let scales: MLXArray
    public let biases: MLXArray?

    /// `public convenience init(_ other: Linear, groupSize: Int = 64, bits: Int = 4, mode: QuantizationMode = .affine)`.
    public init(_ other: Linear, groupSize: Int = 64, bits: Int = 4, mode: QuantizationMode = .affine) {
        let (wq, scales, biases) = quantized(other.weight, groupSize: groupSize, bits: bits, mode: mode)
        self.groupSize = groupSize
        self.bits = bits
        self.mode = mode
        self.scales = scales
        self.biases = biases
        super.init(weight: wq, bias: other.bias)
    }

    open override func callAsFunction(_ x: MLXArray) -> MLXArray {
        let y = quantizedMM(x, weight, scales: scales, biases: biases, transpose: true, groupSize: groupSize,
                            bits: bits, mode: mode)
        if let bias { return y + bias }
        return y
    }
}

/// `open class QuantizedEmbedding: Embedding, Quantized`.
open class QuantizedEmbedding: Embedding, Quantized {
    public let groupSize: Int
    public let bits: Int
    public let mode: QuantizationMode
    public let scales: MLXArray
    public let biases: MLXArray?

    /// `public convenience init(_ other: Embedding, groupSize: Int = 64, bits: Int = 4, mode: QuantizationMode = .affine)`.
    public init(_ other: Embedding, groupSize: Int = 64, bits: Int = 4, mode: QuantizationMode = .affine) {
        let (wq, scales, biases) = quantized(other.weight, groupSize: groupSize, bits: bits, mode: mode)
        self.groupSize = groupSize
        self.bits = bits
        self.mode = mode
        self.scales = scales
        self.biases = biases
        super.init(weight: wq)
    }

    open override func callAsFunction(_ x: MLXArray) -> MLXArray {
        let dense = dequantized(weight, scales: scales, biases: biases, groupSize: groupSize, bits: bits, mode: mode)
        return take(dense, x, axis: 0)
    }
}

/// `public func quantizeSingle(layer: Module, groupSize: Int = 64, bits: Int = 4,
/// mode: QuantizationMode = .affine) -> Quantized?`.
public func quantizeSingle(layer: Module, groupSize: Int = 64, bits: Int = 4, mode: QuantizationMode = .affine)
    -> Module?
{
    if layer is Quantized { return nil }
    return (layer as? Quantizable)?.toQuantized(groupSize: groupSize, bits: bits, mode: mode)
}

/// `public func quantize(model: Module, groupSize: Int = 64, bits: Int = 4, mode: QuantizationMode = .affine,
/// filter: (String, Module) -> Bool = { _, _ in true }, apply: ... = quantizeSingle)`.
public func quantize(
    model: Module, groupSize: Int = 64, bits: Int = 4, mode: QuantizationMode = .affine,
    filter: (String, Module) -> Bool = { _, _ in true }
) {
    quantize(model: model) { path, module in
        filter(path, module) ? (groupSize, bits, mode) : nil
    }
}

/// `public func quantize(model: Module, filter: (String, Module) -> (groupSize: Int, bits: Int,
/// mode: QuantizationMode)?, apply: ... = quantizeSingle)`: per-layer settings, nil skips a layer.
public func quantize(
    model: Module, filter: (String, Module) -> (groupSize: Int, bits: Int, mode: QuantizationMode)?
) {
    let updates = model.leafModules().flattened().compactMap { (path, module) -> (String, Module)? in
        guard let (groupSize, bits, mode) = filter(path, module),
            let quantized = quantizeSingle(layer: module, groupSize: groupSize, bits: bits, mode: mode)
        else { return nil }
        return (path, quantized)
    }
    model.update(modules: ModuleChildren.unflattened(updates))
}
