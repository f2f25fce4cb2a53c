/* Implementations of the wrappers declared in CVFIOLive.h. */
#define _GNU_SOURCE 1
#include <pthread.h>
#include "CVFIOLive.h"

/* The largest fd count one message may carry (SCM_MAX_FD in the kernel is 253). */

int vl_ioctl_ptr(int fd, unsigned long request, void *arg) {
    return ioctl(fd, request, arg);
}

int vl_ioctl_val(int fd, unsigned long request, unsigned long value) {
    return ioctl(fd, request, value);
}

int vl_errno(void) { return errno; }

int vl_memfd_create(const char *name, unsigned int flags) {
    return (int)syscall(SYS_memfd_create, name, flags);
}

/* One sendmsg carrying `iovcnt` buffers and, if nfds > 0, the fds as SCM_RIGHTS. */
ssize_t vl_sendmsg_fds(int sock, const struct iovec *iov, int iovcnt,
                                     const int *fds, int nfds) {
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = (struct iovec *)iov;
    msg.msg_iovlen = (size_t)iovcnt;
    union {
        char buf[CMSG_SPACE(sizeof(int) * VL_MAX_FDS_PER_MESSAGE)];
        struct cmsghdr align;
    } control;
    if (nfds > 0) {
        if (nfds > VL_MAX_FDS_PER_MESSAGE) { errno = EINVAL; return -1; }
        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)nfds);
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL);
}

/*
 * One recvmsg into `buf`, collecting at most `max_fds` SCM_RIGHTS fds into `fds` (O_CLOEXEC).
 * Any fd beyond `max_fds` that still arrived is closed here, and `*truncated` is set to 1 both
 * for that and for MSG_CTRUNC, so the caller can reject the message: a peer that sends more fds
 * than negotiated never leaks one into this process.
 */
ssize_t vl_recvmsg_fds(int sock, void *buf, size_t len, int *fds, int max_fds,
                                     int *nfds, int *truncated, int flags) {
    struct msghdr msg;
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    union {
        char buf[CMSG_SPACE(sizeof(int) * VL_MAX_FDS_PER_MESSAGE)];
        struct cmsghdr align;
    } control;
    if (max_fds < 0) max_fds = 0;
    if (max_fds > VL_MAX_FDS_PER_MESSAGE) max_fds = VL_MAX_FDS_PER_MESSAGE;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    /* Always leave room for at least one fd so that an unexpected fd is received and closed
     * rather than silently dropped into a truncated control buffer. */
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)(max_fds > 0 ? max_fds : 1));
    *nfds = 0;
    *truncated = 0;
    ssize_t n = recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    if (msg.msg_flags & MSG_CTRUNC) *truncated = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *incoming = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, &incoming[i], sizeof(int));
            if (*nfds < max_fds) {
                fds[(*nfds)++] = fd;
            } else {
                close(fd);
                *truncated = 1;
            }
        }
    }
    return n;
}

/* sockaddr_un handling: Swift cannot easily build a sockaddr_un with a fixed char array. */
int vl_unix_bind(int sock, const char *path) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(addr.sun_path)) { errno = ENAMETOOLONG; return -1; }
    strcpy(addr.sun_path, path);
    return bind(sock, (struct sockaddr *)&addr, sizeof(addr));
}

int vl_unix_connect(int sock, const char *path) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(addr.sun_path)) { errno = ENAMETOOLONG; return -1; }
    strcpy(addr.sun_path, path);
    return connect(sock, (struct sockaddr *)&addr, sizeof(addr));
}

/* FD_CLOEXEC toggling, used by cpr-exec (clear) and after load (set again). */
int vl_set_cloexec(int fd, int on) {
    int flags = fcntl(fd, F_GETFD);
    if (flags < 0) return -1;
    flags = on ? (flags | FD_CLOEXEC) : (flags & ~FD_CLOEXEC);
    return fcntl(fd, F_SETFD, flags);
}

int vl_accept(int listen_fd) {
    return accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
}

void vl_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, sizeof(buf) - 1);
    buf[sizeof(buf) - 1] = 0;
    pthread_setname_np(pthread_self(), buf);
}

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

/* Freeze a memfd's size and forbid any new writable mapping or write(): mappings made before
 * stay writable. Used to hand out read-only views of device memory. */
int vl_seal_memfd_future_write(int fd) {
    return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE);
}

#include <malloc.h>
/* Keep large heap blocks resident (see Allocator.keepLargeBuffersResident in Swift). */
void vl_keep_large_buffers_resident(void) {
    mallopt(M_MMAP_THRESHOLD, 256 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
}
