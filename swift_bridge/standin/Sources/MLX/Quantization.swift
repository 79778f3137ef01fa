// Stand-in for mlx-swift's affine quantization ops (test double): ml-explore/mlx-swift Source/MLX/Ops.swift
// `quantized`, `dequantized`, `quantizedMM`. Format as mlx (mlx/ops.cpp `affine_quantize`): per group of
// `groupSize` inputs, edge = the extreme of larger magnitude, scale = +-max((wmax - wmin) / (2^bits - 1), 1e-7)
// (negative when the edge is wmax), q0 = round(edge / scale), scale = edge / q0 when q0 != 0, bias = q0 == 0 ? 0 : edge,
// q = clip(round((w - bias) / scale), 0, 2^bits - 1); element j of a uint32 word holds bits
// [j * bits, (j + 1) * bits) (low bits first). Scales and biases take the weight's dtype.

/// `public func quantized(_ w: MLXArray, groupSize: Int = 64, bits: Int = 4, mode: QuantizationMode = .affine,
/// stream:) -> (wq: MLXArray, scales: MLXArray, biases: MLXArray?)`.
public func quantized(
    _ w: MLXArray, groupSize: Int = 64, bits: Int = 4, mode: QuantizationMode = .affine
) -> (wq: MLXArray, scales: MLXArray, biases: MLXArray?) {
    precondition(mode == .affine, "stand-in: only affine quantization")
    precondition([2, 4, 8].contains(bits), "stand-in: bits \(bits) (2, 4, 8 are implemented)")
    let columns = w.shape.last ?? 0
    precondition(columns % groupSize == 0, "quantized: last axis \(columns) not divisible by \(groupSize)")
    let values = w.floats
    let levels = Float((1 << bits) - 1)
    let perWord = 32 / bits
    let groups = values.count / groupSize
    var scales = [Float](repeating: 0, count: groups)
    var biases = [Float](repeating: 0, count: groups)
    var words = [UInt32](repeating: 0, count: values.count / perWord)
    for g in 0 ..< groups {
        let group = values[(g * groupSize) ..< ((g + 1) * groupSize)]
        let wmin = group.min()!
        let wmax = group.max()!
        // The scale points from the edge towards the other extreme: negative when the edge is wmax.
        let minIsEdge = Swift.abs(wmin) > Swift.abs(wmax)
        var scale = Swift.max((wmax - wmin) / levels, 1e-7) * (minIsEdge ? 1 : -1)
        let edge = minIsEdge ? wmin : wmax
        let q0 = (edge / scale).rounded(.toNearestOrEven)
        if q0 != 0 { scale = edge / q0 }
        let bias: Float = q0 == 0 ? 0 : edge
        scale = w.dtype.represent(scale)
        scales[g] = scale
        biases[g] = w.dtype.represent(bias)
        for (k, v) in group.enumerated() {
            let q = UInt32(Swift.min(Swift.max(((v - bias) / scale).rounded(.toNearestOrEven), 0), levels))
            let index = g * groupSize + k
            words[index / perWord] |= q << UInt32((index % perWord) * bits)
        }
    }
    var packedShape = w.shape
    packedShape[packedShape.count - 1] = columns / perWord
    var groupShape = w.shape
    groupShape[groupShape.count - 1] = columns / groupSize
    return (MLXArray(words: words, shape: packedShape), MLXArray(storage: scales, shape: groupShape, dtype: w.dtype),
            MLXArray(storage: biases, shape: groupShape, dtype: w.dtype))
}

/// `public func dequantized(_ w: MLXArray, scales: MLXArray, biases: MLXArray?, groupSize: Int = 64,
/// bits: Int = 4, mode: QuantizationMode = .affine, stream:) -> MLXArray` (in the scales' dtype).
public func dequantized(
    _ w: MLXArray, scales: MLXArray, biases: MLXArray?, groupSize: Int = 64, bits: Int = 4,
    mode: QuantizationMode = .affine
) -> MLXArray {
    precondition(mode == .affine, "stand-in: only affine quantization")
    guard let words = w.words, let biases else {
        preconditionFailure("dequantized: affine weights must be uint32 with biases")
    }
    let perWord = 32 / bits
    let mask = UInt32((1 << bits) - 1)
    let s = scales.floats
    let b = biases.floats
    var out = [Float](repeating: 0, count: words.count * perWord)
    precondition(out.count == s.count * groupSize, "dequantized: \(w.shape) words for scales \(scales.shape)")
    for i in 0 ..< out.count {
        let q = (words[i / perWord] >> UInt32((i % perWord) * bits)) & mask
        let g = i / groupSize
        out[i] = Float(q) * s[g] + b[g]
    }
    var shape = w.shape
    shape[shape.count - 1] *= perWord
    return MLXArray(storage: out, shape: shape, dtype: scales.dtype)
}

/// `public func quantizedMM(_ x: MLXArray, _ w: MLXArray, scales: MLXArray, biases: MLXArray?,
/// transpose: Bool = true, groupSize: Int = 64, bits: Int = 4, mode: QuantizationMode = .affine, stream:)`:
/// computed in `promote(x.dtype, scales.dtype)` (fp32 accumulation).
public func quantizedMM(
    _ x: MLXArray, _ w: MLXArray, scales: MLXArray, biases: MLXArray?, transpose: Bool = true,
    groupSize: Int = 64, bits: Int = 4, mode: QuantizationMode = .affine
) -> MLXArray {
    let dense = dequantized(w, scales: scales, biases: biases, groupSize: groupSize, bits: bits, mode: mode)
    let out = matmulImpl(x, transpose ? dense.transposed() : dense)
    return out.asType(promote(x.dtype, scales.dtype))
}
