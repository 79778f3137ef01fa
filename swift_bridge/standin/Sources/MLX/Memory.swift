// Stand-in for ml-explore/mlx-swift Source/MLX/Memory.swift (`public enum Memory`), test double.
// The counters track the bytes of live MLXArray storage (every array counts once at its dtype size), so
// `peakMemory` is the high-water mark of live arrays, the stand-in's analogue of MLX's allocator peak.

import Foundation

public enum Memory {
    private static var active = 0
    private static var peak = 0
    private static var limits = (memory: Int.max, cache: 0)
    private static let lock = NSLock()

    static func allocate(_ bytes: Int) {
        lock.lock()
        active += bytes
        peak = Swift.max(peak, active)
        lock.unlock()
    }

    static func release(_ bytes: Int) {
        lock.lock()
        active -= bytes
        lock.unlock()
    }

    /// `public static var activeMemory: Int`.
    public static var activeMemory: Int {
        lock.lock()
        defer { lock.unlock() }
        return active
    }

    /// `public static var peakMemory: Int` (setting it resets the peak to the active memory, as mlx-swift,
    /// which ignores the value and calls `mlx_reset_peak_memory`).
    public static var peakMemory: Int {
        get {
            lock.lock()
            defer { lock.unlock() }
            return peak
        }
        set {
            lock.lock()
            peak = active
            lock.unlock()
        }
    }

    /// `public static var cacheMemory: Int` (the stand-in has no buffer cache).
    public static var cacheMemory: Int { 0 }

    /// `public static var memoryLimit: Int` (recorded, not enforced).
    public static var memoryLimit: Int {
        get { limits.memory }
        set { limits.memory = newValue }
    }

    /// `public static var cacheLimit: Int` (recorded, not enforced).
    public static var cacheLimit: Int {
        get { limits.cache }
        set { limits.cache = newValue }
    }

    /// `public static func clearCache()`.
    public static func clearCache() {}
}
