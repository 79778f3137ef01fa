// Stand-in for ml-explore/mlx-swift Source/MLX/Transforms+Eval.swift (test double): everything is
// computed eagerly, so `eval` has nothing left to do. mlx-swift's overloads take `MLXArray...`,
// collections of arrays and `Any...` (modules, nested containers); one `Any...` form covers the calls.

/// `public func eval(_ values: Any...)`.
public func eval(_ values: Any...) {}
