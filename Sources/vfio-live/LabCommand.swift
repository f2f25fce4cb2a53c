import ArgumentParser
import Glibc
import KernelVFIO
import LiveUpdate
import Machine
import SystemCalls
import VFIO

/// Helpers for the kernel VFIO lab (scripts/lab.sh): the new-VMM side of a live update of a
/// process holding a kernel-assigned edu device. The lab's tests (Tests/KernelVFIOTests) play
/// the old VMM and start this as a separate process, as a real successor would be.
struct LabCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lab",
        abstract: "Kernel VFIO lab helpers (run inside the lab guest by scripts/lab.sh).",
        subcommands: [TakeOver.self])

    struct TakeOver: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "take-over",
            abstract: "Receive a CPR state holding guest RAM and a kernel VFIO edu device, adopt it without reconfiguring, and DMA into guest RAM.",
            discussion: HelpText.reflow("""
                Listens on --cpr, receives the descriptors, maps the guest RAM memfd at a new
                address, and then: legacy container, VFIO_DMA_MAP_FLAG_VADDR with the new
                addresses (no SET_CONTAINER, SET_IOMMU or reset); iommufd, IOMMU_IOAS_CHANGE_PROCESS
                (no BIND, ATTACH or map). Then it has the edu device copy its buffer into guest
                RAM at --iova and answers DONE with the checksum of what landed.
                VFIO_LIVE_CPR_FAULT=after-state makes it die after receiving the state.
                """))
        @Option(help: "The cpr socket to listen on.")
        var cpr: String
        @Option(help: "legacy or iommufd.")
        var backend: String
        @Option(help: "Guest-RAM IOVA the edu DMA writes to.")
        var iova: UInt64
        @Option(help: "Bytes to DMA (≤ 4096).")
        var count: UInt64

        func run() throws {
            let l = try UnixListener(path: cpr)
            guard let s = try l.accept() else { throw Failure("no connection") }
            l.close()
            do {
                let state = try CPRState.receive(from: s)
                try VMCommand.Run.faultInjection("after-state")
                guard let ramFD = state.find(CPRNames.guestRAM) else { throw Failure("no guest RAM in the CPR state") }
                let ram = try GuestMemory(adopting: ramFD, size: try ramFD.fileSize())
                let device: KernelDevice
                var keep: [AnyObject] = []
                if backend == "legacy" {
                    let (c, g, d) = try LegacyContainerCPR.adopt(state, memoryBase: ram.base, memorySize: ram.size)
                    keep = [c, g]; device = d
                } else {
                    let (i, d, _, _, _) = try IOMMUFDCPR.adopt(state)
                    keep = [i]; device = d
                }
                let edu = try Edu(device)
                guard try edu.isAlive() else { throw Failure("the edu device does not answer") }
                try edu.dma(iova: iova, count: count, toRAM: true)
                let sum = Checksum.of(UnsafeRawBufferPointer(start: ram.base + Int(iova), count: Int(count)))
                try CPRMessage.send(s, .done, "{\"checksum\":\(sum),\"pid\":\(getpid())}")
                _ = keep
            } catch {
                try? CPRMessage.send(s, .error, "\(error)")
                throw ExitCode(1)
            }
        }
    }
}
