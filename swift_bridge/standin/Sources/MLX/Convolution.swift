// Stand-in for ml-explore/mlx-swift Source/MLX/Ops.swift `conv2d` (test double): channels-last
// input `[N, H, W, C]`, weight `[O, kH, kW, C / groups]`, output `[N, Ho, Wo, O]`, fp32 accumulation.

/// `public func conv2d(_ array: MLXArray, _ weight: MLXArray, stride: IntOrPair = 1, padding: IntOrPair = 0,
/// dilation: IntOrPair = 1, groups: Int = 1, stream:)`.
public func conv2d(
    _ array: MLXArray, _ weight: MLXArray, stride: IntOrPair = 1, padding: IntOrPair = 0,
    dilation: IntOrPair = 1, groups: Int = 1
) -> MLXArray {
    let (n, h, w, c) = array.shape4
    let (o, kh, kw, ci) = weight.shape4
    precondition(c == ci * groups && o % groups == 0, "conv2d: input \(array.shape), weight \(weight.shape), groups \(groups)")
    let ho = (h + 2 * padding.first - dilation.first * (kh - 1) - 1) / stride.first + 1
    let wo = (w + 2 * padding.second - dilation.second * (kw - 1) - 1) / stride.second + 1
    let x = array.floats
    let wt = weight.floats
    let perGroup = o / groups
    var out = [Float](repeating: 0, count: n * ho * wo * o)
    x.withUnsafeBufferPointer { xp in
        wt.withUnsafeBufferPointer { wp in
            out.withUnsafeMutableBufferPointer { op in
                for b in 0 ..< n {
                    for y in 0 ..< ho {
                        for z in 0 ..< wo {
                            let obase = ((b * ho + y) * wo + z) * o
                            for i in 0 ..< kh {
                                let iy = y * stride.first - padding.first + i * dilation.first
                                if iy < 0 || iy >= h { continue }
                                for j in 0 ..< kw {
                                    let ix = z * stride.second - padding.second + j * dilation.second
                                    if ix < 0 || ix >= w { continue }
                                    let xbase = ((b * h + iy) * w + ix) * c
                                    for oc in 0 ..< o {
                                        let g = oc / perGroup
                                        let wbase = ((oc * kh + i) * kw + j) * ci
                                        var acc: Float = 0
                                        for cc in 0 ..< ci {
                                            acc += xp[xbase + g * ci + cc] * wp[wbase + cc]
                                        }
                                        op[obase + oc] += acc
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    return MLXArray(storage: out, shape: [n, ho, wo, o], dtype: promote(array.dtype, weight.dtype))
}
