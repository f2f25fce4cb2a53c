/*
 * Compile-time proof that the HWPT dirty-tracking ioctls and the IOMMUFD_TEST command match
 * the kernel byte for byte (linux/iommufd.h; drivers/iommu/iommufd/iommufd_test.h).
 */
#include "CVFIOLive.h"

#define SIZE(t, n) _Static_assert(sizeof(struct t) == (n), #t " size")
#define OFF(t, f, n) _Static_assert(offsetof(struct t, f) == (n), #t "." #f " offset")

_Static_assert(IOMMU_OPTION == 0x3B87, "IOMMU_OPTION");
_Static_assert(IOMMU_HWPT_ALLOC == 0x3B89, "HWPT_ALLOC");
_Static_assert(IOMMU_GET_HW_INFO == 0x3B8A, "GET_HW_INFO");
_Static_assert(IOMMU_HWPT_SET_DIRTY_TRACKING == 0x3B8B, "HWPT_SET_DIRTY_TRACKING");
_Static_assert(IOMMU_HWPT_GET_DIRTY_BITMAP == 0x3B8C, "HWPT_GET_DIRTY_BITMAP");
_Static_assert(IOMMU_TEST_CMD == 0x3BA0, "IOMMU_TEST_CMD");

/* The flag values are UAPI too. */
_Static_assert(IOMMU_HWPT_ALLOC_DIRTY_TRACKING == 2, "HWPT_ALLOC_DIRTY_TRACKING");
_Static_assert(IOMMU_HWPT_DIRTY_TRACKING_ENABLE == 1, "DIRTY_TRACKING_ENABLE");
_Static_assert(IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR == 1, "GET_DIRTY_BITMAP_NO_CLEAR");
_Static_assert(IOMMU_HW_CAP_DIRTY_TRACKING == 1, "HW_CAP_DIRTY_TRACKING");

SIZE(iommu_test_cmd, 72);
OFF(iommu_test_cmd, id, 8);
OFF(iommu_test_cmd, u, 16);
OFF(iommu_test_cmd, u.mock_domain.out_hwpt_id, 20);
OFF(iommu_test_cmd, u.mock_domain.out_idev_id, 24);
OFF(iommu_test_cmd, u.mock_domain_flags.dev_flags, 28);
OFF(iommu_test_cmd, u.dirty.flags, 16);
OFF(iommu_test_cmd, u.dirty.iova, 24);
OFF(iommu_test_cmd, u.dirty.length, 32);
OFF(iommu_test_cmd, u.dirty.page_size, 40);
OFF(iommu_test_cmd, u.dirty.uptr, 48);
OFF(iommu_test_cmd, u.dirty.out_nr_dirty, 56);
OFF(iommu_test_cmd, last, 64);
