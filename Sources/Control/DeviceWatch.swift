import Glibc
import SystemCalls

/// Watches the VM's device connections for a hang-up: a vfio-user server that dies (or closes
/// the connection) under a running VM. It only polls for POLLHUP/POLLRDHUP/POLLERR, never
/// reads, so it neither races the client's own reads nor disturbs a connection that is being
/// handed to a successor VMM (live update). A descriptor that this process closed itself
/// (POLLNVAL) is dropped from the watch silently.
final class DeviceWatch: @unchecked Sendable {
    /// <poll.h>'s POLLRDHUP (a GNU extension Glibc's module leaves out).
    static let pollRDHUP: Int32 = 0x2000

    private let stopEvent: EventFD
    private var thread: OSThread?

    /// Each entry is a device's index and its socket; `onLost(device, why)` runs once per
    /// device, on the watch thread.
    init(fds: [(device: Int, fd: Int32)], onLost: @escaping @Sendable (Int, String) -> Void) throws {
        let stop = try EventFD(nonBlocking: true)
        stopEvent = stop
        let stopFD = stop.fd.rawValue
        thread = try OSThread(name: "device-watch") {
            var watched = fds
            while !watched.isEmpty {
                var ps = watched.map { pollfd(fd: $0.fd, events: Int16(DeviceWatch.pollRDHUP), revents: 0) }
                ps.append(pollfd(fd: stopFD, events: Int16(POLLIN), revents: 0))
                let n = poll(&ps, nfds_t(ps.count), -1)
                if n < 0 { if errno == EINTR { continue }; return }
                if ps[ps.count - 1].revents != 0 { return }
                var keep: [(device: Int, fd: Int32)] = []
                for (k, w) in watched.enumerated() {
                    let r = Int32(ps[k].revents)
                    if r & Int32(POLLNVAL) != 0 { continue }
                    if r & (Int32(POLLHUP) | DeviceWatch.pollRDHUP | Int32(POLLERR)) != 0 {
                        let why = r & Int32(POLLERR) != 0 ? "its connection failed (socket error)" : "its server closed the connection (the device server died or hung up)"
                        onLost(w.device, why)
                        continue
                    }
                    keep.append(w)
                }
                watched = keep
            }
        }
    }

    func stop() {
        try? stopEvent.signal()
        thread?.join()
        thread = nil
    }

    deinit { stop() }
}
