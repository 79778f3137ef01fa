// Stand-in for ml-explore/mlx-swift Source/MLX/MLXFast.swift (`public enum MLXFast`), test double.
// Reference semantics of mlx's fast kernels (mlx/fast.cpp fallbacks): statistics and softmax in fp32,
// outputs in the input dtype.

import Foundation

public enum MLXFast {
    /// `public enum ScaledDotProductAttentionMaskMode` (nested in `MLXFast`).
    public enum ScaledDotProductAttentionMaskMode {
        case none
        case array(MLXArray)
        case causal
    }

    /// `public static func layerNorm(_ x: MLXArray, weight: MLXArray?, bias: MLXArray?, eps: Float, stream:)`.
    public static func layerNorm(_ x: MLXArray, weight: MLXArray?, bias: MLXArray?, eps: Float) -> MLXArray {
        let n = x.shape.last ?? 1
        let w = weight.map { broadcast($0, to: [n]).floats }
        let b = bias.map { broadcast($0, to: [n]).floats }
        var values = x.floats
        var row = 0
        while row < values.count {
            var mean: Double = 0
            for i in row ..< row + n { mean += Double(values[i]) }
            mean /= Double(n)
            var variance: Double = 0
            for i in row ..< row + n { variance += (Double(values[i]) - mean) * (Double(values[i]) - mean) }
            variance /= Double(n)
            let inv = 1 / (variance + Double(eps)).squareRoot()
            for i in row ..< row + n {
                var v = Float((Double(values[i]) - mean) * inv)
                if let w { v *= w[i - row] }
                if let b { v += b[i - row] }
                values[i] = v
            }
            row += n
        }
        return MLXArray(storage: values, shape: x.shape, dtype: x.dtype)
    }

    /// `public static func rmsNorm(_ x: MLXArray, weight: MLXArray, eps: Float, stream:)`.
    public static func rmsNorm(_ x: MLXArray, weight: MLXArray, eps: Float) -> MLXArray {
        let n = x.shape.last ?? 1
        let w = broadcast(weight, to: [n]).floats
        var values = x.floats
        var row = 0
        while row < values.count {
            var squares: Double = 0
            for i in row ..< row + n { squares += Double(values[i]) * Double(values[i]) }
            let inv = 1 / (squares / Double(n) + Double(eps)).squareRoot()
            for i in row ..< row + n {
                values[i] = x.dtype.represent(Float(Double(values[i]) * inv)) * w[i - row]
            }
            row += n
        }
        return MLXArray(storage: values, shape: x.shape, dtype: promote(x.dtype, weight.dtype))
    }

    /// `public static func scaledDotProductAttention(queries: MLXArray, keys: MLXArray, values: MLXArray,
    /// scale: Float, mask: ScaledDotProductAttentionMaskMode, sinks: MLXArray? = nil, stream:)`.
    /// queries `[B, Nq, Lq, D]`, keys/values `[B, Nkv, Lk, D]` (Nq a multiple of Nkv); an additive float
    /// mask or a boolean mask (false: masked), broadcast to `[B, Nq, Lq, Lk]`.
    public static func scaledDotProductAttention(
        queries: MLXArray, keys: MLXArray, values: MLXArray, scale: Float,
        mask: ScaledDotProductAttentionMaskMode, sinks: MLXArray? = nil
    ) -> MLXArray {
        precondition(sinks == nil, "stand-in: attention sinks are not implemented")
        let (b, nq, lq, d) = queries.shape4
        let (_, nkv, lk, _) = keys.shape4
        precondition(nq % nkv == 0, "query heads \(nq) not a multiple of key heads \(nkv)")
        let repeats = nq / nkv
        var k = keys
        var v = values
        if repeats > 1 {
            k = broadcast(keys.expandedDimensions(axis: 2), to: [b, nkv, repeats, lk, d]).reshaped([b, nq, lk, d])
            v = broadcast(values.expandedDimensions(axis: 2), to: [b, nkv, repeats, lk, values.dim(3)])
                .reshaped([b, nq, lk, values.dim(3)])
        }
        var scores = matmulImpl(queries.asType(.float32) * scale, k.asType(.float32).transposed(0, 1, 3, 2))
        switch mask {
        case .none:
            break
        case .array(let m):
            if m.dtype == .bool {
                scores = MLX.where(m, scores, MLXArray(-Float.infinity))
            } else {
                scores = scores + m.asType(.float32)
            }
        case .causal:
            var causal = [Float](repeating: 0, count: lq * lk)
            for i in 0 ..< lq {
                for j in 0 ..< lk where j > i + lk - lq {
                    causal[i * lk + j] = -Float.infinity
                }
            }
            scores = scores + MLXArray(causal, [lq, lk])
        }
        let probabilities = softmax(scores, axis: -1)
        return matmulImpl(probabilities, v.asType(.float32)).asType(queries.dtype)
    }
}
