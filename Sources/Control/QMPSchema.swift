/// QAPI argument validation, as QEMU 11.1's generated marshallers do it before a command runs:
/// members visited in schema order (missing, wrong type, out of a type's range), then the first
/// unexpected member, all with QEMU's exact messages. Then the range checks QEMU makes at the
/// start of the command (migrate-set-parameters, migrate). Commands absent from the table pass
/// through to the handler unchanged.
public enum QAPIType {
    case str, bool
    /// uint8/16/32/64 (QEMU's `size` is uint64 here: same messages).
    case uint(bits: Int)
    case enumeration([String])
    indirect case list(QAPIType)
    case object([QAPIMember])
    /// A flat union: `base` holds the enum-typed `tag`; its value selects more members (an
    /// .object, or a nested .union flattened into the same JSON object).
    indirect case union(base: [QAPIMember], tag: String, variants: [String: QAPIType])
    /// QEMU's StrOrNull alternate.
    case strOrNull
}

public struct QAPIMember {
    public var name: String
    public var type: QAPIType
    public var optional: Bool
    /// QEMU accepts it; vfio-live does not implement it and says so instead of ignoring it.
    public var supported: Bool
    public init(_ name: String, _ type: QAPIType, optional: Bool = false, supported: Bool = true) {
        self.name = name; self.type = type; self.optional = optional; self.supported = supported
    }
}

public struct QMPSchema {
    /// Command → argument members. A command listed with [] takes no arguments.
    public var commands: [String: [QAPIMember]]
    /// Checks QEMU makes when the command starts, after QAPI validation.
    public var checks: [String: (QMPValue) throws -> Void]

    public init(commands: [String: [QAPIMember]], checks: [String: (QMPValue) throws -> Void] = [:]) {
        self.commands = commands; self.checks = checks
    }

    /// Validate `arguments` (an object; `{}` when absent) for `command`. Unknown commands pass.
    public func validate(_ command: String, _ arguments: QMPValue) throws {
        guard let members = commands[command] else { return }
        try Self.visit(arguments, .object(members), name: nil, path: "")
        try checks[command]?(arguments)
        for m in members where !m.supported && arguments[m.name] != nil {
            throw QMPError("Parameter '\(m.name)' is not supported by vfio-live")
        }
    }

    private static func join(_ path: String, _ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    /// One value against its type. `name` is the member's own name (nil for a list element):
    /// QEMU uses it, not the full path, for enum values and for the small unsigned types.
    static func visit(_ v: QMPValue, _ t: QAPIType, name: String?, path: String) throws {
        switch t {
        case .str:
            guard case .string = v else { throw QMPError("Invalid parameter type for '\(path)', expected: string") }
        case .bool:
            guard case .bool = v else { throw QMPError("Invalid parameter type for '\(path)', expected: boolean") }
        case let .uint(bits):
            let u: UInt64
            switch v {
            case let .uint(x): u = x
            case let .int(x): u = UInt64(bitPattern: x)  // QEMU accepts negatives, for compatibility
            default: throw QMPError("Parameter '\(path)' expects uint64")
            }
            if bits < 64 && u > (UInt64(1) << UInt64(bits)) - 1 { throw QMPError("Parameter '\(name ?? "null")' expects uint\(bits)_t") }
        case let .enumeration(values):
            guard case let .string(s) = v else { throw QMPError("Invalid parameter type for '\(path)', expected: string") }
            guard values.contains(s) else { throw QMPError("Parameter '\(name ?? "null")' does not accept value '\(s)'") }
        case let .list(element):
            guard case let .array(items) = v else { throw QMPError("Invalid parameter type for '\(path)', expected: array") }
            for (i, item) in items.enumerated() { try visit(item, element, name: nil, path: "\(path)[\(i)]") }
        case .object, .union:
            guard case let .object(given) = v else { throw QMPError("Invalid parameter type for '\(path)', expected: object") }
            let known = try visitFlat(t, v, given, path: path)
            try unexpected(given, known: known, path: path)
        case .strOrNull:
            switch v {
            case .string, .null: break
            default: throw QMPError("Invalid parameter type for '\(path)', expected: StrOrNull")
            }
        }
    }

    /// The members of a struct or flat union (with the variant its tag selects); their names.
    private static func visitFlat(_ t: QAPIType, _ v: QMPValue, _ given: [(String, QMPValue)], path: String) throws -> Set<String> {
        switch t {
        case let .object(members):
            try visitMembers(members, given, path: path)
            return Set(members.map(\.name))
        case let .union(base, tag, variants):
            try visitMembers(base, given, path: path)
            var known = Set(base.map(\.name))
            if case let .string(s)? = v[tag], let variant = variants[s] { known.formUnion(try visitFlat(variant, v, given, path: path)) }
            return known
        default: return []
        }
    }

    private static func visitMembers(_ members: [QAPIMember], _ given: [(String, QMPValue)], path: String) throws {
        for m in members {
            guard let value = given.first(where: { $0.0 == m.name })?.1 else {
                if m.optional { continue }
                throw QMPError("Parameter '\(join(path, m.name))' is missing")
            }
            try visit(value, m.type, name: m.name, path: join(path, m.name))
        }
    }

    /// The first member the schema does not know, in the order QEMU would find it.
    private static func unexpected(_ given: [(String, QMPValue)], known: Set<String>, path: String) throws {
        let order = QEMUHashOrder.glibTable(QEMUHashOrder.qdict(given.map(\.0)))
        if let k = order.first(where: { !known.contains($0) }) { throw QMPError("Parameter '\(join(path, k))' is unexpected") }
    }
}

/// The orders in which QEMU walks a JSON object's members, so that with several bad members
/// the same one is named: a QDict iterates its 512 hash buckets (newest entry first within
/// one), and the QAPI input visitor keeps the not-yet-visited keys in a GLib hash table.
enum QEMUHashOrder {
    static func tdbBucket(_ s: String) -> Int {
        let b = Array(s.utf8)
        var v = UInt32(truncatingIfNeeded: 0x238F13AF &* b.count)
        for (i, c) in b.enumerated() { v = v &+ (UInt32(c) << UInt32(i * 5 % 24)) }
        return Int((1103515243 &* v &+ 12345) % 512)
    }

    /// Keys (in insertion order) in QDict iteration order.
    static func qdict(_ keys: [String]) -> [String] {
        keys.enumerated().sorted { a, b in
            let (ba, bb) = (tdbBucket(a.element), tdbBucket(b.element))
            return ba != bb ? ba < bb : a.offset > b.offset
        }.map(\.element)
    }

    static func glibStrHash(_ s: String) -> UInt32 {
        var h: UInt32 = 5381
        for c in s.utf8 { h = h &* 33 &+ UInt32(bitPattern: Int32(Int8(bitPattern: c))) }  // signed char, as GLib
        return h < 2 ? 2 : h
    }

    static let primeMod: [UInt32] = [1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
                                     262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393, 67108859]

    /// Keys inserted in this order into a GLib string hash table, in its iteration order.
    static func glibTable(_ keys: [String]) -> [String] {
        var shift = 3
        var table = [String?](repeating: nil, count: 8)
        func insert(_ k: String, into t: inout [String?], shift: Int) {
            let mask = (1 << shift) - 1
            var i = Int((glibStrHash(k) &* 11) % primeMod[min(shift, primeMod.count - 1)])
            var step = 0
            while t[i] != nil { step += 1; i = (i + step) & mask }
            t[i] = k
        }
        var n = 0
        for k in keys {
            insert(k, into: &table, shift: shift)
            n += 1
            if table.count <= n + n / 16 {
                var s = 0, m = n * 2
                while m > 0 { m >>= 1; s += 1 }
                shift = max(s, 3)
                var bigger = [String?](repeating: nil, count: 1 << shift)
                for case let old? in table { insert(old, into: &bigger, shift: shift) }
                table = bigger
            }
        }
        return table.compactMap { $0 }
    }
}

extension QMPSchema {
    static let migrationCapabilities = ["xbzrle", "rdma-pin-all", "auto-converge", "events", "postcopy-ram", "x-colo", "release-ram",
                                        "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
                                        "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot", "zero-copy-send",
                                        "postcopy-preempt", "switchover-ack", "dirty-limit", "mapped-ram",
                                        "x-allow-untracked-devices", "x-vfio-live-payload-checksum"]  // vfio-live's

    static let inetSocketAddress: [QAPIMember] = [
        .init("host", .str), .init("port", .str), .init("numeric", .bool, optional: true), .init("to", .uint(bits: 16), optional: true),
        .init("ipv4", .bool, optional: true), .init("ipv6", .bool, optional: true), .init("keep-alive", .bool, optional: true),
        .init("keep-alive-count", .uint(bits: 32), optional: true), .init("keep-alive-idle", .uint(bits: 32), optional: true),
        .init("keep-alive-interval", .uint(bits: 32), optional: true), .init("mptcp", .bool, optional: true),
    ]

    /// MigrationAddress: a flat union on `transport`; `socket` is itself SocketAddress, a flat
    /// union on `type`, flattened into the same object as QEMU does.
    static let socketAddress = QAPIType.union(
        base: [.init("type", .enumeration(["inet", "unix", "vsock", "fd"]))], tag: "type",
        variants: [
            "inet": .object(inetSocketAddress),
            "unix": .object([.init("path", .str), .init("abstract", .bool, optional: true), .init("tight", .bool, optional: true)]),
            "vsock": .object([.init("cid", .str), .init("port", .str)]),
            "fd": .object([.init("str", .str)]),
        ])

    static let migrationAddress = QAPIType.union(
        base: [.init("transport", .enumeration(["socket", "exec", "rdma", "file"]))], tag: "transport",
        variants: [
            "socket": socketAddress,
            "exec": .object([.init("args", .list(.str))]),
            "rdma": .object(inetSocketAddress),
            "file": .object([.init("filename", .str), .init("offset", .uint(bits: 64))]),
        ])

    static let channel = QAPIType.object([.init("channel-type", .enumeration(["main", "cpr"])), .init("addr", migrationAddress)])

    /// The commands vfio-live implements (VirtualMachineManager.execute), typed as QEMU 11.1's
    /// schema types them; vfio-live's own x- commands in the same style.
    public static let vfioLive: QMPSchema = {
        let u8 = QAPIType.uint(bits: 8), u32 = QAPIType.uint(bits: 32), u64 = QAPIType.uint(bits: 64)
        let setParameters: [QAPIMember] = [
            .init("announce-initial", u64, optional: true, supported: false), .init("announce-max", u64, optional: true, supported: false),
            .init("announce-rounds", u64, optional: true, supported: false), .init("announce-step", u64, optional: true, supported: false),
            .init("throttle-trigger-threshold", u8, optional: true, supported: false),
            .init("cpu-throttle-initial", u8, optional: true), .init("cpu-throttle-increment", u8, optional: true),
            .init("cpu-throttle-tailslow", .bool, optional: true, supported: false),
            .init("tls-creds", .strOrNull, optional: true, supported: false), .init("tls-hostname", .strOrNull, optional: true, supported: false),
            .init("tls-authz", .strOrNull, optional: true, supported: false),
            .init("max-bandwidth", u64, optional: true), .init("avail-switchover-bandwidth", u64, optional: true, supported: false),
            .init("downtime-limit", u64, optional: true), .init("x-checkpoint-delay", u32, optional: true, supported: false),
            .init("multifd-channels", u8, optional: true), .init("xbzrle-cache-size", u64, optional: true, supported: false),
            .init("max-postcopy-bandwidth", u64, optional: true, supported: false), .init("max-cpu-throttle", u8, optional: true, supported: false),
            .init("multifd-compression", .enumeration(["none", "zlib", "zstd"]), optional: true, supported: false),
            .init("multifd-zlib-level", u8, optional: true, supported: false), .init("multifd-qatzip-level", u8, optional: true, supported: false),
            .init("multifd-zstd-level", u8, optional: true, supported: false),
            .init("block-bitmap-mapping", .list(.object([.init("node-name", .str), .init("alias", .str),
                                                        .init("bitmaps", .list(.object([.init("name", .str), .init("alias", .str),
                                                                                        .init("transform", .object([.init("persistent", .bool, optional: true)]), optional: true)])))])),
                  optional: true, supported: false),
            .init("x-vcpu-dirty-limit-period", u64, optional: true, supported: false), .init("vcpu-dirty-limit", u64, optional: true, supported: false),
            .init("mode", .enumeration(["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]), optional: true),
            .init("zero-page-detection", .enumeration(["none", "legacy", "multifd"]), optional: true, supported: false),
            .init("direct-io", .bool, optional: true, supported: false), .init("x-rdma-chunk-size", u64, optional: true, supported: false),
            .init("cpr-exec-command", .list(.str), optional: true),
            .init("x-max-iterations", u64, optional: true),  // vfio-live's
            .init("x-vfio-live-peer-timeout", u64, optional: true),  // vfio-live's: bound on a silent peer, ms (0 = none)
        ]
        let channels = QAPIMember("channels", .list(channel), optional: true)
        return QMPSchema(
            commands: [
                "qmp_capabilities": [.init("enable", .list(.enumeration(["oob"])), optional: true)],
                "query-status": [], "stop": [], "cont": [], "quit": [],
                "migrate": [.init("uri", .str, optional: true), channels, .init("resume", .bool, optional: true)],
                "migrate-incoming": [.init("uri", .str, optional: true), channels, .init("exit-on-error", .bool, optional: true)],
                "migrate_cancel": [], "migrate-cancel": [], "query-migrate": [],
                "migrate-set-parameters": setParameters,
                "query-migrate-parameters": [],
                "migrate-set-capabilities": [.init("capabilities", .list(.object([.init("capability", .enumeration(migrationCapabilities)),
                                                                                 .init("state", .bool)])))],
                "query-migrate-capabilities": [],
                "x-vfio-live-update": [.init("mode", .enumeration(["cpr-transfer", "cpr-exec"])), .init("to", .str, optional: true),
                                       .init("binary", .str, optional: true)],
                "x-vfio-live-verify": [], "x-vfio-live-devices": [], "x-vfio-live-pid": [],
            ],
            checks: ["migrate-set-parameters": checkParameters, "migrate": checkMigrate])
    }()

    /// QEMU's migrate_params_check, in its order, with its words.
    static func checkParameters(_ a: QMPValue) throws {
        func u(_ k: String) -> UInt64? {
            switch a[k] {
            case let .uint(x)?: return x
            case let .int(x)?: return UInt64(bitPattern: x)
            default: return nil
            }
        }
        if let v = u("cpu-throttle-initial"), v < 1 || v > 99 {
            throw QMPError("Option cpu-throttle-initial expects an integer in the range of 1 to 99")
        }
        if let v = u("cpu-throttle-increment"), v < 1 || v > 99 {
            throw QMPError("Option cpu-throttle-increment expects an integer in the range of 1 to 99")
        }
        if let v = u("downtime-limit"), v > 2_000_000 {
            throw QMPError("Option downtime-limit expects an integer in the range of 0 to (2000 * 1000) ms")
        }
    }

    /// QEMU's qmp_migrate: exactly one of `uri` and a non-empty `channels`; a URI with a scheme
    /// QEMU knows (vfio-live then says which of them it serves).
    static func checkMigrate(_ a: QMPValue) throws {
        var hasChannels = false
        if case let .array(list)? = a["channels"], !list.isEmpty { hasChannels = true }
        let uri: String? = { if case let .string(s)? = a["uri"] { return s }; return nil }()
        guard (uri != nil) != hasChannels else { throw QMPError("need either 'uri' or 'channels' argument") }
        if let uri, !["tcp:", "unix:", "vsock:", "fd:", "exec:", "rdma:", "file:"].contains(where: { uri.hasPrefix($0) }) {
            throw QMPError("unknown migration protocol: \(uri)")
        }
    }
}

