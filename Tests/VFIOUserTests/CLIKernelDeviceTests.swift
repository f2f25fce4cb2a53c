import Foundation
import Glibc
import XCTest

/// `vm run --device` and `device info --device` with kernel devices in QEMU's spelling
/// (issue 11 item 3), on the host (no lab): the real binary, and every wrong device names what
/// is wrong and how to fix it, with exit 64 for a bad command line and 1 for a host that
/// cannot give the device. The lab (KernelVMMProcessTests) runs the same options against real
/// devices.
final class CLIKernelDeviceTests: XCTestCase {
    let vm = ["vm", "run", "--memory", "16M", "--workload", "working-set=4M", "--duration", "1"]

    func assertRefused(_ args: [String], status: Int32, says: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try LiveProcess.run(args, killAfter: 20)
        XCTAssertEqual(r.status, status, "\(args): \(r.output)", file: file, line: line)
        for s in says { XCTAssertTrue(r.output.contains(s), "\(args) should say '\(s)': \(r.output)", file: file, line: line) }
        XCTAssertFalse(r.output.contains("Fatal error"), "\(args): \(r.output)", file: file, line: line)
    }

    /// A command-line mistake is refused before anything is opened, naming the right spelling.
    func testBadDeviceSpellingsAreRefusedWithTheRightOne() throws {
        let cases: [(String, [String])] = [
            ("vfio-pci,host=0000:00:1:0", ["host=0000:00:1:0 is not a PCI address", "DDDD:BB:DD.F", "0000:00:04.0"]),
            ("vfio-pci,host=0000:00:20.0", ["not a PCI address"]),  // device number above 0x1f
            ("vfio-pci,host=0000:00:04.8", ["not a PCI address"]),  // function above 7
            ("vfio-pci,host=zz:04.0", ["not a PCI address"]),
            // QEMU's own words when neither is given.
            ("vfio-pci", ["needs host=DDDD:BB:DD.F or sysfsdev=PATH", "No provided host device"]),
            ("vfio-pci,host=00:04.0,sysfsdev=/sys/bus/mdev/devices/x", ["not both"]),
            ("vfio-pci,sysfsdev=relative/path", ["absolute sysfs path"]),
            ("vfio-pci,host=0000:00:04.0,iommufd=yes", ["iommufd= takes on", "not 'yes'"]),
            ("vfio-pci,host=0000:00:04.0,enable-migration=maybe", ["enable-migration= takes on, off or auto"]),
            ("vfio-pci,host=0000:00:04.0,cpr=1", ["cpr= takes on or off"]),
            ("vfio-pci,host=0000:00:04.0,x-foo=1", ["unknown property 'x-foo'", "host, sysfsdev, iommufd, enable-migration, cpr"]),
            ("vfio-pci,host=0000:00:04.0,host=0000:00:05.0", ["host= is given twice"]),
            ("vfio-pci,host=0000:00:04.0,", ["is not KEY=VALUE"]),
            ("vfio-user", ["vfio-user needs socket=PATH"]),
            ("vfio-user,socket=/tmp/s,iommufd=on", ["unknown property 'iommufd'", "socket, enable-migration, cpr"]),
            ("nic,host=0000:00:04.0", ["unknown device type 'nic'", "vfio-pci,host=DDDD:BB:DD.F"]),
        ]
        for (spec, says) in cases {
            try assertRefused(vm + ["--device", spec], status: 64, says: says)
            try assertRefused(["device", "info", "--device", spec], status: 64, says: says)
        }
    }

    /// A PCI address that this host does not have: said so, with where to find the real ones.
    /// QEMU accepts the address without its domain, as does this.
    func testAnAddressThisHostDoesNotHaveIsNamed() throws {
        let missing = (0...0xff).lazy.map { String(format: "0000:%02x:1f.7", $0) }.first { access("/sys/bus/pci/devices/\($0)", F_OK) != 0 }!
        try assertRefused(vm + ["--device", "vfio-pci,host=\(missing)"], status: 1,
                          says: ["no PCI device \(missing) on this host", "lspci -D"])
        try assertRefused(["device", "info", "--device", "vfio-pci,host=\(missing.dropFirst(5)),iommufd=on"], status: 1,
                          says: ["no PCI device \(missing) on this host"])
    }

    func testANonExistentSysfsdevIsNamedWithHowToCreateAnMdev() throws {
        let uuid = UUID().uuidString.lowercased()
        try assertRefused(vm + ["--device", "vfio-pci,sysfsdev=/sys/bus/mdev/devices/\(uuid)"], status: 1,
                          says: ["no mediated device \(uuid)", "mdev_supported_types/TYPE/create"])
        try assertRefused(["device", "info", "--device", "vfio-pci,sysfsdev=/tmp"], status: 1,
                          says: ["/tmp is not a PCI or mediated device's sysfs directory"])
    }

    /// A real device of this host, on a host without VFIO (or IOMMUFD): the missing kernel
    /// part is named, not an errno from an ioctl.
    func testAHostWithoutVFIOSaysSo() throws {
        guard let dev = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/bus/pci/devices"))?.sorted().first else {
            throw XCTSkip("this host has no PCI devices in sysfs")
        }
        if access("/dev/vfio/vfio", F_OK) != 0 {
            try assertRefused(vm + ["--device", "vfio-pci,host=\(dev)"], status: 1, says: ["no /dev/vfio/vfio", "modprobe vfio-pci"])
            try assertRefused(["device", "info", "--device", "vfio-pci,host=\(dev)"], status: 1, says: ["no /dev/vfio/vfio"])
        }
        if access("/dev/iommu", F_OK) != 0 {
            try assertRefused(vm + ["--device", "vfio-pci,host=\(dev),iommufd=on"], status: 1, says: ["no /dev/iommu", "iommufd=off"])
        }
        if access("/dev/vfio/vfio", F_OK) == 0 && access("/dev/iommu", F_OK) == 0 {
            throw XCTSkip("this host has VFIO and IOMMUFD: the lab tests the other refusals")
        }
    }

    func testDeviceInfoNeedsExactlyOneDevice() throws {
        try assertRefused(["device", "info"], status: 64, says: ["--socket PATH", "--device vfio-pci,host="])
        try assertRefused(["device", "info", "--socket", "/tmp/a.sock", "--device", "vfio-pci,host=0000:00:04.0"], status: 64, says: ["not both"])
    }

    /// --help teaches the spellings with examples.
    func testHelpShowsTheKernelSpellingsWithExamples() throws {
        let r = try LiveProcess.run(["vm", "run", "--help"])
        XCTAssertEqual(r.status, 0, r.output)
        for s in ["vfio-pci,host=DDDD:BB:DD.F", "vfio-pci,sysfsdev=PATH", "iommufd=on", "--device vfio-pci,host=0000:00:04.0,iommufd=on",
                  "driver_override", "mdev_supported_types/mtty-2/create", "enable-migration=on|off|auto"] {
            XCTAssertTrue(r.output.contains(s), "vm run --help should show '\(s)': \(r.output)")
        }
        let i = try LiveProcess.run(["device", "info", "--help"])
        XCTAssertTrue(i.output.contains("device info --device vfio-pci,host=0000:00:04.0"), i.output)
    }
}
