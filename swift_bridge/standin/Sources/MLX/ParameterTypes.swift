// Stand-in for ml-explore/mlx-swift Source/MLX/ParameterTypes.swift: `IntOrPair` (test double).

/// `public struct IntOrPair: ExpressibleByIntegerLiteral, ExpressibleByArrayLiteral`.
public struct IntOrPair: ExpressibleByIntegerLiteral, ExpressibleByArrayLiteral, Sendable {
    public let first: Int
    public let second: Int

    public init(integerLiteral value: Int) {
        self.first = value
        self.second = value
    }

    public init(arrayLiteral elements: Int...) {
        precondition(elements.count == 2, "IntOrPair needs two values")
        self.first = elements[0]
        self.second = elements[1]
    }

    public init(_ value: Int) {
        self.first = value
        self.second = value
    }

    public init(_ values: (Int, Int)) {
        self.first = values.0
        self.second = values.1
    }

    public var values: (Int, Int) { (first, second) }
}

/// Source/MLX/Ops.swift: `public enum QuantizationMode: String` (only `.affine` is implemented here).
public enum QuantizationMode: String, Codable, Sendable {
    case affine
    case mxfp4
    case mxfp8
    case nvfp4
}
