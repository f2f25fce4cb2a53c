// swift-tools-version:6.0
// vfio-live: live migration and live update of VMs with VFIO-assigned devices.
// Layers depend one way: CVFIOLive → SystemCalls → VFIO → VFIOUser → Devices | Machine →
// Migration → LiveUpdate → Control → tool.
import PackageDescription

let package = Package(
    name: "vfio-live",
    products: [
        .executable(name: "vfio-live", targets: ["vfio-live"]),
        .library(name: "VFIOUser", targets: ["VFIOUser"]),
        .library(name: "Devices", targets: ["Devices"]),
        .library(name: "Migration", targets: ["Migration"]),
        .library(name: "LiveUpdate", targets: ["LiveUpdate"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // Kernel UAPI layouts (vfio, iommufd) with compile-time layout checks, and the few
        // calls Swift cannot make itself: variadic ioctl, SCM_RIGHTS cmsg handling, memfd.
        .target(name: "CVFIOLive"),
        // Typed file descriptors, Errno, EINTR-retrying wrappers, mmap, memfd, eventfd, sockets.
        .target(name: "SystemCalls", dependencies: ["CVFIOLive"]),
        // Transport-neutral VFIO model: migration state machine, dirty bitmaps, device interface.
        .target(name: "VFIO", dependencies: ["SystemCalls"]),
        // vfio-user: codec, connection framing with fd passing, server framework, client.
        .target(name: "VFIOUser", dependencies: ["VFIO", "SystemCalls", "CVFIOLive"]),
        // The KVM micro-VM host: memfd guest RAM, vCPUs, MMIO routing, the guest workload and
        // its integrity verifier, and a software-vCPU fallback.
        .target(name: "Machine", dependencies: ["VFIOUser", "VFIO", "SystemCalls", "CVFIOLive"]),
        // Live migration: the stream, pre-copy of RAM and device state, channels, statistics.
        .target(name: "Migration", dependencies: ["Machine", "VFIOUser", "VFIO", "SystemCalls"]),
        // Live update of the VMM process (cpr-transfer, cpr-exec): the CPR state (descriptors
        // by name, typed records), handing the VM over, adopting it, rolling back.
        .target(name: "LiveUpdate", dependencies: ["KernelVFIO", "Migration", "Machine", "VFIOUser", "VFIO", "SystemCalls"]),
        // The QMP-compatible control socket and the VMM that answers it.
        .target(name: "Control", dependencies: ["LiveUpdate", "Migration", "Machine", "VFIOUser", "VFIO", "SystemCalls"]),
        // Kernel VFIO: legacy container/group/device and iommufd with the device cdev, PCI
        // discovery through sysfs; the VMM side of a passthrough device.
        .target(name: "KernelVFIO", dependencies: ["VFIO", "SystemCalls", "CVFIOLive"]),
        // Device models served over vfio-user.
        .target(name: "Devices", dependencies: ["VFIOUser", "VFIO", "SystemCalls", "CVFIOLive"]),
        .executableTarget(
            name: "vfio-live",
            dependencies: [
                "Devices", "Control", "LiveUpdate", "KernelVFIO", "Machine", "Migration", "VFIOUser", "VFIO", "SystemCalls",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        .testTarget(name: "SystemCallsTests", dependencies: ["SystemCalls", "CVFIOLive"]),
        .testTarget(name: "VFIOTests", dependencies: ["VFIO"]),
        .testTarget(name: "MachineTests", dependencies: ["Machine", "Devices", "VFIOUser", "VFIO", "SystemCalls"]),
        .testTarget(name: "KernelVFIOTests", dependencies: ["KernelVFIO", "LiveUpdate", "Migration", "Machine", "SystemCalls", "VFIO", "CVFIOLive"]),
        .testTarget(name: "LiveUpdateTests", dependencies: ["LiveUpdate", "Control", "Migration", "Machine", "Devices", "VFIOUser", "VFIO", "SystemCalls"]),
        .testTarget(name: "ControlTests", dependencies: ["Control", "Migration", "Machine", "Devices", "VFIOUser", "VFIO", "SystemCalls"]),
        .testTarget(name: "MigrationTests", dependencies: ["Migration", "Machine", "Devices", "VFIOUser", "VFIO", "SystemCalls"]),
        .testTarget(name: "VFIOUserTests", dependencies: ["VFIOUser", "Devices", "VFIO", "SystemCalls", "CVFIOLive"]),
    ],
    swiftLanguageModes: [.v5]
)
