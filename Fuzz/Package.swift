// swift-tools-version:6.0
// libFuzzer harnesses for vfio-live's decoders. Built with special flags, so they live in
// their own package:  scripts/fuzz.sh  (or see README).
import PackageDescription

let package = Package(
    name: "vfio-live-fuzz",
    dependencies: [.package(name: "vfio-live", path: "..")],
    targets: [
        .executableTarget(
            name: "VFIOUserFuzz",
            dependencies: [.product(name: "VFIOUser", package: "vfio-live"), .product(name: "Devices", package: "vfio-live"),
                           .product(name: "Migration", package: "vfio-live"), .product(name: "LiveUpdate", package: "vfio-live")],
            // The sanitizer flags come from scripts/fuzz.sh (-Xswiftc/-Xcc), so that the libraries
            // under test are instrumented for coverage too, not only this target.
            swiftSettings: [.unsafeFlags(["-parse-as-library"])]),
        // The stateful fuzzer: a real server and dma-engine driven through command sequences.
        .executableTarget(
            name: "ServerFuzz",
            dependencies: [.product(name: "VFIOUser", package: "vfio-live"), .product(name: "Devices", package: "vfio-live")],
            swiftSettings: [.unsafeFlags(["-parse-as-library"])]),
    ],
    swiftLanguageModes: [.v5]
)
