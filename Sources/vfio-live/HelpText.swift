/// `--help` discussions are written as source text, wrapped near 90 columns; ArgumentParser
/// wraps every line at the terminal's width but keeps our line breaks, so a paragraph came out
/// with a short line after every long one. This turns the source text into what reads well:
/// a paragraph becomes one line (ArgumentParser wraps it at the terminal's width); an indented
/// block (a table of options, an example command) is wrapped here at `width` with its hanging
/// indent, and a command broken over lines gets a shell continuation (" \").
enum HelpText {
    static func reflow(_ text: String, width: Int = 78) -> String {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        var out: [String] = []
        var i = 0
        func indent(_ s: String) -> Int { s.prefix { $0 == " " }.count }
        while i < lines.count {
            let line = lines[i]
            if line.trimmingSpaces.isEmpty { out.append(""); i += 1; continue }
            let k = indent(line)
            if k == 0 {
                // A paragraph: lines up to a blank one, an indented one, or a line that ends in
                // ":" (it introduces what follows) or starts a list item.
                var p = line
                i += 1
                while i < lines.count, !lines[i].trimmingSpaces.isEmpty, indent(lines[i]) == 0,
                      !p.hasSuffix(":"), !lines[i].hasPrefix("- ") {
                    p += " " + lines[i]
                    i += 1
                }
                out.append(p)
                continue
            }
            // An indented item and its deeper-indented continuation lines.
            var more: [String] = []
            var hang: Int?
            let first = i
            i += 1
            while i < lines.count, !lines[i].trimmingSpaces.isEmpty, indent(lines[i]) > k {
                hang = indent(lines[i])
                more += lines[i].split(separator: " ").map(String.init)
                i += 1
            }
            let command = line.dropFirst(k).hasPrefix("vfio-live ")
            let chars = Array(line)
            if line.hasSuffix("\\") {
                // A command its author broke over lines already.
                out += lines[first..<i]
                continue
            }
            if let h = hang {
                if h < chars.count, h >= 2, chars[h - 1] == " ", chars[h - 2] == " ", chars[h] != " " {
                    // The text starts at the hanging column: keep the term and its padding.
                    out += wrap(head: String(chars[..<h]).trimmingTrailingSpaces,
                                words: String(chars[h...]).split(separator: " ").map(String.init) + more,
                                hang: h, width: width, command: false)
                } else {
                    // The term is wider than the column: it keeps its line, the text goes below.
                    out += item(line, k: k, width: width, command: command)
                    out += wrap(head: "", words: more, hang: h, width: width, command: false)
                }
            } else {
                out += item(line, k: k, width: width, command: command)
            }
        }
        return out.joined(separator: "\n")
    }

    /// One indented line: as it is when it fits; else wrapped with the hanging column where its
    /// aligned text starts (after a run of two spaces), or four columns in.
    static func item(_ line: String, k: Int, width: Int, command: Bool) -> [String] {
        guard line.count > width else { return [line] }
        let chars = Array(line)
        var h = k + 4
        var j = k
        while j + 2 < chars.count {
            if chars[j] == " " && chars[j + 1] == " " && chars[j + 2] != " " { h = j + 2; break }
            j += 1
        }
        if h != k + 4 {
            return wrap(head: String(chars[..<h]).trimmingTrailingSpaces, words: String(chars[h...]).split(separator: " ").map(String.init),
                        hang: h, width: width, command: command)
        }
        let parts = line.dropFirst(k).split(separator: " ").map(String.init)
        return wrap(head: String(repeating: " ", count: k) + (parts.first ?? ""), words: Array(parts.dropFirst()), hang: h, width: width, command: command)
    }

    /// `head` then `words`, broken at spaces so that no line passes `width` (a word longer than
    /// the room left gets a line of its own); continuation lines start at column `hang`.
    static func wrap(head: String, words: [String], hang: Int, width: Int, command: Bool) -> [String] {
        let mark = command ? " \\" : ""
        var lines: [String] = []
        var current = head
        for w in words {
            let sep = current.count < hang ? String(repeating: " ", count: hang - current.count) : " "
            if current.count + sep.count + w.count + mark.count > width && current.trimmingSpaces.count > 0 && current.count > hang {
                lines.append(current + mark)
                current = String(repeating: " ", count: hang) + w
            } else {
                current += sep + w
            }
        }
        lines.append(current)
        return lines
    }
}

extension String {
    var trimmingSpaces: String { String(drop { $0 == " " }).trimmingTrailingSpaces }
    var trimmingTrailingSpaces: String {
        var s = Substring(self)
        while s.last == " " { s = s.dropLast() }
        return String(s)
    }
}
