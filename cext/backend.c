/*
 * backend.c - xenstore as dom0, for the split-device backends (backend.h).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hv.h"
#include "backend.h"

int hv_bk_read(const char *dir, const char *key, char *out, uint32_t max)
{
    char path[2 * HV_BK_PATH_BYTES];
    uint8_t reply[XENSTORE_PAYLOAD_MAX];
    uint32_t type;
    int n = snprintf(path, sizeof(path), "%s/%s", dir, key);
    n = hv_xs_request(0, XS_READ, 0, (const uint8_t *)path, (uint32_t)n + 1, &type, reply);
    if (n < 0 || type == XS_ERROR || (uint32_t)n >= max)
        return -1;
    memcpy(out, reply, (size_t)n);
    out[n] = 0;
    return 0;
}

int64_t hv_bk_read_num(const char *dir, const char *key, uint64_t limit)
{
    char v[24], *end;
    unsigned long long x;
    if (hv_bk_read(dir, key, v, sizeof(v)) < 0 || !v[0])
        return -1;
    errno = 0;
    x = strtoull(v, &end, 10);
    if (*end || errno || x >= limit)
        return -1;
    return (int64_t)x;
}

void hv_bk_printf(const char *dir, const char *key, const char *fmt, ...)
{
    uint8_t msg[2 * HV_BK_PATH_BYTES + 64], reply[XENSTORE_PAYLOAD_MAX];
    uint32_t type;
    va_list ap;
    int n = snprintf((char *)msg, sizeof(msg), "%s/%s", dir, key) + 1;
    va_start(ap, fmt);
    n += vsnprintf((char *)msg + n, sizeof(msg) - (size_t)n, fmt, ap);   /* no NUL: a value */
    va_end(ap);
    hv_xs_request(0, XS_WRITE, 0, msg, (uint32_t)n, &type, reply);
}
