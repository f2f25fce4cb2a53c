/*
 * Compile-time proof that the UAPI structs we carry match the kernel byte for byte.
 * Every size and offset below is a fact from shared/reference/kernel-uapi.md ([SRC][CC]).
 * If one fails, the build fails: nothing in vfio-live may talk to a kernel with a wrong layout.
 */
#include "CVFIOLive.h"

#define SIZE(t, n) _Static_assert(sizeof(struct t) == (n), #t " size")
#define OFF(t, f, n) _Static_assert(offsetof(struct t, f) == (n), #t "." #f " offset")

/* ioctl numbers are _IO(';', nr) */
_Static_assert(VFIO_GET_API_VERSION == 0x3B64, "GET_API_VERSION");
_Static_assert(VFIO_CHECK_EXTENSION == 0x3B65, "CHECK_EXTENSION");
_Static_assert(VFIO_GROUP_GET_DEVICE_FD == 0x3B6A, "GROUP_GET_DEVICE_FD");
_Static_assert(VFIO_DEVICE_RESET == 0x3B6F, "DEVICE_RESET");
_Static_assert(VFIO_IOMMU_GET_INFO == 0x3B70, "IOMMU_GET_INFO");
_Static_assert(VFIO_IOMMU_MAP_DMA == 0x3B71, "MAP_DMA");
_Static_assert(VFIO_IOMMU_UNMAP_DMA == 0x3B72, "UNMAP_DMA");
_Static_assert(VFIO_IOMMU_DIRTY_PAGES == 0x3B75, "DIRTY_PAGES");
_Static_assert(VFIO_DEVICE_FEATURE == 0x3B75, "DEVICE_FEATURE");
_Static_assert(VFIO_DEVICE_BIND_IOMMUFD == 0x3B76, "BIND_IOMMUFD");
_Static_assert(VFIO_MIG_GET_PRECOPY_INFO == 0x3B79, "PRECOPY_INFO");
_Static_assert(IOMMU_IOAS_MAP_FILE == 0x3B8F, "IOAS_MAP_FILE");
_Static_assert(IOMMU_IOAS_CHANGE_PROCESS == 0x3B92, "IOAS_CHANGE_PROCESS");

SIZE(vfio_info_cap_header, 8);
OFF(vfio_info_cap_header, next, 4);
SIZE(vfio_group_status, 8);
SIZE(vfio_device_info, 24);
OFF(vfio_device_info, cap_offset, 16);
SIZE(vfio_region_info, 32);
OFF(vfio_region_info, cap_offset, 12);
OFF(vfio_region_info, size, 16);
OFF(vfio_region_info, offset, 24);
SIZE(vfio_region_sparse_mmap_area, 16);
SIZE(vfio_region_info_cap_sparse_mmap, 16);
OFF(vfio_region_info_cap_sparse_mmap, nr_areas, 8);
OFF(vfio_region_info_cap_sparse_mmap, areas, 16);
SIZE(vfio_region_info_cap_type, 16);
OFF(vfio_region_info_cap_type, subtype, 12);
SIZE(vfio_irq_info, 16);
SIZE(vfio_irq_set, 20);
OFF(vfio_irq_set, data, 20);

SIZE(vfio_iommu_type1_info, 24);
OFF(vfio_iommu_type1_info, iova_pgsizes, 8);
OFF(vfio_iommu_type1_info, cap_offset, 16);
SIZE(vfio_iova_range, 16);
OFF(vfio_iommu_type1_info_cap_iova_range, iova_ranges, 16);
SIZE(vfio_iommu_type1_info_cap_migration, 32);
OFF(vfio_iommu_type1_info_cap_migration, pgsize_bitmap, 16);
OFF(vfio_iommu_type1_info_cap_migration, max_dirty_bitmap_size, 24);
SIZE(vfio_iommu_type1_info_dma_avail, 12);
SIZE(vfio_iommu_type1_dma_map, 32);
OFF(vfio_iommu_type1_dma_map, vaddr, 8);
OFF(vfio_iommu_type1_dma_map, iova, 16);
OFF(vfio_iommu_type1_dma_map, size, 24);
SIZE(vfio_bitmap, 24);
SIZE(vfio_iommu_type1_dma_unmap, 24);
OFF(vfio_iommu_type1_dma_unmap, data, 24);
SIZE(vfio_iommu_type1_dirty_bitmap, 8);
SIZE(vfio_iommu_type1_dirty_bitmap_get, 40);
OFF(vfio_iommu_type1_dirty_bitmap_get, bitmap, 16);

SIZE(vfio_device_feature, 8);
SIZE(vfio_device_feature_migration, 8);
SIZE(vfio_device_feature_mig_state, 8);
SIZE(vfio_precopy_info, 24);
OFF(vfio_precopy_info, initial_bytes, 8);
OFF(vfio_precopy_info, dirty_bytes, 16);
SIZE(vfio_device_feature_dma_logging_control, 24);
OFF(vfio_device_feature_dma_logging_control, ranges, 16);
SIZE(vfio_device_feature_dma_logging_range, 16);
SIZE(vfio_device_feature_dma_logging_report, 32);
OFF(vfio_device_feature_dma_logging_report, bitmap, 24);
SIZE(vfio_device_feature_mig_data_size, 8);
OFF(vfio_device_feature_mig_state, data_fd, 4);
OFF(vfio_precopy_info, flags, 4);
SIZE(vfio_device_migration_info, 32);
OFF(vfio_device_migration_info, pending_bytes, 8);
OFF(vfio_device_migration_info, data_offset, 16);
OFF(vfio_device_migration_info, data_size, 24);
SIZE(vfio_device_bind_iommufd, 24);
OFF(vfio_device_bind_iommufd, out_devid, 12);
OFF(vfio_device_bind_iommufd, token_uuid_ptr, 16);
SIZE(vfio_device_attach_iommufd_pt, 16);
SIZE(vfio_device_detach_iommufd_pt, 12);

SIZE(iommu_destroy, 8);
SIZE(iommu_ioas_alloc, 12);
SIZE(iommu_iova_range, 16);
SIZE(iommu_ioas_iova_ranges, 32);
OFF(iommu_ioas_iova_ranges, out_iova_alignment, 24);
SIZE(iommu_ioas_allow_iovas, 24);
SIZE(iommu_ioas_map, 40);
OFF(iommu_ioas_map, user_va, 16);
OFF(iommu_ioas_map, iova, 32);
SIZE(iommu_ioas_map_file, 40);
OFF(iommu_ioas_map_file, fd, 12);
OFF(iommu_ioas_map_file, start, 16);
SIZE(iommu_ioas_copy, 40);
SIZE(iommu_ioas_unmap, 24);
OFF(iommu_ioas_unmap, iova, 8);
SIZE(iommu_option, 24);
OFF(iommu_option, object_id, 12);
SIZE(iommu_vfio_ioas, 12);
SIZE(iommu_hwpt_alloc, 48);
OFF(iommu_hwpt_alloc, data_uptr, 32);
OFF(iommu_hwpt_alloc, fault_id, 40);
SIZE(iommu_hw_info, 40);
OFF(iommu_hw_info, out_data_type, 24);
OFF(iommu_hw_info, out_max_pasid_log2, 28);
OFF(iommu_hw_info, out_capabilities, 32);
SIZE(iommu_hwpt_set_dirty_tracking, 16);
OFF(iommu_hwpt_set_dirty_tracking, hwpt_id, 8);
SIZE(iommu_hwpt_get_dirty_bitmap, 48);
OFF(iommu_hwpt_get_dirty_bitmap, hwpt_id, 4);
OFF(iommu_hwpt_get_dirty_bitmap, flags, 8);
OFF(iommu_hwpt_get_dirty_bitmap, data, 40);
SIZE(iommu_ioas_change_process, 8);
