import XCTest
@testable import VFIO

/// Every (capabilities, from, to) path from shared/reference/mig-fsm-paths.md (the kernel's
/// vfio_mig_get_next_state() with the ERROR guard), checked against MigrationFSM.
final class MigrationFSMTests: XCTestCase {
    static let vectors: [(String, String, String, String?)] = [
        ("STOP_COPY", "STOP", "RUNNING", "STOP RUNNING"),
        ("STOP_COPY", "STOP", "STOP_COPY", "STOP STOP_COPY"),
        ("STOP_COPY", "STOP", "RESUMING", "STOP RESUMING"),
        ("STOP_COPY", "RUNNING", "STOP", "RUNNING STOP"),
        ("STOP_COPY", "RUNNING", "STOP_COPY", "RUNNING STOP STOP_COPY"),
        ("STOP_COPY", "RUNNING", "RESUMING", "RUNNING STOP RESUMING"),
        ("STOP_COPY", "STOP_COPY", "STOP", "STOP_COPY STOP"),
        ("STOP_COPY", "STOP_COPY", "RUNNING", "STOP_COPY STOP RUNNING"),
        ("STOP_COPY", "STOP_COPY", "RESUMING", "STOP_COPY STOP RESUMING"),
        ("STOP_COPY", "RESUMING", "STOP", "RESUMING STOP"),
        ("STOP_COPY", "RESUMING", "RUNNING", "RESUMING STOP RUNNING"),
        ("STOP_COPY", "RESUMING", "STOP_COPY", "RESUMING STOP STOP_COPY"),
        ("STOP_COPY|P2P", "STOP", "RUNNING", "STOP RUNNING_P2P RUNNING"),
        ("STOP_COPY|P2P", "STOP", "STOP_COPY", "STOP STOP_COPY"),
        ("STOP_COPY|P2P", "STOP", "RESUMING", "STOP RESUMING"),
        ("STOP_COPY|P2P", "STOP", "RUNNING_P2P", "STOP RUNNING_P2P"),
        ("STOP_COPY|P2P", "RUNNING", "STOP", "RUNNING RUNNING_P2P STOP"),
        ("STOP_COPY|P2P", "RUNNING", "STOP_COPY", "RUNNING RUNNING_P2P STOP STOP_COPY"),
        ("STOP_COPY|P2P", "RUNNING", "RESUMING", "RUNNING RUNNING_P2P STOP RESUMING"),
        ("STOP_COPY|P2P", "RUNNING", "RUNNING_P2P", "RUNNING RUNNING_P2P"),
        ("STOP_COPY|P2P", "STOP_COPY", "STOP", "STOP_COPY STOP"),
        ("STOP_COPY|P2P", "STOP_COPY", "RUNNING", "STOP_COPY STOP RUNNING_P2P RUNNING"),
        ("STOP_COPY|P2P", "STOP_COPY", "RESUMING", "STOP_COPY STOP RESUMING"),
        ("STOP_COPY|P2P", "STOP_COPY", "RUNNING_P2P", "STOP_COPY STOP RUNNING_P2P"),
        ("STOP_COPY|P2P", "RESUMING", "STOP", "RESUMING STOP"),
        ("STOP_COPY|P2P", "RESUMING", "RUNNING", "RESUMING STOP RUNNING_P2P RUNNING"),
        ("STOP_COPY|P2P", "RESUMING", "STOP_COPY", "RESUMING STOP STOP_COPY"),
        ("STOP_COPY|P2P", "RESUMING", "RUNNING_P2P", "RESUMING STOP RUNNING_P2P"),
        ("STOP_COPY|P2P", "RUNNING_P2P", "STOP", "RUNNING_P2P STOP"),
        ("STOP_COPY|P2P", "RUNNING_P2P", "RUNNING", "RUNNING_P2P RUNNING"),
        ("STOP_COPY|P2P", "RUNNING_P2P", "STOP_COPY", "RUNNING_P2P STOP STOP_COPY"),
        ("STOP_COPY|P2P", "RUNNING_P2P", "RESUMING", "RUNNING_P2P STOP RESUMING"),
        ("STOP_COPY|PRE_COPY", "STOP", "RUNNING", "STOP RUNNING"),
        ("STOP_COPY|PRE_COPY", "STOP", "STOP_COPY", "STOP STOP_COPY"),
        ("STOP_COPY|PRE_COPY", "STOP", "RESUMING", "STOP RESUMING"),
        ("STOP_COPY|PRE_COPY", "STOP", "PRE_COPY", "STOP RUNNING PRE_COPY"),
        ("STOP_COPY|PRE_COPY", "RUNNING", "STOP", "RUNNING STOP"),
        ("STOP_COPY|PRE_COPY", "RUNNING", "STOP_COPY", "RUNNING STOP STOP_COPY"),
        ("STOP_COPY|PRE_COPY", "RUNNING", "RESUMING", "RUNNING STOP RESUMING"),
        ("STOP_COPY|PRE_COPY", "RUNNING", "PRE_COPY", "RUNNING PRE_COPY"),
        ("STOP_COPY|PRE_COPY", "STOP_COPY", "STOP", "STOP_COPY STOP"),
        ("STOP_COPY|PRE_COPY", "STOP_COPY", "RUNNING", "STOP_COPY STOP RUNNING"),
        ("STOP_COPY|PRE_COPY", "STOP_COPY", "RESUMING", "STOP_COPY STOP RESUMING"),
        ("STOP_COPY|PRE_COPY", "STOP_COPY", "PRE_COPY", nil),
        ("STOP_COPY|PRE_COPY", "RESUMING", "STOP", "RESUMING STOP"),
        ("STOP_COPY|PRE_COPY", "RESUMING", "RUNNING", "RESUMING STOP RUNNING"),
        ("STOP_COPY|PRE_COPY", "RESUMING", "STOP_COPY", "RESUMING STOP STOP_COPY"),
        ("STOP_COPY|PRE_COPY", "RESUMING", "PRE_COPY", "RESUMING STOP RUNNING PRE_COPY"),
        ("STOP_COPY|PRE_COPY", "PRE_COPY", "STOP", "PRE_COPY RUNNING STOP"),
        ("STOP_COPY|PRE_COPY", "PRE_COPY", "RUNNING", "PRE_COPY RUNNING"),
        ("STOP_COPY|PRE_COPY", "PRE_COPY", "STOP_COPY", "PRE_COPY STOP_COPY"),
        ("STOP_COPY|PRE_COPY", "PRE_COPY", "RESUMING", "PRE_COPY RUNNING STOP RESUMING"),
        ("STOP_COPY|P2P|PRE_COPY", "STOP", "RUNNING", "STOP RUNNING_P2P RUNNING"),
        ("STOP_COPY|P2P|PRE_COPY", "STOP", "STOP_COPY", "STOP STOP_COPY"),
        ("STOP_COPY|P2P|PRE_COPY", "STOP", "RESUMING", "STOP RESUMING"),
        ("STOP_COPY|P2P|PRE_COPY", "STOP", "RUNNING_P2P", "STOP RUNNING_P2P"),
        ("STOP_COPY|P2P|PRE_COPY", "STOP", "PRE_COPY", "STOP RUNNING_P2P RUNNING PRE_COPY"),
        ("STOP_COPY|P2P|PRE_COPY", "STOP", "PRE_COPY_P2P", "STOP RUNNING_P2P PRE_COPY_P2P"),
        ("STOP_COPY|P2P|PRE_COPY", "RUNNING", "STOP", "RUNNING RUNNING_P2P STOP"),
        ("STOP_COPY|P2P|PRE_COPY", "RUNNING", "STOP_COPY", "RUNNING RUNNING_P2P STOP STOP_COPY"),
        ("STOP_COPY|P2P|PRE_COPY", "RUNNING", "RESUMING", "RUNNING RUNNING_P2P STOP RESUMING"),
        ("STOP_COPY|P2P|PRE_COPY", "RUNNING", "RUNNING_P2P", "RUNNING RUNNING_P2P"),
        ("STOP_COPY|P2P|PRE_COPY", "RUNNING", "PRE_COPY", "RUNNING PRE_COPY"),
        ("STOP_COPY|P2P|PRE_COPY", "RUNNING", "PRE_COPY_P2P", "RUNNING RUNNING_P2P PRE_COPY_P2P"),
        ("STOP_COPY|P2P|PRE_COPY", "STOP_COPY", "STOP", "STOP_COPY STOP"),
        ("STOP_COPY|P2P|PRE_COPY", "STOP_COPY", "RUNNING", "STOP_COPY STOP RUNNING_P2P RUNNING"),
        ("STOP_COPY|P2P|PRE_COPY", "STOP_COPY", "RESUMING", "STOP_COPY STOP RESUMING"),
        ("STOP_COPY|P2P|PRE_COPY", "STOP_COPY", "RUNNING_P2P", "STOP_COPY STOP RUNNING_P2P"),
        ("STOP_COPY|P2P|PRE_COPY", "STOP_COPY", "PRE_COPY", nil),
        ("STOP_COPY|P2P|PRE_COPY", "STOP_COPY", "PRE_COPY_P2P", nil),
        ("STOP_COPY|P2P|PRE_COPY", "RESUMING", "STOP", "RESUMING STOP"),
        ("STOP_COPY|P2P|PRE_COPY", "RESUMING", "RUNNING", "RESUMING STOP RUNNING_P2P RUNNING"),
        ("STOP_COPY|P2P|PRE_COPY", "RESUMING", "STOP_COPY", "RESUMING STOP STOP_COPY"),
        ("STOP_COPY|P2P|PRE_COPY", "RESUMING", "RUNNING_P2P", "RESUMING STOP RUNNING_P2P"),
        ("STOP_COPY|P2P|PRE_COPY", "RESUMING", "PRE_COPY", "RESUMING STOP RUNNING_P2P RUNNING PRE_COPY"),
        ("STOP_COPY|P2P|PRE_COPY", "RESUMING", "PRE_COPY_P2P", "RESUMING STOP RUNNING_P2P PRE_COPY_P2P"),
        ("STOP_COPY|P2P|PRE_COPY", "RUNNING_P2P", "STOP", "RUNNING_P2P STOP"),
        ("STOP_COPY|P2P|PRE_COPY", "RUNNING_P2P", "RUNNING", "RUNNING_P2P RUNNING"),
        ("STOP_COPY|P2P|PRE_COPY", "RUNNING_P2P", "STOP_COPY", "RUNNING_P2P STOP STOP_COPY"),
        ("STOP_COPY|P2P|PRE_COPY", "RUNNING_P2P", "RESUMING", "RUNNING_P2P STOP RESUMING"),
        ("STOP_COPY|P2P|PRE_COPY", "RUNNING_P2P", "PRE_COPY", "RUNNING_P2P RUNNING PRE_COPY"),
        ("STOP_COPY|P2P|PRE_COPY", "RUNNING_P2P", "PRE_COPY_P2P", "RUNNING_P2P PRE_COPY_P2P"),
        ("STOP_COPY|P2P|PRE_COPY", "PRE_COPY", "STOP", "PRE_COPY RUNNING RUNNING_P2P STOP"),
        ("STOP_COPY|P2P|PRE_COPY", "PRE_COPY", "RUNNING", "PRE_COPY RUNNING"),
        ("STOP_COPY|P2P|PRE_COPY", "PRE_COPY", "STOP_COPY", "PRE_COPY PRE_COPY_P2P STOP_COPY"),
        ("STOP_COPY|P2P|PRE_COPY", "PRE_COPY", "RESUMING", "PRE_COPY RUNNING RUNNING_P2P STOP RESUMING"),
        ("STOP_COPY|P2P|PRE_COPY", "PRE_COPY", "RUNNING_P2P", "PRE_COPY RUNNING RUNNING_P2P"),
        ("STOP_COPY|P2P|PRE_COPY", "PRE_COPY", "PRE_COPY_P2P", "PRE_COPY PRE_COPY_P2P"),
        ("STOP_COPY|P2P|PRE_COPY", "PRE_COPY_P2P", "STOP", "PRE_COPY_P2P RUNNING_P2P STOP"),
        ("STOP_COPY|P2P|PRE_COPY", "PRE_COPY_P2P", "RUNNING", "PRE_COPY_P2P RUNNING_P2P RUNNING"),
        ("STOP_COPY|P2P|PRE_COPY", "PRE_COPY_P2P", "STOP_COPY", "PRE_COPY_P2P STOP_COPY"),
        ("STOP_COPY|P2P|PRE_COPY", "PRE_COPY_P2P", "RESUMING", "PRE_COPY_P2P RUNNING_P2P STOP RESUMING"),
        ("STOP_COPY|P2P|PRE_COPY", "PRE_COPY_P2P", "RUNNING_P2P", "PRE_COPY_P2P RUNNING_P2P"),
        ("STOP_COPY|P2P|PRE_COPY", "PRE_COPY_P2P", "PRE_COPY", "PRE_COPY_P2P PRE_COPY"),    ]

    func capabilities(_ s: String) -> MigrationCapabilities {
        var c: MigrationCapabilities = []
        for part in s.split(separator: "|") {
            switch part {
            case "STOP_COPY": c.insert(.stopCopy)
            case "P2P": c.insert(.p2p)
            case "PRE_COPY": c.insert(.preCopy)
            default: XCTFail("unknown flag \(part)")
            }
        }
        return c
    }

    func testEveryPathMatchesTheKernel() throws {
        XCTAssertEqual(Self.vectors.count, 94)
        for (flags, from, to, expected) in Self.vectors {
            let caps = capabilities(flags)
            let f = try XCTUnwrap(MigrationState(name: from)), t = try XCTUnwrap(MigrationState(name: to))
            if let expected {
                let path = try MigrationFSM.path(from: f, to: t, capabilities: caps)
                XCTAssertEqual(path.map(\.description).joined(separator: " "), expected, "\(flags): \(from) -> \(to)")
            } else {
                XCTAssertThrowsError(try MigrationFSM.path(from: f, to: t, capabilities: caps), "\(flags): \(from) -> \(to) must be refused") {
                    XCTAssertEqual($0 as? MigrationTransitionError, .noPath(from: f, to: t))
                }
            }
        }
    }

    func testUnsupportedAndErrorStatesAreRefused() {
        let basic: MigrationCapabilities = [.stopCopy]
        XCTAssertThrowsError(try MigrationFSM.nextState(from: .running, to: .preCopy, capabilities: basic))
        XCTAssertThrowsError(try MigrationFSM.nextState(from: .running, to: .error, capabilities: basic))
        XCTAssertThrowsError(try MigrationFSM.nextState(from: .error, to: .running, capabilities: basic))
        XCTAssertThrowsError(try MigrationFSM.nextState(from: .running, to: .runningP2P, capabilities: [.stopCopy, .preCopy]))
    }

    func testSavingStatesOnlyAtPathEnds() throws {
        for caps: MigrationCapabilities in [[.stopCopy], [.stopCopy, .p2p], [.stopCopy, .preCopy], [.stopCopy, .p2p, .preCopy]] {
            for f in MigrationState.allCases where MigrationFSM.isSupported(f, by: caps) {
                for t in MigrationState.allCases where MigrationFSM.isSupported(t, by: caps) && t != f {
                    guard let p = try? MigrationFSM.path(from: f, to: t, capabilities: caps) else { continue }
                    // A saving state mid-path only inside the session the path starts in
                    // (PRE_COPY → PRE_COPY_P2P → STOP_COPY keeps one data fd).
                    if !f.isSaving { XCTAssertFalse(p.dropFirst().dropLast().contains { $0.isSaving }, "\(caps): \(p)") }
                    else { XCTAssertTrue(p.prefix { $0.isSaving }.count >= p.dropLast().filter { $0.isSaving }.count, "\(caps): \(p)") }
                }
            }
        }
    }

    func testV1BitsMapToV2States() {
        XCTAssertEqual(MigrationV1State(rawValue: 1).v2, .running)
        XCTAssertEqual(MigrationV1State(rawValue: 3).v2, .preCopy)
        XCTAssertEqual(MigrationV1State(rawValue: 2).v2, .stopCopy)
        XCTAssertEqual(MigrationV1State(rawValue: 0).v2, .stop)
        XCTAssertEqual(MigrationV1State(rawValue: 4).v2, .resuming)
        XCTAssertTrue(MigrationV1State(rawValue: 6).isError)
        XCTAssertFalse(MigrationV1State(rawValue: 5).isValid)
        XCTAssertFalse(MigrationV1State(rawValue: 7).isValid)
        XCTAssertNil(MigrationV1State(rawValue: 5).v2)
        for s in [MigrationState.running, .preCopy, .stopCopy, .stop, .resuming] {
            XCTAssertEqual(MigrationV1State(v2: s)?.v2, s)
        }
    }
}

final class DirtyBitmapTests: XCTestCase {
    func testLayoutIsWordNOver64BitNMod64() {
        let b = DirtyBitmap(pageSize: 4096, length: 200 * 4096)
        b.mark(offset: 70 * 4096 + 5, length: 1)
        b.mark(offset: 3 * 4096, length: 4096 * 2)  // pages 3 and 4
        let w = b.takeWords()
        XCTAssertEqual(w.count, 4)
        XCTAssertEqual(w[0], (1 << 3) | (1 << 4))
        XCTAssertEqual(w[1], 1 << 6)
        XCTAssertEqual(b.dirtyCount, 0, "take clears")
        XCTAssertEqual([UInt64](littleEndianBitmap: w.littleEndianBytes[...]), w)
    }

    func testReportAtOtherPageSizesReplicatesOrORs() {
        let b = DirtyBitmap(pageSize: 4096, length: 64 * 4096)
        b.mark(offset: 5 * 4096, length: 1)
        // Larger report pages OR bits: page 5 of 4 KiB lies in 16 KiB page 1.
        XCTAssertEqual(b.take(offset: 0, length: 64 * 4096, reportPageSize: 16384), [1 << 1])
        b.mark(offset: 5 * 4096, length: 1)
        // A sub-range re-bases to its own bit 0.
        XCTAssertEqual(b.take(offset: 4 * 4096, length: 8 * 4096, reportPageSize: 4096), [1 << 1])
    }

    func testScanAndClearHelpers() {
        let b = DirtyBitmap(pageSize: 4096, length: 1000 * 4096)
        XCTAssertNil(b.firstDirtyPage())
        b.mark(offset: 777 * 4096, length: 1)
        b.mark(offset: 130 * 4096, length: 1)
        XCTAssertEqual(b.firstDirtyPage(), 130)
        XCTAssertEqual(b.firstDirtyPage(from: 131), 777)
        XCTAssertEqual(b.dirtyGroupCount(pagesPerGroup: 16), 2)
        XCTAssertTrue(b.clear(firstPage: 128, count: 16))
        XCTAssertFalse(b.clear(firstPage: 128, count: 16))
        XCTAssertEqual(b.firstDirtyPage(), 777)
    }

    func testChecksumDetectsSingleBitFlipsAndIsStable() {
        var data = [UInt8](repeating: 0, count: 4099)
        for i in data.indices { data[i] = UInt8(truncatingIfNeeded: i * 7) }
        let base = data.withUnsafeBytes { Checksum.of($0) }
        XCTAssertEqual(base, data.withUnsafeBytes { Checksum.of($0) })
        for i in stride(from: 0, to: data.count, by: 97) {
            data[i] ^= 0x10
            XCTAssertNotEqual(data.withUnsafeBytes { Checksum.of($0) }, base, "flip at \(i)")
            data[i] ^= 0x10
        }
    }
}

final class DirtyTrackingChoiceTests: XCTestCase {
    func testDeviceLoggingThenIOMMUThenAllDirtyOnlyWhenAllowed() throws {
        XCTAssertEqual(try DirtyTrackingMethod.choose(deviceLogging: [true, true], iommuDirtyTracking: true, allowUntracked: false), .deviceLogging)
        XCTAssertEqual(try DirtyTrackingMethod.choose(deviceLogging: [true, false], iommuDirtyTracking: true, allowUntracked: false), .iommu)
        XCTAssertThrowsError(try DirtyTrackingMethod.choose(deviceLogging: [true, false], iommuDirtyTracking: false, allowUntracked: false)) { e in
            XCTAssertEqual(e as? DirtyTrackingBlocker, DirtyTrackingBlocker(devices: "1"))
        }
        XCTAssertEqual(try DirtyTrackingMethod.choose(deviceLogging: [false], iommuDirtyTracking: false, allowUntracked: true), .allDirty)
    }
}
