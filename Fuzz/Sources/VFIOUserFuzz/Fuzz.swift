import Devices
import LiveUpdate
import Migration
import SystemCalls
import VFIO
import VFIOUser

/// One input drives four decoders, chosen by its first byte:
///   0: the server's request decoder (header + payload + claimed fd count)
///   1: the client's reply decoders (VERSION, region info with its capability chain, IO fds)
///   2: the dma-engine migration-state loader (records, checksums, staging), then RESUMING→STOP
///   3: the VM migration stream decoder (sections, RAM runs, VFIO records, vCPU state)
///   4: the live-update CPR state (over a real socket pair, as a new VMM receives it) and its
///      records: the machine, a vfio-user connection's handover state
/// Every path must end in a value or a thrown error: a crash, hang or ASan report is a bug.
private let engine: DMAEngine = {
    Log.level = .error
    return try! DMAEngine(stateSize: 128 * 1024)
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size >= 1 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let body = bytes[1...]
    switch bytes[0] % 5 {
    case 0:
        guard body.count >= MessageHeader.size else { return 0 }
        var r = WireReader(body.prefix(MessageHeader.size), context: "header")
        guard let h = try? MessageHeader(decoding: &r) else { return 0 }
        let payload = body.dropFirst(MessageHeader.size)
        let fdCount = Int(h.errorNumber % 4)  // reserved in commands: reuse it to vary the fd count
        _ = try? VFIOUserRequest.decode(header: h, payload: payload, fdCount: fdCount,
                                        limits: .init(maxDataXferSize: 1 << 20, maxFDs: 8))
    case 1:
        _ = try? VersionPayload(decoding: body)
        _ = try? RegionInfo(decoding: body)
        _ = try? RegionIOFDsReply(decoding: body)
        _ = try? MigDataPayload(decoding: body, context: "fuzz", dataBySize: true)
    case 4:
        _ = try? MachineRecord(decoding: Array(body))
        _ = try? VFIOUserClient.HandoverState(decoding: body)
        guard body.count <= 64 * 1024, let (a, b) = try? UnixSocket.pair() else { return 0 }
        _ = try? a.send(Array(body))
        a.close()
        (try? CPRState.receive(from: b))?.closeAll()
        b.close()
    case 3:
        let source = MemorySource(body)
        _ = try? MigrationStreamDecoder(source: source, sink: nullSink).run()
    default:
        do {
            try engine.migrationArc(from: .running, to: .stop)
            try engine.migrationArc(from: .stop, to: .resuming)
            _ = try? body.withUnsafeBytes { try engine.writeMigrationData($0) }
            _ = try? engine.migrationArc(from: .resuming, to: .stop)
            try? engine.reset()
        } catch {}
    }
    return 0
}

// SwiftPM links an executable's entry point as `<target>_main`; hand control to libFuzzer.
@_silgen_name("LLVMFuzzerRunDriver")
private func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<Int32>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> Int32) -> Int32

@_cdecl("VFIOUserFuzz_main")
public func fuzzMain(_ argc: Int32, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
    var c = argc
    var v = argv
    return LLVMFuzzerRunDriver(&c, &v) { data, size in fuzz(data, size) }
}

/// The stream decoder's input from memory.
final class MemorySource: ByteSource {
    var bytes: ArraySlice<UInt8>
    init(_ b: ArraySlice<UInt8>) { bytes = b }
    func readExactly(_ buffer: UnsafeMutableRawBufferPointer) throws {
        guard bytes.count >= buffer.count else { throw Errno.ECONNRESET }
        bytes.prefix(buffer.count).withUnsafeBytes { buffer.copyMemory(from: $0) }
        bytes = bytes.dropFirst(buffer.count)
    }
}

/// A sink with 1 MiB of "guest RAM" and one device that accepts anything.
final class NullSink: MigrationSink {
    let ram = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    func config(ramSize: UInt64, vcpus: UInt32, devices: UInt32) throws {
        guard ramSize <= 1 << 20, devices <= 1 else { throw Errno.EINVAL }
    }
    func ramDestination(gpa: UInt64, pages: UInt32) throws -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: ram[Int(gpa)..<(Int(gpa) + Int(pages) * 4096)])
    }
    func ramZero(gpa: UInt64, pages: UInt32) throws {}
    func deviceSetup(device: UInt32) throws {}
    func deviceData(device: UInt32, _ data: UnsafeRawBufferPointer) throws {}
    func deviceConfig(device: UInt32, _ data: ArraySlice<UInt8>) throws {}
    func deviceInitialDataSent(device: UInt32) throws {}
    func vcpus(_ states: [VCPUStateBytes]) throws {}
    func end(pagesSent: UInt64) throws {}
}
private let nullSink = NullSink()
