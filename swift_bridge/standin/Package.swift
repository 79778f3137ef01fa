// swift-tools-version: 5.9
// A test double of mlx-swift (https://github.com/ml-explore/mlx-swift) for compiling and running the
// code `mlx-video export-swift` generates on Linux: the same module names (MLX, MLXNN) and the part of
// the public API the export uses, with the same names, labels and defaults, implemented as plain eager
// Float32 CPU Swift. Never shipped: exported packages depend on the real mlx-swift by URL and version.

import PackageDescription

let package = Package(
    name: "mlx-swift",
    products: [
        .library(name: "MLX", targets: ["MLX"]),
        .library(name: "MLXNN", targets: ["MLXNN"]),
    ],
    targets: [
        .target(name: "MLX"),
        .target(name: "MLXNN", dependencies: ["MLX"]),
        .testTarget(name: "StandInTests", dependencies: ["MLX", "MLXNN"]),
    ]
)
