import CVFIOLive
import Glibc
import SystemCalls

/// Why a KVM operation failed, as a message.
public enum KVMError: Error, CustomStringConvertible {
    case unavailable(String)
    case ioctl(String, Errno)
    case unexpectedExit(String)

    public var description: String {
        switch self {
        case let .unavailable(why): return "KVM unavailable: \(why)"
        case let .ioctl(what, e): return "\(what) failed: \(e)"
        case let .unexpectedExit(why): return "vCPU stopped: \(why)"
        }
    }
}

/// /dev/kvm: the system fd (api version, capabilities, supported CPUID).
public final class KVMSystem: @unchecked Sendable {
    public let fd: FileDescriptor

    /// Why KVM cannot be used here, or nil if it can (tests skip with this reason).
    public static var unavailableReason: String? {
        if access("/dev/kvm", R_OK | W_OK) != 0 { return "/dev/kvm is missing or not accessible (\(Errno.current))" }
        return nil
    }

    public init() throws {
        let raw = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        guard raw >= 0 else { throw KVMError.unavailable("cannot open /dev/kvm: \(Errno.current)") }
        fd = FileDescriptor(adopting: raw)
        let v = try fd.ioctl(VL_KVM_GET_API_VERSION, value: 0)
        guard v == KVM_API_VERSION else { throw KVMError.unavailable("KVM API version \(v), expected \(KVM_API_VERSION)") }
    }

    public func checkExtension(_ cap: UInt32) -> Int32 {
        (try? fd.ioctl(VL_KVM_CHECK_EXTENSION, value: UInt(cap))) ?? 0
    }

    public var vcpuMmapSize: Int { Int((try? fd.ioctl(VL_KVM_GET_VCPU_MMAP_SIZE, value: 0)) ?? 0) }

    /// KVM_GET_SUPPORTED_CPUID as a buffer ready for KVM_SET_CPUID2.
    public func supportedCPUID() throws -> [UInt8] {
        let maxEntries = 256
        let size = MemoryLayout<kvm_cpuid2>.size + maxEntries * MemoryLayout<kvm_cpuid_entry2>.stride
        var buf = [UInt8](repeating: 0, count: size)
        try buf.withUnsafeMutableBytes { p in
            p.baseAddress!.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent = UInt32(maxEntries)
            do { _ = try fd.ioctl(VL_KVM_GET_SUPPORTED_CPUID, p.baseAddress) } catch let e as Errno {
                throw KVMError.ioctl("KVM_GET_SUPPORTED_CPUID", e)
            }
        }
        return buf
    }

    public func createVM() throws -> VirtualMachine {
        do {
            let raw = try fd.ioctl(VL_KVM_CREATE_VM, value: 0)
            return VirtualMachine(system: self, fd: FileDescriptor(adopting: raw))
        } catch let e as Errno { throw KVMError.ioctl("KVM_CREATE_VM", e) }
    }
}

/// A KVM VM: memslots with dirty logging, and its vCPUs.
public final class VirtualMachine: @unchecked Sendable {
    public let system: KVMSystem
    public let fd: FileDescriptor
    public private(set) var manualDirtyProtect = false

    init(system: KVMSystem, fd: FileDescriptor) { self.system = system; self.fd = fd }

    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET_DIRTY_LOG stops re-protecting; CLEAR_DIRTY_LOG does
    /// it for exactly the pages harvested (much cheaper on large slots).
    public func enableManualDirtyProtect() -> Bool {
        guard system.checkExtension(VL_KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) > 0 else { return false }
        var cap = kvm_enable_cap()
        cap.cap = VL_KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
        cap.args.0 = UInt64(VL_KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        guard (try? fd.ioctl(VL_KVM_ENABLE_CAP, &cap)) != nil else { return false }
        manualDirtyProtect = true
        return true
    }

    public func setMemorySlot(slot: UInt32, guestAddress: UInt64, size: UInt64, host: UnsafeMutableRawPointer, logDirty: Bool) throws {
        var r = kvm_userspace_memory_region(slot: slot, flags: logDirty ? VL_KVM_MEM_LOG_DIRTY_PAGES : 0,
                                            guest_phys_addr: guestAddress, memory_size: size,
                                            userspace_addr: UInt64(UInt(bitPattern: host)))
        do { _ = try fd.ioctl(VL_KVM_SET_USER_MEMORY_REGION, &r) } catch let e as Errno {
            throw KVMError.ioctl("KVM_SET_USER_MEMORY_REGION (slot \(slot), \(size) bytes)", e)
        }
    }

    /// A memslot for a device's mmap'd region (KVM_MEM_READONLY when the mapping is: guest
    /// stores then exit as MMIO).
    public func setDeviceMemorySlot(slot: UInt32, guestAddress: UInt64, size: UInt64, host: UnsafeMutableRawPointer, readOnly: Bool) throws {
        var r = kvm_userspace_memory_region(slot: slot, flags: readOnly ? 1 << 1 /* KVM_MEM_READONLY */ : 0,
                                            guest_phys_addr: guestAddress, memory_size: size,
                                            userspace_addr: UInt64(UInt(bitPattern: host)))
        do { _ = try fd.ioctl(VL_KVM_SET_USER_MEMORY_REGION, &r) } catch let e as Errno {
            throw KVMError.ioctl("KVM_SET_USER_MEMORY_REGION (device slot \(slot), \(size) bytes at \(hex(guestAddress)))", e)
        }
    }

    /// Harvest the dirty bitmap of `slot` (one bit per 4 KiB page, word n/64 bit n%64). With
    /// manual protect the harvested pages are re-protected with CLEAR_DIRTY_LOG.
    public func dirtyLog(slot: UInt32, pages: UInt64) throws -> [UInt64] {
        var words = [UInt64](repeating: 0, count: Int((pages + 63) / 64))
        try words.withUnsafeMutableBytes { p in
            var log = kvm_dirty_log()
            log.slot = slot
            log.dirty_bitmap = p.baseAddress
            do { _ = try fd.ioctl(VL_KVM_GET_DIRTY_LOG, &log) } catch let e as Errno { throw KVMError.ioctl("KVM_GET_DIRTY_LOG", e) }
            guard manualDirtyProtect else { return }
            var clear = kvm_clear_dirty_log()
            clear.slot = slot
            clear.first_page = 0
            clear.num_pages = UInt32((pages + 63) / 64 * 64)
            clear.dirty_bitmap = p.baseAddress
            do { _ = try fd.ioctl(VL_KVM_CLEAR_DIRTY_LOG, &clear) } catch let e as Errno { throw KVMError.ioctl("KVM_CLEAR_DIRTY_LOG", e) }
        }
        return words
    }

    public func createVCPU(id: UInt32) throws -> VCPU {
        do {
            let raw = try fd.ioctl(VL_KVM_CREATE_VCPU, value: UInt(id))
            return try VCPU(vm: self, id: id, fd: FileDescriptor(adopting: raw))
        } catch let e as Errno { throw KVMError.ioctl("KVM_CREATE_VCPU \(id)", e) }
    }
}

/// One vCPU: its fd, the shared kvm_run page, and register state.
public final class VCPU: @unchecked Sendable {
    public let id: UInt32
    public let fd: FileDescriptor
    let runMap: MappedRegion
    public var run: UnsafeMutablePointer<kvm_run> { runMap.base.assumingMemoryBound(to: kvm_run.self) }

    init(vm: VirtualMachine, id: UInt32, fd: FileDescriptor) throws {
        self.id = id
        self.fd = fd
        runMap = try MappedRegion(fd: fd, length: vm.system.vcpuMmapSize)
    }

    public func getRegs() throws -> kvm_regs {
        var r = kvm_regs()
        do { _ = try fd.ioctl(VL_KVM_GET_REGS, &r) } catch let e as Errno { throw KVMError.ioctl("KVM_GET_REGS", e) }
        return r
    }
    public func setRegs(_ r: kvm_regs) throws {
        var r = r
        do { _ = try fd.ioctl(VL_KVM_SET_REGS, &r) } catch let e as Errno { throw KVMError.ioctl("KVM_SET_REGS", e) }
    }
    public func getSregs() throws -> kvm_sregs {
        var s = kvm_sregs()
        do { _ = try fd.ioctl(VL_KVM_GET_SREGS, &s) } catch let e as Errno { throw KVMError.ioctl("KVM_GET_SREGS", e) }
        return s
    }
    public func setSregs(_ s: kvm_sregs) throws {
        var s = s
        do { _ = try fd.ioctl(VL_KVM_SET_SREGS, &s) } catch let e as Errno { throw KVMError.ioctl("KVM_SET_SREGS", e) }
    }
    public func getFPU() throws -> kvm_fpu {
        var f = kvm_fpu()
        do { _ = try fd.ioctl(VL_KVM_GET_FPU, &f) } catch let e as Errno { throw KVMError.ioctl("KVM_GET_FPU", e) }
        return f
    }
    public func setFPU(_ f: kvm_fpu) throws {
        var f = f
        do { _ = try fd.ioctl(VL_KVM_SET_FPU, &f) } catch let e as Errno { throw KVMError.ioctl("KVM_SET_FPU", e) }
    }
    public func setCPUID(_ buffer: [UInt8]) throws {
        var b = buffer
        try b.withUnsafeMutableBytes { p in
            do { _ = try fd.ioctl(VL_KVM_SET_CPUID2, p.baseAddress) } catch let e as Errno { throw KVMError.ioctl("KVM_SET_CPUID2", e) }
        }
    }

    /// KVM_RUN once. EINTR (a pause signal) is returned as `false`, not thrown and not retried.
    public func runOnce() throws -> Bool {
        let rc = vl_ioctl_val(fd.rawValue, VL_KVM_RUN, 0)
        if rc == 0 { return true }
        let e = Errno.current
        if e == .EINTR || e == .EAGAIN { return false }
        throw KVMError.ioctl("KVM_RUN", e)
    }

    /// Ask a running KVM_RUN to return (set before signalling the vCPU thread).
    public func requestImmediateExit(_ on: Bool) { run.pointee.immediate_exit = on ? 1 : 0 }
}
