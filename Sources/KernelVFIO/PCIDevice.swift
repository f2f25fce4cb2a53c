import Glibc
import SystemCalls

/// A PCI device found through sysfs: its IOMMU group, its driver, its VFIO cdev. Binding to
/// vfio-pci goes through driver_override, as the kernel documents.
public struct PCIDevice: Sendable, CustomStringConvertible {
    public let address: String  // 0000:00:03.0
    public var path: String { "/sys/bus/pci/devices/\(address)" }
    public var description: String { address }

    public init(address: String) { self.address = address }

    static func write(_ path: String, _ value: String) throws {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw KernelVFIOError.unavailable("cannot open \(path): \(Errno.current)") }
        defer { close(fd) }
        let n = value.withCString { Glibc.write(fd, $0, strlen($0)) }
        guard n >= 0 else { throw KernelVFIOError.unavailable("writing '\(value)' to \(path): \(Errno.current)") }
    }

    /// Every PCI device with this vendor and device id.
    public static func find(vendor: UInt16, device: UInt16) -> [PCIDevice] {
        (directoryEntryNames("/sys/bus/pci/devices") ?? []).map(PCIDevice.init(address:)).filter { d in
            readKernelFileLine("\(d.path)/vendor") == "0x" + hex4(vendor) && readKernelFileLine("\(d.path)/device") == "0x" + hex4(device)
        }.sorted { $0.address < $1.address }
    }

    static func hex4(_ v: UInt16) -> String { let s = String(v, radix: 16); return String(repeating: "0", count: 4 - s.count) + s }

    static func linkName(_ path: String) -> String? { readLink(path)?.split(separator: "/").last.map(String.init) }

    /// The IOMMU group number (nil without an IOMMU).
    public var iommuGroup: Int? { Self.linkName("\(path)/iommu_group").flatMap { Int($0) } }
    /// The bound driver's name.
    public var driver: String? { Self.linkName("\(path)/driver") }
    /// The VFIO device cdev (/dev/vfio/devices/vfioN) when bound to vfio-pci with cdev support.
    public var cdev: String? {
        directoryEntryNames("\(path)/vfio-dev")?.first { $0.hasPrefix("vfio") }.map { "/dev/vfio/devices/\($0)" }
    }

    /// Bind to vfio-pci (unbinding the current driver first); a no-op if already bound.
    public func bindToVFIOPCI() throws {
        if driver == "vfio-pci" { return }
        try Self.write("\(path)/driver_override", "vfio-pci")
        if driver != nil { try Self.write("\(path)/driver/unbind", address) }
        try Self.write("/sys/bus/pci/drivers_probe", address)
        guard driver == "vfio-pci" else { throw KernelVFIOError.unavailable("\(address) did not bind to vfio-pci (driver: \(driver ?? "none"))") }
    }
}
