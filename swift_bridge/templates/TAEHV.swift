// {{header}}

import Foundation
import MLX
import MLXNN

// {{configuration}}

extension TAEHVConfiguration {
    /// Output frames per latent frame (4 for taew2_1).
    public var timeUpscale: Int { 1 << decoderTimeUpscale.filter { $0 }.count }
    /// Raw decoder frames dropped at the start of a video (latent 0 gives one frame).
    public var framesToTrim: Int { timeUpscale - 1 }
    /// Output pixels per latent pixel along H and W (8 for taew2_1).
    public var spaceUpscale: Int { (1 << decoderSpaceUpscale.filter { $0 }.count) * patchSize }
    /// Decoded frames for `latentFrames` latents: `4T - 3`.
    public func numFrames(latentFrames: Int) -> Int { max(0, timeUpscale * latentFrames - framesToTrim) }
}

// MARK: - Layers. Inside a layer activations are [N, H, W, C]; the decoder handles the time axis.

/// Soft clamp of the input latents to (-3, 3).
final class TAEHVClamp: Module, UnaryLayer {
    func callAsFunction(_ x: MLXArray) -> MLXArray {
        tanh(x / 3) * 3
    }
}

/// Nearest-neighbour upsampling by `factor` (a `factor x factor` repeat); factor 1 is the identity.
final class TAEHVUpsample: Module, UnaryLayer {
    let factor: Int

    init(factor: Int) {
        self.factor = factor
        super.init()
    }

    func callAsFunction(_ x: MLXArray) -> MLXArray {
        if factor == 1 {
            return x
        }
        let (n, h, w, c) = x.shape4
        let repeated = broadcast(x.reshaped([n, h, 1, w, 1, c]), to: [n, h, factor, w, factor, c])
        return repeated.reshaped([n, h * factor, w * factor, c])
    }
}

/// `relu(conv(cat[x, past]) + x)`: `past` is this block's input at the previous frame (zeros at the
/// start). TAEHV builds every MemBlock with as many input as output channels, so there is no skip conv.
final class TAEHVMemBlock: Module {
    // {{properties}}

    init(channels: Int) {
        self._conv.wrappedValue = [
            Conv2d(inputChannels: 2 * channels, outputChannels: channels, kernelSize: 3, padding: 1),
            ReLU(),
            Conv2d(inputChannels: channels, outputChannels: channels, kernelSize: 3, padding: 1),
            ReLU(),
            Conv2d(inputChannels: channels, outputChannels: channels, kernelSize: 3, padding: 1),
        ]
        super.init()
    }

    func callAsFunction(_ x: MLXArray, past: MLXArray) -> MLXArray {
        var h = concatenated([x, past], axis: -1)
        for layer in conv {
            h = layer(h)
        }
        return relu(h + x)
    }
}

/// A 1x1 conv to `timeStride * channels`; channel block k becomes output frame k.
final class TAEHVTGrow: Module {
    let timeStride: Int

    // {{properties}}

    init(channels: Int, stride: Int) {
        self.timeStride = stride
        self._conv.wrappedValue = Conv2d(
            inputChannels: channels, outputChannels: channels * stride, kernelSize: 1, bias: false)
        super.init()
    }

    /// `[B, T, H, W, C]` -> `[B, T * timeStride, H, W, C]`.
    func callAsFunction(_ x: MLXArray) -> MLXArray {
        let shape = x.shape
        let (b, t, h, w, c) = (shape[0], shape[1], shape[2], shape[3], shape[4])
        let y = conv(x.reshaped([b * t, h, w, c]))
        if timeStride == 1 {
            return y.reshaped([b, t, h, w, c])
        }
        return y.reshaped([b, t, h, w, timeStride, c]).transposed(0, 1, 4, 2, 3, 5)
            .reshaped([b, t * timeStride, h, w, c])
    }
}

// MARK: - Decoder

/// TAEHV decoder (`taew2_1`): Wan-normalized latents `[B, T, H, W, 16]` -> RGB frames in [0, 1],
/// `[B, 4T - 3, 8H, 8W, 3]`. `decoder` is indexed exactly like the PyTorch `nn.Sequential`
/// (`decoder.N...` keys); the encoder is not exported (the app only decodes).
public final class TAEHVDecoder: Module {
    public let config: TAEHVConfiguration

    // {{properties}}

    public init(_ config: TAEHVConfiguration) {
        let n = config.decoderChannels
        self.config = config
        var layers: [Module] = [
            TAEHVClamp(),
            Conv2d(inputChannels: config.latentChannels, outputChannels: n[0], kernelSize: 3, padding: 1),
            ReLU(),
        ]
        for stage in 0 ..< 3 {
            layers += (0 ..< config.depth).map { _ -> Module in TAEHVMemBlock(channels: n[stage]) }
            layers += [
                TAEHVUpsample(factor: config.decoderSpaceUpscale[stage] ? 2 : 1),
                TAEHVTGrow(channels: n[stage], stride: config.decoderTimeUpscale[stage] ? 2 : 1),
                Conv2d(
                    inputChannels: n[stage], outputChannels: n[stage + 1], kernelSize: 3, padding: 1,
                    bias: false),
            ]
        }
        layers += [
            ReLU(),
            Conv2d(
                inputChannels: n[3], outputChannels: config.imageChannels * config.patchSize * config.patchSize,
                kernelSize: 3, padding: 1),
        ]
        self._decoder.wrappedValue = layers
        super.init()
    }

    var computeDType: DType {
        (decoder[1] as? Conv2d)?.weight.dtype ?? .float32
    }

    /// Apply the decoder to `x [B, T, H, W, C]`, all T frames at once. `memory[i]` is MemBlock i's input
    /// at the frame before `x[:, 0]` (absent: zeros). Returns the output and the memory for the next call,
    /// so frame-by-frame and all-at-once calls give the same result.
    func run(_ input: MLXArray, memory: [Int: MLXArray]) -> (MLXArray, [Int: MLXArray]) {
        var x = input
        var newMemory = [Int: MLXArray]()
        for (index, layer) in decoder.enumerated() {
            let shape = x.shape
            let (b, t) = (shape[0], shape[1])
            if let block = layer as? TAEHVMemBlock {
                let frames = Array(shape.dropFirst(2))
                let remembered = memory[index]?.expandedDimensions(axis: 1)
                let first = remembered ?? MLXArray.zeros([b, 1] + frames, dtype: x.dtype)
                let past = t == 1 ? first : concatenated([first, x[0..., ..<(t - 1)]], axis: 1)
                newMemory[index] = x[0..., t - 1]
                let y = block(x.reshaped([b * t] + frames), past: past.reshaped([b * t] + frames))
                x = y.reshaped([b, t] + Array(y.shape.dropFirst()))
            } else if let grow = layer as? TAEHVTGrow {
                x = grow(x)
            } else if let unary = layer as? UnaryLayer {
                let y = unary(x.reshaped([b * t] + Array(shape.dropFirst(2))))
                x = y.reshaped([b, t] + Array(y.shape.dropFirst()))
            } else {
                fatalError("decoder.\(index): unexpected layer \(type(of: layer))")
            }
        }
        return (x, newMemory)
    }

    /// Raw decoder output -> RGB in [0, 1] (pixel shuffle when patchSize > 1).
    func finish(_ raw: MLXArray) -> MLXArray {
        pixelShuffle(clip(raw, min: 0, max: 1), patch: config.patchSize)
    }

    /// All frames at once (memory grows with T). For the phone prefer `TAEHVDecoderStream`.
    public func decode(_ latents: MLXArray) -> MLXArray {
        let (raw, _) = run(latents.asType(computeDType), memory: [:])
        let frames = finish(raw)
        return frames[0..., config.framesToTrim...]
    }
}

/// Streaming decode: feed latent frames in order, get the frames they complete. Work runs one latent
/// frame at a time and is evaluated before returning, so peak memory does not depend on the video length.
/// State kept between calls: each MemBlock's previous input.
public final class TAEHVDecoderStream {
    public let model: TAEHVDecoder
    private var memory = [Int: MLXArray]()
    private var rawFrames = 0

    public init(_ model: TAEHVDecoder) {
        self.model = model
    }

    public func reset() {
        memory = [:]
        rawFrames = 0
    }

    /// `latents [B, T, H, W, C]` (any T >= 1) -> the newly finished frames `[B, n, 8H, 8W, 3]`
    /// (1 for latent 0, 4 for each later one).
    public func push(_ latents: MLXArray) -> MLXArray {
        var outputs = [MLXArray]()
        for t in 0 ..< latents.dim(1) {
            outputs.append(step(latents[0..., t ..< (t + 1)]))
        }
        return outputs.count == 1 ? outputs[0] : concatenated(outputs, axis: 1)
    }

    func step(_ latent: MLXArray) -> MLXArray {
        let (raw, newMemory) = model.run(latent.asType(model.computeDType), memory: memory)
        memory.merge(newMemory) { _, new in new }
        let frames = model.finish(raw)
        let n = frames.dim(1)
        let skip = min(n, max(0, model.config.framesToTrim - rawFrames))
        rawFrames += n
        let out = frames[0..., skip...]
        eval(out)
        eval(Array(memory.values))
        return out
    }
}

/// `[B, T, H, W, C p p]` -> `[B, T, H p, W p, C]`: channel `c p p + i p + j` of pixel (h, w) becomes channel
/// `c` of pixel (h p + i, w p + j). A patch of 1 returns `x`.
func pixelShuffle(_ x: MLXArray, patch p: Int) -> MLXArray {
    if p == 1 {
        return x
    }
    let s = x.shape
    let (b, t, h, w, c) = (s[0], s[1], s[2], s[3], s[4])
    return x.reshaped([b, t, h, w, c / (p * p), p, p]).transposed(0, 1, 2, 5, 3, 6, 4)
        .reshaped([b, t, h * p, w * p, -1])
}
