/*
 * The KVM subset vfio-live uses. Layouts come from the kernel's own <linux/kvm.h> (so they are
 * the kernel's by construction); the ioctl numbers are function-like macros Swift cannot
 * import, so they are re-exported here as constants, and the unions of struct kvm_run get
 * accessors.
 */
#ifndef VFIO_LIVE_KVM_UAPI_H
#define VFIO_LIVE_KVM_UAPI_H

#include <linux/kvm.h>

static const unsigned long VL_KVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long VL_KVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long VL_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long VL_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long VL_KVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long VL_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long VL_KVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long VL_KVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
static const unsigned long VL_KVM_CLEAR_DIRTY_LOG = KVM_CLEAR_DIRTY_LOG;
static const unsigned long VL_KVM_ENABLE_CAP = KVM_ENABLE_CAP;
static const unsigned long VL_KVM_RUN = KVM_RUN;
static const unsigned long VL_KVM_GET_REGS = KVM_GET_REGS;
static const unsigned long VL_KVM_SET_REGS = KVM_SET_REGS;
static const unsigned long VL_KVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long VL_KVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long VL_KVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long VL_KVM_GET_FPU = KVM_GET_FPU;
static const unsigned long VL_KVM_SET_FPU = KVM_SET_FPU;
static const unsigned long VL_KVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;

static const unsigned int VL_KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
static const unsigned int VL_KVM_CAP_DIRTY_LOG_RING = KVM_CAP_DIRTY_LOG_RING;
static const unsigned int VL_KVM_CAP_USER_MEMORY = KVM_CAP_USER_MEMORY;
static const unsigned int VL_KVM_CAP_NR_MEMSLOTS = KVM_CAP_NR_MEMSLOTS;
static const unsigned int VL_KVM_MEM_LOG_DIRTY_PAGES = KVM_MEM_LOG_DIRTY_PAGES;
static const unsigned int VL_KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1u;  /* KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE */

enum {
    VL_KVM_EXIT_UNKNOWN = KVM_EXIT_UNKNOWN, VL_KVM_EXIT_IO = KVM_EXIT_IO, VL_KVM_EXIT_HLT = KVM_EXIT_HLT,
    VL_KVM_EXIT_MMIO = KVM_EXIT_MMIO, VL_KVM_EXIT_SHUTDOWN = KVM_EXIT_SHUTDOWN,
    VL_KVM_EXIT_FAIL_ENTRY = KVM_EXIT_FAIL_ENTRY, VL_KVM_EXIT_INTR = KVM_EXIT_INTR,
    VL_KVM_EXIT_INTERNAL_ERROR = KVM_EXIT_INTERNAL_ERROR,
};

/* kvm_run's exit unions. */
static inline unsigned long long vl_run_mmio_addr(struct kvm_run *r) { return r->mmio.phys_addr; }
static inline unsigned char *vl_run_mmio_data(struct kvm_run *r) { return r->mmio.data; }
static inline unsigned int vl_run_mmio_len(struct kvm_run *r) { return r->mmio.len; }
static inline int vl_run_mmio_is_write(struct kvm_run *r) { return r->mmio.is_write; }
static inline unsigned int vl_run_io_port(struct kvm_run *r) { return r->io.port; }
static inline unsigned int vl_run_io_direction(struct kvm_run *r) { return r->io.direction; }
static inline unsigned int vl_run_io_size(struct kvm_run *r) { return r->io.size; }
static inline unsigned int vl_run_io_count(struct kvm_run *r) { return r->io.count; }
static inline unsigned long long vl_run_io_offset(struct kvm_run *r) { return r->io.data_offset; }
static inline unsigned int vl_run_internal_suberror(struct kvm_run *r) { return r->internal.suberror; }
static inline unsigned long long vl_run_fail_reason(struct kvm_run *r) { return r->fail_entry.hardware_entry_failure_reason; }

/* The guest workload: 64-bit CPL3 code assembled from guest/workload.S, copied into guest RAM. */
extern const unsigned char vl_guest_workload_start[];
extern const unsigned char vl_guest_workload_end[];
static inline const void *vl_guest_workload_start_ptr(void) { return vl_guest_workload_start; }
static inline const void *vl_guest_workload_end_ptr(void) { return vl_guest_workload_end; }

#endif
