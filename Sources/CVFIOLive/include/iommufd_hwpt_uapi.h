/*
 * iommufd hardware page tables with dirty tracking (linux/iommufd.h): the ioctl numbers Swift
 * needs as constants, IOMMU_OPTION's ids, and — test-only — the IOMMUFD_TEST mock domain's
 * command (drivers/iommu/iommufd/iommufd_test.h), which plays the IOMMU hardware that sets
 * dirty bits. The structs of the HWPT ioctls themselves are in iommufd_uapi.h. Layouts are
 * checked in layout_checks_hwpt.c.
 */
#ifndef VFIO_LIVE_IOMMUFD_HWPT_UAPI_H
#define VFIO_LIVE_IOMMUFD_HWPT_UAPI_H

#include <stdint.h>
#include "iommufd_uapi.h"

static const unsigned long VL_IOMMU_HWPT_SET_DIRTY_TRACKING = IOMMU_HWPT_SET_DIRTY_TRACKING;
static const unsigned long VL_IOMMU_HWPT_GET_DIRTY_BITMAP = IOMMU_HWPT_GET_DIRTY_BITMAP;
static const unsigned long VL_IOMMU_OPTION = IOMMU_OPTION;

/* enum iommufd_option / iommufd_option_ops */
#define IOMMU_OPTION_RLIMIT_MODE 0u
#define IOMMU_OPTION_HUGE_PAGES  1u
#define IOMMU_OPTION_OP_SET 0u
#define IOMMU_OPTION_OP_GET 1u

/* ---- Test-only: the IOMMUFD_TEST mock domain (a kernel built with CONFIG_IOMMUFD_TEST) ---- */

#define IOMMU_TEST_CMD VL_IO(0x80 + 32)
static const unsigned long VL_IOMMU_TEST_CMD = IOMMU_TEST_CMD;

/* The ops this project uses; the kernel's enum starts at 1 (ADD_RESERVED). */
#define IOMMU_TEST_OP_MOCK_DOMAIN         2u
#define IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE 10u
#define IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS   12u
#define IOMMU_TEST_OP_DIRTY               13u

/* A mock device whose IOMMU has no dirty bit (HWPT_ALLOC with DIRTY_TRACKING is refused). */
#define MOCK_FLAGS_DEVICE_NO_DIRTY (1u << 0)
/* The mock domain's aperture and IO page size (2 KiB, half a CPU page). */
#define MOCK_APERTURE_START (1ull << 24)
#define MOCK_PAGE_SIZE 2048u

/* struct iommu_test_cmd with the union members vfio-live uses; `__union_size` holds the
 * union at the kernel's size (its largest member is `dirty`, 48 bytes). */
struct iommu_test_cmd {
    uint32_t size;
    uint32_t op;
    uint32_t id;
    uint32_t __reserved;
    union {
        struct {
            uint32_t out_stdev_id;
            uint32_t out_hwpt_id;
            uint32_t out_idev_id;
        } mock_domain;
        struct {
            uint32_t out_stdev_id;
            uint32_t out_hwpt_id;
            uint32_t out_idev_id;
            uint32_t dev_flags;
        } mock_domain_flags;
        struct {
            uint32_t pt_id;
        } mock_domain_replace;
        struct {
            uint32_t flags;
            VL_ALIGNED_U64 iova;
            VL_ALIGNED_U64 length;
            VL_ALIGNED_U64 page_size;
            VL_ALIGNED_U64 uptr;
            VL_ALIGNED_U64 out_nr_dirty;
        } dirty;
        uint8_t __union_size[48];
    } u;
    uint32_t last;
};

#endif
