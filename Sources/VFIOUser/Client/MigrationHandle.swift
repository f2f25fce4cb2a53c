import SystemCalls
import VFIO

/// The vfio-user client as a transport-neutral migration handle.
extension VFIOUserClient: MigrationDeviceHandle {
    public func resetDevice() throws { try reset() }

    public func findRegion(type: UInt32, subtype: UInt32) throws -> (index: UInt32, size: UInt64)? {
        let info = try deviceInfo()
        for i in 0..<min(info.regionCount, 64) {
            guard let (r, fd) = try? regionInfo(i) else { continue }
            fd?.close()
            if let t = r.type, t.type == type, t.subtype == subtype { return (i, r.size) }
        }
        return nil
    }
}

extension VFIOUserClient: MigrationDataRelay {
    public func relayMigrationData(to destination: MigrationDeviceHandle, chunk: Int, maxBytes: UInt64, beforeWrite: (() throws -> Void)?) throws -> UInt64? {
        guard let d = destination as? VFIOUserClient else { return nil }
        return try relayMigrationData(to: d, chunk: chunk, depth: 4, maxBytes: maxBytes, beforeWrite: beforeWrite)
    }
}
