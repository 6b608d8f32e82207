/*
 * backend.h - what trapless's split-device backends (blkback.c, netback.c) share:
 * xenstore reads and writes as dom0, on the keys of their two directories.
 */
#ifndef TRAPLESS_BACKEND_H
#define TRAPLESS_BACKEND_H
#include <stdint.h>

#define HV_BK_PATH_BYTES 128            /* a device directory's path */

/* dir/key's value, NUL-terminated, into out: 0, or -1 if absent or longer than max-1. */
int     hv_bk_read(const char *dir, const char *key, char *out, uint32_t max);
/* dir/key as a decimal number below limit, or -1 if absent or not one. */
int64_t hv_bk_read_num(const char *dir, const char *key, uint64_t limit);
/* Write dir/key = the formatted value. */
void    hv_bk_printf(const char *dir, const char *key, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

#endif
