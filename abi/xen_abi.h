/*
 * xen_abi.h - the hypercall ABI trapless follows: Xen's public x86-64 interface.
 *
 * THE CONTRACT. The C extension includes this file and cffi builds its Python side
 * from the cdef part below; Python reads every number and layout from there
 * (abi/__init__.py); the guest assembler uses those numbers and offsets by name.
 * Nothing here is retyped anywhere else.
 *
 * Written from the facts in shared/XEN-ABI-FACTS.md. Everything between the
 * cdef markers must stay in the subset cffi's cdef parses: plain integer #defines
 * and structs of fixed-width fields (explicit padding where Xen's layout has holes).
 */
#ifndef TRAPLESS_XEN_ABI_H
#define TRAPLESS_XEN_ABI_H
#include <stdint.h>

/* cdef-begin */

/* ---- hypercall numbers (rax) ------------------------------------------------ */
#define __HYPERVISOR_set_trap_table                  0
#define __HYPERVISOR_mmu_update                      1
#define __HYPERVISOR_set_gdt                         2
#define __HYPERVISOR_stack_switch                    3
#define __HYPERVISOR_set_callbacks                   4
#define __HYPERVISOR_fpu_taskswitch                  5
#define __HYPERVISOR_sched_op_compat                 6
#define __HYPERVISOR_platform_op                     7
#define __HYPERVISOR_set_debugreg                    8
#define __HYPERVISOR_get_debugreg                    9
#define __HYPERVISOR_update_descriptor              10
#define __HYPERVISOR_memory_op                      12
#define __HYPERVISOR_multicall                      13
#define __HYPERVISOR_update_va_mapping              14
#define __HYPERVISOR_set_timer_op                   15
#define __HYPERVISOR_event_channel_op_compat        16
#define __HYPERVISOR_xen_version                    17
#define __HYPERVISOR_console_io                     18
#define __HYPERVISOR_physdev_op_compat              19
#define __HYPERVISOR_grant_table_op                 20
#define __HYPERVISOR_vm_assist                      21
#define __HYPERVISOR_update_va_mapping_otherdomain  22
#define __HYPERVISOR_iret                           23
#define __HYPERVISOR_vcpu_op                        24
#define __HYPERVISOR_set_segment_base               25
#define __HYPERVISOR_mmuext_op                      26
#define __HYPERVISOR_xsm_op                         27
#define __HYPERVISOR_nmi_op                         28
#define __HYPERVISOR_sched_op                       29
#define __HYPERVISOR_callback_op                    30
#define __HYPERVISOR_xenoprof_op                    31
#define __HYPERVISOR_event_channel_op               32
#define __HYPERVISOR_physdev_op                     33
#define __HYPERVISOR_hvm_op                         34
#define __HYPERVISOR_sysctl                         35
#define __HYPERVISOR_domctl                         36
#define __HYPERVISOR_kexec_op                       37
#define __HYPERVISOR_tmem_op                        38
#define __HYPERVISOR_argo_op                        39
#define __HYPERVISOR_xenpmu_op                      40
#define __HYPERVISOR_dm_op                          41
#define __HYPERVISOR_hypfs_op                       42
/* Size of the dispatch table: numbers at or above it are -ENOSYS. */
#define TRAPLESS_NR_HYPERCALLS                      43

/* ---- the hypercall page ------------------------------------------------------ */
/* Stub N lives at page + N * 32 and is: mov eax, N ; in eax, TRAPLESS_HYPERCALL_PORT ;
 * cdqe ; ret. The exit hands the VMM rax and the argument registers; the result comes
 * back as the data the `in` reads (a 32-bit errno or count, sign-extended by cdqe).
 * Guests only `call page + N * 32` and never depend on what the stub holds. */
#define TRAPLESS_HYPERCALL_STUB_SIZE                32
#define TRAPLESS_HYPERCALL_PAGE_STUBS              128
#define TRAPLESS_HYPERCALL_PORT                   0xCA
/* A PVH domain's ACPI sleep registers (hardware-reduced ACPI, FADT SLEEP_CONTROL_REG and
 * SLEEP_STATUS_REG, byte-wide I/O ports where Xen's HVM ACPI PM1a blocks sit) and the
 * SLP_TYP its DSDT's \_S5 names: writing SLP_EN with that type powers the domain off. */
#define TRAPLESS_ACPI_SLEEP_STATUS_PORT           0xB000
#define TRAPLESS_ACPI_SLEEP_CONTROL_PORT          0xB004
#define TRAPLESS_ACPI_S5_SLP_TYP                  5

/* ---- errno values (returned negated in rax) ------------------------------------ */
#define XEN_EPERM            1
#define XEN_ENOENT           2
#define XEN_ESRCH            3
#define XEN_EINTR            4
#define XEN_EIO              5
#define XEN_ENXIO            6
#define XEN_E2BIG            7
#define XEN_ENOEXEC          8
#define XEN_EBADF            9
#define XEN_ECHILD          10
#define XEN_EAGAIN          11
#define XEN_ENOMEM          12
#define XEN_EACCES          13
#define XEN_EFAULT          14
#define XEN_EBUSY           16
#define XEN_EEXIST          17
#define XEN_EXDEV           18
#define XEN_ENODEV          19
#define XEN_ENOTDIR         20
#define XEN_EISDIR          21
#define XEN_EINVAL          22
#define XEN_ENFILE          23
#define XEN_EMFILE          24
#define XEN_ENOSPC          28
#define XEN_EROFS           30
#define XEN_EMLINK          31
#define XEN_EDOM            33
#define XEN_ERANGE          34
#define XEN_EDEADLK         35
#define XEN_ENAMETOOLONG    36
#define XEN_ENOLCK          37
#define XEN_ENOSYS          38
#define XEN_ENOTEMPTY       39
#define XEN_ENODATA         61
#define XEN_ETIME           62
#define XEN_EBADMSG         74
#define XEN_EOVERFLOW       75
#define XEN_EILSEQ          84
#define XEN_ERESTART        85
#define XEN_ENOTSOCK        88
#define XEN_EMSGSIZE        90
#define XEN_EOPNOTSUPP      95
#define XEN_EADDRINUSE      98
#define XEN_EADDRNOTAVAIL   99
#define XEN_ENOBUFS        105
#define XEN_EISCONN        106
#define XEN_ENOTCONN       107
#define XEN_ETIMEDOUT      110
#define XEN_ECONNREFUSED   111

/* ---- console_io(cmd, count, buffer) ------------------------------------------- */
#define CONSOLEIO_write      0
#define CONSOLEIO_read       1

/* ---- xen_version(cmd, arg) ----------------------------------------------------- */
#define XENVER_version              0
#define XENVER_extraversion         1
#define XENVER_compile_info         2
#define XENVER_capabilities         3
#define XENVER_changeset            4
#define XENVER_platform_parameters  5
#define XENVER_get_features         6
#define XENVER_pagesize             7
#define XENVER_guest_handle         8
#define XENVER_commandline          9
#define XENVER_build_id            10

#define XEN_EXTRAVERSION_LEN       16
#define XEN_CAPABILITIES_INFO_LEN 1024
#define XEN_CHANGESET_INFO_LEN     64
#define XEN_COMMANDLINE_INFO_LEN 1024

struct xen_compile_info {
    char compiler[64];
    char compile_by[16];
    char compile_domain[32];
    char compile_date[32];
};

struct xen_platform_parameters {
    uint64_t virt_start;
};

struct xen_feature_info {
    uint32_t submap_idx;            /* in */
    uint32_t submap;                /* out */
};

/* XENVER_get_features submap 0 bits */
#define XENFEAT_writable_page_tables        0
#define XENFEAT_writable_descriptor_tables  1
#define XENFEAT_auto_translated_physmap     2
#define XENFEAT_supervisor_mode_kernel      3
#define XENFEAT_pae_pgdir_above_4gb         4
#define XENFEAT_mmu_pt_update_preserve_ad   5
#define XENFEAT_highmem_assist              6   /* mmuext_op CLEAR_PAGE / COPY_PAGE */
#define XENFEAT_gnttab_map_avail_bits       7   /* PV grant maps keep GNTMAP_guest_avail bits */
#define XENFEAT_hvm_callback_vector         8
#define XENFEAT_hvm_safe_pvclock            9
#define XENFEAT_NR_SUBMAPS                  1

/* ---- sched_op(cmd, arg) ----------------------------------------------------------- */
#define SCHEDOP_yield           0
#define SCHEDOP_block           1
#define SCHEDOP_shutdown        2
#define SCHEDOP_poll            3
#define SCHEDOP_remote_shutdown 4
#define SCHEDOP_shutdown_code   5
#define SCHEDOP_watchdog        6
#define SCHEDOP_pin_override    7

struct sched_shutdown {
    uint32_t reason;
};

struct sched_poll {
    uint64_t ports;                 /* guest pointer to evtchn_port_t[] */
    uint32_t nr_ports;
    uint32_t _pad0;
    uint64_t timeout;               /* absolute system time, ns; 0 = none */
};

struct sched_remote_shutdown {
    uint16_t domain_id;
    uint16_t _pad0;
    uint32_t reason;
};

/* shutdown reasons */
#define SHUTDOWN_poweroff    0
#define SHUTDOWN_reboot      1
#define SHUTDOWN_suspend     2
#define SHUTDOWN_crash       3
#define SHUTDOWN_watchdog    4
#define SHUTDOWN_soft_reset  5

/* ---- domain ids ------------------------------------------------------------------- */
#define DOMID_FIRST_RESERVED  0x7FF0
#define DOMID_SELF            0x7FF0
#define DOMID_IO              0x7FF1
#define DOMID_XEN             0x7FF2
#define DOMID_COW             0x7FF3
#define DOMID_INVALID         0x7FF4
#define DOMID_IDLE            0x7FFF

/* ---- start_info: the x86-64 PV start-of-day page (rsi at entry) ---------------------- */
#define XEN_START_INFO_MAGIC_LEN  32
#define XEN_MAX_GUEST_CMDLINE   1024

struct start_info {
    char     magic[32];             /* "xen-3.0-x86_64" */
    uint64_t nr_pages;              /* pages of pseudo-physical memory */
    uint64_t shared_info;           /* address of the shared_info page */
    uint32_t flags;                 /* SIF_* */
    uint32_t _pad0;
    uint64_t store_mfn;
    uint32_t store_evtchn;
    uint32_t _pad1;
    uint64_t console_mfn;           /* domU view of the console union */
    uint32_t console_evtchn;
    uint32_t _pad2;
    uint64_t pt_base;               /* virtual address of the top-level page table */
    uint64_t nr_pt_frames;
    uint64_t mfn_list;              /* virtual address of the page-frame list */
    uint64_t mod_start;
    uint64_t mod_len;
    char     cmd_line[1024];
    uint64_t first_p2m_pfn;
    uint64_t nr_p2m_frames;
};

#define SIF_PRIVILEGED       1
#define SIF_INITDOMAIN       2
#define SIF_MULTIBOOT_MOD    4
#define SIF_MOD_START_PFN    8

/* ---- the PV console ring (io/console.h): one page shared with the console backend ---- */
/* The frontend (guest) produces into out and consumes from in; the backend does the
 * reverse. Indexes run freely (u32, wrapping) and are masked by the ring size - 1. */
#define XENCONS_IN_SIZE     1024
#define XENCONS_OUT_SIZE    2048
#define XENCONS_CONNECTED     0
#define XENCONS_DISCONNECTED  1

struct xencons_interface {
    char     in[1024];              /* backend -> guest: keyboard input */
    char     out[2048];             /* guest -> backend: console output */
    uint32_t in_cons, in_prod;
    uint32_t out_cons, out_prod;
    uint8_t  connection;            /* XENCONS_CONNECTED / _DISCONNECTED; 3 bytes of tail padding */
};

/* ---- xenstore (io/xs_wire.h): the wire protocol and the ring page ----------------- */
/* A message is a header and len bytes of payload; strings in it end with NUL. */
#define XS_CONTROL               0
#define XS_DIRECTORY             1
#define XS_READ                  2
#define XS_GET_PERMS             3
#define XS_WATCH                 4
#define XS_UNWATCH               5
#define XS_TRANSACTION_START     6
#define XS_TRANSACTION_END       7
#define XS_INTRODUCE             8
#define XS_RELEASE               9
#define XS_GET_DOMAIN_PATH      10
#define XS_WRITE                11
#define XS_MKDIR                12
#define XS_RM                   13
#define XS_SET_PERMS            14
#define XS_WATCH_EVENT          15
#define XS_ERROR                16
#define XS_IS_DOMAIN_INTRODUCED 17
#define XS_RESUME               18
#define XS_SET_TARGET           19
#define XS_RESET_WATCHES        21
#define XS_DIRECTORY_PART       22
#define XS_TYPE_COUNT           27

struct xsd_sockmsg {
    uint32_t type;                  /* XS_* */
    uint32_t req_id;                /* echoed in the reply */
    uint32_t tx_id;                 /* transaction, 0 for none */
    uint32_t len;                   /* bytes of payload after the header */
};

#define XENSTORE_PAYLOAD_MAX    4096
#define XENSTORE_ABS_PATH_MAX   3072
#define XENSTORE_REL_PATH_MAX   2048
#define XENSTORE_RING_SIZE      1024

/* The ring page: requests from the guest in req, replies and watch events to it in rsp.
 * Indexes run freely (u32, wrapping); byte x of a ring is at x & (XENSTORE_RING_SIZE-1). */
struct xenstore_domain_interface {
    char     req[1024];
    char     rsp[1024];
    uint32_t req_cons, req_prod;
    uint32_t rsp_cons, rsp_prod;
    uint32_t server_features;       /* XENSTORE_SERVER_FEATURE_* */
    uint32_t connection;            /* XENSTORE_CONNECTED / _RECONNECT */
    uint32_t error;                 /* XENSTORE_ERROR_*: why the server stopped serving */
    uint32_t evtchn_port;
};

#define XENSTORE_SERVER_FEATURE_RECONNECTION  1
#define XENSTORE_SERVER_FEATURE_ERROR         2
#define XENSTORE_CONNECTED      0
#define XENSTORE_RECONNECT      1
#define XENSTORE_ERROR_NONE     0
#define XENSTORE_ERROR_COMM     1
#define XENSTORE_ERROR_RINGIDX  2
#define XENSTORE_ERROR_PROTO    3

/* ---- split devices: the XenbusState handshake (io/xenbus.h) ---- */
/* Each end publishes its state in its xenstore directory and watches the other's. */
#define XenbusStateUnknown       0
#define XenbusStateInitialising  1
#define XenbusStateInitWait      2      /* backend: features published, waiting for the ring */
#define XenbusStateInitialised   3      /* frontend: ring granted and published */
#define XenbusStateConnected     4
#define XenbusStateClosing       5
#define XenbusStateClosed        6
#define XenbusStateReconfiguring 7
#define XenbusStateReconfigured  8

/* ---- the block device's ring (io/blkif.h, io/ring.h) ---- */
#define BLKIF_OP_READ             0
#define BLKIF_OP_WRITE            1
#define BLKIF_OP_WRITE_BARRIER    2
#define BLKIF_OP_FLUSH_DISKCACHE  3
#define BLKIF_OP_DISCARD          5
#define BLKIF_OP_INDIRECT         6
#define BLKIF_RSP_EOPNOTSUPP     -2
#define BLKIF_RSP_ERROR          -1
#define BLKIF_RSP_OKAY            0
#define BLKIF_MAX_SEGMENTS_PER_REQUEST 11
#define BLKIF_DISCARD_SECURE      1
#define BLKIF_SECTOR_SIZE         512   /* sector_number and first/last_sect count these */
#define BLKIF_SECTORS_PER_PAGE    8
#define VDISK_CDROM               1     /* the backend's info key */
#define VDISK_REMOVABLE           2
#define VDISK_READONLY            4
#define BLKIF_RING_HEADER         64    /* req_prod, req_event, rsp_prod, rsp_event, pad */

/* The shared ring page starts with these indexes (free-running u32), then entries. */
struct blkif_sring_header {
    uint32_t req_prod, req_event;
    uint32_t rsp_prod, rsp_event;
    uint8_t  pad[48];
};

struct blkif_request_segment {
    uint32_t gref;                  /* a granted page */
    uint8_t  first_sect, last_sect; /* inclusive, 512-byte units within it */
    uint8_t  pad[2];
};

struct blkif_request {
    uint8_t  operation;             /* BLKIF_OP_* */
    uint8_t  nr_segments;
    uint16_t handle;
    uint32_t pad;
    uint64_t id;                    /* echoed in the response */
    uint64_t sector_number;
    struct blkif_request_segment seg[11];
};

struct blkif_request_discard {
    uint8_t  operation;             /* BLKIF_OP_DISCARD */
    uint8_t  flag;                  /* BLKIF_DISCARD_SECURE */
    uint16_t handle;
    uint32_t pad;
    uint64_t id;
    uint64_t sector_number;
    uint64_t nr_sectors;
};

/* Segments in pages of their own (feature-max-indirect-segments): 512 a page. */
struct blkif_request_indirect {
    uint8_t  operation;             /* BLKIF_OP_INDIRECT */
    uint8_t  indirect_op;           /* BLKIF_OP_READ or _WRITE */
    uint16_t nr_segments;
    uint32_t pad;
    uint64_t id;
    uint64_t sector_number;
    uint16_t handle;
    uint16_t pad2;
    uint32_t indirect_grefs[8];
    uint32_t pad3;
};
#define BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST 8
#define BLKIF_SEGMENTS_PER_INDIRECT_PAGE     512

struct blkif_response {
    uint64_t id;
    uint8_t  operation;
    uint8_t  pad;
    int16_t  status;                /* BLKIF_RSP_* */
    uint32_t pad2;
};

/* ---- the network device's rings (io/netif.h, io/ring.h) ---- */
/* Two one-page rings, each with the blkif ring's 64-byte header: tx (the frontend's
 * frames out) and rx (its empty buffers in, filled by the backend in rx-copy mode). */
#define NETTXF_csum_blank         1     /* the L4 checksum is not filled in yet */
#define NETTXF_data_validated     2
#define NETTXF_more_data          4     /* another request of this frame follows */
#define NETTXF_extra_info         8     /* a netif_extra_info slot follows */
#define NETRXF_data_validated     1
#define NETRXF_csum_blank         2
#define NETRXF_more_data          4     /* the frame goes on in the next response */
#define NETRXF_extra_info         8
#define NETIF_RSP_DROPPED        -2
#define NETIF_RSP_ERROR          -1
#define NETIF_RSP_OKAY            0
#define NETIF_RSP_NULL            1     /* the response of an extra-info slot */
#define XEN_NETIF_EXTRA_FLAG_MORE 1     /* another extra-info slot follows */
#define XEN_NETIF_MAX_TX_SIZE     65535 /* a frame's total size fits the first request's u16 */
#define NET_RING_HEADER           64
#define NET_TX_RING_SIZE          256   /* (4096 - 64) / 12 = 336, rounded down to 2^n */
#define NET_RX_RING_SIZE          256   /* (4096 - 64) / 8 = 504, rounded down to 2^n */

struct netif_tx_request {
    uint32_t gref;                  /* the page holding this piece of the frame */
    uint16_t offset;                /* where in the page it starts */
    uint16_t flags;                 /* NETTXF_* */
    uint16_t id;                    /* echoed in the response */
    uint16_t size;                  /* the first request: the whole frame; others: theirs */
};

struct netif_tx_response {
    uint16_t id;
    int16_t  status;                /* NETIF_RSP_* */
};

/* Occupies a tx request slot after a request with NETTXF_extra_info. */
struct netif_extra_info {
    uint8_t  type;                  /* XEN_NETIF_EXTRA_TYPE_* (1 gso, 2/3 mcast, 4 hash) */
    uint8_t  flags;                 /* XEN_NETIF_EXTRA_FLAG_* */
    uint16_t u[3];
};

struct netif_rx_request {
    uint16_t id;
    uint16_t pad;
    uint32_t gref;                  /* an empty page the backend may write */
};

struct netif_rx_response {
    uint16_t id;
    uint16_t offset;                /* where in the page the data starts */
    uint16_t flags;                 /* NETRXF_* */
    int16_t  status;                /* > 0: bytes of the frame in this page; < 0: error */
};

/* ---- Xen ELF notes (owner "Xen") ---------------------------------------------------- */
#define XEN_ELFNOTE_INFO                 0
#define XEN_ELFNOTE_ENTRY                1
#define XEN_ELFNOTE_HYPERCALL_PAGE       2
#define XEN_ELFNOTE_VIRT_BASE            3
#define XEN_ELFNOTE_PADDR_OFFSET         4
#define XEN_ELFNOTE_XEN_VERSION          5
#define XEN_ELFNOTE_GUEST_OS             6
#define XEN_ELFNOTE_GUEST_VERSION        7
#define XEN_ELFNOTE_LOADER               8
#define XEN_ELFNOTE_PAE_MODE             9
#define XEN_ELFNOTE_FEATURES            10
#define XEN_ELFNOTE_BSD_SYMTAB          11
#define XEN_ELFNOTE_HV_START_LOW        12
#define XEN_ELFNOTE_L1_MFN_VALID        13
#define XEN_ELFNOTE_SUSPEND_CANCEL      14
#define XEN_ELFNOTE_INIT_P2M            15
#define XEN_ELFNOTE_MOD_START_PFN       16
#define XEN_ELFNOTE_SUPPORTED_FEATURES  17
#define XEN_ELFNOTE_PHYS32_ENTRY        18

/* ---- PVH start of day (arch/x86/hvm/start_info.h): ebx points at hvm_start_info ---- */
#define XEN_HVM_START_MAGIC_VALUE   0x336ec578
#define XEN_HVM_MEMMAP_TYPE_RAM       1
#define XEN_HVM_MEMMAP_TYPE_RESERVED  2
#define XEN_HVM_MEMMAP_TYPE_ACPI      3
#define XEN_HVM_MEMMAP_TYPE_NVS       4
#define XEN_HVM_MEMMAP_TYPE_UNUSABLE  5
#define XEN_HVM_MEMMAP_TYPE_DISABLED  6
#define XEN_HVM_MEMMAP_TYPE_PMEM      7

struct hvm_start_info {
    uint32_t magic;                 /* XEN_HVM_START_MAGIC_VALUE */
    uint32_t version;               /* 1: the memory map fields are there */
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;         /* hvm_modlist_entry[nr_modules] */
    uint64_t cmdline_paddr;         /* NUL-terminated */
    uint64_t rsdp_paddr;            /* ACPI RSDP, 0: none */
    uint64_t memmap_paddr;          /* hvm_memmap_table_entry[memmap_entries] */
    uint32_t memmap_entries;
    uint32_t reserved;
};

struct hvm_modlist_entry {
    uint64_t paddr;
    uint64_t size;
    uint64_t cmdline_paddr;
    uint64_t reserved;
};

struct hvm_memmap_table_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;                  /* XEN_HVM_MEMMAP_TYPE_* */
    uint32_t reserved;
};

/* ---- event_channel_op(cmd, arg): the 2-level event channel ABI ------------------------ */
#define EVTCHNOP_bind_interdomain   0
#define EVTCHNOP_bind_virq          1
#define EVTCHNOP_bind_pirq          2
#define EVTCHNOP_close              3
#define EVTCHNOP_send               4
#define EVTCHNOP_status             5
#define EVTCHNOP_alloc_unbound      6
#define EVTCHNOP_bind_ipi           7
#define EVTCHNOP_bind_vcpu          8
#define EVTCHNOP_unmask             9
#define EVTCHNOP_reset             10
#define EVTCHNOP_init_control      11
#define EVTCHNOP_expand_array      12
#define EVTCHNOP_set_priority      13
#define EVTCHNOP_reset_cont        14

#define EVTCHN_2L_NR_CHANNELS    4096

struct evtchn_alloc_unbound {
    uint16_t dom;
    uint16_t remote_dom;
    uint32_t port;                  /* out */
};

struct evtchn_bind_interdomain {
    uint16_t remote_dom;
    uint16_t _pad0;
    uint32_t remote_port;
    uint32_t local_port;            /* out */
};

struct evtchn_bind_virq {
    uint32_t virq;
    uint32_t vcpu;
    uint32_t port;                  /* out */
};

struct evtchn_bind_pirq {
    uint32_t pirq;
    uint32_t flags;
    uint32_t port;                  /* out */
};

struct evtchn_bind_ipi {
    uint32_t vcpu;
    uint32_t port;                  /* out */
};

struct evtchn_close {
    uint32_t port;
};

struct evtchn_send {
    uint32_t port;
};

struct evtchn_unmask {
    uint32_t port;
};

struct evtchn_status {
    uint16_t dom;
    uint16_t _pad0;
    uint32_t port;
    uint32_t status;                /* out: EVTCHNSTAT_* */
    uint32_t vcpu;                  /* out */
    uint16_t u_dom;                 /* out: unbound remote dom / interdomain dom */
    uint16_t _pad1;
    uint32_t u_port;                /* out: interdomain port; pirq and virq share offset 16 */
};

struct evtchn_bind_vcpu {
    uint32_t port;
    uint32_t vcpu;
};

struct evtchn_reset {
    uint16_t dom;
};

#define EVTCHNSTAT_closed       0
#define EVTCHNSTAT_unbound      1
#define EVTCHNSTAT_interdomain  2
#define EVTCHNSTAT_pirq         3
#define EVTCHNSTAT_virq         4
#define EVTCHNSTAT_ipi          5

#define VIRQ_TIMER       0
#define VIRQ_DEBUG       1
#define VIRQ_CONSOLE     2
#define VIRQ_DOM_EXC     3
#define VIRQ_TBUF        4
#define VIRQ_DEBUGGER    6
#define VIRQ_XENOPROF    7
#define VIRQ_CON_RING    8
#define VIRQ_PCPU_STATE  9
#define VIRQ_MEM_EVENT  10
#define VIRQ_ARGO       11
#define VIRQ_ENOMEM     12
#define VIRQ_XENPMU     13
#define NR_VIRQS        24

/* ---- shared_info and vcpu_info ------------------------------------------------------- */
#define XEN_LEGACY_MAX_VCPUS 32

struct vcpu_time_info {
    uint32_t version;               /* odd while the hypervisor updates */
    uint32_t pad0;
    uint64_t tsc_timestamp;
    uint64_t system_time;           /* ns at tsc_timestamp */
    uint32_t tsc_to_system_mul;
    int8_t   tsc_shift;
    uint8_t  flags;
    uint8_t  pad1[2];
};

#define XEN_PVCLOCK_TSC_STABLE_BIT   1
#define XEN_PVCLOCK_GUEST_STOPPED    2

struct arch_vcpu_info {
    uint64_t cr2;
    uint64_t pad;
};

struct vcpu_info {
    uint8_t  evtchn_upcall_pending;
    uint8_t  evtchn_upcall_mask;
    uint8_t  _pad0[6];
    uint64_t evtchn_pending_sel;
    struct arch_vcpu_info arch;
    struct vcpu_time_info time;
};

struct arch_shared_info {
    uint64_t max_pfn;
    uint64_t pfn_to_mfn_frame_list_list;
    uint64_t nmi_reason;
    uint64_t p2m_cr3;
    uint64_t p2m_vaddr;
    uint64_t p2m_generation;
};

struct shared_info {
    struct vcpu_info vcpu_info[32];
    uint64_t evtchn_pending[64];
    uint64_t evtchn_mask[64];
    uint32_t wc_version;
    uint32_t wc_sec;
    uint32_t wc_nsec;
    uint32_t wc_sec_hi;
    struct arch_shared_info arch;
};

/* ---- hvm_op: the upcall vector ------------------------------------------------------ */
#define HVMOP_set_param            0
#define HVMOP_get_param            1
#define HVM_PARAM_CALLBACK_IRQ     0
#define HVM_PARAM_STORE_PFN        1
#define HVM_PARAM_STORE_EVTCHN     2
#define HVM_PARAM_TIMER_MODE      10
#define HVM_PARAM_CONSOLE_PFN     17
#define HVM_PARAM_CONSOLE_EVTCHN  18
#define HVM_NR_PARAMS             39
/* CALLBACK_IRQ value: type in bits 63..56; type 2 = vector in the low 8 bits */
#define HVM_PARAM_CALLBACK_TYPE_SHIFT   56
#define HVM_PARAM_CALLBACK_TYPE_GSI      0
#define HVM_PARAM_CALLBACK_TYPE_PCI_INTX 1
#define HVM_PARAM_CALLBACK_TYPE_VECTOR   2

struct xen_hvm_param {
    uint16_t domid;
    uint16_t _pad0;
    uint32_t index;
    uint64_t value;
};

/* A per-vCPU upcall vector: an edge interrupt through the vCPU's local APIC (the guest
 * EOIs it), which beats HVM_PARAM_CALLBACK_IRQ. vector < 0x10: -EINVAL; no such
 * vCPU: -ENOENT. */
#define HVMOP_set_evtchn_upcall_vector 23
struct xen_hvm_evtchn_upcall_vector {
    uint32_t vcpu;
    uint8_t  vector;
    uint8_t  _pad0[3];
};

/* ---- timers: set_timer_op(timeout_ns) and vcpu_op(cmd, vcpuid, arg) ------------------- */
#define VCPUOP_initialise                  0
#define VCPUOP_up                          1
#define VCPUOP_down                        2
#define VCPUOP_is_up                       3
#define VCPUOP_get_runstate_info           4
#define VCPUOP_register_runstate_memory_area 5
#define VCPUOP_set_periodic_timer          6
#define VCPUOP_stop_periodic_timer         7
#define VCPUOP_set_singleshot_timer        8
#define VCPUOP_stop_singleshot_timer       9
#define VCPUOP_register_vcpu_info         10
#define VCPUOP_send_nmi                   11
#define VCPUOP_get_physid                 12
#define VCPUOP_register_vcpu_time_memory_area 13

struct vcpu_set_periodic_timer {
    uint64_t period_ns;
};

struct vcpu_set_singleshot_timer {
    uint64_t timeout_abs_ns;
    uint32_t flags;
    uint32_t _pad0;
};
#define VCPU_SSHOTTMR_future 1

struct vcpu_register_vcpu_info {
    uint64_t mfn;
    uint32_t offset;
    uint32_t rsvd;
};

struct vcpu_runstate_info {
    int32_t  state;
    uint32_t _pad0;
    uint64_t state_entry_time;
    uint64_t time[4];
};
/* VCPUOP_register_runstate_memory_area: where the vCPU's runstate_info is kept up to
 * date (a guest virtual address; Xen's union of a handle and a pointer). */
struct vcpu_register_runstate_memory_area {
    uint64_t addr;
};
#define RUNSTATE_running   0
#define RUNSTATE_runnable  1
#define RUNSTATE_blocked   2
#define RUNSTATE_offline   3

/* ---- memory_op(cmd, arg) ------------------------------------------------------------ */
#define XENMEMOP_CMD_MASK              0x3f
#define XENMEM_increase_reservation    0
#define XENMEM_decrease_reservation    1
#define XENMEM_maximum_ram_page        2
#define XENMEM_current_reservation     3
#define XENMEM_maximum_reservation     4
#define XENMEM_machphys_mfn_list       5
#define XENMEM_populate_physmap        6
#define XENMEM_add_to_physmap          7
#define XENMEM_memory_map              9
#define XENMEM_machine_memory_map     10
#define XENMEM_exchange               11
#define XENMEM_machphys_mapping       12
#define XENMEM_set_memory_map         13
#define XENMEM_maximum_gpfn           14
#define XENMEM_remove_from_physmap    15
#define XENMEM_add_to_physmap_batch   23
#define XENMEM_claim_pages            24
#define XENMEM_acquire_resource       28

struct xen_memory_reservation {
    uint64_t extent_start;          /* guest pointer to xen_pfn_t[] */
    uint64_t nr_extents;
    uint32_t extent_order;
    uint32_t mem_flags;
    uint16_t domid;
    uint8_t  _pad0[6];
};

struct xen_memory_map {
    uint32_t nr_entries;            /* in: capacity; out: entries written */
    uint32_t _pad0;
    uint64_t buffer;                /* guest pointer to e820 entries */
};

/* One e820 record as the guest sees it: packed, 20 bytes (addr @0, size @8, type @16). */
struct e820_entry {
    uint32_t addr_lo;
    uint32_t addr_hi;
    uint32_t size_lo;
    uint32_t size_hi;
    uint32_t type;
};
#define E820_RAM       1
#define E820_RESERVED  2
#define E820_ACPI      3
#define E820_NVS       4
#define E820_UNUSABLE  5

struct xen_add_to_physmap {
    uint16_t domid;
    uint16_t size;
    uint32_t space;
    uint64_t idx;
    uint64_t gpfn;
};
#define XENMAPSPACE_shared_info   0
#define XENMAPSPACE_grant_table   1
#define XENMAPSPACE_gmfn          2
#define XENMAPSPACE_gmfn_range    3
#define XENMAPSPACE_gmfn_foreign  4
#define XENMAPSPACE_dev_mmio      5
/* XENMAPSPACE_grant_table: this bit in idx asks for status frame idx & ~bit (v2) */
#define XENMAPIDX_grant_table_status  0x80000000

/* ---- grant_table_op(cmd, uop, count) (public/grant_table.h) --------------------------- */
#define GNTTABOP_map_grant_ref        0
#define GNTTABOP_unmap_grant_ref      1
#define GNTTABOP_setup_table          2
#define GNTTABOP_dump_table           3
#define GNTTABOP_transfer             4
#define GNTTABOP_copy                 5
#define GNTTABOP_query_size           6
#define GNTTABOP_unmap_and_replace    7
#define GNTTABOP_set_version          8
#define GNTTABOP_get_status_frames    9
#define GNTTABOP_get_version          10
#define GNTTABOP_swap_grant_ref       11
#define GNTTABOP_cache_flush          12
#define GNTTABOP_CMD_MASK             0xfff    /* cmd bits above: cache_flush's continuation */

/* A granting domain's table entry, v1 (8 bytes; 512 a frame). */
struct grant_entry_v1 {
    uint16_t flags;                 /* GTF_* */
    uint16_t domid;                 /* the domain allowed to use it */
    uint32_t frame;                 /* the granted frame */
};
/* v2 (16 bytes; 256 a frame): the full_page form; flags GTF_reading/writing move to a
 * separate status frame (one uint16_t per entry, 2048 a frame). */
struct grant_entry_v2 {
    uint16_t flags;
    uint16_t domid;
    uint32_t _pad0;
    uint64_t frame;
};
#define GNTTAB_NR_RESERVED_ENTRIES  8   /* kept across set_version (console, xenstore) */
#define GTF_invalid          0
#define GTF_permit_access    1
#define GTF_accept_transfer  2
#define GTF_transitive       3
#define GTF_type_mask        3
#define GTF_readonly         4
#define GTF_reading          8
#define GTF_writing          16
#define GTF_PWT              32
#define GTF_PCD              64
#define GTF_PAT              128
#define GTF_sub_page         256

#define GNTMAP_device_map        1
#define GNTMAP_host_map          2
#define GNTMAP_readonly          4
#define GNTMAP_application_map   8
#define GNTMAP_contains_pte      16

struct gnttab_map_grant_ref {
    uint64_t host_addr;             /* PV: linear address (or the PTE's machine address
                                     * with GNTMAP_contains_pte); PVH: guest-physical */
    uint32_t flags;                 /* GNTMAP_* */
    uint32_t ref;
    uint16_t dom;                   /* the granting domain */
    int16_t  status;                /* out: GNTST_* */
    uint32_t handle;                /* out: for unmap */
    uint64_t dev_bus_addr;          /* out: the frame's machine address (device_map) */
};
struct gnttab_unmap_grant_ref {
    uint64_t host_addr;
    uint64_t dev_bus_addr;
    uint32_t handle;
    int16_t  status;
    uint16_t _pad0;
};
struct gnttab_setup_table {
    uint16_t dom;
    uint16_t _pad0;
    uint32_t nr_frames;
    int16_t  status;
    uint16_t _pad1[3];
    uint64_t frame_list;            /* guest pointer to nr_frames u64 frame numbers */
};
struct gnttab_dump_table {
    uint16_t dom;
    int16_t  status;
};
struct gnttab_copy_ptr {
    uint64_t u;                     /* a grant ref (u32) or a frame number (u64) */
    uint16_t domid;
    uint16_t offset;
    uint32_t _pad0;
};
struct gnttab_copy {
    struct gnttab_copy_ptr source;
    struct gnttab_copy_ptr dest;
    uint16_t len;
    uint16_t flags;                 /* GNTCOPY_* */
    int16_t  status;
    uint16_t _pad0;
};
#define GNTCOPY_source_gref  1
#define GNTCOPY_dest_gref    2
struct gnttab_query_size {
    uint16_t dom;
    uint16_t _pad0;
    uint32_t nr_frames;
    uint32_t max_nr_frames;
    int16_t  status;
    uint16_t _pad1;
};
struct gnttab_unmap_and_replace {
    uint64_t host_addr;
    uint64_t new_addr;
    uint32_t handle;
    int16_t  status;
    uint16_t _pad0;
};
struct gnttab_set_version {
    uint32_t version;               /* in: 1 or 2; out: the version in force */
};
struct gnttab_get_status_frames {
    uint32_t nr_frames;
    uint16_t dom;
    int16_t  status;
    uint64_t frame_list;            /* guest pointer to nr_frames u64 frame numbers */
};
struct gnttab_get_version {
    uint16_t dom;
    uint16_t _pad0;
    uint32_t version;
};
struct gnttab_swap_grant_ref {
    uint32_t ref_a;
    uint32_t ref_b;
    int16_t  status;
    uint16_t _pad0;
};
struct gnttab_cache_flush {
    uint64_t a;                     /* dev_bus_addr, or a grant ref (CACHE_SOURCE_GREF) */
    uint16_t offset;
    uint16_t length;
    uint32_t op;
};
#define GNTTAB_CACHE_CLEAN        1
#define GNTTAB_CACHE_INVAL        2
#define GNTTAB_CACHE_SOURCE_GREF  0x80000000

/* Status codes in each op's status field (negative, as Xen writes them). */
#define GNTST_okay               0
#define GNTST_general_error     -1
#define GNTST_bad_domain        -2
#define GNTST_bad_gntref        -3
#define GNTST_bad_handle        -4
#define GNTST_bad_virt_addr     -5
#define GNTST_bad_dev_addr      -6
#define GNTST_no_device_space   -7
#define GNTST_permission_denied -8
#define GNTST_bad_page          -9
#define GNTST_bad_copy_arg      -10
#define GNTST_address_too_big   -11
#define GNTST_eagain            -12
#define GNTST_no_space          -13

/* ---- mmu_update(reqs, count, success_count, domid) ------------------------------------ */
struct mmu_update {
    uint64_t ptr;                   /* machine address of the PTE; low 2 bits = command */
    uint64_t val;
};
#define MMU_NORMAL_PT_UPDATE        0
#define MMU_MACHPHYS_UPDATE         1
#define MMU_PT_UPDATE_PRESERVE_AD   2
#define MMU_PT_UPDATE_NO_TRANSLATE  3

/* ---- mmuext_op(ops, count, success_count, domid) -------------------------------------- */
struct mmuext_op {
    uint32_t cmd;
    uint32_t _pad0;
    uint64_t arg1;                  /* mfn or linear_addr */
    uint64_t arg2;                  /* nr_ents, vcpumask or src_mfn */
};
#define MMUEXT_PIN_L1_TABLE       0
#define MMUEXT_PIN_L2_TABLE       1
#define MMUEXT_PIN_L3_TABLE       2
#define MMUEXT_PIN_L4_TABLE       3
#define MMUEXT_UNPIN_TABLE        4
#define MMUEXT_NEW_BASEPTR        5
#define MMUEXT_TLB_FLUSH_LOCAL    6
#define MMUEXT_INVLPG_LOCAL       7
#define MMUEXT_TLB_FLUSH_MULTI    8
#define MMUEXT_INVLPG_MULTI       9
#define MMUEXT_TLB_FLUSH_ALL     10
#define MMUEXT_INVLPG_ALL        11
#define MMUEXT_FLUSH_CACHE       12
#define MMUEXT_SET_LDT           13
#define MMUEXT_NEW_USER_BASEPTR  15
#define MMUEXT_CLEAR_PAGE        16
#define MMUEXT_COPY_PAGE         17
#define MMUEXT_MARK_SUPER        19
#define MMUEXT_UNMARK_SUPER      20

/* ---- multicall(entries, nr) ----------------------------------------------------------- */
struct multicall_entry {
    uint64_t op;
    int64_t  result;
    uint64_t args[6];
};


/* ---- the x86-64 PV CPU model (XEN-ABI-FACTS §18-§21) ----------------------------- */
/* Flat selectors of a 64-bit PV guest; kernel and user alike run in ring 3. The
 * descriptors live in the hypervisor's reserved GDT page (entries from 0xe000 up). */
#define FLAT_RING3_CS32      0xe023
#define FLAT_RING3_SS64      0xe02b
#define FLAT_RING3_DS32      0xe02b
#define FLAT_RING3_CS64      0xe033
#define FLAT_KERNEL_CS       0xe033
#define FLAT_KERNEL_SS       0xe02b
/* What Xen's compat `syscall` entry (cstar_enter) saves in the frame, whatever 32-bit
 * code selector and stack selector the guest ran with. */
#define FLAT_USER_CS32       0xe023
#define FLAT_USER_SS32       0xe02b
#define FIRST_RESERVED_GDT_PAGE   14
#define FIRST_RESERVED_GDT_ENTRY  7168
/* The read-only machine-to-phys table: L4 slot 256, the start of Xen's reserved range. */
#define HYPERVISOR_VIRT_START   0xffff800000000000
#define HYPERVISOR_VIRT_END     0xffff880000000000
#define MACH2PHYS_VIRT_START    0xffff800000000000
#define MACH2PHYS_VIRT_END      0xffff804000000000

/* XENMEM_machphys_mapping: where the read-only machine-to-phys table is mapped. */
struct xen_machphys_mapping {
    uint64_t v_start, v_end;        /* start and end of the table's virtual window */
    uint64_t max_mfn;               /* the last entry the window holds */
};

/* set_trap_table: one virtual IDT entry; a zero address ends the list. */
struct trap_info {
    uint8_t  vector;
    uint8_t  flags;         /* bits 0-1: the DPL `int n` needs; bit 2: mask events */
    uint16_t cs;            /* unused by 64-bit guests */
    uint32_t _pad;
    uint64_t address;
};
#define TI_DPL_MASK          3
#define TI_MASK_EVENTS       4

/* VCPUOP_initialise for a 64-bit PV guest: the state a down vCPU starts in (Xen's
 * arch-x86 vcpu_guest_context; the registers are its cpu_user_regs). */
struct xen_user_regs {
    uint64_t r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi;
    uint32_t error_code, entry_vector;  /* Xen's own, ignored */
    uint64_t rip;
    uint16_t cs, _pad0[1];
    uint8_t  saved_upcall_mask;
    uint8_t  _pad1[3];
    uint64_t rflags;
    uint64_t rsp;
    uint16_t ss, _pad2[3];
    uint16_t es, _pad3[3];
    uint16_t ds, _pad4[3];
    uint16_t fs, _pad5[3];
    uint16_t gs, _pad6[3];
};

struct vcpu_guest_context {
    uint8_t  fpu_ctxt[512];             /* FXSAVE image, used with VGCF_i387_valid */
    uint64_t flags;                     /* VGCF_* */
    struct xen_user_regs user_regs;
    struct trap_info trap_ctxt[256];    /* the virtual IDT, by vector */
    uint64_t ldt_base, ldt_ents;
    uint64_t gdt_frames[16], gdt_ents;
    uint64_t kernel_ss, kernel_sp;
    uint64_t ctrlreg[8];                /* [3]: kernel L4, [1]: user L4 (frame << 12) */
    uint64_t debugreg[8];
    uint64_t event_callback_eip;
    uint64_t failsafe_callback_eip;
    uint64_t syscall_callback_eip;
    uint64_t vm_assist;                 /* only vCPU 0's counts */
    uint64_t fs_base, gs_base_kernel, gs_base_user;
};
#define VGCF_i387_valid                1
#define VGCF_in_kernel                 4
#define VGCF_failsafe_disables_events  8
#define VGCF_syscall_disables_events   0x10
#define VGCF_online                    0x20

/* callback_op (30) */
#define CALLBACKOP_register          0
#define CALLBACKOP_unregister        1
#define CALLBACKTYPE_event           0
#define CALLBACKTYPE_failsafe        1
#define CALLBACKTYPE_syscall         2
#define CALLBACKTYPE_sysenter_deprecated 3
#define CALLBACKTYPE_nmi             4
#define CALLBACKTYPE_sysenter        5
#define CALLBACKTYPE_syscall32       7
#define CALLBACKF_mask_events        1

struct callback_register {
    uint16_t type;
    uint16_t flags;
    uint32_t _pad;
    uint64_t address;
};

struct callback_unregister {
    uint16_t type;
    uint16_t _pad;
};

/* iret (23): what the guest pushed before its syscall, lowest address first. */
struct iret_context {
    uint64_t rax, r11, rcx, flags, rip, cs, rflags, rsp, ss;
};
#define VGCF_in_syscall      0x100

/* set_segment_base (25) */
#define SEGBASE_FS           0
#define SEGBASE_GS_USER      1      /* the user GS base (inactive in kernel mode) */
#define SEGBASE_GS_KERNEL    2      /* the active GS base */
#define SEGBASE_GS_USER_SEL  3      /* load the user %gs selector */

/* vm_assist (21): cmd, then the type */
#define VMASST_CMD_enable    0
#define VMASST_CMD_disable   1
#define VMASST_TYPE_4gb_segments         0
#define VMASST_TYPE_4gb_segments_notify  1
#define VMASST_TYPE_writable_pagetables  2
#define VMASST_TYPE_pae_extended_cr3     3
#define VMASST_TYPE_architectural_iopl   4
#define VMASST_TYPE_runstate_update_flag 5
#define VMASST_TYPE_m2p_strict           32

/* physdev_op (33): the two sub-ops a PV domU's port I/O needs */
#define PHYSDEVOP_set_iopl   6
#define PHYSDEVOP_set_iobitmap 7
struct physdev_set_iopl {
    uint32_t iopl;
};
struct physdev_set_iobitmap {
    uint64_t bitmap;        /* guest pointer: one bit per port, set = denied */
    uint32_t nr_ports;
    uint32_t _pad;
};

/* update_va_mapping (14) flags: bits 0-1 the flush, the rest whose TLBs */
#define UVMF_NONE            0
#define UVMF_TLB_FLUSH       1
#define UVMF_INVLPG          2
#define UVMF_FLUSHTYPE_MASK  3
#define UVMF_LOCAL           0
#define UVMF_ALL             4
/* The hypercall the forced-emulation prefix (ud2; .ascii "xen") may precede: cpuid. */
#define XEN_CPUID_BASE       0x40000000
/* Leaf base+4 eax (HVM/PVH): what Xen sets for every such vCPU (its emulated local APIC
 * carries the per-vCPU upcall vector). APIC_ACCESS_VIRT and X2APIC_VIRT (bits 0, 1)
 * say the hardware accelerates the APIC, which an emulated one is not. */
#define XEN_HVM_CPUID_IOMMU_MAPPINGS   4    /* bit 2 */
#define XEN_HVM_CPUID_VCPU_ID_PRESENT  8    /* bit 3 */
#define XEN_HVM_CPUID_DOMID_PRESENT    16   /* bit 4 */
#define XEN_HVM_CPUID_UPCALL_VECTOR    64   /* bit 6: HVMOP_set_evtchn_upcall_vector */

/* cdef-end */

#endif /* TRAPLESS_XEN_ABI_H */
