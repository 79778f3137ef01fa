// Stand-in for ml-explore/mlx-swift Source/MLX/Random.swift (`public enum MLXRandom`), test double.
// mlx's counter-based PRNG (mlx/random.cpp, mlx/backend/cpu/primitives.cpp `RandomBits`): a key is two
// uint32 words (seed >> 32, seed & 0xffffffff); `bits` hashes counters with Threefry-2x32 (20 rounds),
// word i and word i + ceil(n/2) from the pair (i, i + ceil(n/2)); `uniform` divides by UInt32.max;
// `normal` is sqrt(2) * erfinv(uniform(nextafter(-1, 0), 1)). The op checks compare with Python MLX.

import Foundation

func threefry2x32(_ key: (UInt32, UInt32), _ count: (UInt32, UInt32)) -> (UInt32, UInt32) {
    let rotations: [[UInt32]] = [[13, 15, 26, 6], [17, 29, 16, 24]]
    let ks = [key.0, key.1, key.0 ^ key.1 ^ 0x1BD1_1BDA]
    var x0 = count.0 &+ ks[0]
    var x1 = count.1 &+ ks[1]
    for i in 0 ..< 5 {
        for r in rotations[i % 2] {
            x0 = x0 &+ x1
            x1 = (x1 << r) | (x1 >> (32 - r))
            x1 ^= x0
        }
        x0 = x0 &+ ks[(i + 1) % 3]
        x1 = x1 &+ ks[(i + 2) % 3] &+ UInt32(i + 1)
    }
    return (x0, x1)
}

/// `n` random uint32 words for one key, in mlx's order.
func randomWords(_ key: MLXArray, _ n: Int) -> [UInt32] {
    guard let k = key.words, k.count == 2 else { preconditionFailure("a PRNG key is a uint32 array of shape [2]") }
    let half = n / 2
    let even = n % 2 == 0
    let second = half + (even ? 0 : 1)
    var out = [UInt32](repeating: 0, count: n)
    for i in 0 ..< half {
        let (a, b) = threefry2x32((k[0], k[1]), (UInt32(i), UInt32(i + second)))
        out[i] = a
        out[i + second] = b
    }
    if !even {
        out[half] = threefry2x32((k[0], k[1]), (UInt32(half), 0)).0
    }
    return out
}

/// Single-precision inverse error function (the polynomial approximation mlx's CPU backend uses).
func erfinvFloat(_ a: Float) -> Float {
    let t = Foundation.log(Float(1).addingProduct(a, -a))  // log(1 - a^2) with one rounding
    var p: Float
    if Swift.abs(t) > 6.125 {
        p = 3.03697567e-10
        for c: Float in [2.93243101e-8, 1.22150334e-6, 2.84108955e-5, 3.93552968e-4, 3.02698812e-3, 4.83185798e-3,
                         -2.64646143e-1, 8.40016484e-1] {
            p = c.addingProduct(p, t)
        }
    } else {
        p = 5.43877832e-9
        for c: Float in [1.43285448e-7, 1.22774793e-6, 1.12963626e-7, -5.61530760e-5, -1.47697632e-4,
                         2.31468678e-3, 1.15392581e-2, -2.32015476e-1, 8.86226892e-1] {
            p = c.addingProduct(p, t)
        }
    }
    return a * p
}

public enum MLXRandom {
    /// `public static func key(_ seed: UInt64) -> MLXArray`.
    public static func key(_ seed: UInt64) -> MLXArray {
        MLXArray(words: [UInt32(truncatingIfNeeded: seed >> 32), UInt32(truncatingIfNeeded: seed)], shape: [2])
    }

    /// `public static func split(key: MLXArray, into num: Int, stream: StreamOrDevice = .default) -> [MLXArray]`.
    public static func split(key: MLXArray, into num: Int) -> [MLXArray] {
        let words = randomWords(key, 2 * num)
        return (0 ..< num).map { MLXArray(words: [words[2 * $0], words[2 * $0 + 1]], shape: [2]) }
    }

    /// `public static func split(key: MLXArray, stream: StreamOrDevice = .default) -> (MLXArray, MLXArray)`.
    public static func split(key: MLXArray) -> (MLXArray, MLXArray) {
        let keys = split(key: key, into: 2)
        return (keys[0], keys[1])
    }

    /// `public static func uniform(_ range: Range<Float> = 0 ..< 1, _ shape: some Collection<Int> = [],
    /// type: ... = Float.self, key: (some RandomStateOrKey)? = nil, stream:) -> MLXArray`.
    public static func uniform(_ range: Range<Float> = 0 ..< 1, _ shape: [Int] = [], key: MLXArray) -> MLXArray {
        let n = shape.reduce(1, *)
        let words = randomWords(key, n)
        let width = range.upperBound - range.lowerBound
        let top = range.upperBound.nextDown
        let values = words.map { w -> Float in
            let u = Float(w) / Float(UInt32.max)
            return Swift.min(width * u + range.lowerBound, top)
        }
        return MLXArray(storage: values, shape: shape, dtype: .float32)
    }

    /// `public static func normal(_ shape: some Collection<Int> = [], type: ... = Float.self, loc: Float = 0,
    /// scale: Float = 1, key: (some RandomStateOrKey)? = nil, stream:) -> MLXArray`.
    public static func normal(_ shape: [Int] = [], loc: Float = 0, scale: Float = 1, key: MLXArray) -> MLXArray {
        let low = Float(-1).nextUp
        let u = uniform(low ..< 1, shape, key: key)
        let values = u.storage.map { Float(2).squareRoot() * scale * erfinvFloat($0) + loc }
        return MLXArray(storage: values, shape: shape, dtype: .float32)
    }
}
