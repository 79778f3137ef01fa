// {{header}}

import Foundation
import MLX
import MLXNN

// {{configuration}}

// MARK: - Relative position buckets (host side, not parameters)

/// T5/UMT5 bucket of `keyPosition - queryPosition` (bidirectional). The reference evaluates the log
/// branch in float32 and lands exactly on the bucket boundaries at distances 16, 32 and 64; here the
/// expression runs in Double and is snapped by 1e-9, which gives that exact value.
func umt5RelativePositionBucket(_ relative: Int, numBuckets: Int, maxDistance: Int) -> Int {
    let half = numBuckets / 2
    var bucket = relative > 0 ? half : 0
    let n = abs(relative)
    let maxExact = half / 2
    if n < maxExact {
        return bucket + n
    }
    let ratio = log(Double(n) / Double(maxExact)) / log(Double(maxDistance) / Double(maxExact))
    let large = maxExact + Int((max(ratio * Double(half - maxExact), 0) + 1e-9).rounded(.down))
    bucket += min(large, half - 1)
    return bucket
}

/// Bucket matrix `[queries, keys]` (Int32) for a sequence of `length` tokens.
func umt5BucketMatrix(length: Int, numBuckets: Int, maxDistance: Int) -> MLXArray {
    var values = [Int32]()
    values.reserveCapacity(length * length)
    for q in 0 ..< length {
        for k in 0 ..< length {
            values.append(Int32(umt5RelativePositionBucket(k - q, numBuckets: numBuckets, maxDistance: maxDistance)))
        }
    }
    return MLXArray(values, [length, length])
}

private let float16Max: Float = 65504

/// Most negative finite value of a floating dtype (the reference masks with `finfo(dtype).min`).
func lowestFinite(_ dtype: DType) -> Float {
    switch dtype {
    case .float16: return -float16Max
    case .bfloat16: return -3.3895314e38
    default: return -Float.greatestFiniteMagnitude
    }
}

/// Apply a (possibly quantized) projection in its storage dtype. In fp16, inputs and outputs are clamped
/// to the fp16 range (Wan's `fp16_clamp`) so the encoder never produces inf; the residual stream is fp32.
func umt5Linear(_ layer: Linear, _ x: MLXArray) -> MLXArray {
    let dtype = (layer as? QuantizedLinear)?.scales.dtype ?? layer.weight.dtype
    var input = x
    if dtype == .float16 {
        input = clip(input, min: -float16Max, max: float16Max)
    }
    var y = layer(input.asType(dtype))
    if dtype == .float16 {
        y = clip(y, min: -float16Max, max: float16Max)
    }
    return y
}

// MARK: - Layers

/// Self-attention without the 1/sqrt(d) scale, with this block's relative-position bias.
final class UMT5Attention: Module {
    let heads: Int
    let headDim: Int

    // {{properties}}

    init(config: UMT5Configuration) {
        self.heads = config.numHeads
        self.headDim = config.dimAttn / config.numHeads
        self._q.wrappedValue = Linear(config.dim, config.dimAttn, bias: false)
        self._k.wrappedValue = Linear(config.dim, config.dimAttn, bias: false)
        self._v.wrappedValue = Linear(config.dim, config.dimAttn, bias: false)
        self._o.wrappedValue = Linear(config.dimAttn, config.dim, bias: false)
        super.init()
    }

    /// `bias`: `[1, H, L, L]` fp32 position bias; `keyValid`: `[B, 1, 1, L]`, false on padding keys,
    /// which get the most negative value of the query dtype (as the reference's `masked_fill`).
    func callAsFunction(_ x: MLXArray, bias: MLXArray, keyValid: MLXArray?) -> MLXArray {
        let (b, l, _) = x.shape3
        func splitHeads(_ t: MLXArray) -> MLXArray {
            t.reshaped([b, l, heads, headDim]).transposed(0, 2, 1, 3)
        }
        let queries = splitHeads(umt5Linear(q, x))
        let keys = splitHeads(umt5Linear(k, x))
        let values = splitHeads(umt5Linear(v, x))
        var mask = bias.asType(queries.dtype)
        if let keyValid {
            mask = MLX.where(keyValid, mask, MLXArray(lowestFinite(queries.dtype)).asType(queries.dtype))
        }
        let out = MLXFast.scaledDotProductAttention(
            queries: queries, keys: keys, values: values, scale: 1.0, mask: .array(mask))
        return umt5Linear(o, out.transposed(0, 2, 1, 3).reshaped([b, l, -1]))
    }
}

/// Gated GELU: `fc2(fc1(x) * gelu_tanh(gate(x)))` (Wan `gate` == HF `wi_0`, `fc1` == `wi_1`), fp32 product.
final class UMT5FeedForward: Module {
    // {{properties}}

    init(config: UMT5Configuration) {
        self._gate.wrappedValue = Linear(config.dim, config.dimFfn, bias: false)
        self._fc1.wrappedValue = Linear(config.dim, config.dimFfn, bias: false)
        self._fc2.wrappedValue = Linear(config.dimFfn, config.dim, bias: false)
        super.init()
    }

    func callAsFunction(_ x: MLXArray) -> MLXArray {
        let gated = geluApproximate(umt5Linear(gate, x).asType(.float32))
        return umt5Linear(fc2, gated * umt5Linear(fc1, x).asType(.float32))
    }
}

/// Pre-norm block with its own relative-position table (`shared_pos` is false in UMT5).
final class UMT5Block: Module {
    let numBuckets: Int
    let maxDistance: Int

    // {{properties}}

    init(config: UMT5Configuration) {
        self.numBuckets = config.numBuckets
        self.maxDistance = config.maxDistance
        self._norm1.wrappedValue = RMSNorm(dimensions: config.dim, eps: Float(config.eps))
        self._attn.wrappedValue = UMT5Attention(config: config)
        self._posEmbedding.wrappedValue = Embedding(embeddingCount: config.numBuckets, dimensions: config.numHeads)
        self._norm2.wrappedValue = RMSNorm(dimensions: config.dim, eps: Float(config.eps))
        self._ffn.wrappedValue = UMT5FeedForward(config: config)
        super.init()
    }

    /// This block's position bias `[1, H, L, L]`, fp32.
    func positionBias(buckets: MLXArray) -> MLXArray {
        let table = posEmbedding.weight.asType(.float32)
        return take(table, buckets, axis: 0).transposed(2, 0, 1).expandedDimensions(axis: 0)
    }

    func callAsFunction(_ x: MLXArray, buckets: MLXArray, keyValid: MLXArray?) -> MLXArray {
        let bias = positionBias(buckets: buckets)
        var h = x + attn(norm1(x), bias: bias, keyValid: keyValid).asType(.float32)
        h = h + ffn(norm2(h)).asType(.float32)
        return h
    }
}

// MARK: - Model

/// UMT5 encoder: token ids -> fp32 embeddings. The residual stream, norms, position bias and softmax are
/// fp32; projections run in their storage dtype (fp16 or INT4 via `quantizedMM`).
public final class UMT5EncoderModel: Module {
    public let config: UMT5Configuration

    // {{properties}}

    public init(_ config: UMT5Configuration) {
        self.config = config
        self._tokenEmbedding.wrappedValue = Embedding(embeddingCount: config.vocabSize, dimensions: config.dim)
        self._blocks.wrappedValue = (0 ..< config.numLayers).map { _ in UMT5Block(config: config) }
        self._norm.wrappedValue = RMSNorm(dimensions: config.dim, eps: Float(config.eps))
        super.init()
    }

    /// Encode `ids [B, L]`; keys at or past each `lengths[b]` are masked and those rows zeroed.
    public func callAsFunction(_ ids: MLXArray, lengths: [Int]? = nil) -> MLXArray {
        let (b, l) = ids.shape2
        let buckets = umt5BucketMatrix(length: l, numBuckets: config.numBuckets, maxDistance: config.maxDistance)
        var valid: MLXArray? = nil
        if let lengths, lengths.contains(where: { $0 < l }) {
            let positions = MLXArray(Array(Int32(0) ..< Int32(l))).expandedDimensions(axis: 0)
            let limits = MLXArray(lengths.map { Int32($0) }).expandedDimensions(axis: 1)
            valid = less(positions, limits)  // [B, L]
        }
        let keyValid = valid?.reshaped([b, 1, 1, l])
        var x = tokenEmbedding(ids).asType(.float32)
        for block in blocks {
            x = block(x, buckets: buckets, keyValid: keyValid)
            eval(x)
        }
        x = norm(x)
        if let valid {
            x = MLX.where(valid.expandedDimensions(axis: -1), x, MLXArray(Float(0)))
        }
        return x
    }

    /// Wan's contract: `[B, textLen, dim]` fp32, encoder outputs for the real tokens (EOS included),
    /// exact zeros after. The batch runs at its longest real length, not at `textLen`.
    public func encode(tokens: [[Int]]) -> MLXArray {
        let lengths = tokens.map(\.count)
        let longest = lengths.max() ?? 0
        precondition(longest >= 1 && lengths.min()! >= 1, "every prompt needs at least one token (EOS)")
        precondition(longest <= config.textLen, "a prompt has \(longest) tokens, more than \(config.textLen)")
        var ids = [Int32](repeating: Int32(config.padId), count: tokens.count * longest)
        for (row, sequence) in tokens.enumerated() {
            for (column, id) in sequence.enumerated() {
                ids[row * longest + column] = Int32(id)
            }
        }
        var out = self(MLXArray(ids, [tokens.count, longest]), lengths: lengths)
        if longest < config.textLen {
            out = padded(out, widths: [0, [0, config.textLen - longest], 0])
        }
        return out
    }
}
