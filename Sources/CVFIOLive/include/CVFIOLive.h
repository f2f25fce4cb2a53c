/*
 * The C side of vfio-live: kernel UAPI layouts plus thin static-inline wrappers for what Swift
 * cannot call directly (variadic ioctl, CMSG/SCM_RIGHTS handling, memfd_create). Each wrapper
 * returns the raw syscall result; the Swift SystemCalls layer turns -1/errno into `Errno` and
 * retries EINTR.
 */
#ifndef VFIO_LIVE_C_H
#define VFIO_LIVE_C_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <poll.h>
#include <signal.h>

#include "vfio_uapi.h"
#include "iommufd_uapi.h"
#include "iommufd_hwpt_uapi.h"
#include "kvm_uapi.h"
#include "vfio_mig_uapi.h"
#include "vl_checksum.h"

/* The largest fd count one message may carry (SCM_MAX_FD in the kernel is 253). */
#define VL_MAX_FDS_PER_MESSAGE 253

/* A read prefetch of the cache line at `p` (no fault if it is not mapped). */
static inline void vl_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

int vl_ioctl_ptr(int fd, unsigned long request, void *arg);
int vl_ioctl_val(int fd, unsigned long request, unsigned long value);
int vl_errno(void);
/* memfd_create flags (linux/memfd.h) */
#define VL_MFD_CLOEXEC 0x0001u
#define VL_MFD_ALLOW_SEALING 0x0002u
int vl_memfd_create(const char *name, unsigned int flags);
/* One sendmsg carrying `iovcnt` buffers and, if nfds > 0, the fds as SCM_RIGHTS (MSG_NOSIGNAL). */
ssize_t vl_sendmsg_fds(int sock, const struct iovec *iov, int iovcnt, const int *fds, int nfds);
/* One recvmsg collecting at most `max_fds` fds (O_CLOEXEC); surplus fds are closed and
 * `*truncated` set, as it is on MSG_CTRUNC. */
ssize_t vl_recvmsg_fds(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds,
                       int *truncated, int flags);
int vl_unix_bind(int sock, const char *path);
int vl_unix_connect(int sock, const char *path);
int vl_accept(int listen_fd);
int vl_set_cloexec(int fd, int on);
void vl_set_thread_name(const char *name);
int vl_seal_memfd_future_write(int fd);
void vl_keep_large_buffers_resident(void);

#endif
