// Stand-in for the MLXNN layers the export uses (test double, never shipped). Initializers, keys and
// forward math after ml-explore/mlx-swift:
// - Source/MLXNN/Linear.swift: `Linear` (`weight [out, in]`, `bias [out]`, `x @ weight.T + bias`).
// - Source/MLXNN/Convolution.swift: `Conv2d` (NHWC input, `weight [O, kH, kW, I / groups]`, `bias [O]`).
// - Source/MLXNN/Normalization.swift: `LayerNorm`, `RMSNorm` (via `MLXFast`).
// - Source/MLXNN/Embedding.swift: `Embedding` (`weight [count, dimensions]`).
// - Source/MLXNN/Activations.swift: `relu`, `silu`, `geluApproximate`, `ReLU`.
// Parameters start as zeros/ones (mlx-swift draws random ones): the export always loads its weights.

import Foundation
import MLX

/// Source/MLXNN/Linear.swift: `open class Linear: Module, UnaryLayer, Quantizable`.
open class Linear: Module, UnaryLayer, Quantizable {
    public let weight: MLXArray
    public let bias: MLXArray?

    /// `public init(_ inputDimensions: Int, _ outputDimensions: Int, bias: Bool = true)`.
    public init(_ inputDimensions: Int, _ outputDimensions: Int, bias: Bool = true) {
        self.weight = MLXArray.zeros([outputDimensions, inputDimensions])
        self.bias = bias ? MLXArray.zeros([outputDimensions]) : nil
        super.init()
    }

    /// `public init(weight: MLXArray, bias: MLXArray? = nil)`.
    public init(weight: MLXArray, bias: MLXArray? = nil) {
        self.weight = weight
        self.bias = bias
        super.init()
    }

    open func callAsFunction(_ x: MLXArray) -> MLXArray {
        let y = matmul(x, weight.T)
        if let bias { return y + bias }
        return y
    }

    public func toQuantized(groupSize: Int, bits: Int, mode: QuantizationMode) -> Module {
        QuantizedLinear(self, groupSize: groupSize, bits: bits, mode: mode)
    }
}

/// Source/MLXNN/Convolution.swift: `open class Conv2d: Module, UnaryLayer`.
open class Conv2d: Module, UnaryLayer {
    public let weight: MLXArray
    public let bias: MLXArray?
    public let padding: (Int, Int)
    public let dilation: (Int, Int)
    public let stride: (Int, Int)
    public let groups: Int

    /// `public init(inputChannels: Int, outputChannels: Int, kernelSize: IntOrPair, stride: IntOrPair = 1,
    /// padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: Int = 1, bias: Bool = true)`.
    public init(
        inputChannels: Int, outputChannels: Int, kernelSize: IntOrPair, stride: IntOrPair = 1,
        padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: Int = 1, bias: Bool = true
    ) {
        self.weight = MLXArray.zeros([outputChannels, kernelSize.first, kernelSize.second, inputChannels / groups])
        self.bias = bias ? MLXArray.zeros([outputChannels]) : nil
        self.padding = padding.values
        self.dilation = dilation.values
        self.stride = stride.values
        self.groups = groups
        super.init()
    }

    open func callAsFunction(_ x: MLXArray) -> MLXArray {
        let y = conv2d(x, weight, stride: IntOrPair(stride), padding: IntOrPair(padding),
                       dilation: IntOrPair(dilation), groups: groups)
        if let bias { return y + bias }
        return y
    }
}

/// Source/MLXNN/Normalization.swift: `open class LayerNorm: Module, UnaryLayer`.
open class LayerNorm: Module, UnaryLayer {
    public let weight: MLXArray?
    public let bias: MLXArray?
    public let eps: Float

    /// `public init(dimensions: Int, eps: Float = 1e-5, affine: Bool = true, bias: Bool = true)`.
    public init(dimensions: Int, eps: Float = 1e-5, affine: Bool = true, bias: Bool = true) {
        self.weight = affine ? MLXArray.ones([dimensions]) : nil
        self.bias = affine && bias ? MLXArray.zeros([dimensions]) : nil
        self.eps = eps
        super.init()
    }

    open func callAsFunction(_ x: MLXArray) -> MLXArray {
        MLXFast.layerNorm(x, weight: weight, bias: bias, eps: eps)
    }
}

/// Source/MLXNN/Normalization.swift: `open class RMSNorm: Module, UnaryLayer`.
open class RMSNorm: Module, UnaryLayer {
    public let weight: MLXArray
    public let eps: Float

    /// `public init(dimensions: Int, eps: Float = 1e-5)`.
    public init(dimensions: Int, eps: Float = 1e-5) {
        self.weight = MLXArray.ones([dimensions])
        self.eps = eps
        super.init()
    }

    open func callAsFunction(_ x: MLXArray) -> MLXArray {
        MLXFast.rmsNorm(x, weight: weight, eps: eps)
    }
}

/// Source/MLXNN/Embedding.swift: `open class Embedding: Module, UnaryLayer, Quantizable`.
open class Embedding: Module, UnaryLayer, Quantizable {
    public let weight: MLXArray

    /// `public init(embeddingCount: Int, dimensions: Int)`.
    public init(embeddingCount: Int, dimensions: Int) {
        self.weight = MLXArray.zeros([embeddingCount, dimensions])
        super.init()
    }

    /// `public init(weight: MLXArray)`.
    public init(weight: MLXArray) {
        self.weight = weight
        super.init()
    }

    open func callAsFunction(_ x: MLXArray) -> MLXArray {
        take(weight, x, axis: 0)
    }

    /// `open func asLinear(_ x: MLXArray) -> MLXArray` (tied output heads).
    open func asLinear(_ x: MLXArray) -> MLXArray {
        matmul(x, weight.T)
    }

    public func toQuantized(groupSize: Int, bits: Int, mode: QuantizationMode) -> Module {
        QuantizedEmbedding(self, groupSize: groupSize, bits: bits, mode: mode)
    }
}

/// Source/MLXNN/Activations.swift: `public func relu(_ x: MLXArray) -> MLXArray`.
public func relu(_ x: MLXArray) -> MLXArray {
    maximum(x, MLXArray(Float(0)).asType(x.dtype))
}

/// Source/MLXNN/Activations.swift: `public func silu(_ x: MLXArray) -> MLXArray` (`x * sigmoid(x)`).
public func silu(_ x: MLXArray) -> MLXArray {
    x * sigmoid(x)
}

/// Source/MLXNN/Activations.swift: `public func geluApproximate(_ x: MLXArray) -> MLXArray`
/// (`0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`).
public func geluApproximate(_ x: MLXArray) -> MLXArray {
    0.5 * x * (1 + tanh(Float(2 / Double.pi).squareRoot() * (x + 0.044715 * x * x * x)))
}

/// Source/MLXNN/Activations.swift: `open class ReLU: Module, UnaryLayer`.
open class ReLU: Module, UnaryLayer {
    public override init() {
        super.init()
    }

    open func callAsFunction(_ x: MLXArray) -> MLXArray {
        relu(x)
    }
}
