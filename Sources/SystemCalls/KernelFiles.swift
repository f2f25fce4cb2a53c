import Glibc

/// The names in directory `path` (sysfs, /proc), without the entries that start with "."; nil
/// when it cannot be opened.
public func directoryEntryNames(_ path: String) -> [String]? {
    guard let dir = opendir(path) else { return nil }
    defer { closedir(dir) }
    var out: [String] = []
    while let e = readdir(dir) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        if !name.hasPrefix(".") { out.append(name) }
    }
    return out
}

/// The first line of a small kernel file (a sysfs attribute, a /proc entry), without its
/// newline; nil when it cannot be read.
public func readKernelFileLine(_ path: String) -> String? {
    guard let f = fopen(path, "re") else { return nil }
    defer { fclose(f) }
    var buf = [CChar](repeating: 0, count: 256)
    guard fgets(&buf, Int32(buf.count), f) != nil else { return nil }
    let s = String(cString: buf)
    return s.hasSuffix("\n") ? String(s.dropLast()) : s
}
