import Glibc

/// Starting and watching child processes (a live update's successor VMM).
public enum ChildProcess {
    /// posix_spawn `path` with `argv` (argv[0] included); the child inherits stdin, stdout and
    /// stderr, and no descriptor marked close-on-exec.
    /// `extraEnvironment` ("NAME=value") is added to this process's environment.
    public static func spawn(_ path: String, _ argv: [String], extraEnvironment: [String] = []) throws -> pid_t {
        var pid: pid_t = 0
        let cargs = argv.map { strdup($0) } + [nil]
        var env: [UnsafeMutablePointer<CChar>?] = extraEnvironment.map { strdup($0) }
        var i = 0
        while let e = environ[i] { env.append(strdup(e)); i += 1 }
        env.append(nil)
        defer { for p in cargs { free(p) }; for e in env { free(e) } }
        let rc = posix_spawn(&pid, path, nil, nil, cargs, env)
        guard rc == 0 else { throw Errno(rc) }
        return pid
    }

    /// The child's exit status if it has ended (reaping it), nil while it runs.
    public static func exitStatus(_ pid: pid_t) -> Int32? {
        var st: Int32 = 0
        guard waitpid(pid, &st, WNOHANG) == pid else { return nil }
        if st & 0x7f == 0 { return (st >> 8) & 0xff }
        return 128 + (st & 0x7f)
    }

    /// execv `path` with `argv` (argv[0] included) in this process. Returns only if exec failed,
    /// with the reason; the caller is still running and must undo what it prepared.
    public static func replaceImage(_ path: String, _ argv: [String]) -> Errno {
        let cargs = argv.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        execv(path, cargs)
        return Errno.current
    }

    /// Wait for the child to end; its exit status.
    @discardableResult
    public static func wait(_ pid: pid_t) -> Int32 {
        var st: Int32 = 0
        while waitpid(pid, &st, 0) < 0 && errno == EINTR {}
        return st & 0x7f == 0 ? (st >> 8) & 0xff : 128 + (st & 0x7f)
    }

    /// This process's own executable (for re-exec and for spawning a successor of the same build).
    public static func currentExecutable() -> String { readLink("/proc/self/exe") ?? CommandLine.arguments[0] }

    /// `name` in the folder that holds this process's executable, or the .xctest bundle it
    /// runs from (tests start the `vfio-live` built beside them).
    public static func besideCurrentExecutable(_ name: String) -> String {
        var path = currentExecutable()
        // Inside a bundle (…/X.xctest/Contents/…): start from the bundle itself.
        var parts = path.split(separator: "/", omittingEmptySubsequences: false)
        if let b = parts.firstIndex(where: { $0.hasSuffix(".xctest") }) { parts = Array(parts[...b]); path = parts.joined(separator: "/") }
        guard let slash = path.lastIndex(of: "/") else { return name }
        return String(path[..<slash]) + "/" + name
    }
}

/// The target of a symbolic link (a /proc or sysfs link), nil if `path` is not one.
public func readLink(_ path: String) -> String? {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink(path, &buf, buf.count - 1)
    return n > 0 ? String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : nil
}
