/*
 * VFIO UAPI definitions carried by vfio-live (the current linux/vfio.h subset the project uses:
 * container/group/device basics, type1 IOMMU with VADDR and dirty pages, migration v2 with
 * PRE_COPY and DMA logging, and the deprecated v1 migration region).
 *
 * Written from the layouts in shared/reference/kernel-uapi.md; every struct is checked at compile
 * time against the sizes and offsets given there (see layout_checks.c). We never include the
 * host's <linux/vfio.h>: it is 6.1 and lacks PRE_COPY, MIG_DATA_SIZE and the cdev ioctls.
 */
#ifndef VFIO_LIVE_VFIO_UAPI_H
#define VFIO_LIVE_VFIO_UAPI_H

#include <stdint.h>

#define VL_ALIGNED_U64 uint64_t __attribute__((aligned(8)))

/* All VFIO and iommufd ioctls are _IO(';', nr): direction and size are 0. */
#define VFIO_TYPE ';'
#define VFIO_BASE 100
#define VL_IO(nr) ((unsigned long)((VFIO_TYPE << 8) | (nr)))

#define VFIO_API_VERSION 0

/* ---- ioctl numbers ---------------------------------------------------------------------- */
#define VFIO_GET_API_VERSION           VL_IO(VFIO_BASE + 0)
#define VFIO_CHECK_EXTENSION           VL_IO(VFIO_BASE + 1)
#define VFIO_SET_IOMMU                 VL_IO(VFIO_BASE + 2)
#define VFIO_GROUP_GET_STATUS          VL_IO(VFIO_BASE + 3)
#define VFIO_GROUP_SET_CONTAINER       VL_IO(VFIO_BASE + 4)
#define VFIO_GROUP_UNSET_CONTAINER     VL_IO(VFIO_BASE + 5)
#define VFIO_GROUP_GET_DEVICE_FD       VL_IO(VFIO_BASE + 6)
#define VFIO_DEVICE_GET_INFO           VL_IO(VFIO_BASE + 7)
#define VFIO_DEVICE_GET_REGION_INFO    VL_IO(VFIO_BASE + 8)
#define VFIO_DEVICE_GET_IRQ_INFO       VL_IO(VFIO_BASE + 9)
#define VFIO_DEVICE_SET_IRQS           VL_IO(VFIO_BASE + 10)
#define VFIO_DEVICE_RESET              VL_IO(VFIO_BASE + 11)
#define VFIO_DEVICE_FEATURE            VL_IO(VFIO_BASE + 17)
#define VFIO_DEVICE_BIND_IOMMUFD       VL_IO(VFIO_BASE + 18)
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT  VL_IO(VFIO_BASE + 19)
#define VFIO_DEVICE_DETACH_IOMMUFD_PT  VL_IO(VFIO_BASE + 20)
#define VFIO_MIG_GET_PRECOPY_INFO      VL_IO(VFIO_BASE + 21) /* on the migration data_fd */
#define VFIO_IOMMU_GET_INFO            VL_IO(VFIO_BASE + 12) /* on a container */
#define VFIO_IOMMU_MAP_DMA             VL_IO(VFIO_BASE + 13)
#define VFIO_IOMMU_UNMAP_DMA           VL_IO(VFIO_BASE + 14)
#define VFIO_IOMMU_DIRTY_PAGES         VL_IO(VFIO_BASE + 17)

/* ---- CHECK_EXTENSION / SET_IOMMU -------------------------------------------------------- */
#define VFIO_TYPE1_IOMMU       1
#define VFIO_TYPE1v2_IOMMU     3
#define VFIO_DMA_CC_IOMMU      4
#define VFIO_NOIOMMU_IOMMU     8
#define VFIO_UNMAP_ALL         9
#define VFIO_UPDATE_VADDR      10

/* ---- info capability chain -------------------------------------------------------------- */
struct vfio_info_cap_header {
    uint16_t id;
    uint16_t version;
    uint32_t next;
};

struct vfio_group_status {
    uint32_t argsz;
    uint32_t flags;
};
#define VFIO_GROUP_FLAGS_VIABLE        (1u << 0)
#define VFIO_GROUP_FLAGS_CONTAINER_SET (1u << 1)

struct vfio_device_info {
    uint32_t argsz;
    uint32_t flags;
    uint32_t num_regions;
    uint32_t num_irqs;
    uint32_t cap_offset;
    uint32_t pad;
};
#define VFIO_DEVICE_FLAGS_RESET    (1u << 0)
#define VFIO_DEVICE_FLAGS_PCI      (1u << 1)
#define VFIO_DEVICE_FLAGS_PLATFORM (1u << 2)
#define VFIO_DEVICE_FLAGS_CAPS     (1u << 7)

struct vfio_region_info {
    uint32_t argsz;
    uint32_t flags;
    uint32_t index;
    uint32_t cap_offset;
    VL_ALIGNED_U64 size;
    VL_ALIGNED_U64 offset;
};
#define VFIO_REGION_INFO_FLAG_READ  (1u << 0)
#define VFIO_REGION_INFO_FLAG_WRITE (1u << 1)
#define VFIO_REGION_INFO_FLAG_MMAP  (1u << 2)
#define VFIO_REGION_INFO_FLAG_CAPS  (1u << 3)

#define VFIO_REGION_INFO_CAP_SPARSE_MMAP 1
#define VFIO_REGION_INFO_CAP_TYPE        2

struct vfio_region_sparse_mmap_area {
    VL_ALIGNED_U64 offset;
    VL_ALIGNED_U64 size;
};

struct vfio_region_info_cap_sparse_mmap {
    struct vfio_info_cap_header header;
    uint32_t nr_areas;
    uint32_t reserved;
    struct vfio_region_sparse_mmap_area areas[];
};

struct vfio_region_info_cap_type {
    struct vfio_info_cap_header header;
    uint32_t type;
    uint32_t subtype;
};
#define VFIO_REGION_TYPE_MIGRATION_DEPRECATED    3
#define VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED 1

/* vfio-pci fixed indices */
enum {
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR1_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX,
    VFIO_PCI_BAR3_REGION_INDEX, VFIO_PCI_BAR4_REGION_INDEX, VFIO_PCI_BAR5_REGION_INDEX,
    VFIO_PCI_ROM_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_VGA_REGION_INDEX,
    VFIO_PCI_NUM_REGIONS
};
enum {
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX, VFIO_PCI_NUM_IRQS
};

struct vfio_irq_info {
    uint32_t argsz;
    uint32_t flags;
    uint32_t index;
    uint32_t count;
};
#define VFIO_IRQ_INFO_EVENTFD    (1u << 0)
#define VFIO_IRQ_INFO_MASKABLE   (1u << 1)
#define VFIO_IRQ_INFO_AUTOMASKED (1u << 2)
#define VFIO_IRQ_INFO_NORESIZE   (1u << 3)

struct vfio_irq_set {
    uint32_t argsz;
    uint32_t flags;
    uint32_t index;
    uint32_t start;
    uint32_t count;
    uint8_t data[];
};
#define VFIO_IRQ_SET_DATA_NONE      (1u << 0)
#define VFIO_IRQ_SET_DATA_BOOL      (1u << 1)
#define VFIO_IRQ_SET_DATA_EVENTFD   (1u << 2)
#define VFIO_IRQ_SET_ACTION_MASK    (1u << 3)
#define VFIO_IRQ_SET_ACTION_UNMASK  (1u << 4)
#define VFIO_IRQ_SET_ACTION_TRIGGER (1u << 5)
#define VFIO_IRQ_SET_DATA_TYPE_MASK   (VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD)
#define VFIO_IRQ_SET_ACTION_TYPE_MASK (VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER)

/* ---- type1 IOMMU ------------------------------------------------------------------------ */
struct vfio_iommu_type1_info {
    uint32_t argsz;
    uint32_t flags;
    VL_ALIGNED_U64 iova_pgsizes;
    uint32_t cap_offset;
    uint32_t pad;
};
#define VFIO_IOMMU_INFO_PGSIZES (1u << 0)
#define VFIO_IOMMU_INFO_CAPS    (1u << 1)
#define VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE 1
#define VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION  2
#define VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL      3

struct vfio_iova_range {
    uint64_t start;
    uint64_t end; /* inclusive */
};

struct vfio_iommu_type1_info_cap_iova_range {
    struct vfio_info_cap_header header;
    uint32_t nr_iovas;
    uint32_t reserved;
    struct vfio_iova_range iova_ranges[];
};

struct vfio_iommu_type1_info_cap_migration {
    struct vfio_info_cap_header header;
    uint32_t flags;
    uint64_t pgsize_bitmap;
    uint64_t max_dirty_bitmap_size;
};

struct vfio_iommu_type1_info_dma_avail {
    struct vfio_info_cap_header header;
    uint32_t avail;
};

struct vfio_iommu_type1_dma_map {
    uint32_t argsz;
    uint32_t flags;
    uint64_t vaddr;
    uint64_t iova;
    uint64_t size;
};
#define VFIO_DMA_MAP_FLAG_READ  (1u << 0)
#define VFIO_DMA_MAP_FLAG_WRITE (1u << 1)
#define VFIO_DMA_MAP_FLAG_VADDR (1u << 2)

struct vfio_bitmap {
    uint64_t pgsize;
    uint64_t size;
    uint64_t *data;
};

struct vfio_iommu_type1_dma_unmap {
    uint32_t argsz;
    uint32_t flags;
    uint64_t iova;
    uint64_t size;
    uint8_t data[];
};
#define VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP (1u << 0)
#define VFIO_DMA_UNMAP_FLAG_ALL              (1u << 1)
#define VFIO_DMA_UNMAP_FLAG_VADDR            (1u << 2)

struct vfio_iommu_type1_dirty_bitmap {
    uint32_t argsz;
    uint32_t flags;
    uint8_t data[];
};
#define VFIO_IOMMU_DIRTY_PAGES_FLAG_START      (1u << 0)
#define VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP       (1u << 1)
#define VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP (1u << 2)

struct vfio_iommu_type1_dirty_bitmap_get {
    uint64_t iova;
    uint64_t size;
    struct vfio_bitmap bitmap;
};

/* ---- migration v2 ----------------------------------------------------------------------- */
struct vfio_device_feature {
    uint32_t argsz;
    uint32_t flags;
    uint8_t data[];
};
#define VFIO_DEVICE_FEATURE_MASK  0xffffu
#define VFIO_DEVICE_FEATURE_GET   (1u << 16)
#define VFIO_DEVICE_FEATURE_SET   (1u << 17)
#define VFIO_DEVICE_FEATURE_PROBE (1u << 18)

#define VFIO_DEVICE_FEATURE_MIGRATION          1
#define VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE   2
#define VFIO_DEVICE_FEATURE_DMA_LOGGING_START  6
#define VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP   7
#define VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT 8
#define VFIO_DEVICE_FEATURE_MIG_DATA_SIZE      9

struct vfio_device_feature_migration {
    VL_ALIGNED_U64 flags;
};
#define VFIO_MIGRATION_STOP_COPY (1u << 0)
#define VFIO_MIGRATION_P2P       (1u << 1)
#define VFIO_MIGRATION_PRE_COPY  (1u << 2)

struct vfio_device_feature_mig_state {
    uint32_t device_state;
    int32_t data_fd;
};

enum vfio_device_mig_state {
    VFIO_DEVICE_STATE_ERROR = 0,
    VFIO_DEVICE_STATE_STOP = 1,
    VFIO_DEVICE_STATE_RUNNING = 2,
    VFIO_DEVICE_STATE_STOP_COPY = 3,
    VFIO_DEVICE_STATE_RESUMING = 4,
    VFIO_DEVICE_STATE_RUNNING_P2P = 5,
    VFIO_DEVICE_STATE_PRE_COPY = 6,
    VFIO_DEVICE_STATE_PRE_COPY_P2P = 7,
    VFIO_DEVICE_STATE_NR,
};

struct vfio_precopy_info {
    uint32_t argsz;
    uint32_t flags;
    VL_ALIGNED_U64 initial_bytes;
    VL_ALIGNED_U64 dirty_bytes;
};

struct vfio_device_feature_dma_logging_control {
    VL_ALIGNED_U64 page_size;
    uint32_t num_ranges;
    uint32_t __reserved;
    VL_ALIGNED_U64 ranges;
};

struct vfio_device_feature_dma_logging_range {
    VL_ALIGNED_U64 iova;
    VL_ALIGNED_U64 length;
};

struct vfio_device_feature_dma_logging_report {
    VL_ALIGNED_U64 iova;
    VL_ALIGNED_U64 length;
    VL_ALIGNED_U64 page_size;
    VL_ALIGNED_U64 bitmap;
};

struct vfio_device_feature_mig_data_size {
    VL_ALIGNED_U64 stop_copy_length;
};

/* ---- migration v1 (deprecated region protocol) ------------------------------------------ */
struct vfio_device_migration_info {
    uint32_t device_state;
    uint32_t reserved;
    VL_ALIGNED_U64 pending_bytes;
    VL_ALIGNED_U64 data_offset;
    VL_ALIGNED_U64 data_size;
};
#define VFIO_DEVICE_STATE_V1_STOP     0u
#define VFIO_DEVICE_STATE_V1_RUNNING  (1u << 0)
#define VFIO_DEVICE_STATE_V1_SAVING   (1u << 1)
#define VFIO_DEVICE_STATE_V1_RESUMING (1u << 2)
#define VFIO_DEVICE_STATE_MASK        0x7u

/* ---- VFIO device cdev ------------------------------------------------------------------- */
struct vfio_device_bind_iommufd {
    uint32_t argsz;
    uint32_t flags;
    int32_t iommufd;
    uint32_t out_devid;
    VL_ALIGNED_U64 token_uuid_ptr;
};

struct vfio_device_attach_iommufd_pt {
    uint32_t argsz;
    uint32_t flags;
    uint32_t pt_id;
    uint32_t pasid;
};

struct vfio_device_detach_iommufd_pt {
    uint32_t argsz;
    uint32_t flags;
    uint32_t pasid;
};


/* The ioctl numbers above are function-like macros, which Swift does not import: the same
 * values as constants (checked against the kernel's numbers in layout_checks.c). */
static const unsigned long VL_VFIO_GET_API_VERSION = VFIO_GET_API_VERSION;
static const unsigned long VL_VFIO_CHECK_EXTENSION = VFIO_CHECK_EXTENSION;
static const unsigned long VL_VFIO_SET_IOMMU = VFIO_SET_IOMMU;
static const unsigned long VL_VFIO_GROUP_GET_STATUS = VFIO_GROUP_GET_STATUS;
static const unsigned long VL_VFIO_GROUP_SET_CONTAINER = VFIO_GROUP_SET_CONTAINER;
static const unsigned long VL_VFIO_GROUP_GET_DEVICE_FD = VFIO_GROUP_GET_DEVICE_FD;
static const unsigned long VL_VFIO_DEVICE_GET_INFO = VFIO_DEVICE_GET_INFO;
static const unsigned long VL_VFIO_DEVICE_GET_REGION_INFO = VFIO_DEVICE_GET_REGION_INFO;
static const unsigned long VL_VFIO_DEVICE_GET_IRQ_INFO = VFIO_DEVICE_GET_IRQ_INFO;
static const unsigned long VL_VFIO_DEVICE_SET_IRQS = VFIO_DEVICE_SET_IRQS;
static const unsigned long VL_VFIO_DEVICE_RESET = VFIO_DEVICE_RESET;
static const unsigned long VL_VFIO_DEVICE_FEATURE = VFIO_DEVICE_FEATURE;
static const unsigned long VL_VFIO_DEVICE_BIND_IOMMUFD = VFIO_DEVICE_BIND_IOMMUFD;
static const unsigned long VL_VFIO_DEVICE_ATTACH_IOMMUFD_PT = VFIO_DEVICE_ATTACH_IOMMUFD_PT;
static const unsigned long VL_VFIO_DEVICE_DETACH_IOMMUFD_PT = VFIO_DEVICE_DETACH_IOMMUFD_PT;
static const unsigned long VL_VFIO_IOMMU_GET_INFO = VFIO_IOMMU_GET_INFO;
static const unsigned long VL_VFIO_IOMMU_MAP_DMA = VFIO_IOMMU_MAP_DMA;
static const unsigned long VL_VFIO_IOMMU_UNMAP_DMA = VFIO_IOMMU_UNMAP_DMA;
static const unsigned long VL_VFIO_IOMMU_DIRTY_PAGES = VFIO_IOMMU_DIRTY_PAGES;

#endif
