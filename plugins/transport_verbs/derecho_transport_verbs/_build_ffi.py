"""cffi API-mode build of the libfabric binding (``derecho_transport_verbs._fi_cffi``).

API mode is the only mode that works: ``libfabric.so.1`` exports about sixteen
functions, everything else (``fi_domain``, ``fi_endpoint``, ``fi_cq_read``,
``fi_send``, ``fi_write``, ``fi_close`` ...) is a ``static inline`` in the
headers. Declaring the inlines below as ordinary prototypes makes cffi
generate a C wrapper for each; partial structs (``...;``) and
``#define X ...`` let the compiler fill in layouts and values.

Needs ``libfabric-dev`` (headers and ``libfabric.so``) at build time and only
``libfabric1`` at run time. Run directly (``python _build_ffi.py``) to build
in place, or through setuptools' ``cffi_modules`` (see ``setup.py``).
"""

from __future__ import annotations

import cffi

MODULE_NAME = "derecho_transport_verbs._fi_cffi"

CDEF = r"""
typedef uint64_t fi_addr_t;

#define FI_MAJOR_VERSION ...
#define FI_MINOR_VERSION ...
#define FI_ADDR_UNSPEC ...

/* capabilities and flags (uint64) */
#define FI_MSG ...
#define FI_RMA ...
#define FI_TAGGED ...
#define FI_READ ...
#define FI_WRITE ...
#define FI_RECV ...
#define FI_SEND ...
#define FI_REMOTE_READ ...
#define FI_REMOTE_WRITE ...
#define FI_SOURCE ...
#define FI_NUMERICHOST ...
#define FI_DELIVERY_COMPLETE ...
#define FI_TRANSMIT_COMPLETE ...
#define FI_INJECT_COMPLETE ...
#define FI_COMPLETION ...
#define FI_REMOTE_CQ_DATA ...
#define FI_TRANSMIT ...
#define FI_CONTEXT ...
#define FI_CONTEXT2 ...
#define FI_MSG_PREFIX ...
#define FI_RX_CQ_DATA ...
#define FI_LOCAL_COMM ...
#define FI_ORDER_SAS ...
#define FI_ORDER_SAW ...
#define FI_REMOTE_COMM ...

/* mr_mode bits */
#define FI_MR_LOCAL ...
#define FI_MR_RAW ...
#define FI_MR_VIRT_ADDR ...
#define FI_MR_ALLOCATED ...
#define FI_MR_PROV_KEY ...
#define FI_MR_MMU_NOTIFY ...
#define FI_MR_RMA_EVENT ...
#define FI_MR_ENDPOINT ...
#define FI_MR_HMEM ...

/* errors (positive; functions return their negatives) */
#define FI_SUCCESS ...
#define FI_EAGAIN ...
#define FI_EAVAIL ...
#define FI_ENODATA ...
#define FI_ENOKEY ...
#define FI_ETRUNC ...
#define FI_ECANCELED ...
#define FI_EBUSY ...
#define FI_ENOMEM ...
#define FI_EINVAL ...
#define FI_EACCES ...
#define FI_ECONNREFUSED ...
#define FI_ECONNRESET ...
#define FI_ECONNABORTED ...
#define FI_ENOSYS ...
#define FI_EOPNOTSUPP ...
#define FI_ETIMEDOUT ...
#define FI_EIO ...
#define FI_EMSGSIZE ...
#define FI_ENOENT ...

enum fi_ep_type { FI_EP_UNSPEC, FI_EP_MSG, FI_EP_DGRAM, FI_EP_RDM, ... };
enum fi_av_type { FI_AV_UNSPEC, FI_AV_MAP, FI_AV_TABLE };
enum fi_progress { FI_PROGRESS_UNSPEC, FI_PROGRESS_AUTO, FI_PROGRESS_MANUAL };
enum fi_threading { FI_THREAD_UNSPEC, FI_THREAD_SAFE, FI_THREAD_FID, FI_THREAD_DOMAIN,
                    FI_THREAD_COMPLETION, FI_THREAD_ENDPOINT };
enum fi_resource_mgmt { FI_RM_UNSPEC, FI_RM_DISABLED, FI_RM_ENABLED };
enum fi_cq_format { FI_CQ_FORMAT_UNSPEC, FI_CQ_FORMAT_CONTEXT, FI_CQ_FORMAT_MSG,
                    FI_CQ_FORMAT_DATA, FI_CQ_FORMAT_TAGGED };
enum fi_wait_obj { FI_WAIT_NONE, FI_WAIT_UNSPEC, FI_WAIT_SET, FI_WAIT_FD, FI_WAIT_MUTEX_COND,
                   FI_WAIT_YIELD, FI_WAIT_POLLFD };
enum { FI_GETFIDFLAG, FI_SETFIDFLAG, FI_GETOPSFLAG, FI_SETOPSFLAG, FI_ALIAS, FI_GETWAIT, ... };
enum fi_type { FI_TYPE_INFO, FI_TYPE_EP_TYPE, FI_TYPE_CAPS, ... };

struct fid { size_t fclass; void *context; ...; };
typedef struct fid *fid_t;
struct fid_fabric { struct fid fid; ...; };
struct fid_domain { struct fid fid; ...; };
struct fid_ep { struct fid fid; ...; };
struct fid_cq { struct fid fid; ...; };
struct fid_av { struct fid fid; ...; };
struct fid_mr { struct fid fid; void *mem_desc; uint64_t key; ...; };
struct fid_nic;

struct iovec { void *iov_base; size_t iov_len; };

struct fi_tx_attr {
    uint64_t caps; uint64_t mode; uint64_t op_flags; uint64_t msg_order; uint64_t comp_order;
    size_t inject_size; size_t size; size_t iov_limit; size_t rma_iov_limit; ...;
};
struct fi_rx_attr {
    uint64_t caps; uint64_t mode; uint64_t op_flags; uint64_t msg_order; uint64_t comp_order;
    size_t total_buffered_recv; size_t size; size_t iov_limit; ...;
};
struct fi_ep_attr { enum fi_ep_type type; size_t max_msg_size; ...; };
struct fi_domain_attr {
    struct fid_domain *domain; char *name; enum fi_threading threading;
    enum fi_progress control_progress; enum fi_progress data_progress;
    enum fi_resource_mgmt resource_mgmt; enum fi_av_type av_type; int mr_mode;
    size_t mr_key_size; size_t cq_data_size; size_t cq_cnt; size_t ep_cnt; size_t mr_iov_limit;
    ...;
};
struct fi_fabric_attr { struct fid_fabric *fabric; char *name; char *prov_name;
                        uint32_t prov_version; uint32_t api_version; ...; };
struct fi_info {
    struct fi_info *next; uint64_t caps; uint64_t mode; uint32_t addr_format;
    size_t src_addrlen; size_t dest_addrlen; void *src_addr; void *dest_addr;
    struct fi_tx_attr *tx_attr; struct fi_rx_attr *rx_attr; struct fi_ep_attr *ep_attr;
    struct fi_domain_attr *domain_attr; struct fi_fabric_attr *fabric_attr; ...;
};
struct fi_cq_attr { size_t size; uint64_t flags; enum fi_cq_format format; enum fi_wait_obj wait_obj; ...; };
struct fi_av_attr { enum fi_av_type type; size_t count; uint64_t flags; ...; };
struct fi_cq_tagged_entry { void *op_context; uint64_t flags; size_t len; void *buf; uint64_t data; uint64_t tag; };
struct fi_cq_err_entry {
    void *op_context; uint64_t flags; size_t len; void *buf; uint64_t data; uint64_t tag;
    size_t olen; int err; int prov_errno; void *err_data; size_t err_data_size; ...;
};
struct fi_rma_iov { uint64_t addr; size_t len; uint64_t key; };
struct fi_msg_rma {
    const struct iovec *msg_iov; void **desc; size_t iov_count; fi_addr_t addr;
    const struct fi_rma_iov *rma_iov; size_t rma_iov_count; void *context; uint64_t data;
};

/* exported by libfabric.so */
uint32_t fi_version(void);
int fi_getinfo(uint32_t version, const char *node, const char *service, uint64_t flags,
               const struct fi_info *hints, struct fi_info **info);
void fi_freeinfo(struct fi_info *info);
struct fi_info *fi_dupinfo(const struct fi_info *info);
int fi_fabric(struct fi_fabric_attr *attr, struct fid_fabric **fabric, void *context);
const char *fi_strerror(int errnum);
char *fi_tostr(const void *data, enum fi_type datatype);

/* static inline in the headers: cffi generates wrappers */
struct fi_info *fi_allocinfo(void);
int fi_close(struct fid *fid);
int fi_control(struct fid *fid, int command, void *arg);
int fi_domain(struct fid_fabric *fabric, struct fi_info *info, struct fid_domain **domain, void *context);
int fi_endpoint(struct fid_domain *domain, struct fi_info *info, struct fid_ep **ep, void *context);
int fi_cq_open(struct fid_domain *domain, struct fi_cq_attr *attr, struct fid_cq **cq, void *context);
int fi_av_open(struct fid_domain *domain, struct fi_av_attr *attr, struct fid_av **av, void *context);
int fi_ep_bind(struct fid_ep *ep, struct fid *bfid, uint64_t flags);
int fi_enable(struct fid_ep *ep);
int fi_getname(fid_t fid, void *addr, size_t *addrlen);
int fi_av_insert(struct fid_av *av, const void *addr, size_t count, fi_addr_t *fi_addr,
                 uint64_t flags, void *context);
int fi_av_remove(struct fid_av *av, fi_addr_t *fi_addr, size_t count, uint64_t flags);
int fi_mr_reg(struct fid_domain *domain, const void *buf, size_t len, uint64_t access,
              uint64_t offset, uint64_t requested_key, uint64_t flags, struct fid_mr **mr, void *context);
void *fi_mr_desc(struct fid_mr *mr);
uint64_t fi_mr_key(struct fid_mr *mr);
int fi_mr_bind(struct fid_mr *mr, struct fid *bfid, uint64_t flags);
int fi_mr_enable(struct fid_mr *mr);
ssize_t fi_send(struct fid_ep *ep, const void *buf, size_t len, void *desc, fi_addr_t dest_addr, void *context);
ssize_t fi_sendv(struct fid_ep *ep, const struct iovec *iov, void **desc, size_t count,
                 fi_addr_t dest_addr, void *context);
ssize_t fi_inject(struct fid_ep *ep, const void *buf, size_t len, fi_addr_t dest_addr);
ssize_t fi_recv(struct fid_ep *ep, void *buf, size_t len, void *desc, fi_addr_t src_addr, void *context);
ssize_t fi_tsend(struct fid_ep *ep, const void *buf, size_t len, void *desc, fi_addr_t dest_addr,
                 uint64_t tag, void *context);
ssize_t fi_tsendv(struct fid_ep *ep, const struct iovec *iov, void **desc, size_t count,
                  fi_addr_t dest_addr, uint64_t tag, void *context);
ssize_t fi_trecv(struct fid_ep *ep, void *buf, size_t len, void *desc, fi_addr_t src_addr,
                 uint64_t tag, uint64_t ignore, void *context);
ssize_t fi_write(struct fid_ep *ep, const void *buf, size_t len, void *desc, fi_addr_t dest_addr,
                 uint64_t addr, uint64_t key, void *context);
ssize_t fi_writedata(struct fid_ep *ep, const void *buf, size_t len, void *desc, uint64_t data,
                     fi_addr_t dest_addr, uint64_t addr, uint64_t key, void *context);
ssize_t fi_writemsg(struct fid_ep *ep, const struct fi_msg_rma *msg, uint64_t flags);
ssize_t fi_read(struct fid_ep *ep, void *buf, size_t len, void *desc, fi_addr_t src_addr,
                uint64_t addr, uint64_t key, void *context);
ssize_t fi_cq_read(struct fid_cq *cq, void *buf, size_t count);
ssize_t fi_cq_readerr(struct fid_cq *cq, struct fi_cq_err_entry *buf, uint64_t flags);
const char *fi_cq_strerror(struct fid_cq *cq, int prov_errno, const void *err_data, char *buf, size_t len);
int fi_trywait(struct fid_fabric *fabric, struct fid **fids, int count);
ssize_t fi_cancel(fid_t fid, void *context);

/* helpers defined in the source below */
uint32_t drc_fi_version(void);
char *drc_strdup(const char *s);
"""

SOURCE = r"""
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_rma.h>
#include <rdma/fi_tagged.h>
#include <rdma/fi_errno.h>

/* The API version we ask for: the headers we were built against. */
static uint32_t drc_fi_version(void) { return FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION); }
/* hints->fabric_attr->prov_name is freed by fi_freeinfo: it must come from malloc. */
static char *drc_strdup(const char *s) { return s ? strdup(s) : NULL; }
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(MODULE_NAME, SOURCE, libraries=["fabric"])

if __name__ == "__main__":  # pragma: no cover - developer convenience
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    ffibuilder.compile(tmpdir=os.path.dirname(here), verbose=True)
