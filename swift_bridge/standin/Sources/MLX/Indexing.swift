// Stand-in for mlx-swift indexing (test double, never shipped).
// After ml-explore/mlx-swift Source/MLX/MLXArray+Indexing.swift: `MLXArrayIndex`, `MLXArrayIndexOperation`,
// `MLXEllipsisIndex` (`.ellipsis`), `.newAxis`, Int and range indices, `subscript(indices: MLXArrayIndex...)`.

/// Source/MLX/MLXArray+Indexing.swift: `public enum MLXArrayIndexOperation` (array indices left out).
public enum MLXArrayIndexOperation: Sendable {
    case ellipsis
    case newAxis
    case index(Int)
    /// start, end (nil: to the end), stride
    case slice(Int?, Int?, Int)
}

/// Source/MLX/MLXArray+Indexing.swift: `public protocol MLXArrayIndex`.
public protocol MLXArrayIndex {
    var mlxArrayIndexOperation: MLXArrayIndexOperation { get }
}

extension Int: MLXArrayIndex {
    public var mlxArrayIndexOperation: MLXArrayIndexOperation { .index(self) }
}

extension Range: MLXArrayIndex where Bound == Int {
    public var mlxArrayIndexOperation: MLXArrayIndexOperation { .slice(lowerBound, upperBound, 1) }
}

extension ClosedRange: MLXArrayIndex where Bound == Int {
    public var mlxArrayIndexOperation: MLXArrayIndexOperation { .slice(lowerBound, upperBound + 1, 1) }
}

extension PartialRangeFrom: MLXArrayIndex where Bound == Int {
    public var mlxArrayIndexOperation: MLXArrayIndexOperation { .slice(lowerBound, nil, 1) }
}

extension PartialRangeUpTo: MLXArrayIndex where Bound == Int {
    public var mlxArrayIndexOperation: MLXArrayIndexOperation { .slice(0, upperBound, 1) }
}

extension PartialRangeThrough: MLXArrayIndex where Bound == Int {
    public var mlxArrayIndexOperation: MLXArrayIndexOperation { .slice(0, upperBound + 1, 1) }
}

/// Source/MLX/MLXArray+Indexing.swift: `public struct MLXEllipsisIndex`.
public struct MLXEllipsisIndex: MLXArrayIndex, Sendable {
    public var mlxArrayIndexOperation: MLXArrayIndexOperation { .ellipsis }
}

/// Source/MLX/MLXArray+Indexing.swift: `public struct MLXNewAxisIndex`.
public struct MLXNewAxisIndex: MLXArrayIndex, Sendable {
    public var mlxArrayIndexOperation: MLXArrayIndexOperation { .newAxis }
}

/// Source/MLX/MLXArray+Indexing.swift: `public struct MLXSlice` via `.stride(from:to:by:)`.
public struct MLXStrideIndex: MLXArrayIndex, Sendable {
    let start: Int?
    let end: Int?
    let by: Int
    public var mlxArrayIndexOperation: MLXArrayIndexOperation { .slice(start, end, by) }
}

extension MLXArrayIndex where Self == MLXEllipsisIndex {
    public static var ellipsis: MLXEllipsisIndex { MLXEllipsisIndex() }
}

extension MLXArrayIndex where Self == MLXNewAxisIndex {
    public static var newAxis: MLXNewAxisIndex { MLXNewAxisIndex() }
}

extension MLXArrayIndex where Self == MLXStrideIndex {
    public static func stride(from: Int? = nil, to: Int? = nil, by: Int = 1) -> MLXStrideIndex {
        MLXStrideIndex(start: from, end: to, by: by)
    }
}

extension MLXArray {
    /// `public subscript(indices: MLXArrayIndex..., stream: StreamOrDevice = .default) -> MLXArray` (read only).
    public subscript(_ indices: any MLXArrayIndex...) -> MLXArray {
        index(indices.map(\.mlxArrayIndexOperation))
    }

    /// numpy basic indexing: integers drop their axis, slices keep it, `.newAxis` inserts one,
    /// `.ellipsis` stands for the axes not named.
    func index(_ ops: [MLXArrayIndexOperation]) -> MLXArray {
        let named = ops.filter {
            if case .index = $0 { return true }
            if case .slice = $0 { return true }
            return false
        }.count
        precondition(named <= ndim, "too many indices (\(named)) for \(shape)")
        precondition(ops.filter { if case .ellipsis = $0 { return true }; return false }.count <= 1,
                     "at most one .ellipsis")
        var expanded = [MLXArrayIndexOperation]()
        for op in ops {
            if case .ellipsis = op {
                expanded += [MLXArrayIndexOperation](repeating: .slice(nil, nil, 1), count: ndim - named)
            } else {
                expanded.append(op)
            }
        }
        let used = expanded.filter { if case .newAxis = $0 { return false }; return true }.count
        expanded += [MLXArrayIndexOperation](repeating: .slice(nil, nil, 1), count: ndim - used)

        var selections = [[Int]]()  // per input axis
        var outShape = [Int]()
        var axis = 0
        for op in expanded {
            switch op {
            case .newAxis:
                outShape.append(1)
            case .index(let i):
                let n = shape[axis]
                let j = i < 0 ? i + n : i
                precondition(j >= 0 && j < n, "index \(i) out of range for axis \(axis) of size \(n)")
                selections.append([j])
                axis += 1
            case .slice(let start, let end, let step):
                let n = shape[axis]
                precondition(step != 0, "slice step 0")
                func clamp(_ v: Int?, _ fallback: Int) -> Int {
                    guard let v else { return fallback }
                    let w = v < 0 ? v + n : v
                    return step > 0 ? Swift.min(Swift.max(w, 0), n) : Swift.min(Swift.max(w, -1), n - 1)
                }
                let s = clamp(start, step > 0 ? 0 : n - 1)
                let e = clamp(end, step > 0 ? n : -1)
                let picks = Array(Swift.stride(from: s, to: e, by: step))
                selections.append(picks)
                outShape.append(picks.count)
                axis += 1
            case .ellipsis:
                fatalError("unreachable")
            }
        }
        let strides = stridesOf(shape)
        let total = selections.reduce(1) { $0 * $1.count }
        let values = floats
        var out = [Float]()
        out.reserveCapacity(total)
        if total > 0 {
            var counter = [Int](repeating: 0, count: ndim)
            for _ in 0 ..< total {
                var position = 0
                for d in 0 ..< ndim {
                    position += selections[d][counter[d]] * strides[d]
                }
                out.append(values[position])
                var d = ndim - 1
                while d >= 0 {
                    counter[d] += 1
                    if counter[d] < selections[d].count { break }
                    counter[d] = 0
                    d -= 1
                }
            }
        }
        precondition(words == nil, "stand-in: indexing uint32 arrays is not supported")
        return MLXArray(storage: out, shape: outShape, dtype: dtype)
    }
}
