import Glibc
import SystemCalls
import VFIOUser

/// A dma-engine served over a real UNIX socket from a background thread of this process:
/// what the benchmarks, the demo's checks and the tests run against when a second process is
/// not the point.
public final class InProcessServer: @unchecked Sendable {
    public let path: String
    public let device: DMAEngine
    public let server: VFIOUserServer
    private let listener: UnixListener
    private var thread: OSThread?

    public init(path: String, stateSize: UInt64 = 16 << 20, options: VFIOUserServer.Options = .init(), name: String = "dma-engine") throws {
        self.path = path
        device = try DMAEngine(stateSize: stateSize)
        server = try VFIOUserServer(device: device, name: name, options: options)
        listener = try UnixListener(path: path)
        thread = try OSThread(name: "vfu-server") { [server, listener] in server.serve(listener: listener) }
    }

    public func stop() {
        server.stop()
        thread?.join()
        thread = nil
        listener.close()
        device.shutdown()
    }

    deinit { stop() }

    /// A socket path in /tmp that no one else uses.
    public static func temporaryPath(_ tag: String) -> String {
        "/tmp/vfio-live-\(getpid())-\(tag)-\(UInt32.random(in: 0...UInt32.max)).sock"
    }
}
