import Devices
import Glibc
import SystemCalls
import VFIO
import VFIOUser

/// A stateful fuzzer of the vfio-user server (issue 13 deliver 2): each input is decoded into a
/// sequence of commands that a hostile client sends to a real `VFIOUserServer` serving a real
/// dma-engine over a socket pair, with fds attached: sealed memfds (mmapped by the server),
/// unsealed tmpfs files (pread/pwrite, and shrunk under the server), pipes, eventfds, none.
/// The client answers the server's DMA_READ/WRITE messages on the main or the twin socket.
///
/// Failure (libFuzzer records the input): a trap or abort; no reply within a bound, or the
/// server not returning after the client hangs up (hang); fds left open after the input (leak);
/// a DMA message for an address outside every fd-less mapping, or a write into a sealed memfd
/// outside every range mapped writable (DMA outside a mapping). libFuzzer's -rss_limit_mb and
/// -timeout catch memory growth and hangs elsewhere.

let poolSize = 256 * 1024
let canary: UInt8 = 0xa5

enum Fail {
    static func now(_ why: String) -> Never {
        let line = "stateful fuzz failure: \(why)\n"
        _ = line.withCString { write(2, $0, strlen($0)) }
        abort()
    }
}

/// The fds a client can pass, and what must stay untouched in them.
final class Backing {
    let sealed: [FileDescriptor]
    let sealedMaps: [MappedRegion]
    let unsealed: FileDescriptor
    var unsealedShrunk = false
    /// File ranges of the sealed memfds mapped writable at some point: [start, end).
    var writable: [[(UInt64, UInt64)]] = [[], []]

    init() throws {
        sealed = try (0..<2).map { try MemFD.create(name: "fuzz-ram-\($0)", size: UInt64(poolSize)) }
        sealedMaps = try sealed.map { try MappedRegion(fd: $0, length: poolSize) }
        for m in sealedMaps { memset(m.base, Int32(canary), poolSize) }
        let path = "/dev/shm/vfio-live-fuzz-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let raw = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard raw >= 0 else { Fail.now("cannot create \(path): errno \(errno)") }
        unlink(path)
        unsealed = FileDescriptor(adopting: raw)
        try unsealed.truncate(to: UInt64(poolSize))
    }

    /// Nothing outside the writable ranges of the sealed memfds changed.
    func check() {
        for (i, m) in sealedMaps.enumerated() {
            let p = m.base.assumingMemoryBound(to: UInt8.self)
            for off in 0..<poolSize where p[off] != canary {
                let inside = writable[i].contains { UInt64(off) >= $0.0 && UInt64(off) < $0.1 }
                if !inside { Fail.now("sealed memfd \(i) byte 0x\(String(off, radix: 16)) written outside every writable mapping") }
            }
        }
    }

    func close() {
        for m in sealedMaps { m.unmap() }
        for f in sealed { f.close() }
        unsealed.close()
    }
}

/// The input, read as a stream of small numbers.
struct Input {
    var bytes: ArraySlice<UInt8>
    var isEmpty: Bool { bytes.isEmpty }
    mutating func u8() -> UInt8 { bytes.popFirst() ?? 0 }
    mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }
    mutating func take(_ n: Int) -> [UInt8] { let t = Array(bytes.prefix(n)); bytes = bytes.dropFirst(t.count); return t }
    /// An address: mostly a few interesting ones, sometimes anything.
    mutating func address() -> UInt64 {
        switch u8() % 8 {
        case 0: return 0
        case 1: return 0x10_0000
        case 2: return 0x10_0000 + UInt64(u8()) * 4096
        case 3: return UInt64.max - 4095 - UInt64(u8() % 4) * 4096
        case 4: return UInt64(u16()) * 4096
        case 5: return DMAEngine.deviceMemoryBase + UInt64(u16()) * 16
        default: return u64()
        }
    }
    mutating func size() -> UInt64 {
        switch u8() % 6 {
        case 0: return 4096
        case 1: return UInt64(u8() % 64 + 1) * 4096
        case 2: return 0
        case 3: return UInt64.max
        case 4: return UInt64(u16())
        default: return u64()
        }
    }
}

/// The hostile client.
final class Client {
    let main: VFIOUserConnection
    var twin: VFIOUserConnection?
    var nextID: UInt16 = 100
    var dead = false
    /// fd-less mappings the server may DMA into (added when sent, removed when the unmap is answered).
    var fdless: [(iova: UInt64, size: UInt64)] = []
    let backing: Backing

    init(_ s: UnixSocket, backing: Backing) {
        main = VFIOUserConnection(socket: s, maxReceiveFDs: 8, maxMessageSize: 16 << 20)
        self.backing = backing
    }

    func insideFDless(_ a: UInt64, _ n: UInt64) -> Bool {
        guard n > 0 else { return true }
        guard n - 1 <= UInt64.max - a else { return false }
        return fdless.contains { a >= $0.iova && a - $0.iova <= $0.size - 1 && n - 1 <= $0.size - 1 - (a - $0.iova) }
    }

    /// Answer one server→client command (DMA_READ/WRITE), after checking it stays inside a
    /// mapping the server may reach by message.
    func answer(_ m: Message, on c: VFIOUserConnection) {
        m.closeFDs()
        guard let a = try? DMAAccess(decoding: m.payload[...], context: "fuzz DMA") else {
            try? c.sendError(to: m.header, errno: .EINVAL); return
        }
        if !insideFDless(a.address, a.count) {
            Fail.now("server DMA \(m.header.command) [0x\(String(a.address, radix: 16)), +0x\(String(a.count, radix: 16))) outside every fd-less mapping")
        }
        if m.header.command == VFIOUserCommand.dmaRead.rawValue {
            var w = WireWriter(); w.u64(a.address); w.u64(a.count); w.zeros(Int(min(a.count, 16 << 20)))
            try? c.sendReply(to: m.header, payload: w.bytes)
        } else {
            try? c.sendReply(to: m.header, payload: DMAAccess(address: a.address, count: a.count).encode())
        }
    }

    /// Send and wait for the reply (serving DMA meanwhile). nil: no reply expected, or the
    /// server closed the connection (allowed: it may drop a client that broke the protocol).
    @discardableResult
    func call(_ cmd: UInt16, _ payload: [UInt8], fds: [Int32] = [], flags: UInt32 = 0, raw: [UInt8]? = nil) -> Message? {
        guard !dead else { return nil }
        let id = nextID; nextID &+= 1
        do {
            if let raw { try main.socket.send(raw, fds: fds) }
            else { try main.send(id: id, command: cmd, flags: flags, payload: payload, fds: fds) }
        } catch { dead = true; return nil }
        if raw != nil || flags & MessageHeader.flagNoReply != 0 { return pump(untilID: nil) }
        return pump(untilID: id)
    }

    /// Serve DMA until the reply `id` (or, with nil, until things are quiet for a moment).
    func pump(untilID id: UInt16?) -> Message? {
        let bound: UInt64 = 8_000_000_000  // far above the server's 0.3 s peer timeout
        let start = monotonicNanoseconds()
        while true {
            let waited = monotonicNanoseconds() - start
            if waited > bound { Fail.now("no reply to message id \(id.map(String.init) ?? "-") within \(bound / 1_000_000_000) s: the server hangs") }
            let fds = [main.socket.fd.rawValue] + (twin.map { [$0.socket.fd.rawValue] } ?? [])
            let timeout: Int32 = id == nil ? 5 : 200
            guard let which = (try? Poll.waitAnyReadable(fds, timeoutMilliseconds: timeout)) ?? nil else {
                if id == nil { return nil }
                continue
            }
            let c = which == 0 ? main : twin!
            let m: Message
            do { m = try c.receive() } catch is FramingError { continue } catch {
                if which == 0 { dead = true; return nil }
                twin?.close(); twin = nil; continue
            }
            if m.header.isCommand { answer(m, on: c); continue }
            if let id, m.header.messageID == id, which == 0 { return m }
            m.closeFDs()
        }
    }

    func close() {
        twin?.close()
        main.close()
    }
}

/// One input: one server, one client, one command sequence.
func runSequence(_ data: ArraySlice<UInt8>) {
    let before = openFileDescriptorCount()
    do {
        let backing = try! Backing()
        defer { backing.close() }
        let engine = try! DMAEngine(stateSize: 128 * 1024)
        defer { engine.shutdown() }
        var o = VFIOUserServer.Options()
        o.peerTimeoutSeconds = 0.3
        o.maxDMAMaps = 64
        let server = try! VFIOUserServer(device: engine, name: "fuzz", options: o)
        let (ours, theirs) = try! UnixSocket.pair()
        let done = try! EventFD()
        let thread = try! OSThread(name: "fuzz-server") { server.serve(connection: theirs); try? done.signal() }
        let c = Client(ours, backing: backing)
        var input = Input(bytes: data)
        drive(c, &input, backing)
        c.close()
        if ((try? done.wait(timeoutMilliseconds: 8000)) ?? 0) == 0 { Fail.now("the server did not return within 8 s after the client hung up") }
        thread.join()
        backing.check()
    }
    let after = openFileDescriptorCount()
    if after > before { Fail.now("\(after - before) fd(s) leaked by one input (\(before) before, \(after) after)") }
}

func drive(_ c: Client, _ input: inout Input, _ b: Backing) {
    // Most sequences start with a valid VERSION, so that the handlers are reached.
    let first = input.u8()
    if first % 8 != 0 { version(c, twin: first & 1 != 0, maxXfer: first & 2 != 0 ? 1024 : nil) }
    var steps = 0
    while !input.isEmpty, !c.dead, steps < 64 {
        steps += 1
        let op = input.u8()
        switch op % 16 {
        case 0: version(c, twin: op & 0x10 != 0, maxXfer: nil)
        case 1, 2: dmaMap(c, &input, b)
        case 3: dmaUnmap(c, &input)
        case 4, 5: registerWrite(c, &input)
        case 6: regionAccess(c, &input)
        case 7: setIRQs(c, &input)
        case 8, 9: feature(c, &input)
        case 10: migData(c, &input)
        case 11:
            // Shrink the unsealed file under the server.
            _ = try? b.unsealed.truncate(to: UInt64(input.u8()) * 1024)
            b.unsealedShrunk = true
        case 12: dirtyPages(c, &input)
        case 13:
            let cmd = [VFIOUserCommand.deviceReset, .deviceGetInfo, .deviceGetRegionInfo, .deviceGetIRQInfo, .deviceGetRegionIOFDs][Int(input.u8() % 5)]
            var w = WireWriter(); w.u32(UInt32(input.u8()) * 8); w.u32(0); w.u32(UInt32(input.u8() % 12)); w.u32(0); w.zeros(16)
            c.call(cmd.rawValue, w.bytes)
        case 14:
            // Raw bytes: a header that lies, garbage, a truncated message.
            let n = Int(input.u8())
            c.call(0, [], raw: input.take(n))
        default:
            usleep(UInt32(input.u8()) * 50)
            _ = c.pump(untilID: nil)
        }
    }
}

func version(_ c: Client, twin: Bool, maxXfer: UInt64?) {
    var caps = Capabilities()
    if twin { caps.twinSocket = .init(supported: true) }
    if let maxXfer { caps.maxDataXferSize = maxXfer }
    guard let r = c.call(VFIOUserCommand.version.rawValue, VersionPayload(major: 0, minor: 2, capabilities: caps).encode()) else { return }
    if let f = r.fds.first, !r.header.isError {
        c.twin?.close()
        c.twin = VFIOUserConnection(socket: UnixSocket(adopting: f), maxReceiveFDs: 0, maxMessageSize: 16 << 20)
        for g in r.fds.dropFirst() { g.close() }
    } else {
        r.closeFDs()
    }
}

func dmaMap(_ c: Client, _ input: inout Input, _ b: Backing) {
    let iova = input.address(), size = input.size()
    let offset = UInt64(input.u8() % 80) * 4096
    let kind = input.u8()
    let flagsRaw = UInt32(kind >> 3 & 3 == 0 ? 3 : kind >> 3 & 3)
    let req = DMAMapRequest(flags: DMAMapFlags(rawValue: flagsRaw), offset: offset, address: iova, size: size).encode()
    var pipeFDs: [Int32] = [-1, -1]
    var fds: [Int32] = []
    switch kind % 5 {
    case 0: break  // fd-less: served by message
    case 1, 2: fds = [b.sealed[Int(kind % 5) - 1].rawValue]
    case 3: fds = [b.unsealed.rawValue]
    default: if pipe(&pipeFDs) == 0 { fds = [pipeFDs[Int(kind >> 5 & 1)]] }
    }
    if fds.isEmpty { c.fdless.append((iova, size)) }
    let r = c.call(VFIOUserCommand.dmaMap.rawValue, req, fds: fds)
    for p in pipeFDs where p >= 0 { Glibc.close(p) }
    let ok = r.map { !$0.header.isError } ?? false
    r?.closeFDs()
    if fds.isEmpty {
        if !ok, let i = c.fdless.lastIndex(where: { $0.iova == iova && $0.size == size }) { c.fdless.remove(at: i) }
    } else if ok, flagsRaw & 2 != 0, kind % 5 == 1 || kind % 5 == 2 {
        // The whole mapped file range may be written by the device.
        b.writable[Int(kind % 5) - 1].append((offset, offset &+ size))
    }
}

func dmaUnmap(_ c: Client, _ input: inout Input) {
    let sel = input.u8()
    let iova: UInt64, size: UInt64
    if sel & 1 == 0, !c.fdless.isEmpty { let m = c.fdless[Int(sel >> 1) % c.fdless.count]; iova = m.iova; size = m.size }
    else { iova = input.address(); size = input.size() }
    let flags = UInt32(input.u8() % 4)
    var w = WireWriter(); w.u32(UInt32(input.u8()) * 8 + 24); w.u32(flags); w.u64(sel & 2 != 0 && flags & 2 != 0 ? 0 : iova); w.u64(sel & 2 != 0 && flags & 2 != 0 ? 0 : size)
    if flags & 1 != 0 { w.u64(input.u8() % 2 == 0 ? 4096 : input.u64()); w.u64(input.size()) }
    let r = c.call(VFIOUserCommand.dmaUnmap.rawValue, w.bytes)
    if let r, !r.header.isError {
        if flags & 2 != 0 { c.fdless = [] } else { c.fdless.removeAll { $0.iova == iova && $0.size == size } }
    }
}

/// Program the dma-engine (BAR0): source, destination, count, command.
func registerWrite(_ c: Client, _ input: inout Input) {
    let which = input.u8()
    let regs: [UInt64] = [DMAEngine.Reg.dmaSource, DMAEngine.Reg.dmaDestination, DMAEngine.Reg.dmaCount, DMAEngine.Reg.dmaCommand, DMAEngine.Reg.irqRaise, DMAEngine.Reg.liveness]
    let off = regs[Int(which) % regs.count]
    let v: UInt64
    switch off {
    case DMAEngine.Reg.dmaCount: v = UInt64(input.u16()) * 16
    case DMAEngine.Reg.dmaCommand: v = DMAEngine.dmaCommandStart | UInt64(input.u8() & 0x6)
    default: v = input.address()
    }
    var d = WireWriter(); d.u64(v)
    c.call(VFIOUserCommand.regionWrite.rawValue, RegionAccess(offset: off, region: 0, count: 8, data: d.bytes[...]).encode())
}

func regionAccess(_ c: Client, _ input: inout Input) {
    let region = UInt32(input.u8() % 11), offset = UInt64(input.u16()), count = UInt32(input.u8())
    if input.u8() & 1 == 0 {
        c.call(VFIOUserCommand.regionRead.rawValue, RegionAccess(offset: offset, region: region, count: count).encode())
    } else {
        let data = input.take(Int(count)) + [UInt8](repeating: 0, count: max(0, Int(count) - input.bytes.count))
        c.call(VFIOUserCommand.regionWrite.rawValue, RegionAccess(offset: offset, region: region, count: count, data: data.prefix(Int(count))).encode())
    }
}

func setIRQs(_ c: Client, _ input: inout Input) {
    let flags = UInt32(input.u8() & 0x3f), index = UInt32(input.u8() % 6), start = UInt32(input.u8() % 3), count = UInt32(input.u8() % 3)
    var w = WireWriter(); w.u32(20); w.u32(flags); w.u32(index); w.u32(start); w.u32(count)
    if flags & 2 != 0 { w.append(input.take(Int(count))) }
    let efds = flags & 4 != 0 ? (0..<Int(count)).compactMap { _ in try? EventFD() } : []
    c.call(VFIOUserCommand.deviceSetIRQs.rawValue, w.bytes, fds: efds.map { $0.fd.rawValue })
}

func feature(_ c: Client, _ input: inout Input) {
    let features: [UInt32] = [DeviceFeature.migration, DeviceFeature.migDeviceState, DeviceFeature.dmaLoggingStart,
                              DeviceFeature.dmaLoggingStop, DeviceFeature.dmaLoggingReport, DeviceFeature.migDataSize, UInt32(input.u8())]
    let f = features[Int(input.u8()) % features.count]
    let mode = [DeviceFeature.get, DeviceFeature.set, DeviceFeature.probe | DeviceFeature.get, DeviceFeature.probe | DeviceFeature.set, 0][Int(input.u8() % 5)]
    var data: [UInt8]
    switch f {
    case DeviceFeature.migDeviceState:
        var w = WireWriter(); w.u32(UInt32(input.u8() % 9)); w.i32(-1); data = w.bytes
    case DeviceFeature.dmaLoggingStart:
        var w = WireWriter(); w.u64(input.u8() % 2 == 0 ? 4096 : input.u64())
        let n = Int(input.u8() % 4); w.u32(UInt32(n)); w.u32(0)
        for _ in 0..<n { w.u64(input.address()); w.u64(input.size()) }
        data = w.bytes
    case DeviceFeature.dmaLoggingReport:
        var w = WireWriter(); w.u64(input.address()); w.u64(input.size()); w.u64(input.u8() % 2 == 0 ? 4096 : input.u64()); data = w.bytes
    default:
        data = input.take(Int(input.u8() % 32))
    }
    if input.u8() % 8 == 0 { data = Array(data.prefix(Int(input.u8()) % (data.count + 1))) }  // truncated
    let argsz = input.u8() % 4 == 0 ? UInt32(input.u16()) : UInt32(8 + data.count + 4096)
    c.call(VFIOUserCommand.deviceFeature.rawValue, DeviceFeature(argsz: argsz, flags: f | mode, data: data[...]).encode())
}

func migData(_ c: Client, _ input: inout Input) {
    if input.u8() & 1 == 0 {
        let size = input.u8() % 2 == 0 ? UInt32(input.u16()) : input.u32()
        var w = WireWriter(); w.u32(size &+ 8); w.u32(size)
        c.call(VFIOUserCommand.migDataRead.rawValue, w.bytes)
    } else {
        let data = input.take(Int(input.u8()))
        c.call(VFIOUserCommand.migDataWrite.rawValue, MigDataPayload(argsz: UInt32(8 + data.count), size: UInt32(data.count), data: data[...]).encode())
    }
}

func dirtyPages(_ c: Client, _ input: inout Input) {
    let flags = [DirtyPagesRequest.start, DirtyPagesRequest.stop, DirtyPagesRequest.getBitmap, UInt32(input.u8())][Int(input.u8() % 4)]
    let range: (UInt64, UInt64, UInt64, UInt64)? = flags == DirtyPagesRequest.getBitmap
        ? (input.address(), input.size(), input.u8() % 2 == 0 ? 4096 : input.u64(), input.size()) : nil
    c.call(VFIOUserCommand.dirtyPages.rawValue, DirtyPagesRequest(argsz: UInt32(input.u16()), flags: flags, range: range).encode())
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    runSequence(Array(UnsafeBufferPointer(start: data, count: size))[...])
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
private func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<Int32>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> Int32) -> Int32

@_cdecl("ServerFuzz_main")
public func serverFuzzMain(_ argc: Int32, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
    Log.level = .error
    signal(SIGPIPE, SIG_IGN)
    // Warm up once: lazily created process-wide fds are not a per-input leak.
    runSequence([1, 4, 0][...])
    var c = argc
    var v = argv
    return LLVMFuzzerRunDriver(&c, &v) { data, size in fuzzOne(data, size) }
}
