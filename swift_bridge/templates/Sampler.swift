// {{header}}

import Foundation
import MLX

// {{configuration}}

/// What the DiT receives at each step and the sigma grid (`timesteps.count + 1` entries, the last 0).
/// Flow matching: `x_t = (1 - sigma) x0 + sigma noise`, the DiT predicts `v ~ noise - x0`, `t = 1000 sigma`.
public struct SamplerSchedule: Sendable {
    public var timesteps: [Double]
    public var sigmas: [Double]
}

public enum SamplerError: Error, CustomStringConvertible {
    case unsupported(String)
    case invalid(String)

    public var description: String {
        switch self {
        case .unsupported(let message), .invalid(let message): return message
        }
    }
}

/// Schedules and step updates of the few-step (warped, Self-Forcing) and Euler samplers, ported from
/// `mlx_video/sampling.py`. Scalar math runs in Float/Double exactly as the Python side does it in
/// numpy float32/float64, so the timesteps match bit for bit (the golden test checks them).
public enum Sampler {
    static let numTrainTimesteps = 1000

    /// `torch.linspace(start, end, steps)` in float32, bit for bit (two halves, fused in float64).
    static func torchLinspaceFloat32(_ start: Float, _ end: Float, _ steps: Int) -> [Float] {
        let step = (end - start) / Float(steps - 1)
        return (0 ..< steps).map { i -> Float in
            if i < steps / 2 {
                return Float(Double(start) + Double(step) * Double(i))
            }
            return Float(Double(end) - Double(step) * Double(steps - 1 - i))
        }
    }

    /// Self-Forcing's `FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)` table after
    /// `set_timesteps(1000, training=True)`: (sigmas, timesteps), float32.
    static func flowMatchTable(shift: Double) -> (sigmas: [Float], timesteps: [Float]) {
        let s = Float(shift)
        let base = torchLinspaceFloat32(1, 0, numTrainTimesteps + 1).dropLast()
        let sigmas = base.map { sigma -> Float in
            let shifted = s * sigma
            return shifted / (1 + (s - 1) * sigma)
        }
        return (sigmas, sigmas.map { $0 * Float(numTrainTimesteps) })
    }

    /// The few-step list, warped through the shifted table when `warp` is set (shift 5 gives
    /// t = 1000, 937.5, 833.33, 625: fractional, as the reference feeds them).
    public static func fewStepSchedule(_ config: SamplerConfiguration) throws -> SamplerSchedule {
        let table = flowMatchTable(shift: config.shift)
        var steps = config.denoisingStepList
        if steps.last == 0 {
            steps.removeLast()
        }
        var timesteps = [Double]()
        if config.warp {
            for step in steps {
                let index = Double(numTrainTimesteps) - step
                guard index == index.rounded(), index >= 0, Int(index) <= numTrainTimesteps else {
                    throw SamplerError.invalid("warped denoising steps must be integers in (0, 1000], got \(steps)")
                }
                let i = Int(index)
                timesteps.append(i == numTrainTimesteps ? 0 : Double(table.timesteps[i]))
            }
        } else {
            timesteps = steps
        }
        var sigmas = timesteps.map { t -> Double in
            var best = 0
            var bestDistance = Double.infinity
            for (k, value) in table.timesteps.enumerated() {
                let distance = abs(Double(value) - t)
                if distance < bestDistance {
                    best = k
                    bestDistance = distance
                }
            }
            return Double(table.sigmas[best])
        }
        sigmas.append(0)
        return SamplerSchedule(timesteps: timesteps, sigmas: sigmas)
    }

    /// numpy `linspace` in Double: `start + i * step`, the last value exactly `stop`.
    static func linspace(_ start: Double, _ stop: Double, _ count: Int) -> [Double] {
        guard count > 1 else { return [start] }
        let step = (stop - start) / Double(count - 1)
        var values = (0 ..< count).map { Double($0) * step + start }
        values[count - 1] = stop
        return values
    }

    /// Wan's UniPC grid (also used by Euler): sigma_max 0.999, shifted, integer (truncated) timesteps.
    public static func wanSchedule(steps: Int, shift: Double) -> SamplerSchedule {
        let sigmaMax = Double(Float(1.0 - 1.0 / Double(numTrainTimesteps)))
        var sigmas = Array(linspace(sigmaMax, 0, steps + 1).dropLast())
        sigmas = sigmas.map { shift * $0 / (1 + (shift - 1) * $0) }
        let timesteps = sigmas.map { Double(Int($0 * Double(numTrainTimesteps))) }
        sigmas.append(0)
        return SamplerSchedule(timesteps: timesteps, sigmas: sigmas.map { Double(Float($0)) })
    }

    public static func schedule(_ config: SamplerConfiguration) throws -> SamplerSchedule {
        switch config.name {
        case "fewstep":
            return try fewStepSchedule(config)
        case "euler":
            guard let steps = config.steps, steps >= 1 else {
                throw SamplerError.invalid("euler needs steps >= 1")
            }
            return wanSchedule(steps: steps, shift: config.shift)
        default:
            throw SamplerError.unsupported(
                "sampler \(config.name) is not ported to Swift (fewstep and euler are); export with one of those")
        }
    }

    /// One few-step update: `x0 = x - sigma v`, then re-noise to the next sigma with fresh `noise`
    /// (the last step returns `x0`: clean latents).
    public static func fewStep(
        _ x: MLXArray, velocity: MLXArray, sigma: Double, nextSigma: Double, noise: MLXArray?
    ) -> MLXArray {
        let x0 = x - Float(sigma) * velocity.asType(.float32)
        guard let noise, nextSigma > 0 else {
            return x0
        }
        return Float(1 - nextSigma) * x0 + Float(nextSigma) * noise.asType(.float32)
    }

    /// One Euler update: `x + (sigmaNext - sigma) v`.
    public static func eulerStep(_ x: MLXArray, velocity: MLXArray, sigma: Double, nextSigma: Double) -> MLXArray {
        x + Float(nextSigma - sigma) * velocity.asType(.float32)
    }

    /// Initial noise and per-step re-noising draws for a seed, split as the Python runtime splits them
    /// (`key(seed)` -> [initial, re-noise]; re-noise -> one key per step), so a seed reproduces the same
    /// draws on both sides (same MLX core).
    public static func noiseKeys(seed: UInt64, steps: Int) -> (initial: MLXArray, perStep: [MLXArray]) {
        let root = MLXRandom.split(key: MLXRandom.key(seed), into: 2)
        let perStep = MLXRandom.split(key: root[1], into: max(steps, 2))
        return (root[0], perStep)
    }

    /// Run a sampler. `velocity(x, t)` evaluates the DiT for the prompt; `x` is fp32 `[B, F, H, W, C]`.
    /// Classifier-free guidance is not ported: distilled few-step models run without it (guidance 1).
    public static func sample(
        _ config: SamplerConfiguration, noise: MLXArray, seed: UInt64,
        velocity: (MLXArray, Double) -> MLXArray,
        progress: ((Int, Int, Double) -> Void)? = nil
    ) throws -> MLXArray {
        if config.guidance > 1 {
            throw SamplerError.unsupported(
                "guidance \(config.guidance) > 1 needs classifier-free guidance, which the Swift port leaves out")
        }
        let schedule = try schedule(config)
        let n = schedule.timesteps.count
        let keys = noiseKeys(seed: seed, steps: n).perStep
        var x = noise.asType(.float32)
        for (i, t) in schedule.timesteps.enumerated() {
            let v = velocity(x, t)
            if config.name == "fewstep" {
                let renoise = i < n - 1 ? MLXRandom.normal(x.shape, key: keys[i + 1]) : nil
                x = fewStep(x, velocity: v, sigma: schedule.sigmas[i], nextSigma: schedule.sigmas[i + 1], noise: renoise)
            } else {
                x = eulerStep(x, velocity: v, sigma: schedule.sigmas[i], nextSigma: schedule.sigmas[i + 1])
            }
            eval(x)
            progress?(i, n, t)
        }
        return x
    }
}
