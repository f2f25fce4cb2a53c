/// How a VMM learns which guest pages assigned devices wrote during pre-copy, per container
/// (or iommufd): the devices' own DMA logging if every device has it, else the IOMMU's dirty
/// tracking, else every mapped page counts as dirty — which never converges for a busy guest,
/// so it is a migration blocker unless the user allows it (x-allow-untracked-devices).
public enum DirtyTrackingMethod: String, Equatable, Sendable {
    case deviceLogging = "device DMA logging"
    case iommu = "IOMMU dirty tracking"
    case allDirty = "all mapped pages dirty"

    /// `deviceLogging[i]`: device i supports DMA logging.
    public static func choose(deviceLogging: [Bool], iommuDirtyTracking: Bool, allowUntracked: Bool) throws -> DirtyTrackingMethod {
        if !deviceLogging.isEmpty && deviceLogging.allSatisfy({ $0 }) { return .deviceLogging }
        if iommuDirtyTracking { return .iommu }
        guard allowUntracked else {
            let without = deviceLogging.enumerated().filter { !$0.element }.map { "\($0.offset)" }.joined(separator: ", ")
            throw DirtyTrackingBlocker(devices: without)
        }
        return .allDirty
    }
}

public struct DirtyTrackingBlocker: Error, CustomStringConvertible, Equatable {
    public var devices: String
    public var description: String {
        "migration blocked: device(s) \(devices) cannot log their DMA and the IOMMU cannot track dirty pages; every mapped page would be resent each round (allow it with x-allow-untracked-devices)"
    }
}
