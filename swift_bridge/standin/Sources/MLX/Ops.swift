// Stand-in for the mlx-swift operations the export uses (test double, never shipped).
// Operators: ml-explore/mlx-swift Source/MLX/MLXArray+Ops.swift. Free functions: Source/MLX/Ops.swift
// (and Source/MLX/Ops+Array.swift for the methods). Labels and defaults follow those files; the
// `stream:` parameters are left out (everything runs eagerly on the CPU).

import Foundation

// MARK: - Broadcasting (numpy rules, as mlx)

func broadcastShapes(_ a: [Int], _ b: [Int]) -> [Int] {
    let n = Swift.max(a.count, b.count)
    var out = [Int](repeating: 1, count: n)
    for i in 0 ..< n {
        let da = i < n - a.count ? 1 : a[i - (n - a.count)]
        let db = i < n - b.count ? 1 : b[i - (n - b.count)]
        precondition(da == db || da == 1 || db == 1, "shapes \(a) and \(b) cannot be broadcast")
        out[i] = da == 1 ? db : da
    }
    return out
}

/// Walking `shape` in row-major order, the offset `sum(index[d] * strides[d])` of every element.
func stridedOffsets(_ shape: [Int], _ strides: [Int]) -> [Int] {
    let total = shape.reduce(1, *)
    var offsets = [Int](repeating: 0, count: total)
    var counter = [Int](repeating: 0, count: shape.count)
    var position = 0
    for k in 0 ..< total {
        offsets[k] = position
        var d = shape.count - 1
        while d >= 0 {
            counter[d] += 1
            position += strides[d]
            if counter[d] < shape[d] { break }
            position -= strides[d] * counter[d]
            counter[d] = 0
            d -= 1
        }
    }
    return offsets
}

/// For every element of `out` (row-major), the index of the element of an array of `shape` it reads.
func broadcastIndices(_ shape: [Int], to out: [Int]) -> [Int] {
    if shape == out { return Array(0 ..< out.reduce(1, *)) }
    let offset = out.count - shape.count
    let inStrides = stridesOf(shape)
    var strides = [Int](repeating: 0, count: out.count)
    for i in 0 ..< shape.count where shape[i] != 1 {
        strides[i + offset] = inStrides[i]
    }
    return stridedOffsets(out, strides)
}

func binary(_ a: MLXArray, _ b: MLXArray, dtype: DType? = nil, _ f: (Float, Float) -> Float) -> MLXArray {
    let shape = broadcastShapes(a.shape, b.shape)
    let ia = broadcastIndices(a.shape, to: shape)
    let ib = broadcastIndices(b.shape, to: shape)
    let x = a.floats
    let y = b.floats
    var out = [Float](repeating: 0, count: ia.count)
    for k in 0 ..< ia.count {
        out[k] = f(x[ia[k]], y[ib[k]])
    }
    return MLXArray(storage: out, shape: shape, dtype: dtype ?? promote(a.dtype, b.dtype))
}

/// A Swift scalar is a "weak" operand in mlx: the array keeps its floating dtype.
func scalarDType(_ a: MLXArray) -> DType { a.dtype.isFloatingPoint ? a.dtype : .float32 }

func unary(_ a: MLXArray, dtype: DType? = nil, _ f: (Float) -> Float) -> MLXArray {
    MLXArray(storage: a.floats.map(f), shape: a.shape, dtype: dtype ?? a.dtype)
}

func floatingUnary(_ a: MLXArray, _ f: (Float) -> Float) -> MLXArray {
    unary(a, dtype: scalarDType(a), f)
}

// MARK: - Operators (Source/MLX/MLXArray+Ops.swift)

extension MLXArray {
    public static func + (lhs: MLXArray, rhs: MLXArray) -> MLXArray { binary(lhs, rhs, +) }
    public static func - (lhs: MLXArray, rhs: MLXArray) -> MLXArray { binary(lhs, rhs, -) }
    public static func * (lhs: MLXArray, rhs: MLXArray) -> MLXArray { binary(lhs, rhs, *) }
    public static func / (lhs: MLXArray, rhs: MLXArray) -> MLXArray {
        binary(lhs, rhs, dtype: promote(scalarDType(lhs), rhs.dtype), /)
    }

    public static func + (lhs: MLXArray, rhs: Float) -> MLXArray { unary(lhs, dtype: scalarDType(lhs)) { $0 + rhs } }
    public static func - (lhs: MLXArray, rhs: Float) -> MLXArray { unary(lhs, dtype: scalarDType(lhs)) { $0 - rhs } }
    public static func * (lhs: MLXArray, rhs: Float) -> MLXArray { unary(lhs, dtype: scalarDType(lhs)) { $0 * rhs } }
    public static func / (lhs: MLXArray, rhs: Float) -> MLXArray { unary(lhs, dtype: scalarDType(lhs)) { $0 / rhs } }
    public static func + (lhs: Float, rhs: MLXArray) -> MLXArray { unary(rhs, dtype: scalarDType(rhs)) { lhs + $0 } }
    public static func - (lhs: Float, rhs: MLXArray) -> MLXArray { unary(rhs, dtype: scalarDType(rhs)) { lhs - $0 } }
    public static func * (lhs: Float, rhs: MLXArray) -> MLXArray { unary(rhs, dtype: scalarDType(rhs)) { lhs * $0 } }
    public static func / (lhs: Float, rhs: MLXArray) -> MLXArray { unary(rhs, dtype: scalarDType(rhs)) { lhs / $0 } }

    public static prefix func - (x: MLXArray) -> MLXArray { unary(x) { -$0 } }

    /// `public var T: MLXArray` (reversed axes).
    public var T: MLXArray { transposed() }
}

// MARK: - Elementwise functions (Source/MLX/Ops.swift)

public func abs(_ array: MLXArray) -> MLXArray { unary(array) { Swift.abs($0) } }
public func exp(_ array: MLXArray) -> MLXArray { floatingUnary(array) { Foundation.exp($0) } }
public func sqrt(_ array: MLXArray) -> MLXArray { floatingUnary(array) { $0.squareRoot() } }
public func rsqrt(_ array: MLXArray) -> MLXArray { floatingUnary(array) { 1 / $0.squareRoot() } }
public func tanh(_ array: MLXArray) -> MLXArray { floatingUnary(array) { Foundation.tanh($0) } }
public func sigmoid(_ array: MLXArray) -> MLXArray { floatingUnary(array) { 1 / (1 + Foundation.exp(-$0)) } }
public func erf(_ array: MLXArray) -> MLXArray { floatingUnary(array) { Foundation.erf($0) } }
public func square(_ array: MLXArray) -> MLXArray { unary(array) { $0 * $0 } }

/// `public func round(_ array: MLXArray, decimals: Int = 0, stream:)`: half to even, as numpy/mlx.
public func round(_ array: MLXArray, decimals: Int = 0) -> MLXArray {
    let scale = Float(pow(10.0, Double(decimals)))
    return unary(array) { ($0 * scale).rounded(.toNearestOrEven) / scale }
}

public func maximum(_ a: MLXArray, _ b: MLXArray) -> MLXArray { binary(a, b) { Swift.max($0, $1) } }
public func minimum(_ a: MLXArray, _ b: MLXArray) -> MLXArray { binary(a, b) { Swift.min($0, $1) } }
public func matmul(_ a: MLXArray, _ b: MLXArray) -> MLXArray { matmulImpl(a, b) }

/// `public func less(_ a: some ScalarOrArray, _ b: some ScalarOrArray, stream:)`.
public func less(_ a: MLXArray, _ b: MLXArray) -> MLXArray { binary(a, b, dtype: .bool) { $0 < $1 ? 1 : 0 } }
public func greater(_ a: MLXArray, _ b: MLXArray) -> MLXArray { binary(a, b, dtype: .bool) { $0 > $1 ? 1 : 0 } }

/// `public func clip(_ array: MLXArray, min: some ScalarOrArray, max: some ScalarOrArray, stream:)`.
public func clip(_ array: MLXArray, min: Float, max: Float) -> MLXArray {
    unary(array, dtype: scalarDType(array)) { Swift.min(Swift.max($0, min), max) }
}

/// `public func which(_ condition: MLXArray, _ x: some ScalarOrArray, _ y: some ScalarOrArray, stream:)`,
/// exported as `MLX.where` (Source/MLX/Ops.swift).
public func `where`(_ condition: MLXArray, _ x: MLXArray, _ y: MLXArray) -> MLXArray {
    let shape = broadcastShapes(broadcastShapes(condition.shape, x.shape), y.shape)
    let ic = broadcastIndices(condition.shape, to: shape)
    let ix = broadcastIndices(x.shape, to: shape)
    let iy = broadcastIndices(y.shape, to: shape)
    let c = condition.floats
    let xv = x.floats
    let yv = y.floats
    var out = [Float](repeating: 0, count: ic.count)
    for k in 0 ..< ic.count {
        out[k] = c[ic[k]] != 0 ? xv[ix[k]] : yv[iy[k]]
    }
    return MLXArray(storage: out, shape: shape, dtype: promote(x.dtype, y.dtype))
}

// MARK: - Reductions

/// Reduce `axes` (sorted, distinct) with `f` over the values of each output slot.
func reduce(_ a: MLXArray, axes: [Int], keepDims: Bool, dtype: DType? = nil, _ f: ([Float]) -> Float) -> MLXArray {
    let axes = Set(axes.map { normalizeAxis($0, a.ndim) })
    let outShapeKeep = a.shape.enumerated().map { axes.contains($0.offset) ? 1 : $0.element }
    let outCount = outShapeKeep.reduce(1, *)
    var groups = [[Float]](repeating: [], count: outCount)
    let outStrides = stridesOf(outShapeKeep)
    let values = a.floats
    var counter = [Int](repeating: 0, count: a.ndim)
    for k in 0 ..< values.count {
        var o = 0
        for d in 0 ..< a.ndim where !axes.contains(d) {
            o += counter[d] * outStrides[d]
        }
        groups[o].append(values[k])
        var d = a.ndim - 1
        while d >= 0 {
            counter[d] += 1
            if counter[d] < a.shape[d] { break }
            counter[d] = 0
            d -= 1
        }
    }
    let shape = keepDims ? outShapeKeep : a.shape.enumerated().filter { !axes.contains($0.offset) }.map(\.element)
    return MLXArray(storage: groups.map(f), shape: shape, dtype: dtype ?? a.dtype)
}

func allAxes(_ a: MLXArray) -> [Int] { Array(0 ..< a.ndim) }

extension MLXArray {
    /// `public func max(keepDims: Bool = false, stream:) -> MLXArray` (Source/MLX/MLXArray+Ops.swift).
    public func max(keepDims: Bool = false) -> MLXArray {
        reduce(self, axes: allAxes(self), keepDims: keepDims) { $0.max() ?? -.infinity }
    }

    public func max(axis: Int, keepDims: Bool = false) -> MLXArray {
        reduce(self, axes: [axis], keepDims: keepDims) { $0.max() ?? -.infinity }
    }

    public func min(keepDims: Bool = false) -> MLXArray {
        reduce(self, axes: allAxes(self), keepDims: keepDims) { $0.min() ?? .infinity }
    }

    public func sum(keepDims: Bool = false) -> MLXArray {
        reduce(self, axes: allAxes(self), keepDims: keepDims) { Float($0.reduce(0.0) { $0 + Double($1) }) }
    }

    public func sum(axis: Int, keepDims: Bool = false) -> MLXArray {
        reduce(self, axes: [axis], keepDims: keepDims) { Float($0.reduce(0.0) { $0 + Double($1) }) }
    }

    public func mean(keepDims: Bool = false) -> MLXArray {
        reduce(self, axes: allAxes(self), keepDims: keepDims, dtype: scalarDType(self)) {
            Float($0.reduce(0.0) { $0 + Double($1) } / Double(Swift.max($0.count, 1)))
        }
    }

    public func mean(axis: Int, keepDims: Bool = false) -> MLXArray {
        reduce(self, axes: [axis], keepDims: keepDims, dtype: scalarDType(self)) {
            Float($0.reduce(0.0) { $0 + Double($1) } / Double(Swift.max($0.count, 1)))
        }
    }
}

/// `public func softmax(_ array: MLXArray, axis: Int, precise: Bool = false, stream:)`: computed in fp32.
public func softmax(_ array: MLXArray, axis: Int, precise: Bool = false) -> MLXArray {
    let moved = swappedAxes(array, axis, -1)
    let n = moved.shape.last ?? 1
    var values = moved.floats
    var row = 0
    while row < values.count {
        let slice = values[row ..< row + n]
        let top = slice.max() ?? 0
        var total: Double = 0
        for i in row ..< row + n {
            let e = top == -.infinity ? 0 : Foundation.exp(values[i] - top)
            values[i] = e
            total += Double(e)
        }
        for i in row ..< row + n {
            values[i] = total > 0 ? Float(Double(values[i]) / total) : 0
        }
        row += n
    }
    return swappedAxes(MLXArray(storage: values, shape: moved.shape, dtype: array.dtype), axis, -1)
}

// MARK: - Shapes (Source/MLX/Ops.swift, Source/MLX/MLXArray+Ops.swift)

extension MLXArray {
    /// `public func reshaped(_ newShape: [Int], stream:)`; one entry may be -1.
    public func reshaped(_ newShape: [Int]) -> MLXArray {
        var shape = newShape
        if let unknown = shape.firstIndex(of: -1) {
            let known = shape.enumerated().filter { $0.offset != unknown }.map(\.element).reduce(1, *)
            precondition(known > 0 && size % known == 0, "cannot reshape \(self.shape) to \(newShape)")
            shape[unknown] = size / known
        }
        precondition(shape.reduce(1, *) == size, "cannot reshape \(self.shape) to \(newShape)")
        if let words { return MLXArray(words: words, shape: shape) }
        return MLXArray(storage: storage, shape: shape, dtype: dtype)
    }

    /// `public func reshaped(_ newShape: Int..., stream:)`.
    public func reshaped(_ newShape: Int...) -> MLXArray { reshaped(newShape) }

    /// `public func transposed(_ axes: Int..., stream:)`; no axes reverses them (`transposed()`).
    public func transposed(_ axes: Int...) -> MLXArray { transposed(axes) }

    /// `public func transposed(_ axes: [Int], stream:)`.
    public func transposed(_ axes: [Int]) -> MLXArray {
        let axes = axes.isEmpty ? Array((0 ..< ndim).reversed()) : axes.map { normalizeAxis($0, ndim) }
        precondition(axes.count == ndim && Set(axes).count == ndim, "bad transpose axes \(axes) for \(shape)")
        let outShape = axes.map { shape[$0] }
        let inStrides = stridesOf(shape)
        let strides = axes.map { inStrides[$0] }
        let values = floats
        precondition(words == nil, "stand-in: transposing uint32 arrays is not supported")
        return MLXArray(storage: stridedOffsets(outShape, strides).map { values[$0] }, shape: outShape, dtype: dtype)
    }

    /// `public func expandedDimensions(axis: Int, stream:)`.
    public func expandedDimensions(axis: Int) -> MLXArray {
        let a = axis < 0 ? axis + ndim + 1 : axis
        precondition(a >= 0 && a <= ndim, "axis \(axis) out of range")
        var s = shape
        s.insert(1, at: a)
        return reshaped(s)
    }

    /// `public func squeezed(axis: Int, stream:)`.
    public func squeezed(axis: Int) -> MLXArray {
        let a = normalizeAxis(axis, ndim)
        precondition(shape[a] == 1, "cannot squeeze axis \(axis) of \(shape)")
        var s = shape
        s.remove(at: a)
        return reshaped(s)
    }
}

/// `public func swappedAxes(_ array: MLXArray, _ axis1: Int, _ axis2: Int, stream:)`.
public func swappedAxes(_ array: MLXArray, _ axis1: Int, _ axis2: Int) -> MLXArray {
    var axes = Array(0 ..< array.ndim)
    axes.swapAt(normalizeAxis(axis1, array.ndim), normalizeAxis(axis2, array.ndim))
    return array.transposed(axes)
}

/// `public func broadcast(_ array: MLXArray, to shape: some Collection<Int>, stream:)`.
public func broadcast(_ array: MLXArray, to shape: [Int]) -> MLXArray {
    precondition(broadcastShapes(array.shape, shape) == shape, "cannot broadcast \(array.shape) to \(shape)")
    let values = array.floats
    return MLXArray(storage: broadcastIndices(array.shape, to: shape).map { values[$0] }, shape: shape,
                    dtype: array.dtype)
}

/// `public func concatenated(_ arrays: [MLXArray], axis: Int = 0, stream:)`.
public func concatenated(_ arrays: [MLXArray], axis: Int = 0) -> MLXArray {
    precondition(!arrays.isEmpty, "concatenated needs at least one array")
    let first = arrays[0]
    let a = normalizeAxis(axis, first.ndim)
    var dtype = first.dtype
    for x in arrays {
        precondition(x.ndim == first.ndim, "concatenated: ranks differ")
        for d in 0 ..< x.ndim where d != a {
            precondition(x.shape[d] == first.shape[d], "concatenated: shapes \(first.shape) and \(x.shape)")
        }
        dtype = promote(dtype, x.dtype)
    }
    let outer = first.shape[..<a].reduce(1, *)
    let inner = first.shape[(a + 1)...].reduce(1, *)
    var out = [Float]()
    out.reserveCapacity(arrays.reduce(0) { $0 + $1.size })
    let values = arrays.map(\.floats)
    for o in 0 ..< outer {
        for (x, v) in zip(arrays, values) {
            let chunk = x.shape[a] * inner
            out += v[(o * chunk) ..< ((o + 1) * chunk)]
        }
    }
    var shape = first.shape
    shape[a] = arrays.reduce(0) { $0 + $1.shape[a] }
    return MLXArray(storage: out, shape: shape, dtype: dtype)
}

/// `public func stacked(_ arrays: [MLXArray], axis: Int = 0, stream:)`.
public func stacked(_ arrays: [MLXArray], axis: Int = 0) -> MLXArray {
    concatenated(arrays.map { $0.expandedDimensions(axis: axis) }, axis: axis)
}

/// `public func split(_ array: MLXArray, parts: Int, axis: Int = 0, stream:) -> [MLXArray]`.
public func split(_ array: MLXArray, parts: Int, axis: Int = 0) -> [MLXArray] {
    let a = normalizeAxis(axis, array.ndim)
    precondition(array.shape[a] % parts == 0, "split: \(array.shape[a]) is not divisible by \(parts)")
    let n = array.shape[a] / parts
    return (0 ..< parts).map { slice(array, axis: a, start: $0 * n, end: ($0 + 1) * n) }
}

/// Elements `start ..< end` along `axis`.
func slice(_ array: MLXArray, axis: Int, start: Int, end: Int) -> MLXArray {
    let outer = array.shape[..<axis].reduce(1, *)
    let inner = array.shape[(axis + 1)...].reduce(1, *)
    let values = array.floats
    var out = [Float]()
    out.reserveCapacity(outer * (end - start) * inner)
    for o in 0 ..< outer {
        let base = o * array.shape[axis] * inner
        out += values[(base + start * inner) ..< (base + end * inner)]
    }
    var shape = array.shape
    shape[axis] = end - start
    return MLXArray(storage: out, shape: shape, dtype: array.dtype)
}

/// `public func take(_ array: MLXArray, _ indices: MLXArray, axis: Int, stream:)`.
public func take(_ array: MLXArray, _ indices: MLXArray, axis: Int) -> MLXArray {
    let a = normalizeAxis(axis, array.ndim)
    let n = array.shape[a]
    let picks = indices.floats.map { i -> Int in
        let j = Int(i)
        let k = j < 0 ? j + n : j
        precondition(k >= 0 && k < n, "take: index \(j) out of range \(n)")
        return k
    }
    let outer = array.shape[..<a].reduce(1, *)
    let inner = array.shape[(a + 1)...].reduce(1, *)
    let values = array.floats
    var out = [Float]()
    out.reserveCapacity(outer * picks.count * inner)
    for o in 0 ..< outer {
        for k in picks {
            let base = (o * n + k) * inner
            out += values[base ..< (base + inner)]
        }
    }
    let shape = Array(array.shape[..<a]) + indices.shape + Array(array.shape[(a + 1)...])
    return MLXArray(storage: out, shape: shape, dtype: array.dtype)
}

/// `public func padded(_ array: MLXArray, widths: [IntOrPair], mode: PadMode = .constant,
/// value: MLXArray? = nil, stream:)` (constant mode only).
public func padded(_ array: MLXArray, widths: [IntOrPair], value: MLXArray? = nil) -> MLXArray {
    precondition(widths.count == array.ndim, "padded: \(widths.count) widths for \(array.ndim) axes")
    let fill = value?.floats.first ?? 0
    var x = array
    for (axis, width) in widths.enumerated() {
        var parts = [MLXArray]()
        var shape = x.shape
        if width.first > 0 {
            shape[axis] = width.first
            parts.append(MLXArray.full(shape, fill, x.dtype))
        }
        parts.append(x)
        if width.second > 0 {
            shape[axis] = width.second
            parts.append(MLXArray.full(shape, fill, x.dtype))
        }
        if parts.count > 1 { x = concatenated(parts, axis: axis) }
    }
    return x
}

/// Batched matrix product `[..., M, K] x [..., K, N]` with broadcast batch axes, accumulated in fp32.
func matmulImpl(_ a: MLXArray, _ b: MLXArray) -> MLXArray {
    precondition(a.ndim >= 2 && b.ndim >= 2, "matmul of \(a.shape) and \(b.shape)")
    let (m, k) = (a.shape[a.ndim - 2], a.shape[a.ndim - 1])
    let (k2, n) = (b.shape[b.ndim - 2], b.shape[b.ndim - 1])
    precondition(k == k2, "matmul: inner dimensions \(a.shape) x \(b.shape)")
    let batch = broadcastShapes(Array(a.shape.dropLast(2)), Array(b.shape.dropLast(2)))
    let ia = broadcastIndices(Array(a.shape.dropLast(2)), to: batch)
    let ib = broadcastIndices(Array(b.shape.dropLast(2)), to: batch)
    let x = a.floats
    let y = b.floats
    var out = [Float](repeating: 0, count: ia.count * m * n)
    x.withUnsafeBufferPointer { xp in
        y.withUnsafeBufferPointer { yp in
            out.withUnsafeMutableBufferPointer { op in
                for (bi, (pa, pb)) in zip(ia, ib).enumerated() {
                    let xa = pa * m * k
                    let yb = pb * k * n
                    let ob = bi * m * n
                    for i in 0 ..< m {
                        for p in 0 ..< k {
                            let v = xp[xa + i * k + p]
                            let row = yb + p * n
                            let orow = ob + i * n
                            for j in 0 ..< n {
                                op[orow + j] += v * yp[row + j]
                            }
                        }
                    }
                }
            }
        }
    }
    return MLXArray(storage: out, shape: batch + [m, n], dtype: promote(a.dtype, b.dtype))
}
