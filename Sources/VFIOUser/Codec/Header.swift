/// vfio-user command numbers (QEMU docs/interop/vfio-user.rst).
public enum VFIOUserCommand: UInt16, CaseIterable, CustomStringConvertible, Sendable {
    case version = 1
    case dmaMap = 2
    case dmaUnmap = 3
    case deviceGetInfo = 4
    case deviceGetRegionInfo = 5
    case deviceGetRegionIOFDs = 6
    case deviceGetIRQInfo = 7
    case deviceSetIRQs = 8
    case regionRead = 9
    case regionWrite = 10
    case dmaRead = 11
    case dmaWrite = 12
    case deviceReset = 13
    case dirtyPages = 14  // migration v1 era; removed from the spec and from libvfio-user
    case regionWriteMulti = 15
    case deviceFeature = 16
    case migDataRead = 17
    case migDataWrite = 18

    public var description: String {
        switch self {
        case .version: return "VERSION"
        case .dmaMap: return "DMA_MAP"
        case .dmaUnmap: return "DMA_UNMAP"
        case .deviceGetInfo: return "DEVICE_GET_INFO"
        case .deviceGetRegionInfo: return "DEVICE_GET_REGION_INFO"
        case .deviceGetRegionIOFDs: return "DEVICE_GET_REGION_IO_FDS"
        case .deviceGetIRQInfo: return "DEVICE_GET_IRQ_INFO"
        case .deviceSetIRQs: return "DEVICE_SET_IRQS"
        case .regionRead: return "REGION_READ"
        case .regionWrite: return "REGION_WRITE"
        case .dmaRead: return "DMA_READ"
        case .dmaWrite: return "DMA_WRITE"
        case .deviceReset: return "DEVICE_RESET"
        case .dirtyPages: return "DIRTY_PAGES"
        case .regionWriteMulti: return "REGION_WRITE_MULTI"
        case .deviceFeature: return "DEVICE_FEATURE"
        case .migDataRead: return "MIG_DATA_READ"
        case .migDataWrite: return "MIG_DATA_WRITE"
        }
    }
}

/// The 16-byte message header.
public struct MessageHeader: Equatable, Sendable {
    public static let size = 16
    public static let typeCommand: UInt32 = 0
    public static let typeReply: UInt32 = 1
    public static let typeMask: UInt32 = 0xf
    public static let flagNoReply: UInt32 = 0x10
    public static let flagError: UInt32 = 0x20

    public var messageID: UInt16
    public var command: UInt16
    public var messageSize: UInt32
    public var flags: UInt32
    public var errorNumber: UInt32

    public init(messageID: UInt16, command: UInt16, messageSize: UInt32, flags: UInt32, errorNumber: UInt32 = 0) {
        self.messageID = messageID
        self.command = command
        self.messageSize = messageSize
        self.flags = flags
        self.errorNumber = errorNumber
    }

    public var isReply: Bool { flags & Self.typeMask == Self.typeReply }
    public var isCommand: Bool { flags & Self.typeMask == Self.typeCommand }
    public var isError: Bool { flags & Self.flagError != 0 }
    public var wantsReply: Bool { flags & Self.flagNoReply == 0 }
    public var payloadSize: Int { Int(messageSize) - Self.size }
    public var knownCommand: VFIOUserCommand? { VFIOUserCommand(rawValue: command) }

    public func encode(into w: inout WireWriter) {
        w.u16(messageID); w.u16(command); w.u32(messageSize); w.u32(flags); w.u32(errorNumber)
    }

    public var bytes: [UInt8] { var w = WireWriter(capacity: 16); encode(into: &w); return w.bytes }

    public init(decoding r: inout WireReader) throws {
        messageID = try r.u16(); command = try r.u16(); messageSize = try r.u32()
        flags = try r.u32(); errorNumber = try r.u32()
    }
}
