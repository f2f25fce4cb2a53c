/*
 * iommufd UAPI subset (linux/iommufd.h) carried by vfio-live. The host has no <linux/iommufd.h>;
 * layouts come from shared/reference/kernel-uapi.md §5 and are checked in layout_checks.c.
 * We use the newest (largest) layouts with new fields zeroed, which older kernels accept.
 */
#ifndef VFIO_LIVE_IOMMUFD_UAPI_H
#define VFIO_LIVE_IOMMUFD_UAPI_H

#include <stdint.h>
#include "vfio_uapi.h"

#define IOMMUFD_TYPE ';'
#define IOMMU_DESTROY              VL_IO(0x80)
#define IOMMU_IOAS_ALLOC           VL_IO(0x81)
#define IOMMU_IOAS_ALLOW_IOVAS     VL_IO(0x82)
#define IOMMU_IOAS_COPY            VL_IO(0x83)
#define IOMMU_IOAS_IOVA_RANGES     VL_IO(0x84)
#define IOMMU_IOAS_MAP             VL_IO(0x85)
#define IOMMU_IOAS_UNMAP           VL_IO(0x86)
#define IOMMU_OPTION               VL_IO(0x87)
#define IOMMU_VFIO_IOAS            VL_IO(0x88)
#define IOMMU_HWPT_ALLOC           VL_IO(0x89)
#define IOMMU_GET_HW_INFO          VL_IO(0x8a)
#define IOMMU_HWPT_SET_DIRTY_TRACKING VL_IO(0x8b)
#define IOMMU_HWPT_GET_DIRTY_BITMAP   VL_IO(0x8c)
#define IOMMU_IOAS_MAP_FILE        VL_IO(0x8f)
#define IOMMU_IOAS_CHANGE_PROCESS  VL_IO(0x92)

struct iommu_destroy { uint32_t size; uint32_t id; };

struct iommu_ioas_alloc { uint32_t size; uint32_t flags; uint32_t out_ioas_id; };

struct iommu_iova_range { VL_ALIGNED_U64 start; VL_ALIGNED_U64 last; };

struct iommu_ioas_iova_ranges {
    uint32_t size;
    uint32_t ioas_id;
    uint32_t num_iovas;
    uint32_t __reserved;
    VL_ALIGNED_U64 allowed_iovas;
    VL_ALIGNED_U64 out_iova_alignment;
};

struct iommu_ioas_allow_iovas {
    uint32_t size;
    uint32_t ioas_id;
    uint32_t num_iovas;
    uint32_t __reserved;
    VL_ALIGNED_U64 allowed_iovas;
};

#define IOMMU_IOAS_MAP_FIXED_IOVA (1u << 0)
#define IOMMU_IOAS_MAP_WRITEABLE  (1u << 1)
#define IOMMU_IOAS_MAP_READABLE   (1u << 2)

struct iommu_ioas_map {
    uint32_t size;
    uint32_t flags;
    uint32_t ioas_id;
    uint32_t __reserved;
    VL_ALIGNED_U64 user_va;
    VL_ALIGNED_U64 length;
    VL_ALIGNED_U64 iova;
};

struct iommu_ioas_map_file {
    uint32_t size;
    uint32_t flags;
    uint32_t ioas_id;
    int32_t fd;
    VL_ALIGNED_U64 start;
    VL_ALIGNED_U64 length;
    VL_ALIGNED_U64 iova;
};

struct iommu_ioas_copy {
    uint32_t size;
    uint32_t flags;
    uint32_t dst_ioas_id;
    uint32_t src_ioas_id;
    VL_ALIGNED_U64 length;
    VL_ALIGNED_U64 dst_iova;
    VL_ALIGNED_U64 src_iova;
};

struct iommu_ioas_unmap {
    uint32_t size;
    uint32_t ioas_id;
    VL_ALIGNED_U64 iova;
    VL_ALIGNED_U64 length;
};

struct iommu_option {
    uint32_t size;
    uint32_t option_id;
    uint16_t op;
    uint16_t __reserved;
    uint32_t object_id;
    VL_ALIGNED_U64 val64;
};

struct iommu_vfio_ioas {
    uint32_t size;
    uint32_t ioas_id;
    uint16_t op;
    uint16_t __reserved;
};

#define IOMMU_HWPT_ALLOC_NEST_PARENT    (1u << 0)
#define IOMMU_HWPT_ALLOC_DIRTY_TRACKING (1u << 1)

struct iommu_hwpt_alloc {
    uint32_t size;
    uint32_t flags;
    uint32_t dev_id;
    uint32_t pt_id;
    uint32_t out_hwpt_id;
    uint32_t __reserved;
    uint32_t data_type;
    uint32_t data_len;
    VL_ALIGNED_U64 data_uptr;
    uint32_t fault_id;
    uint32_t __reserved2;
};

#define IOMMU_HW_CAP_DIRTY_TRACKING (1ull << 0)

struct iommu_hw_info {
    uint32_t size;
    uint32_t flags;
    uint32_t dev_id;
    uint32_t data_len;
    VL_ALIGNED_U64 data_uptr;
    uint32_t out_data_type;
    uint8_t out_max_pasid_log2;
    uint8_t __reserved[3];
    VL_ALIGNED_U64 out_capabilities;
};

#define IOMMU_HWPT_DIRTY_TRACKING_ENABLE 1u

struct iommu_hwpt_set_dirty_tracking {
    uint32_t size;
    uint32_t flags;
    uint32_t hwpt_id;
    uint32_t __reserved;
};

#define IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR 1u

struct iommu_hwpt_get_dirty_bitmap {
    uint32_t size;
    uint32_t hwpt_id;
    uint32_t flags;
    uint32_t __reserved;
    VL_ALIGNED_U64 iova;
    VL_ALIGNED_U64 length;
    VL_ALIGNED_U64 page_size;
    VL_ALIGNED_U64 data;
};

struct iommu_ioas_change_process {
    uint32_t size;
    uint32_t __reserved;
};


static const unsigned long VL_IOMMU_DESTROY = IOMMU_DESTROY;
static const unsigned long VL_IOMMU_IOAS_ALLOC = IOMMU_IOAS_ALLOC;
static const unsigned long VL_IOMMU_IOAS_MAP = IOMMU_IOAS_MAP;
static const unsigned long VL_IOMMU_IOAS_UNMAP = IOMMU_IOAS_UNMAP;
static const unsigned long VL_IOMMU_IOAS_MAP_FILE = IOMMU_IOAS_MAP_FILE;
static const unsigned long VL_IOMMU_IOAS_CHANGE_PROCESS = IOMMU_IOAS_CHANGE_PROCESS;
static const unsigned long VL_IOMMU_GET_HW_INFO = IOMMU_GET_HW_INFO;
static const unsigned long VL_IOMMU_HWPT_ALLOC = IOMMU_HWPT_ALLOC;

#endif
