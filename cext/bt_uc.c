/*
 * bt_uc.c - loading Unicorn for the bt engine: dlopen a libunicorn (trapless's patched
 * build in build/unicorn, else the one the unicorn Python package ships; Python finds it
 * and passes its path) and resolve the entry points bt.h declares. Nothing links against Unicorn at build time, so the extension
 * builds and the kvm engine works on a host without it.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "bt.h"

struct bt_uc_api bt_uc;
int bt_uc_loaded;
char bt_uc_why[200] = "the Unicorn library was not loaded (hv_bt_init was not called)";

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;

#define UNICORN_MAJOR_WANTED 2

int hv_bt_init(const char *library, char *err, int err_len)
{
    void *h;
    unsigned major = 0, minor = 0;
    struct { const char *name; void **slot; } syms[] = {
        { "uc_version", (void **)&bt_uc.version },
        { "uc_open", (void **)&bt_uc.open },
        { "uc_close", (void **)&bt_uc.close },
        { "uc_strerror", (void **)&bt_uc.strerror },
        { "uc_ctl", (void **)&bt_uc.ctl },
        { "uc_reg_read", (void **)&bt_uc.reg_read },
        { "uc_reg_write", (void **)&bt_uc.reg_write },
        { "uc_reg_read_batch", (void **)&bt_uc.reg_read_batch },
        { "uc_reg_write_batch", (void **)&bt_uc.reg_write_batch },
        { "uc_mem_map_ptr", (void **)&bt_uc.mem_map_ptr },
        { "uc_mem_protect", (void **)&bt_uc.mem_protect },
        { "uc_mmio_map", (void **)&bt_uc.mmio_map },
        { "uc_emu_start", (void **)&bt_uc.emu_start },
        { "uc_emu_stop", (void **)&bt_uc.emu_stop },
        { "uc_hook_add", (void **)&bt_uc.hook_add },
        { "uc_hook_del", (void **)&bt_uc.hook_del },
    };

    pthread_mutex_lock(&load_lock);
    if (bt_uc_loaded) {
        pthread_mutex_unlock(&load_lock);
        return 0;
    }
    h = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(bt_uc_why, sizeof(bt_uc_why), "cannot load the Unicorn library: %s", dlerror());
        goto fail;
    }
    for (size_t i = 0; i < sizeof(syms) / sizeof(syms[0]); i++) {
        *syms[i].slot = dlsym(h, syms[i].name);
        if (!*syms[i].slot) {
            snprintf(bt_uc_why, sizeof(bt_uc_why), "%s lacks %s: not Unicorn 2", library,
                     syms[i].name);
            dlclose(h);
            goto fail;
        }
    }
    bt_uc.version(&major, &minor);
    if (major != UNICORN_MAJOR_WANTED) {
        snprintf(bt_uc_why, sizeof(bt_uc_why), "%s is Unicorn %u.%u; bt needs Unicorn %d",
                 library, major, minor, UNICORN_MAJOR_WANTED);
        dlclose(h);
        goto fail;
    }
    /* the patched build's exact kick: both entry points or neither */
    *(void **)&bt_uc.kick = dlsym(h, "uc_kick");
    *(void **)&bt_uc.kick_take = dlsym(h, "uc_kick_take");
    if (!bt_uc.kick || !bt_uc.kick_take)
        bt_uc.kick = NULL, bt_uc.kick_take = NULL;
    *(void **)&bt_uc.reg_write_batch_goto = dlsym(h, "uc_reg_write_batch_goto");
    *(void **)&bt_uc.x86_regs = dlsym(h, "uc_x86_regs");
    *(void **)&bt_uc.go = dlsym(h, "uc_goto");
    *(void **)&bt_uc.flags_cs = dlsym(h, "uc_x86_flags_cs");
    *(void **)&bt_uc.tlb_host = dlsym(h, "uc_x86_tlb_host");
    *(void **)&bt_uc.control_flags_cs = dlsym(h, "uc_x86_control_flags_cs");
    *(void **)&bt_uc.set_flags = dlsym(h, "uc_x86_set_flags");
    *(void **)&bt_uc.soft_int_in_place = dlsym(h, "uc_x86_soft_int_in_place");
    *(void **)&bt_uc.tlb_gen = dlsym(h, "uc_x86_tlb_gen");
    *(void **)&bt_uc.gs_base = dlsym(h, "uc_x86_gs_base");
    *(void **)&bt_uc.syscall_callback = dlsym(h, "uc_x86_syscall_callback");
    if (!bt_uc.reg_write_batch_goto || !bt_uc.x86_regs || !bt_uc.go)
        bt_uc.reg_write_batch_goto = NULL, bt_uc.x86_regs = NULL, bt_uc.go = NULL;
    bt_uc_loaded = 1;
    bt_uc_why[0] = 0;
    pthread_mutex_unlock(&load_lock);
    return 0;
fail:
    hv_set_error(err, err_len, "%s", bt_uc_why);
    pthread_mutex_unlock(&load_lock);
    return -1;
}

int hv_bt_exact_kicks(void)
{
    return bt_uc_loaded && bt_uc.kick != NULL;
}

int hv_bt_hook_goto(void)
{
    return bt_uc_loaded && bt_uc.reg_write_batch_goto != NULL;
}
