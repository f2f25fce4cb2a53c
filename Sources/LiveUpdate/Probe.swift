import Glibc
import SystemCalls

/// Before a VMM hands its VM to a new binary (exec in place, or a spawned successor), it asks
/// the binary whether it can take a VM over: `BINARY --cpr-probe` must print `answer` (which
/// names the CPR state version) and exit 0 within a bound. Anything else (/bin/false, a
/// script, another program, an incompatible build, a binary that hangs) is refused before the
/// guest is touched: after exec there is no way back.
public enum CPRProbe {
    public static let flag = "--cpr-probe"
    public static var answer: String { "vfio-live cpr-probe: takes a VM over with CPR state version \(CPRState.version)" }

    /// In a VMM's main, before argument parsing: answer the probe and exit.
    public static func answerIfAsked(_ args: [String] = CommandLine.arguments) {
        guard args.count == 2, args[1] == flag else { return }
        print(answer)
        fflush(stdout)
        exit(0)
    }

    /// Run `binary --cpr-probe` (stdin and stderr on /dev/null, stdout read back) and check the
    /// answer. The probe is killed and reaped if it takes longer than the bound: 15 s, because
    /// a debug binary started on a loaded machine (the lab's TCG guest, with two VMMs running)
    /// took more than 5 s to answer, and a refused update costs the operator more than a wait.
    public static let defaultTimeoutMilliseconds: Int32 = 15_000

    /// `timeoutMilliseconds` is the bound (at least the default, when the VMM's peer timeout
    /// is longer: see VirtualMachineManager.startLiveUpdate).
    public static func check(binary: String, timeoutMilliseconds: Int32 = defaultTimeoutMilliseconds) throws {
        guard access(binary, X_OK) == 0 else { throw CPRError.blocked("\(binary) is not executable (\(Errno.current))") }
        var p: [Int32] = [-1, -1]
        guard pipe(&p) == 0 else { throw CPRError.blocked("probing \(binary): pipe: \(Errno.current)") }
        _ = fcntl(p[0], F_SETFD, FD_CLOEXEC); _ = fcntl(p[1], F_SETFD, FD_CLOEXEC)
        let readEnd = FileDescriptor(adopting: p[0])
        defer { readEnd.close() }
        var fa = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fa)
        defer { posix_spawn_file_actions_destroy(&fa) }
        posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&fa, p[1], 1)
        posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0)
        let cargs: [UnsafeMutablePointer<CChar>?] = [strdup(binary), strdup(flag), nil]
        defer { for c in cargs { free(c) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, binary, &fa, nil, cargs, environ)
        close(p[1])
        guard rc == 0 else { throw CPRError.blocked("cannot start \(binary): \(Errno(rc))") }
        var out: [UInt8] = []
        var timedOut = false
        let deadline = monotonicNanoseconds() + UInt64(timeoutMilliseconds) * 1_000_000
        var chunk = [UInt8](repeating: 0, count: 512)
        while out.count < 4096 {
            let now = monotonicNanoseconds()
            guard now < deadline else { timedOut = true; break }
            let left = Int32((deadline - now) / 1_000_000) + 1
            guard (try? Poll.waitReadable(readEnd, timeoutMilliseconds: left)) == true else { continue }
            let n = (try? chunk.withUnsafeMutableBytes { try readEnd.read(into: $0) }) ?? 0
            if n <= 0 { break }
            out += chunk[0..<n]
        }
        if timedOut { kill(pid, SIGKILL) }
        let status = ChildProcess.wait(pid)
        let line = String(decoding: out.prefix { $0 != 10 }, as: UTF8.self)
        if timedOut { throw CPRError.blocked("\(binary) \(flag) did not answer within \(timeoutMilliseconds) ms (killed); it is not a vfio-live VMM") }
        guard status == 0, line == answer else {
            let said = line.isEmpty ? "nothing" : "'\(line.prefix(120))'"
            if line.hasPrefix("vfio-live cpr-probe:") {
                throw CPRError.blocked("\(binary) cannot take this VM over: it answered \(said), this VMM needs '\(answer)'")
            }
            throw CPRError.blocked("\(binary) is not a vfio-live VMM: to \(flag) it answered \(said) and exited with status \(status)")
        }
    }
}

/// Bound every blocking send and receive on a CPR socket: a peer that stops reading or
/// writing (SIGSTOP, a hang) makes the call fail with EAGAIN instead of waiting forever.
public func setSocketTimeouts(_ fd: FileDescriptor, milliseconds: Int32) {
    var tv = timeval(tv_sec: Int(milliseconds / 1000), tv_usec: Int(milliseconds % 1000) * 1000)
    _ = setsockopt(fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    _ = setsockopt(fd.rawValue, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
}
