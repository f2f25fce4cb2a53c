#!/usr/bin/env python3
"""A small vfio-user device server written from the protocol, sharing nothing with
Sources/VFIOUser/Server: the "foreign" device the VMM must attach without knowing its layout.

It is a PCI device with a layout unlike the dma-engine's:
  * vendor 1b36 device 0005, 9 regions and the 5 IRQ indexes vfio-pci has;
  * config space with a PCIe capability at 0x48 and, by --irq, MSI at 0x60 or MSI-X at 0x80
    (table and PBA in BAR0), or INTx only, or no interrupt at all;
  * BAR0: 4 KiB, trapped: 0x00 id (read-only), 0x04/0x08 scratch, 0x0c doorbell (a write counts
    and raises the interrupt), 0x10 doorbell count;
  * migration v2 (STOP_COPY only) with a small state blob holding the BAR0 registers, and DMA
    logging (the device never DMAs, so its reports are empty) -- or none with --migration off.

Usage: foreign_vfio_user_server.py SOCKET [--irq msix|msi|intx|none] [--migration v2|off]
                                          [--refuse-dma] [--edu-id] [--refuse-irq INDEX]
                                          [--cap-loop]
--edu-id gives it edu's IDs (1234:11e8) without edu's registers; --refuse-dma answers DMA_MAP
with ENOTSUP; --refuse-irq answers SET_IRQS on that IRQ index with EINVAL; --cap-loop makes the capability list point back at itself (hostile).
Stdlib only. SIGTERM ends it and removes the socket. One client at a time; the device state
survives a disconnect (the spec's rule), DMA mappings and eventfds do not.
"""
import array
import errno
import json
import os
import signal
import socket
import struct
import sys

HDR = struct.Struct("<HHIII")  # msg_id, command, msg_size, flags, error_no
VERSION, DMA_MAP, DMA_UNMAP, GET_INFO, GET_REGION_INFO, GET_REGION_IO_FDS, GET_IRQ_INFO, SET_IRQS, \
    REGION_READ, REGION_WRITE = range(1, 11)
RESET, FEATURE, MIG_DATA_READ, MIG_DATA_WRITE = 13, 16, 17, 18
REPLY, NO_REPLY, ERROR = 0x1, 0x10, 0x20
MAX_XFER = 1 << 20

# Migration states (the kernel's numbering) and the arcs a STOP_COPY-only device has.
ERROR_STATE, STOP, RUNNING, STOP_COPY, RESUMING = 0, 1, 2, 3, 4
ARCS = {(RUNNING, STOP), (STOP, RUNNING), (STOP, STOP_COPY), (STOP_COPY, STOP), (STOP, RESUMING), (RESUMING, STOP)}
BLOB_MAGIC = b"FVUS"

MSI_CAP, MSIX_CAP, PCIE_CAP = 0x60, 0x80, 0x48
BAR0_SIZE = 0x1000
MSIX_TABLE, MSIX_PBA, MSIX_VECTORS = 0x800, 0xC00, 2


class Failure(Exception):
    def __init__(self, err, why=""):
        super().__init__(why)
        self.err = err


class Device:
    def __init__(self, irq, migration, refuse_dma, edu_id):
        self.irq, self.migration, self.refuse_dma = irq, migration, refuse_dma
        self.cfg = bytearray(256)
        struct.pack_into("<HH", self.cfg, 0, *((0x1234, 0x11E8) if edu_id else (0x1B36, 0x0005)))
        self.cfg[0x08] = 0x01
        self.cfg[0x09:0x0C] = bytes([0x00, 0x00, 0xFF])      # class: unassigned
        struct.pack_into("<HH", self.cfg, 0x2C, 0x1AF4, 0x1100)
        self.cfg[0x3D] = 0 if irq == "none" else 1           # INTA# unless no interrupt at all
        first = {"msi": MSI_CAP, "msix": MSIX_CAP}.get(irq, PCIE_CAP)
        struct.pack_into("<H", self.cfg, 0x06, 0x0010)       # status: capability list
        self.cfg[0x34] = first
        self.cfg[PCIE_CAP:PCIE_CAP + 4] = bytes([0x10, 0x00, 0x02, 0x00])   # PCIe v2, endpoint
        if irq == "msi":
            self.cfg[MSI_CAP:MSI_CAP + 4] = bytes([0x05, PCIE_CAP, 0x80, 0x00])  # 64-bit, 1 vector
        if irq == "msix":
            self.cfg[MSIX_CAP:MSIX_CAP + 4] = bytes([0x11, PCIE_CAP]) + struct.pack("<H", MSIX_VECTORS - 1)
            struct.pack_into("<II", self.cfg, MSIX_CAP + 4, MSIX_TABLE | 0, MSIX_PBA | 0)
        self.bar0 = bytearray(BAR0_SIZE)
        self.reset()
        self.state = RUNNING
        self.blob, self.blob_at, self.incoming = b"", 0, bytearray()
        self.logging = None
        self.drop_client()

    def reset(self):
        self.bar0[:] = bytes(BAR0_SIZE)
        struct.pack_into("<I", self.bar0, 0, 0xF0E10001)
        for v in range(MSIX_VECTORS):
            struct.pack_into("<I", self.bar0, MSIX_TABLE + 16 * v + 12, 1)   # vectors start masked

    def drop_client(self):
        for fds in getattr(self, "irqfds", {}).values():
            for fd in fds:
                if fd is not None:
                    os.close(fd)
        self.irqfds = {}
        self.maps = []
        self.logging = None

    # ---- PCI behaviour --------------------------------------------------------------------
    def cfg_write_mask(self, o):
        if o == 0x04:
            return 0x07
        if o == 0x05:
            return 0x04
        if 0x10 <= o < 0x14:                                  # BAR0: 4 KiB, 32-bit memory
            return {0x10: 0x00, 0x11: 0xF0}.get(o, 0xFF)
        if o in (0x0C, 0x0D, 0x3C):
            return 0xFF
        if self.irq == "msi":
            if o == MSI_CAP + 2:
                return 0x71
            if MSI_CAP + 4 <= o < MSI_CAP + 14:
                return 0xFF
        if self.irq == "msix" and o == MSIX_CAP + 3:
            return 0xC0
        return 0

    def cfg_write(self, off, data):
        for i, b in enumerate(data):
            o = off + i
            if o < 256:
                m = self.cfg_write_mask(o)
                self.cfg[o] = (self.cfg[o] & ~m & 0xFF) | (b & m)

    def raise_irq(self):
        if self.state not in (RUNNING,):
            return
        cmd = struct.unpack_from("<H", self.cfg, 4)[0]
        if self.irq == "msix" and self.cfg[MSIX_CAP + 3] & 0x80 and not self.cfg[MSIX_CAP + 3] & 0x40:
            # Enabled and not function-masked. Per-vector masks live in the table, which a
            # vfio-user VMM emulates itself (as QEMU does): vector 0 fires.
            self.signal(2, 0)
        elif self.irq == "msi" and self.cfg[MSI_CAP + 2] & 1:
            self.signal(1, 0)
        elif self.irq in ("msix", "msi", "intx") and not cmd & 0x400:
            self.signal(0, 0)

    def signal(self, index, vector):
        fds = self.irqfds.get(index, [])
        if vector < len(fds) and fds[vector] is not None:
            os.write(fds[vector], struct.pack("<Q", 1))

    def bar0_read(self, off, n):
        return bytes(self.bar0[off:off + n])

    def bar0_write(self, off, data):
        end = off + len(data)
        for i, b in enumerate(data):
            o = off + i
            if o < 4:
                continue                                       # id is read-only
            self.bar0[o] = b
        if off <= 0x0C < end:
            n = struct.unpack_from("<I", self.bar0, 0x10)[0]
            struct.pack_into("<I", self.bar0, 0x10, (n + 1) & 0xFFFFFFFF)
            self.raise_irq()

    # ---- regions and IRQs -----------------------------------------------------------------
    def region_size(self, index):
        return {0: BAR0_SIZE, 7: 256}.get(index, 0)

    def irq_count(self, index):
        return {"msix": [1, 0, MSIX_VECTORS, 0, 0], "msi": [1, 1, 0, 0, 0],
                "intx": [1, 0, 0, 0, 0], "none": [0, 0, 0, 0, 0]}[self.irq][index]

    # ---- migration ------------------------------------------------------------------------
    def snapshot(self):
        regs = bytes(self.bar0[0:0x20]) + bytes(self.bar0[MSIX_TABLE:MSIX_TABLE + 16 * MSIX_VECTORS])
        return BLOB_MAGIC + struct.pack("<II", 1, len(regs)) + regs

    def restore(self, blob):
        if len(blob) < 12 or blob[:4] != BLOB_MAGIC:
            raise Failure(errno.EINVAL, "state blob has no magic")
        version, n = struct.unpack_from("<II", blob, 4)
        if version != 1 or n != 0x20 + 16 * MSIX_VECTORS or len(blob) != 12 + n:
            raise Failure(errno.EINVAL, "state blob version %d, %d bytes" % (version, len(blob)))
        regs = blob[12:]
        self.bar0[0:0x20] = regs[0:0x20]
        self.bar0[MSIX_TABLE:MSIX_TABLE + 16 * MSIX_VECTORS] = regs[0x20:]

    def set_state(self, target):
        if target == self.state:
            return
        if target not in (STOP, RUNNING, STOP_COPY, RESUMING):
            raise Failure(errno.EINVAL, "state %d is not supported" % target)
        path = [self.state] if (self.state, target) in ARCS else [self.state, STOP]
        path.append(target)
        for a, b in zip(path, path[1:]):
            if (a, b) not in ARCS:
                raise Failure(errno.EINVAL, "arc %d->%d" % (a, b))
            if b == STOP_COPY:
                self.blob, self.blob_at = self.snapshot(), 0
            if b == RESUMING:
                self.incoming = bytearray()
            if a == RESUMING and b == STOP:
                try:
                    self.restore(bytes(self.incoming))
                except Failure:
                    self.state = ERROR_STATE
                    raise
            self.state = b

    def feature(self, payload):
        if len(payload) < 8:
            raise Failure(errno.EINVAL, "feature header")
        argsz, flags = struct.unpack_from("<II", payload, 0)
        index, get, set_, probe = flags & 0xFFFF, flags & (1 << 16), flags & (1 << 17), flags & (1 << 18)
        data = payload[8:]
        if self.migration != "v2" or index not in (1, 2, 6, 7, 8, 9):
            raise Failure(errno.EINVAL, "feature %d not supported" % index)
        can_get = index in (1, 2, 8, 9)
        can_set = index in (2, 6, 7)
        if (get and not can_get) or (set_ and not can_set) or (get and set_):
            raise Failure(errno.EINVAL, "feature %d: that operation" % index)
        if probe:
            return payload[:8]
        if index == 1:
            return struct.pack("<II", 16, flags) + struct.pack("<Q", 1)   # STOP_COPY only
        if index == 2 and get:
            return struct.pack("<II", 16, flags) + struct.pack("<Ii", self.state, -1)
        if index == 2:
            if len(data) < 8:
                raise Failure(errno.EINVAL, "MIG_DEVICE_STATE data")
            self.set_state(struct.unpack_from("<I", data, 0)[0])
            return payload[:8] + struct.pack("<Ii", self.state, -1)
        if index == 9:
            return struct.pack("<II", 16, flags) + struct.pack("<Q", len(self.snapshot()))
        if index == 6:
            if len(data) < 16:
                raise Failure(errno.EINVAL, "DMA_LOGGING_START data")
            page, = struct.unpack_from("<Q", data, 0)
            if page == 0 or page & (page - 1):
                raise Failure(errno.EINVAL, "page size %d" % page)
            self.logging = page
            return payload[:8]
        if index == 7:
            self.logging = None
            return payload[:8]
        # 8: DMA_LOGGING_REPORT. The device never writes guest memory: every bit is clear.
        if self.logging is None or len(data) < 24:
            raise Failure(errno.EINVAL, "DMA logging not started")
        iova, length, page = struct.unpack_from("<QQQ", data, 0)
        if page == 0 or page & (page - 1) or length == 0 or length > (1 << 48) or iova + length > (1 << 64):
            raise Failure(errno.EINVAL, "report range")
        pages = (length + page - 1) // page
        need = (pages + 63) // 64 * 8
        if argsz < 8 + 24 + need or need > MAX_XFER:
            raise Failure(errno.EINVAL, "report argsz %d for %d bytes of bitmap" % (argsz, need))
        return struct.pack("<II", 8 + 24 + need, flags) + data[:24] + bytes(need)


class Server:
    def __init__(self, path, dev):
        self.path, self.dev = path, dev
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = path + ".tmp%d" % os.getpid()
        self.listener.bind(tmp)
        os.chmod(tmp, 0o600)
        self.listener.listen(1)
        os.rename(tmp, path)                                  # appears only once listening

    def recv_exact(self, conn, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def receive(self, conn):
        fds = array.array("i")
        head, anc, flags, _ = conn.recvmsg(HDR.size, socket.CMSG_SPACE(16 * fds.itemsize))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
        fds = list(fds)
        try:
            if not head:
                raise EOFError
            if flags & socket.MSG_CTRUNC:
                raise Failure(errno.EFAULT, "control data truncated")
            head += self.recv_exact(conn, HDR.size - len(head))
            msg_id, cmd, size, mflags, _ = HDR.unpack(head)
            if size < HDR.size or size > MAX_XFER + 4096:
                raise EOFError                                # framing is lost: drop the client
            payload = self.recv_exact(conn, size - HDR.size)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return msg_id, cmd, mflags, payload, fds

    def reply(self, conn, msg_id, cmd, payload=b"", err=None):
        flags = REPLY | (ERROR if err else 0)
        body = b"" if err else payload
        conn.sendall(HDR.pack(msg_id, cmd, HDR.size + len(body), flags, err or 0) + body)

    def handle(self, cmd, p, fds):
        d = self.dev
        if cmd == VERSION:
            major, minor = struct.unpack_from("<HH", p, 0)
            if major != 0:
                raise Failure(errno.ENOTSUP, "major %d" % major)
            caps = json.dumps({"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": MAX_XFER}}).encode() + b"\0"
            return struct.pack("<HH", 0, min(minor, 2)) + caps
        if fds and cmd not in (DMA_MAP, SET_IRQS):
            raise Failure(errno.EINVAL, "fds with command %d" % cmd)
        if cmd == DMA_MAP:
            argsz, flags, offset, iova, size = struct.unpack_from("<IIQQQ", p, 0)
            if d.refuse_dma:
                raise Failure(errno.ENOTSUP, "this device does no DMA")
            if size == 0 or iova + size > 1 << 64 or any(iova < m[0] + m[1] and m[0] < iova + size for m in d.maps):
                raise Failure(errno.EEXIST, "overlapping or empty mapping")
            d.maps.append((iova, size))                       # never accessed: the fd is not kept
            return b""
        if cmd == DMA_UNMAP:
            argsz, flags, iova, size = struct.unpack_from("<IIQQ", p, 0)
            if flags == 2:
                d.maps = []
            elif flags == 0 and (iova, size) in d.maps:
                d.maps.remove((iova, size))
            else:
                raise Failure(errno.ENOENT if flags == 0 else errno.EINVAL, "unmap")
            return struct.pack("<IIQQ", 24, flags, iova, size)
        if cmd == GET_INFO:
            return struct.pack("<IIII", 16, 0x3, 9, 5)        # RESET | PCI, 9 regions, 5 IRQ indexes
        if cmd == GET_REGION_INFO:
            argsz, _, index = struct.unpack_from("<III", p, 0)
            if index >= 9:
                raise Failure(errno.EINVAL, "region %d" % index)
            size = d.region_size(index)
            flags = 0x3 if size else 0
            return struct.pack("<IIIIQQ", 32, flags, index, 0, size, 0)
        if cmd == GET_IRQ_INFO:
            argsz, _, index, _ = struct.unpack_from("<IIII", p, 0)
            if index >= 5:
                raise Failure(errno.EINVAL, "irq index %d" % index)
            flags = 0x1 | (0x2 | 0x4 if index == 0 else 0x8)
            return struct.pack("<IIII", 16, flags, index, d.irq_count(index))
        if cmd == SET_IRQS:
            argsz, flags, index, start, count = struct.unpack_from("<IIIII", p, 0)
            if index >= 5 or index == getattr(d, "refuse_irq", None):
                raise Failure(errno.EINVAL, "irq index %d" % index)
            total = d.irq_count(index)
            data, action = flags & 0x7, flags & 0x38
            if data == 0x1 and count == 0 and action == 0x20:
                for fd in d.irqfds.pop(index, []):
                    if fd is not None:
                        os.close(fd)
                return b""
            if start + count > total or count == 0:
                raise Failure(errno.EINVAL, "vectors %d+%d of %d" % (start, count, total))
            if action != 0x20:
                if fds:
                    raise Failure(errno.EINVAL, "fds with mask/unmask")
                return b""                                    # mask/unmask: nothing to do here
            if data != 0x4 or len(fds) != count:
                raise Failure(errno.EINVAL, "%d eventfds for %d vectors" % (len(fds), count))
            slots = d.irqfds.setdefault(index, [None] * total)
            for i, fd in enumerate(fds):
                if slots[start + i] is not None:
                    os.close(slots[start + i])
                slots[start + i] = fd
            fds.clear()                                       # now owned by the device
            return b""
        if cmd in (REGION_READ, REGION_WRITE):
            offset, index, count = struct.unpack_from("<QII", p, 0)
            size = d.region_size(index)
            if count > MAX_XFER or offset > size or count > size - offset:
                raise Failure(errno.EINVAL, "region %d access %#x+%d" % (index, offset, count))
            if cmd == REGION_READ:
                data = bytes(d.cfg[offset:offset + count]) if index == 7 else d.bar0_read(offset, count)
                return p[:16] + data
            data = p[16:]
            if len(data) != count:
                raise Failure(errno.EINVAL, "write payload")
            if index == 7:
                d.cfg_write(offset, data)
            else:
                d.bar0_write(offset, data)
            return p[:16]
        if cmd == RESET:
            d.reset()
            d.state = RUNNING
            return b""
        if cmd == FEATURE:
            return d.feature(p)
        if cmd == MIG_DATA_READ:
            argsz, size = struct.unpack_from("<II", p, 0)
            if d.state != STOP_COPY or size > MAX_XFER or argsz < 8 + size:
                raise Failure(errno.EINVAL, "MIG_DATA_READ in state %d" % d.state)
            chunk = d.blob[d.blob_at:d.blob_at + size]
            d.blob_at += len(chunk)
            return struct.pack("<II", 8 + len(chunk), len(chunk)) + chunk
        if cmd == MIG_DATA_WRITE:
            argsz, size = struct.unpack_from("<II", p, 0)
            if d.state != RESUMING or len(p) != 8 + size or len(d.incoming) + size > 1 << 16:
                raise Failure(errno.EINVAL, "MIG_DATA_WRITE in state %d" % d.state)
            d.incoming += p[8:]
            return b""
        raise Failure(errno.EINVAL, "command %d" % cmd)

    def serve(self, conn):
        while True:
            msg_id, cmd, mflags, p, fds = self.receive(conn)
            try:
                out, err = self.handle(cmd, p, fds), None
            except Failure as f:
                out, err = b"", f.err
                sys.stderr.write("foreign-server: command %d refused: %s\n" % (cmd, f))
            except struct.error:
                out, err = b"", errno.EINVAL
            finally:
                for fd in fds:
                    os.close(fd)
            if not mflags & NO_REPLY:
                self.reply(conn, msg_id, cmd, out, err)

    def run(self):
        while True:
            conn, _ = self.listener.accept()
            try:
                self.serve(conn)
            except (EOFError, ConnectionError, OSError):
                pass
            finally:
                conn.close()
                self.dev.drop_client()


def main():
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        sys.exit(__doc__)
    path, opts = args[0], dict(irq="msix", migration="v2", refuse_dma=False, edu_id=False, refuse_irq=None, cap_loop=False)
    it = iter(args[1:])
    for a in it:
        if a == "--irq":
            opts["irq"] = next(it)
        elif a == "--migration":
            opts["migration"] = next(it)
        elif a == "--refuse-dma":
            opts["refuse_dma"] = True
        elif a == "--edu-id":
            opts["edu_id"] = True
        elif a == "--cap-loop":
            opts["cap_loop"] = True
        elif a == "--refuse-irq":
            opts["refuse_irq"] = int(next(it))
        else:
            sys.exit("unknown option %s\n%s" % (a, __doc__))
    if opts["irq"] not in ("msix", "msi", "intx", "none") or opts["migration"] not in ("v2", "off"):
        sys.exit(__doc__)

    def stop(*_):
        try:
            os.unlink(path)
        finally:
            os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    dev = Device(opts["irq"], opts["migration"], opts["refuse_dma"], opts["edu_id"])
    dev.refuse_irq = opts["refuse_irq"]
    if opts["cap_loop"]:
        dev.cfg[PCIE_CAP + 1] = PCIE_CAP
    Server(path, dev).run()


if __name__ == "__main__":
    main()
