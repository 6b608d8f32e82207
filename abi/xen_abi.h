/*
 * xen_abi.h - the hypercall ABI trapless follows: Xen's public x86-64 interface.
 *
 * THE CONTRACT. The C extension includes this file; Python reads every number and
 * layout below from it (abi/__init__.py hands it to cffi's cdef); the guest assembler
 * uses those numbers and offsets by name. Nothing here is retyped anywhere else.
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
#define XENFEAT_hvm_callback_vector         8
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

/* cdef-end */

#endif /* TRAPLESS_XEN_ABI_H */
