// {{header}}

import Foundation

/// On-device UMT5 tokenizer: reads the same `spiece.model` the Python runtime uses (sentencepiece
/// protobuf) and reproduces `Tokenizer.encode` of `mlx_video/tokenizer.py`: Wan's prompt cleaning,
/// sentencepiece normalization (precompiled `nmt_nfkc` charsmap, dummy prefix, whitespace escaping),
/// unigram Viterbi segmentation, `</s>` appended, truncation to `maxLength`.
///
/// Differences from the Python side, by design: `ftfy.fix_text` is not available (it repairs mojibake,
/// which typed prompts do not contain), and HTML unescaping knows the common named entities and all
/// numeric ones. The golden test compares ids with the Python tokenizer on the exported model.
public final class UMT5Tokenizer {
    public enum TokenizerError: Error, CustomStringConvertible {
        case invalid(String)

        public var description: String {
            switch self {
            case .invalid(let message): return message
            }
        }
    }

    enum PieceType: Int {
        case normal = 1, unknown = 2, control = 3, userDefined = 4, unused = 5, byte = 6
    }

    public let maxLength: Int
    public let padId: Int
    public let eosId: Int
    private(set) var pieces: [(piece: [UInt8], score: Float, type: PieceType)] = []
    private var lookup: [[UInt8]: Int] = [:]
    private var userDefined: [[UInt8]] = []
    private var maxPieceBytes = 1
    private var unkId = 0
    private var minScore = Float.greatestFiniteMagnitude
    private var byteFallback = false
    private var addDummyPrefix = true
    private var removeExtraWhitespaces = true
    private var escapeWhitespaces = true
    private var charsmap = PrecompiledCharsmap(blob: [])

    public init(url: URL, maxLength: Int = 512, padId: Int = 0, eosId: Int = 1) throws {
        self.maxLength = maxLength
        self.padId = padId
        self.eosId = eosId
        let data = [UInt8](try Data(contentsOf: url))
        try parseModel(data)
        guard pieces.count > max(padId, eosId) else {
            throw TokenizerError.invalid("\(url.lastPathComponent): only \(pieces.count) pieces")
        }
    }

    // MARK: Encoding

    /// Cleaned prompt -> ids with EOS, at most `maxLength` (the first `maxLength - 1` pieces, then EOS).
    public func encode(_ prompt: String) -> [Int] {
        var ids = encodePieces(UMT5Tokenizer.clean(prompt)) + [eosId]
        if ids.count > maxLength {
            ids = Array(ids.prefix(maxLength - 1)) + [eosId]
        }
        return ids
    }

    /// Wan's `whitespace` cleaning: HTML unescaping twice, strip, collapse whitespace runs, strip.
    public static func clean(_ text: String) -> String {
        let unescaped = htmlUnescape(htmlUnescape(text))
        var out = ""
        var pendingSpace = false
        for character in unescaped {
            if character.isWhitespace {
                pendingSpace = !out.isEmpty
            } else {
                if pendingSpace {
                    out.append(" ")
                    pendingSpace = false
                }
                out.append(character)
            }
        }
        return out
    }

    /// sentencepiece ids of an already cleaned text (no EOS).
    func encodePieces(_ text: String) -> [Int] {
        let normalized = normalize(Array(text.utf8))
        let size = normalized.count
        if size == 0 {
            return []
        }
        let unkScore = minScore - 10  // sentencepiece's kUnkPenalty
        var bestScore = [Float](repeating: 0, count: size + 1)
        var bestStart = [Int](repeating: -1, count: size + 1)
        var bestId = [Int](repeating: -1, count: size + 1)
        var start = 0
        while start < size {
            let charLength = min(utf8Length(normalized[start]), size - start)
            let scoreHere = bestScore[start]
            var hasSingleNode = false
            var end = start + 1
            while end <= min(size, start + maxPieceBytes) {
                if let id = lookup[Array(normalized[start ..< end])], pieces[id].type != .unused {
                    let length = end - start
                    // A user-defined piece scores 0.1 per byte - 0.1, what sentencepiece 0.2.3 (the Python
                    // runtime's) does, measured; its source reads `length * max_score - 0.1`, which it is not.
                    let score = pieces[id].type == .userDefined ? Float(length) * 0.1 - 0.1 : pieces[id].score
                    let candidate = score + scoreHere
                    if bestStart[end] == -1 || candidate > bestScore[end] {
                        bestScore[end] = candidate
                        bestStart[end] = start
                        bestId[end] = id
                    }
                    if length == charLength {
                        hasSingleNode = true
                    }
                }
                end += 1
            }
            if !hasSingleNode {
                let target = start + charLength
                let candidate = unkScore + scoreHere
                if bestStart[target] == -1 || candidate > bestScore[target] {
                    bestScore[target] = candidate
                    bestStart[target] = start
                    bestId[target] = unkId
                }
            }
            start += charLength
        }
        var segments = [(Int, Int, Int)]()
        var end = size
        while end > 0 {
            segments.append((bestStart[end], end, bestId[end]))
            end = bestStart[end]
        }
        var ids = [Int]()
        for (from, to, id) in segments.reversed() {
            if id == unkId && byteFallback {
                for byte in normalized[from ..< to] {
                    ids.append(lookup[Array(String(format: "<0x%02X>", byte).utf8)] ?? unkId)
                }
            } else if id == unkId && ids.last == unkId {
                continue  // sentencepiece fuses a run of unknown characters into one <unk>
            } else {
                ids.append(id)
            }
        }
        return ids
    }

    // MARK: Normalization (sentencepiece `Normalizer::Normalize`)

    func normalize(_ input: [UInt8]) -> [UInt8] {
        let space: [UInt8] = [0xE2, 0x96, 0x81]  // U+2581, sentencepiece's whitespace symbol
        var position = 0
        if removeExtraWhitespaces {
            while position < input.count {
                let (replacement, consumed) = normalizePrefix(input, at: position)
                if replacement != [0x20] {
                    break
                }
                position += consumed
            }
        }
        if position >= input.count {
            return []
        }
        var out = [UInt8]()
        if addDummyPrefix {
            out += escapeWhitespaces ? space : [0x20]
        }
        var previousIsSpace = removeExtraWhitespaces
        while position < input.count {
            let (replacement, consumed) = normalizePrefix(input, at: position)
            var piece = replacement[...]
            while previousIsSpace && piece.first == 0x20 {
                piece = piece.dropFirst()
            }
            if !piece.isEmpty {
                for byte in piece {
                    if escapeWhitespaces && byte == 0x20 {
                        out += space
                    } else {
                        out.append(byte)
                    }
                }
                previousIsSpace = piece.last == 0x20
            }
            position += consumed
            if !removeExtraWhitespaces {
                previousIsSpace = false
            }
        }
        if removeExtraWhitespaces {
            let trailing = escapeWhitespaces ? space : [0x20]
            while out.count >= trailing.count && Array(out.suffix(trailing.count)) == trailing {
                out.removeLast(trailing.count)
            }
        }
        return out
    }

    /// Replacement bytes for the longest rule matching at `position`, and the input bytes it consumes.
    func normalizePrefix(_ input: [UInt8], at position: Int) -> ([UInt8], Int) {
        for symbol in userDefined where input.count - position >= symbol.count {
            if Array(input[position ..< position + symbol.count]) == symbol {
                return (symbol, symbol.count)
            }
        }
        if let match = charsmap.longestMatch(input, at: position) {
            return (match.replacement, match.length)
        }
        let length = min(utf8Length(input[position]), input.count - position)
        return (Array(input[position ..< position + length]), length)
    }

    // MARK: Model file (sentencepiece ModelProto)

    private func parseModel(_ data: [UInt8]) throws {
        var reader = ProtobufReader(data)
        var modelType = 1
        while let key = try reader.next() {
            let (field, wire) = key
            switch (field, wire) {
            case (1, 2):
                var piece = ProtobufReader(try reader.bytes())
                var text = [UInt8]()
                var score: Float = 0
                var type = PieceType.normal
                while let key = try piece.next() {
                    switch key {
                    case (1, 2): text = try piece.bytes()
                    case (2, 5): score = try piece.float()
                    case (3, 0):
                        let raw = try piece.varint()
                        type = PieceType(rawValue: Int(raw)) ?? .normal
                    default: try piece.skip(key.1)
                    }
                }
                pieces.append((text, score, type))
            case (2, 2):
                var trainer = ProtobufReader(try reader.bytes())
                while let key = try trainer.next() {
                    switch key {
                    case (3, 0): modelType = Int(try trainer.varint())
                    case (35, 0): byteFallback = try trainer.varint() != 0
                    default: try trainer.skip(key.1)
                    }
                }
            case (3, 2):
                var normalizer = ProtobufReader(try reader.bytes())
                while let key = try normalizer.next() {
                    switch key {
                    case (2, 2): charsmap = PrecompiledCharsmap(blob: try normalizer.bytes())
                    case (3, 0): addDummyPrefix = try normalizer.varint() != 0
                    case (4, 0): removeExtraWhitespaces = try normalizer.varint() != 0
                    case (5, 0): escapeWhitespaces = try normalizer.varint() != 0
                    default: try normalizer.skip(key.1)
                    }
                }
            default:
                try reader.skip(wire)
            }
        }
        guard modelType == 1 else {
            throw TokenizerError.invalid("only unigram sentencepiece models are supported (model type \(modelType))")
        }
        for (id, entry) in pieces.enumerated() {
            switch entry.type {
            case .normal, .userDefined, .unused:
                if lookup[entry.piece] == nil {
                    lookup[entry.piece] = id
                }
                maxPieceBytes = max(maxPieceBytes, entry.piece.count)
            case .byte:
                lookup[entry.piece] = id
            case .unknown:
                unkId = id
            case .control:
                break
            }
            if entry.type == .normal {
                minScore = min(minScore, entry.score)
            }
            if entry.type == .userDefined {
                userDefined.append(entry.piece)
            }
        }
        userDefined.sort { $0.count > $1.count }
    }
}

/// Length of a UTF-8 sequence from its lead byte (sentencepiece `OneCharLen`).
func utf8Length(_ lead: UInt8) -> Int {
    let table: [Int] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4]
    return table[Int(lead >> 4)]
}

/// sentencepiece's precompiled normalization map: a darts-clone double-array trie over UTF-8 input
/// bytes whose values index NUL-terminated replacement strings.
struct PrecompiledCharsmap {
    private var units: [UInt32] = []
    private var normalized: [UInt8] = []

    init(blob: [UInt8]) {
        guard blob.count > 4 else { return }
        let trieSize = Int(PrecompiledCharsmap.littleEndian(blob, at: 0))
        guard trieSize + 4 <= blob.count else { return }
        units = stride(from: 4, to: 4 + trieSize, by: 4).map { PrecompiledCharsmap.littleEndian(blob, at: $0) }
        normalized = Array(blob[(4 + trieSize)...])
    }

    private static func littleEndian(_ bytes: [UInt8], at i: Int) -> UInt32 {
        var value: UInt32 = 0
        for k in 0 ..< 4 {
            value |= UInt32(bytes[i + k]) << UInt32(8 * k)
        }
        return value
    }

    private static func hasLeaf(_ unit: UInt32) -> Bool { (unit >> 8) & 1 == 1 }
    private static func value(_ unit: UInt32) -> Int { Int(unit & ((1 << 31) - 1)) }
    private static func label(_ unit: UInt32) -> UInt32 { unit & ((1 << 31) | 0xFF) }
    private static func offset(_ unit: UInt32) -> Int { Int((unit >> 10) << ((unit & (1 << 9)) >> 6)) }

    /// Longest rule matching `input[position...]`: (bytes consumed, replacement bytes).
    func longestMatch(_ input: [UInt8], at position: Int) -> (length: Int, replacement: [UInt8])? {
        guard !units.isEmpty else { return nil }
        var node = PrecompiledCharsmap.offset(units[0])
        var bestLength = 0
        var bestValue = -1
        var i = position
        while i < input.count {
            node ^= Int(input[i])
            guard node < units.count else { break }
            let unit = units[node]
            if PrecompiledCharsmap.label(unit) != UInt32(input[i]) {
                break
            }
            node ^= PrecompiledCharsmap.offset(unit)
            if PrecompiledCharsmap.hasLeaf(unit), node < units.count {
                bestLength = i + 1 - position
                bestValue = PrecompiledCharsmap.value(units[node])
            }
            i += 1
        }
        guard bestValue >= 0, bestValue < normalized.count else { return nil }
        let start = bestValue
        var end = start
        while end < normalized.count && normalized[end] != 0 {
            end += 1
        }
        return (bestLength, Array(normalized[start ..< end]))
    }
}

/// Minimal protobuf wire-format reader (varints, fixed32, length-delimited), enough for ModelProto.
struct ProtobufReader {
    private let data: [UInt8]
    private var position = 0

    init(_ data: [UInt8]) {
        self.data = data
    }

    mutating func next() throws -> (Int, Int)? {
        guard position < data.count else { return nil }
        let key = try varint()
        return (Int(key >> 3), Int(key & 7))
    }

    mutating func varint() throws -> UInt64 {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            guard position < data.count, shift < 64 else {
                throw UMT5Tokenizer.TokenizerError.invalid("truncated sentencepiece model (varint)")
            }
            let byte = data[position]
            position += 1
            result |= UInt64(byte & 0x7F) << shift
            if byte & 0x80 == 0 {
                return result
            }
            shift += 7
        }
    }

    mutating func bytes() throws -> [UInt8] {
        let length = Int(try varint())
        guard length >= 0, position + length <= data.count else {
            throw UMT5Tokenizer.TokenizerError.invalid("truncated sentencepiece model (field length)")
        }
        defer { position += length }
        return Array(data[position ..< position + length])
    }

    mutating func float() throws -> Float {
        guard position + 4 <= data.count else {
            throw UMT5Tokenizer.TokenizerError.invalid("truncated sentencepiece model (float)")
        }
        var bits: UInt32 = 0
        for k in 0 ..< 4 {
            bits |= UInt32(data[position + k]) << UInt32(8 * k)
        }
        position += 4
        return Float(bitPattern: bits)
    }

    mutating func skip(_ wire: Int) throws {
        switch wire {
        case 0: _ = try varint()
        case 1: position += 8
        case 2: _ = try bytes()
        case 5: position += 4
        default: throw UMT5Tokenizer.TokenizerError.invalid("unsupported protobuf wire type \(wire)")
        }
        if position > data.count {
            throw UMT5Tokenizer.TokenizerError.invalid("truncated sentencepiece model")
        }
    }
}

// MARK: - HTML unescaping (Python's html.unescape for the entities prompts use)

private let namedEntities: [String: String] = [
    "amp": "&", "lt": "<", "gt": ">", "quot": "\"", "apos": "'", "nbsp": "\u{00A0}", "ndash": "\u{2013}",
    "mdash": "\u{2014}", "lsquo": "\u{2018}", "rsquo": "\u{2019}", "ldquo": "\u{201C}", "rdquo": "\u{201D}",
    "hellip": "\u{2026}", "copy": "\u{00A9}", "reg": "\u{00AE}", "trade": "\u{2122}", "deg": "\u{00B0}",
    "times": "\u{00D7}", "divide": "\u{00F7}", "middot": "\u{00B7}", "laquo": "\u{00AB}", "raquo": "\u{00BB}",
    "eacute": "\u{00E9}", "egrave": "\u{00E8}", "agrave": "\u{00E0}", "ccedil": "\u{00E7}", "uuml": "\u{00FC}",
    "ouml": "\u{00F6}", "auml": "\u{00E4}", "szlig": "\u{00DF}", "euro": "\u{20AC}", "pound": "\u{00A3}",
    "yen": "\u{00A5}", "cent": "\u{00A2}", "sect": "\u{00A7}", "para": "\u{00B6}", "bull": "\u{2022}",
]

/// Replaces `&name;`, `&#NNN;` and `&#xHH;` (semicolon required for named entities, as the common case).
func htmlUnescape(_ text: String) -> String {
    guard text.contains("&") else { return text }
    var out = ""
    var index = text.startIndex
    while index < text.endIndex {
        let character = text[index]
        if character == "&", let semicolon = text[index...].prefix(33).firstIndex(of: ";") {
            let body = String(text[text.index(after: index) ..< semicolon])
            var replacement: String? = namedEntities[body]
            if replacement == nil, body.hasPrefix("#") {
                let digits = body.dropFirst()
                let isHex = digits.first == "x" || digits.first == "X"
                let scalarValue = isHex ? UInt32(digits.dropFirst(), radix: 16) : UInt32(digits, radix: 10)
                if let scalarValue, let scalar = Unicode.Scalar(scalarValue) {
                    replacement = String(Character(scalar))
                }
            }
            if let replacement {
                out += replacement
                index = text.index(after: semicolon)
                continue
            }
        }
        out.append(character)
        index = text.index(after: index)
    }
    return out
}
