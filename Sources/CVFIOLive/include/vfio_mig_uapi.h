/*
 * Migration v2 additions for kernel VFIO devices, apart from vfio_uapi.h (which carries the
 * structs): ioctl numbers Swift cannot expand from the _IO macros. Layouts and numbers are
 * checked in layout_checks.c.
 */
#ifndef VFIO_LIVE_MIG_UAPI_H
#define VFIO_LIVE_MIG_UAPI_H

#include "vfio_uapi.h"

/* On the migration data_fd, in PRE_COPY and PRE_COPY_P2P only (else EINVAL). */
static const unsigned long VL_VFIO_MIG_GET_PRECOPY_INFO = VFIO_MIG_GET_PRECOPY_INFO;

#endif
