/*
 * tcg_store_load_litmus.c - why vcpu.c's hv_guest_barrier exists: a store-buffering
 * litmus test between guest code in Unicorn (the bt engine's TCG) and a host thread.
 *
 * Each round the guest stores X, runs mfence, loads Y; the host thread stores Y, runs
 * its barrier, loads X. Sequentially consistent, at least one of the two loads sees the
 * other side's store; both loads old means the guest's load passed its own store, which
 * Unicorn's TCG lets happen: outside its parallel mode it emits no host fence for mfence
 * (or a lock prefix). With membarrier(2) as the host's barrier (what hv_guest_barrier
 * does on bt) no round may end with both loads old.
 *
 *   U=.venv/lib/python3.11/site-packages/unicorn
 *   gcc -O2 -I$U/include scripts/tcg_store_load_litmus.c -o /tmp/litmus \
 *       -L$U/lib -l:libunicorn.so.2 -Wl,-rpath,$U/lib -lpthread
 *   /tmp/litmus 200000 fence        # the host's own fence only: some rounds both old
 *   /tmp/litmus 20000 membarrier    # none
 */
#define _GNU_SOURCE
#include <linux/membarrier.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unicorn/unicorn.h>
#include <unistd.h>

enum { GO = 0, X = 64, Y = 128, SEEN = 192, ACK = 256 };    /* offsets in the shared page */
#define CODE_GPA 0x1000
#define DATA_GPA 0x10000

static uint8_t *shared;
static long rounds;
static int use_membarrier;

static volatile uint32_t *word(int off)
{
    return (volatile uint32_t *)(shared + off);
}

static void *host_side(void *unused)
{
    long both_old = 0;
    for (uint32_t i = 1; i <= rounds; i++) {
        __atomic_store_n(word(GO), i, __ATOMIC_SEQ_CST);
        for (volatile int d = 0; d < (int)(i % 64) * 4; d++)
            ;                           /* vary the overlap with the guest's window */
        __atomic_store_n(word(Y), i, __ATOMIC_RELAXED);
        if (use_membarrier)
            syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0);
        else
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
        uint32_t x = __atomic_load_n(word(X), __ATOMIC_RELAXED);
        while (__atomic_load_n(word(ACK), __ATOMIC_ACQUIRE) != i)
            ;
        if (x != i && *word(SEEN) != i)
            both_old++;
    }
    printf("%s: %ld rounds, both loads old in %ld\n",
           use_membarrier ? "membarrier" : "fence", rounds, both_old);
    __atomic_store_n(word(GO), 0xffffffffu, __ATOMIC_SEQ_CST);   /* the guest halts */
    return NULL;
}

int main(int argc, char **argv)
{
    static const uint8_t guest[] = {
        0x8b, 0x03,                             /* 0:  mov eax, [rbx]        GO */
        0x83, 0xf8, 0xff,                       /* 2:  cmp eax, -1 */
        0x74, 0x22,                             /* 5:  je 41 */
        0x44, 0x39, 0xe0,                       /* 7:  cmp eax, r12d */
        0x74, 0xf4,                             /* 10: je 0 (no new round yet) */
        0x41, 0x89, 0xc4,                       /* 12: mov r12d, eax */
        0x89, 0x43, 0x40,                       /* 15: mov [rbx+64], eax     X */
        0x0f, 0xae, 0xf0,                       /* 18: mfence */
        0x8b, 0x8b, 0x80, 0x00, 0x00, 0x00,     /* 21: mov ecx, [rbx+128]    Y */
        0x89, 0x8b, 0xc0, 0x00, 0x00, 0x00,     /* 27: mov [rbx+192], ecx    SEEN */
        0x89, 0x83, 0x00, 0x01, 0x00, 0x00,     /* 33: mov [rbx+256], eax    ACK */
        0xeb, 0xd7,                             /* 39: jmp 0 */
        0xf4,                                   /* 41: hlt */
    };
    uc_engine *uc;
    pthread_t host;
    uint64_t rbx = DATA_GPA, r12 = 0;
    uint8_t *code;
    uc_err e;

    if (argc != 3 || (strcmp(argv[2], "fence") && strcmp(argv[2], "membarrier")) ||
        (rounds = atol(argv[1])) <= 0) {
        fprintf(stderr, "usage: %s ROUNDS fence|membarrier\n", argv[0]);
        return 2;
    }
    use_membarrier = !strcmp(argv[2], "membarrier");
    if (use_membarrier &&
        syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) != 0) {
        perror("membarrier");
        return 1;
    }
    shared = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    code = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED || code == MAP_FAILED || uc_open(UC_ARCH_X86, UC_MODE_64, &uc)) {
        fprintf(stderr, "cannot set up the guest\n");
        return 1;
    }
    memcpy(code, guest, sizeof(guest));
    uc_mem_map_ptr(uc, CODE_GPA, 0x1000, UC_PROT_ALL, code);
    uc_mem_map_ptr(uc, DATA_GPA, 0x1000, UC_PROT_ALL, shared);
    uc_reg_write(uc, UC_X86_REG_RBX, &rbx);
    uc_reg_write(uc, UC_X86_REG_R12, &r12);
    pthread_create(&host, NULL, host_side, NULL);
    e = uc_emu_start(uc, CODE_GPA, CODE_GPA + sizeof(guest) - 1, 0, 0);
    pthread_join(host, NULL);
    if (e != UC_ERR_OK) {
        fprintf(stderr, "Unicorn: %s\n", uc_strerror(e));
        return 1;
    }
    return 0;
}
