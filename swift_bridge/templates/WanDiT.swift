// {{header}}

import Foundation
import MLX
import MLXNN

// {{configuration}}

// MARK: - Host-side tables (not parameters)

/// Wan's sinusoidal time embedding: cos first, exponent `-i/half`, computed in Double on the host
/// (as the reference does in float64), returned as fp32 `[B, dim]`.
func wanSinusoidalEmbedding(_ timesteps: [Double], dim: Int) -> MLXArray {
    let half = dim / 2
    var values = [Float]()
    values.reserveCapacity(timesteps.count * dim)
    for t in timesteps {
        let args = (0 ..< half).map { t * pow(10000.0, -Double($0) / Double(half)) }
        values += args.map { Float(cos($0)) }
        values += args.map { Float(sin($0)) }
    }
    return MLXArray(values, [timesteps.count, dim])
}

/// Cos/sin tables of Wan's 3D RoPE for one latent grid, `[L, 1, headDim/2]` fp32, tokens in row-major
/// (f, h, w) order. Interleaved pairs (2i, 2i+1) = (real, imag); pairs split between the frame, row and
/// column axes as `headDim - 4*(headDim/6)`, `2*(headDim/6)`, `2*(headDim/6)` dimensions, each axis with
/// its own frequencies `1/theta^(2j/D_axis)`. `MLXFast.RoPE` rotates along one axis only, so the tables
/// are built here and applied by hand. A struct, not a Module: it never enters the parameter tree.
struct WanRoPE3D {
    let cosTable: MLXArray
    let sinTable: MLXArray

    init(grid: (Int, Int, Int), headDim: Int, theta: Double) {
        let d = headDim
        let axisDims = [d - 4 * (d / 6), 2 * (d / 6), 2 * (d / 6)]
        let omegas: [[Double]] = axisDims.map { axisDim in
            stride(from: 0, to: axisDim, by: 2).map { 1.0 / pow(theta, Double($0) / Double(axisDim)) }
        }
        let half = d / 2
        let count = grid.0 * grid.1 * grid.2
        var cosValues = [Float](repeating: 0, count: count * half)
        var sinValues = [Float](repeating: 0, count: count * half)
        var token = 0
        for f in 0 ..< grid.0 {
            for h in 0 ..< grid.1 {
                for w in 0 ..< grid.2 {
                    let position = [Double(f), Double(h), Double(w)]
                    var j = token * half
                    for axis in 0 ..< 3 {
                        for omega in omegas[axis] {
                            let angle = position[axis] * omega
                            cosValues[j] = Float(cos(angle))
                            sinValues[j] = Float(sin(angle))
                            j += 1
                        }
                    }
                    token += 1
                }
            }
        }
        cosTable = MLXArray(cosValues, [count, 1, half])
        sinTable = MLXArray(sinValues, [count, 1, half])
    }

    /// Rotate `x [B, L, H, D]` in fp32.
    func apply(_ x: MLXArray) -> MLXArray {
        let (b, l, h, d) = x.shape4
        let pairs = x.asType(.float32).reshaped([b, l, h, d / 2, 2])
        let real = pairs[.ellipsis, 0]
        let imag = pairs[.ellipsis, 1]
        let rotated = stacked(
            [real * cosTable - imag * sinTable, real * sinTable + imag * cosTable], axis: -1)
        return rotated.reshaped([b, l, h, d])
    }
}

/// Parameter-free LayerNorm with fp32 statistics (Wan's norm1/norm2/head norm).
func wanLayerNorm(_ x: MLXArray, eps: Float) -> MLXArray {
    MLXFast.layerNorm(x.asType(.float32), weight: nil, bias: nil, eps: eps)
}

/// Apply a (possibly quantized) Linear in its own dtype: fp16 weights run fp16 matmuls, as in the
/// Python runtime; the callers keep norms, modulation and the residual stream in fp32.
func linearInOwnDType(_ layer: Linear, _ x: MLXArray) -> MLXArray {
    let dtype = (layer as? QuantizedLinear)?.scales.dtype ?? layer.weight.dtype
    return layer(x.asType(dtype))
}

// MARK: - Layers

/// Wan's q/k RMSNorm over all heads jointly (before the head split), statistics in fp32.
/// `qk_norm == "masked"` reproduces a wider model whose pruned heads were zeroed:
/// `rmsNorm(x, w*sqrt(f/k), eps*f/k) == w*x*rsqrt(sum(x^2)/f + eps)` for `k` kept of `f` channels.
final class WanQKNorm: Module {
    let weightScale: Float
    let eps: Float

    // {{properties}}

    init(width: Int, eps: Double, fullWidth: Int?) {
        let ratio = fullWidth.map { Double($0) / Double(width) } ?? 1.0
        self.weightScale = Float(ratio.squareRoot())
        self.eps = Float(eps * ratio)
        self._weight.wrappedValue = MLXArray.ones([width])
        super.init()
    }

    func callAsFunction(_ x: MLXArray) -> MLXArray {
        var w = weight.asType(.float32)
        if weightScale != 1 {
            w = w * weightScale
        }
        return MLXFast.rmsNorm(x.asType(.float32), weight: w, eps: eps)
    }
}

/// Self- or cross-attention with q/k RMSNorm across heads. `heads * headDim` may differ from the model
/// width: pruned models keep `headDim` (128) and drop whole heads, per layer. Attention runs through
/// `MLXFast.scaledDotProductAttention`, MLX's fused Metal kernel, which never materializes the
/// `[L, L]` score matrix (32760 tokens at 480x832x81).
final class WanAttention: Module {
    let heads: Int
    let headDim: Int

    // {{properties}}

    init(dim: Int, heads: Int, config: WanDiTConfiguration) {
        let inner = heads * config.headDim
        let fullWidth: Int? = config.qkNorm == "masked" ? (config.qkNormWidth ?? dim) : nil
        self.heads = heads
        self.headDim = config.headDim
        self._q.wrappedValue = Linear(dim, inner)
        self._k.wrappedValue = Linear(dim, inner)
        self._v.wrappedValue = Linear(dim, inner)
        self._o.wrappedValue = Linear(inner, dim)
        self._normQ.wrappedValue = WanQKNorm(width: inner, eps: config.eps, fullWidth: fullWidth)
        self._normK.wrappedValue = WanQKNorm(width: inner, eps: config.eps, fullWidth: fullWidth)
        super.init()
    }

    private func splitHeads(_ x: MLXArray) -> MLXArray {
        let (b, l, _) = x.shape3
        return x.reshaped([b, l, heads, headDim])
    }

    private var computeDType: DType {
        (v as? QuantizedLinear)?.scales.dtype ?? v.weight.dtype
    }

    /// Cross-attention keys and values `[B, H, L, D]` for a prompt: computed once, reused every step.
    func keyValues(_ context: MLXArray) -> (MLXArray, MLXArray) {
        let keys = splitHeads(normK(linearInOwnDType(k, context)))
        let values = splitHeads(linearInOwnDType(v, context))
        return (keys.asType(computeDType).transposed(0, 2, 1, 3), values.transposed(0, 2, 1, 3))
    }

    /// Self-attention when `rope` is given, cross-attention on precomputed `keyValues` otherwise.
    func callAsFunction(
        _ x: MLXArray, rope: WanRoPE3D? = nil, keyValues cached: (MLXArray, MLXArray)? = nil
    ) -> MLXArray {
        let dtype = computeDType
        var queries = splitHeads(normQ(linearInOwnDType(q, x)))
        var keys: MLXArray
        var values: MLXArray
        if let cached {
            (keys, values) = cached
        } else {
            keys = splitHeads(normK(linearInOwnDType(k, x)))
            values = splitHeads(linearInOwnDType(v, x)).transposed(0, 2, 1, 3)
            if let rope {
                queries = rope.apply(queries)
                keys = rope.apply(keys)
            }
            keys = keys.asType(dtype).transposed(0, 2, 1, 3)
        }
        queries = queries.asType(dtype).transposed(0, 2, 1, 3)
        let out = MLXFast.scaledDotProductAttention(
            queries: queries, keys: keys, values: values, scale: 1 / Float(headDim).squareRoot(),
            mask: MLXFast.ScaledDotProductAttentionMaskMode.none)
        let (b, _, l, _) = out.shape4
        return linearInOwnDType(o, out.transposed(0, 2, 1, 3).reshaped([b, l, -1]))
    }
}

/// Linear -> GELU (tanh approximation, fp32) -> Linear, token-chunked like the Python runtime so the
/// `[L, hidden]` activation (and its fp32 GELU copy) stays within `activationBudget` bytes.
final class WanFeedForward: Module {
    /// The Python runtime's budget (`mlx_video.ops.DEFAULT_ATTENTION_BUDGET`).
    static let activationBudget = {{constant:ffn_activation_budget}}

    // {{properties}}

    init(dim: Int, hidden: Int) {
        self._fc1.wrappedValue = Linear(dim, hidden)
        self._fc2.wrappedValue = Linear(hidden, dim)
        super.init()
    }

    private func apply(_ x: MLXArray) -> MLXArray {
        let hidden = linearInOwnDType(fc1, x)
        return linearInOwnDType(fc2, geluApproximate(hidden.asType(.float32)).asType(hidden.dtype))
    }

    /// Tokens per chunk: the most whose `[hidden]` fp32 activation and GELU copy (8 bytes per element) fit
    /// in `budget`, and at least 1.
    static func chunkTokens(hidden: Int, budget: Int) -> Int {
        max(1, budget / (hidden * 4 * 2))
    }

    /// `chunkTokens` at this layer's hidden width.
    func chunkTokens(budget: Int) -> Int {
        Self.chunkTokens(hidden: fc1.weight.dim(0), budget: budget)
    }

    func callAsFunction(_ x: MLXArray, budget: Int = activationBudget) -> MLXArray {
        let chunk = chunkTokens(budget: budget)
        let tokens = x.dim(1)
        if tokens <= chunk {
            return apply(x)
        }
        var outputs = [MLXArray]()
        for start in stride(from: 0, to: tokens, by: chunk) {
            let out = apply(x[0..., start ..< min(start + chunk, tokens)])
            eval(out)
            outputs.append(out)
        }
        return concatenated(outputs, axis: 1)
    }
}

/// One transformer block: modulated self-attention, unmodulated cross-attention (affine `norm3`),
/// modulated FFN. Modulation, norms and the residual stream are fp32.
final class WanBlock: Module {
    let eps: Float

    // {{properties}}

    init(config: WanDiTConfiguration, layer: Int) {
        self.eps = Float(config.eps)
        self._modulation.wrappedValue = MLXArray.zeros([1, 6, config.dim])
        self._selfAttn.wrappedValue = WanAttention(
            dim: config.dim, heads: config.selfAttnHeads[layer], config: config)
        self._norm3.wrappedValue = LayerNorm(dimensions: config.dim, eps: Float(config.eps))
        self._crossAttn.wrappedValue = WanAttention(
            dim: config.dim, heads: config.crossAttnHeads[layer], config: config)
        self._ffn.wrappedValue = WanFeedForward(dim: config.dim, hidden: config.ffnDim[layer])
        super.init()
    }

    func callAsFunction(
        _ x: MLXArray, e0: MLXArray, rope: WanRoPE3D, crossKeyValues: (MLXArray, MLXArray)
    ) -> MLXArray {
        // shift, scale, gate (self-attention), then shift, scale, gate (FFN)
        let e = split(modulation.asType(.float32) + e0, parts: 6, axis: 1)
        var h = x
        let attended = selfAttn(wanLayerNorm(h, eps: eps) * (1 + e[1]) + e[0], rope: rope)
        h = h + attended.asType(.float32) * e[2]
        let crossed = crossAttn(norm3(h.asType(.float32)), keyValues: crossKeyValues)
        h = h + crossed.asType(.float32)
        let fed = ffn(wanLayerNorm(h, eps: eps) * (1 + e[4]) + e[3])
        return h + fed.asType(.float32) * e[5]
    }
}

/// Linear -> activation -> Linear (the text and time embedders; the caller applies the activation).
final class WanMLP: Module {
    // {{properties}}

    init(input: Int, hidden: Int, output: Int) {
        self._linear1.wrappedValue = Linear(input, hidden)
        self._linear2.wrappedValue = Linear(hidden, output)
        super.init()
    }
}

/// Output head: modulated by the raw time embedding `e` (no SiLU), fp32 matmul.
final class WanHead: Module {
    let eps: Float

    // {{properties}}

    init(config: WanDiTConfiguration) {
        let patchElements = config.patchSize.reduce(1, *)
        self.eps = Float(config.eps)
        self._modulation.wrappedValue = MLXArray.zeros([1, 2, config.dim])
        self._linear.wrappedValue = Linear(config.dim, config.outChannels * patchElements)
        super.init()
    }

    func callAsFunction(_ x: MLXArray, e: MLXArray) -> MLXArray {
        let mod = split(modulation.asType(.float32) + e.expandedDimensions(axis: 1), parts: 2, axis: 1)
        let y = wanLayerNorm(x, eps: eps) * (1 + mod[1]) + mod[0]
        return linear(y.asType(linear.weight.dtype)).asType(.float32)
    }
}

// MARK: - Model

/// The Wan2.1 text-to-video DiT (velocity prediction), channels-last latents `[B, F, H, W, C]`.
public final class WanDiTModel: Module {
    public let config: WanDiTConfiguration

    // {{properties}}

    public init(_ config: WanDiTConfiguration) {
        let patchElements = config.patchSize.reduce(1, *)
        self.config = config
        // kernel == stride, so Wan's Conv3d patch embedding is a Linear over (kt, kh, kw, c) patches.
        self._patchEmbedding.wrappedValue = Linear(config.inChannels * patchElements, config.dim)
        self._textEmbedding.wrappedValue = WanMLP(
            input: config.textDim, hidden: config.dim, output: config.dim)
        self._timeEmbedding.wrappedValue = WanMLP(
            input: config.freqDim, hidden: config.dim, output: config.dim)
        self._timeProjection.wrappedValue = Linear(config.dim, 6 * config.dim)
        self._blocks.wrappedValue = (0 ..< config.numLayers).map {
            WanBlock(config: config, layer: $0)
        }
        self._head.wrappedValue = WanHead(config: config)
        super.init()
    }

    /// T5 embeddings `[B, L <= textLen, textDim]` -> `[B, textLen, dim]`. Padding rows are embedded
    /// zeros: Wan attends to all `textLen` slots, without a mask.
    public func embedText(_ context: MLXArray) -> MLXArray {
        let (b, l, c) = context.shape3
        precondition(l <= config.textLen, "context has \(l) tokens; the model takes at most \(config.textLen)")
        var padded = context
        if l < config.textLen {
            padded = concatenated(
                [context, MLXArray.zeros([b, config.textLen - l, c], dtype: context.dtype)], axis: 1)
        }
        let hidden = linearInOwnDType(textEmbedding.linear1, padded)
        let activated = geluApproximate(hidden.asType(.float32)).asType(hidden.dtype)
        return linearInOwnDType(textEmbedding.linear2, activated)
    }

    /// Per-block cross-attention keys/values for a prompt; compute once and pass to every step.
    public func prepareText(_ context: MLXArray) -> [(MLXArray, MLXArray)] {
        let text = embedText(context)
        return blocks.map { $0.crossAttn.keyValues(text) }
    }

    /// `e [B, dim]` (for the head) and `e0 [B, 6, dim]` (block modulation), fp32.
    func embedTime(_ timesteps: [Double]) -> (MLXArray, MLXArray) {
        let s = wanSinusoidalEmbedding(timesteps, dim: config.freqDim)
        let hidden = timeEmbedding.linear1(s.asType(timeEmbedding.linear1.weight.dtype))
        let e = timeEmbedding.linear2(silu(hidden)).asType(.float32)
        let e0 = timeProjection(silu(e).asType(timeProjection.weight.dtype)).asType(.float32)
        return (e, e0.reshaped([timesteps.count, 6, config.dim]))
    }

    func patchify(_ x: MLXArray) -> (MLXArray, (Int, Int, Int)) {
        let s = x.shape
        let (b, f, h, w, c) = (s[0], s[1], s[2], s[3], s[4])
        let (pt, ph, pw) = (config.patchSize[0], config.patchSize[1], config.patchSize[2])
        precondition(f % pt == 0 && h % ph == 0 && w % pw == 0, "latent grid is not divisible by the patch size")
        precondition(c == config.inChannels, "latents have \(c) channels; the model expects \(config.inChannels)")
        let grid = (f / pt, h / ph, w / pw)
        let patches = x.reshaped([b, grid.0, pt, grid.1, ph, grid.2, pw, c])
            .transposed(0, 1, 3, 5, 2, 4, 6, 7)
        return (patches.reshaped([b, grid.0 * grid.1 * grid.2, pt * ph * pw * c]), grid)
    }

    /// Head channel `o = ((p*ph + q)*pw + r)*C + c` (channel innermost).
    func unpatchify(_ x: MLXArray, grid: (Int, Int, Int)) -> MLXArray {
        let b = x.dim(0)
        let (pt, ph, pw) = (config.patchSize[0], config.patchSize[1], config.patchSize[2])
        let c = config.outChannels
        let patches = x.reshaped([b, grid.0, grid.1, grid.2, pt, ph, pw, c])
            .transposed(0, 1, 4, 2, 5, 3, 6, 7)
        return patches.reshaped([b, grid.0 * pt, grid.1 * ph, grid.2 * pw, c])
    }

    /// Velocity for `latents [B, F, H, W, C]` at `timesteps` (one per batch entry, or one for all; may be
    /// fractional), given `text = prepareText(context)`. Evaluates after every block so the graph stays
    /// small on the phone.
    public func callAsFunction(
        _ latents: MLXArray, timesteps: [Double], text: [(MLXArray, MLXArray)]
    ) -> MLXArray {
        precondition(text.count == blocks.count, "text has \(text.count) entries for \(blocks.count) blocks")
        let (tokens, grid) = patchify(latents.asType(.float32))
        var x = linearInOwnDType(patchEmbedding, tokens).asType(.float32)
        var (e, e0) = embedTime(timesteps)
        if e.dim(0) != x.dim(0) {
            e = broadcast(e, to: [x.dim(0), config.dim])
            e0 = broadcast(e0, to: [x.dim(0), 6, config.dim])
        }
        let rope = WanRoPE3D(grid: grid, headDim: config.headDim, theta: config.ropeTheta)
        for (block, keyValues) in zip(blocks, text) {
            x = block(x, e0: e0, rope: rope, crossKeyValues: keyValues)
            eval(x)
        }
        return unpatchify(head(x, e: e), grid: grid)
    }

    /// Convenience: raw T5 `context [B, L, textDim]` instead of prepared keys/values.
    public func callAsFunction(_ latents: MLXArray, timesteps: [Double], context: MLXArray) -> MLXArray {
        callAsFunction(latents, timesteps: timesteps, text: prepareText(context))
    }
}
