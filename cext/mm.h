/*
 * mm.h - the memory service's per-domain state (owned by memory.c and mm.c).
 */
#ifndef TRAPLESS_MM_H
#define TRAPLESS_MM_H
#include <stdint.h>

struct hv_mm {
    uint64_t nr_pages;              /* frames of guest-physical memory */
};

#endif
