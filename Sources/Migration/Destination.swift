import Glibc
import Machine
import SystemCalls
import VFIO
import VFIOUser

/// The incoming side: applies the stream to a paused VM whose devices wait in RESUMING, then
/// loads the devices (RESUMING→STOP validates their state), restores config space, interrupt
/// wiring and vCPUs, resumes, and tells the source. Any error is reported to the source with
/// its precise reason; the guest never runs on a partial state.
public final class MigrationDestination: MigrationSink, @unchecked Sendable {
    public let vm: MicroVM
    private let socket: StreamSocket
    private var migrations: [DeviceMigration] = []
    private var configs: [Int: ArraySlice<UInt8>] = [:]
    public private(set) var pagesReceived: UInt64 = 0
    public private(set) var deviceBytes: [UInt64] = []
    private var ended = false
    public private(set) var resumedAt: UInt64 = 0
    public let stats = MigrationStats()
    /// Check the workload's invariants before resuming (tests; it adds to the downtime).
    public var verifyBeforeResume = false
    /// Called after everything is loaded, just before the guest resumes (checks, reports).
    public var beforeResume: (() -> Void)?
    /// Called when every device has loaded its state (RESUMING→STOP) and before any runs again:
    /// the one moment the destination's device state equals the source's stopped state.
    public var afterDevicesLoaded: (() -> Void)?

    public init(vm: MicroVM, from socket: StreamSocket) throws {
        self.vm = vm; self.socket = socket
        for (i, d) in vm.devices.enumerated() {
            do { migrations.append(try DeviceMigration(device: d.client)) } catch {
                throw MigrationError.device(i, "cannot receive migration state: \(error)")
            }
        }
        deviceBytes = [UInt64](repeating: 0, count: migrations.count)
    }

    /// Receive the whole migration and resume the guest. Throws (after telling the source) on
    /// any error; the VM is then left paused and its devices reset out of RESUMING.
    public func run() throws {
        stats.set(.active)
        do {
            let decoder = MigrationStreamDecoder(source: ChannelSource(socket), sink: self)
            try decoder.run()
            guard ended else { throw StreamError.missingEnd }
            var summary = "{\"pages\":\(pagesReceived),\"device-bytes\":[\(deviceBytes.map(String.init).joined(separator: ","))]"
            if verifyBeforeResume {
                // A test instrument: it scans all guest memory inside the downtime window.
                let report = vm.verify()
                guard report.ok else { throw StreamError.configMismatch("guest memory fails verification after the load: \(report)") }
                summary += ",\"verified\":true"
            }
            summary += "}"
            beforeResume?()
            vm.resume()
            resumedAt = monotonicNanoseconds()
            Verdict.send(socket, ok: true, summary)
            stats.set(.completed)
        } catch {
            Verdict.send(socket, ok: false, "\(error)")
            for m in migrations { try? m.reset() }
            stats.set(.failed, error: "\(error)")
            throw error
        }
    }

    // MARK: MigrationSink

    public func config(ramSize: UInt64, vcpus: UInt32, devices: UInt32) throws {
        guard ramSize == vm.memory.size else {
            throw StreamError.configMismatch("source guest RAM is \(ramSize) bytes, this VM has \(vm.memory.size) (start it with --memory \(ramSize))")
        }
        guard vcpus == UInt32(vm.vcpuCount) else { throw StreamError.configMismatch("source has \(vcpus) vCPUs, this VM \(vm.vcpuCount)") }
        guard devices == UInt32(migrations.count) else { throw StreamError.configMismatch("source has \(devices) devices, this VM \(migrations.count)") }
        for (i, m) in migrations.enumerated() {
            do { try m.transition(to: .resuming) } catch { throw MigrationError.device(i, "\(error)") }
        }
    }

    public func ramDestination(gpa: UInt64, pages: UInt32) throws -> UnsafeMutableRawBufferPointer {
        pagesReceived += UInt64(pages)
        return UnsafeMutableRawBufferPointer(start: vm.memory.base + Int(gpa), count: Int(pages) * 4096)
    }

    public func ramZero(gpa: UInt64, pages: UInt32) throws {
        pagesReceived += UInt64(pages)
        memset(vm.memory.base + Int(gpa), 0, Int(pages) * 4096)
    }

    public func deviceSetup(device: UInt32) throws {}

    public func deviceData(device: UInt32, _ data: UnsafeRawBufferPointer) throws {
        do { try migrations[Int(device)].write(data) } catch { throw MigrationError.device(Int(device), "loading state: \(error)") }
        deviceBytes[Int(device)] += UInt64(data.count)
    }

    public func deviceConfig(device: UInt32, _ data: ArraySlice<UInt8>) throws {
        configs[Int(device)] = data
    }

    public func deviceInitialDataSent(device: UInt32) throws {}

    public func vcpus(_ states: [VCPUStateBytes]) throws {
        do { try vm.restoreVCPUs(states.map { VCPUState(regs: $0.regs, sregs: $0.sregs, fpu: $0.fpu) }) } catch {
            throw StreamError.configMismatch("vCPU state: \(error)")
        }
    }

    public func end(pagesSent: UInt64) throws {
        guard pagesSent == pagesReceived else {
            throw StreamError.malformed(.end, id: 0, "the source sent \(pagesSent) pages, \(pagesReceived) arrived")
        }
        for (i, m) in migrations.enumerated() {
            // RESUMING→STOP is where the device validates the image.
            do { try m.transition(to: .stop) } catch { throw MigrationError.device(i, "\(error)") }
        }
        afterDevicesLoaded?()
        for (i, m) in migrations.enumerated() {
            if let cfg = configs[i] { try applyConfig(i, cfg) }
            do { try m.transition(to: .running) } catch { throw MigrationError.device(i, "\(error)") }
        }
        ended = true
    }

    /// The VMM's copy of config space goes back before the device runs; MSI wiring is this
    /// VM's own eventfd.
    private func applyConfig(_ i: Int, _ payload: ArraySlice<UInt8>) throws {
        var r = BEReader(payload)
        guard let n = r.u32(), n == 256, let cfg = r.bytes(Int(n)), let msi = r.bytes(1) else {
            throw MigrationError.device(i, "CONFIG record is not 256 bytes of config space plus interrupt state")
        }
        let c = vm.devices[i].client
        do {
            try c.regionWrite(7, offset: 4, Array(cfg[(cfg.startIndex + 4)..<(cfg.startIndex + 6)]))  // command
            try c.regionWrite(7, offset: 0x3c, [cfg[cfg.startIndex + 0x3c]])                         // interrupt line
            for bar in [0, 2, 4] { try c.regionWrite(7, offset: UInt64(0x10 + 4 * bar), Array(cfg[(cfg.startIndex + 0x10 + 4 * bar)..<(cfg.startIndex + 0x14 + 4 * bar)])) }
            try c.regionWrite(7, offset: 0x40, Array(cfg[(cfg.startIndex + 0x40)..<(cfg.startIndex + 0x4e)]))  // MSI capability
            if msi.first == 1 { try c.setIRQs(index: 1, eventfds: [vm.devices[i].msi]) }
        } catch {
            throw MigrationError.device(i, "restoring config space: \(error)")
        }
    }
}
