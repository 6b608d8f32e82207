/*
 * xenstore.c - the store: trapless's xenstored, and its end of every domain's xenstore ring.
 *
 * Xen keeps a tree of small values (xenstored, in dom0) through which guests find their
 * devices and talk to backends. Here trapless is dom0, so the store lives in this process:
 * one tree for all domains, with Xen's permission model (an owner, a default for everybody
 * else, and per-domain r/w/b/n entries; trapless itself may do anything), watches, and
 * transactions. A domain talks to it with Xen's wire protocol (io/xs_wire.h) on its ring
 * page, and trapless (the toolstack, the console's verbs) through hv_xs_request.
 *
 * A guest can write anything into its ring and send any request, so: every index is read
 * from the page, checked, and used masked (nothing outside the page is touched); a
 * message longer than Xen allows, or indexes no honest frontend produces, stop serving
 * the ring and say why in its error field, as xenstored does; one notification consumes
 * at most one ring's worth of requests; and what a domain may make the host hold is
 * bounded by its quotas (nodes, value size, watches, transactions) plus one fixed input
 * and output buffer.
 *
 * Transactions, as xenstored does them since it tracks conflicts per node: every node
 * carries the generation of its last change (its value, permissions or list of
 * children). A transaction holds a sparse tree of its own: a node is copied into it
 * (value, permissions, the generation it had) only when the transaction first goes
 * through it, and all of a node's children only when it lists them or adds or removes
 * one. Its writes change only its copies. At commit, every node it read or changed must still have the generation it
 * copied (a node it found missing: its parent, whose list of children would show it);
 * otherwise EAGAIN and the client retries. Then its changes move into the store, and
 * nothing else was ever copied.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hv.h"

#define PERM_NONE   0
#define PERM_READ   1
#define PERM_WRITE  2
#define PERM_OWNER  4                   /* internal: may change the permissions */

#define MSG_MAX      ((uint32_t)sizeof(struct xsd_sockmsg) + XENSTORE_PAYLOAD_MAX)
#define OUT_BYTES    16384              /* replies and events waiting for room in rsp */
#define RING_MASK    (XENSTORE_RING_SIZE - 1)
#define NR_DOMIDS    DOMID_FIRST_RESERVED
#define TX_CHANGES_MAX 1024             /* nodes one transaction may change (Xen's default) */
#define TX_NODES_MAX (1u << 20)         /* nodes all open transactions' copies hold */
#define NO_GEN       0                  /* a transaction's node that the store never had */

struct xs_perm {
    uint16_t domid;
    uint8_t  perm;                      /* PERM_READ | PERM_WRITE */
};

struct xs_node {
    char *name;                         /* this path component; "" for the root */
    uint8_t *value;
    uint32_t len;
    struct xs_perm *perms;              /* [0]: owner and the default for everybody else */
    uint32_t nperms;
    struct xs_node *parent, *child, *last_child, *next;
    uint64_t gen;                       /* store: its last change; copy: the store's, then */
    /* a transaction's copy only: */
    uint8_t kids_loaded;                /* its children are copied (or it has none) */
    uint8_t accessed;                   /* read or changed: checked at commit */
    uint8_t changed;                    /* value or permissions: to move into the store */
    uint8_t kids_changed;               /* children added or removed */
};

/* A node a request changed: watches on it and above fire (below it too if removed), for
 * watchers that may read it (perms as they were when it changed). */
struct xs_change {
    struct xs_change *next;
    char *path;
    int removed;
    struct xs_perm *perms;
    uint32_t nperms;
};

struct xs_watch {
    struct xs_watch *next;
    char *path;                         /* absolute, or @introduceDomain / @releaseDomain */
    char *token;
    int relative;                       /* events name paths relative to the domain's home */
};

struct xs_tx {
    struct xs_tx *next;
    uint32_t id;
    struct xs_node *root;               /* its copies of the nodes it went through */
    uint32_t nodes;                     /* nodes in the copy */
    int stale;                          /* it copied a node the store had changed: EAGAIN */
    int error;                          /* copying failed (XEN_ENOMEM): the request fails */
    int32_t own_delta;                  /* nodes its domain gained in the copy */
    struct xs_change *changes, **tail;
    uint32_t nchanges;
};

struct xs_conn {
    struct xs_conn *next;               /* the list of rings, for firing watches */
    uint32_t domid;
    struct hv_domain *d;                /* NULL: trapless itself */
    uint64_t gpa;
    uint32_t port;
    uint32_t error;                     /* XENSTORE_ERROR_*: no longer served */
    uint8_t  in[MSG_MAX];               /* the request being received */
    uint32_t in_len;
    uint8_t  out[OUT_BYTES];            /* what waits for room in rsp */
    uint32_t out_prod, out_cons;
    struct xs_watch *watches;
    uint32_t nwatches;
    struct xs_tx *txs;
    uint32_t ntxs, next_tx;
    uint64_t requests, events_dropped;
};

struct xs_reply {
    uint32_t type;
    uint32_t len;
    uint8_t  data[XENSTORE_PAYLOAD_MAX];
};

/* What a request leaves to do once its reply is queued (events come after the reply). */
struct xs_after {
    struct xs_change *changes;
    struct xs_watch *new_watch;         /* a new watch fires once at once */
};

static pthread_mutex_t xs_lock = PTHREAD_MUTEX_INITIALIZER;
static struct xs_node *store;           /* the tree; created on first use */
static uint64_t store_gen;              /* the last generation a change got */
static uint32_t store_nodes, tx_nodes;
static uint32_t owned[NR_DOMIDS];       /* nodes each domain owns in the tree */
static struct xs_conn *conns[NR_DOMIDS];
static struct xs_conn *conn_list;
static struct xs_conn host;             /* trapless itself: domid 0, no ring */
/* trapless's own watchers (backends): told, under xs_lock, that something at or below
 * path changed; they only wake a thread of their own, which reads the store. */
struct host_watch {
    struct host_watch *next;
    char path[XENSTORE_ABS_PATH_MAX + 1];
    void (*fn)(void *arg);
    void *arg;
};
static struct host_watch *host_watches;
static struct hv_xs_quota quota = {
    .entries = 1000, .value_bytes = 2048, .watches = 128, .transactions = 10, .perms = 5,
};

/* ---- errors ---- */

static const char *error_name(int e)
{
    switch (e) {
    case XEN_EINVAL:    return "EINVAL";
    case XEN_EACCES:    return "EACCES";
    case XEN_EEXIST:    return "EEXIST";
    case XEN_EISDIR:    return "EISDIR";
    case XEN_ENOENT:    return "ENOENT";
    case XEN_ENOMEM:    return "ENOMEM";
    case XEN_ENOSPC:    return "ENOSPC";
    case XEN_EIO:       return "EIO";
    case XEN_ENOTEMPTY: return "ENOTEMPTY";
    case XEN_ENOSYS:    return "ENOSYS";
    case XEN_EROFS:     return "EROFS";
    case XEN_EBUSY:     return "EBUSY";
    case XEN_EAGAIN:    return "EAGAIN";
    case XEN_EISCONN:   return "EISCONN";
    case XEN_E2BIG:     return "E2BIG";
    case XEN_EPERM:     return "EPERM";
    }
    return "EINVAL";
}

static void reply_error(struct xs_reply *r, int e)
{
    const char *name = error_name(e);
    r->type = XS_ERROR;
    r->len = (uint32_t)strlen(name) + 1;
    memcpy(r->data, name, r->len);
}

static void reply_str(struct xs_reply *r, uint32_t type, const char *s)
{
    r->type = type;
    r->len = (uint32_t)strlen(s) + 1;
    memcpy(r->data, s, r->len);
}

/* ---- nodes ---- */

static void node_free(struct xs_node *n)
{
    struct xs_node *c = n->child, *next;
    for (; c; c = next) {
        next = c->next;
        node_free(c);
    }
    free(n->name);
    free(n->value);
    free(n->perms);
    free(n);
}

static struct xs_node *node_new(const char *name, size_t name_len, const struct xs_perm *perms,
                                uint32_t nperms)
{
    struct xs_node *n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    n->name = malloc(name_len + 1);
    n->perms = malloc(nperms * sizeof(*perms));
    if (!n->name || !n->perms) {
        free(n->name);
        free(n->perms);
        free(n);
        return NULL;
    }
    memcpy(n->name, name, name_len);
    n->name[name_len] = 0;
    memcpy(n->perms, perms, nperms * sizeof(*perms));
    n->nperms = nperms;
    return n;
}

static void node_link(struct xs_node *parent, struct xs_node *n)
{
    n->parent = parent;
    if (parent->last_child)
        parent->last_child->next = n;
    else
        parent->child = n;
    parent->last_child = n;
}

static void node_unlink(struct xs_node *n)
{
    struct xs_node *p = n->parent, **pp = &p->child, *prev = NULL;
    while (*pp != n) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    *pp = n->next;
    if (p->last_child == n)
        p->last_child = prev;
    n->next = NULL;
}

/* A transaction's copy of one store node, without its children; NULL if memory ran out. */
static struct xs_node *node_copy(const struct xs_node *n)
{
    struct xs_node *c = node_new(n->name, strlen(n->name), n->perms, n->nperms);
    if (!c)
        return NULL;
    if (n->len) {
        if (!(c->value = malloc(n->len))) {
            node_free(c);
            return NULL;
        }
        memcpy(c->value, n->value, n->len);
        c->len = n->len;
    }
    c->gen = n->gen;
    return c;
}

static void set_gen(struct xs_node *n, uint64_t gen)
{
    n->gen = gen;
    for (struct xs_node *k = n->child; k; k = k->next)
        set_gen(k, gen);
}

/* Add (sign 1) or take away (-1) the nodes of a subtree from their owners' counts. */
static void count_owners(const struct xs_node *n, int sign)
{
    if (n->perms[0].domid < NR_DOMIDS)
        owned[n->perms[0].domid] += (uint32_t)sign;
    for (const struct xs_node *k = n->child; k; k = k->next)
        count_owners(k, sign);
}

static uint32_t subtree_size(const struct xs_node *n, uint32_t domid, uint32_t *of_domid)
{
    uint32_t total = 1;
    if (n->perms[0].domid == domid)
        (*of_domid)++;
    for (const struct xs_node *k = n->child; k; k = k->next)
        total += subtree_size(k, domid, of_domid);
    return total;
}

/* Nodes owned by `owner` appear (n > 0) or go (n < 0) in the tree c is working on. */
static void account(struct xs_conn *c, struct xs_tx *t, uint32_t owner, int32_t n)
{
    if (t) {
        t->nodes += (uint32_t)n;
        tx_nodes += (uint32_t)n;
        if (owner == c->domid)
            t->own_delta += n;
    } else {
        store_nodes += (uint32_t)n;
        if (owner < NR_DOMIDS)
            owned[owner] += (uint32_t)n;
    }
}

static uint32_t owned_now(struct xs_conn *c, struct xs_tx *t)
{
    uint32_t base = c->domid < NR_DOMIDS ? owned[c->domid] : 0;
    return base + (uint32_t)(t ? t->own_delta : 0);
}

static struct xs_node **root_of(struct xs_tx *t)
{
    if (!store) {
        static const struct xs_perm none = { 0, PERM_NONE };
        store = node_new("", 0, &none, 1);  /* "/" is dom0's; others see nothing */
        store_nodes = 1;
    }
    return t ? &t->root : &store;
}

/* A node's absolute path, into out (XENSTORE_ABS_PATH_MAX + 1 bytes). */
static void node_path(const struct xs_node *n, char *out)
{
    const struct xs_node *chain[XENSTORE_ABS_PATH_MAX / 2 + 1];
    size_t depth = 0, len = 0;
    for (; n->parent; n = n->parent)
        chain[depth++] = n;
    out[0] = '/';
    out[1] = 0;
    while (depth--) {
        size_t k = strlen(chain[depth]->name);
        if (len)
            out[len++] = '/';
        else
            len = 1;
        memcpy(out + len, chain[depth]->name, k);
        len += k;
        out[len] = 0;
    }
}

static struct xs_node *walk(struct xs_tx *t, const char *path, struct xs_node **deepest,
                            size_t *rest);

/* Changes: a store node gets a new generation at once; a transaction's copy is marked
 * for its commit. */
static void touch(struct xs_tx *t, struct xs_node *n)
{
    if (t)
        n->changed = n->accessed = 1;
    else
        n->gen = ++store_gen;
}

static void load_kids(struct xs_tx *t, struct xs_node *n);

static void touch_kids(struct xs_tx *t, struct xs_node *n)
{
    if (t) {
        load_kids(t, n);                /* the commit makes the store's list this one */
        n->kids_changed = n->accessed = 1;
    } else {
        n->gen = ++store_gen;
    }
}

static struct xs_node *named_kid(const struct xs_node *n, const char *name, size_t len)
{
    struct xs_node *k = n->child;
    while (k && !(strncmp(k->name, name, len) == 0 && k->name[len] == 0))
        k = k->next;
    return k;
}

/* The store's node that t's copy n copied, or NULL (t marked stale) if it changed. */
static struct xs_node *original(struct xs_tx *t, const struct xs_node *n)
{
    char path[XENSTORE_ABS_PATH_MAX + 1];
    struct xs_node *s, *deep;
    size_t rest;
    node_path(n, path);
    s = walk(NULL, path, &deep, &rest);
    if (!s || s->gen != n->gen) {
        t->stale = 1;                   /* what t saw is out of date: it will not commit */
        return NULL;
    }
    return s;
}

/* Copy store node k in as a child of t's n. */
static struct xs_node *copy_in(struct xs_tx *t, struct xs_node *n, const struct xs_node *k)
{
    struct xs_node *copy;
    if (tx_nodes >= TX_NODES_MAX || !(copy = node_copy(k))) {
        t->error = XEN_ENOMEM;          /* the host's bound on all transactions' copies */
        return NULL;
    }
    node_link(n, copy);
    t->nodes++;
    tx_nodes++;
    return copy;
}

/* Copy into t the children of n it does not have yet, once. */
static void load_kids(struct xs_tx *t, struct xs_node *n)
{
    const struct xs_node *s;
    if (!t || n->kids_loaded)
        return;
    n->kids_loaded = 1;
    if (n->gen == NO_GEN || !(s = original(t, n)))
        return;                         /* made by t: no children in the store */
    for (const struct xs_node *k = s->child; k && !t->error; k = k->next)
        if (!named_kid(n, k->name, strlen(k->name)))
            copy_in(t, n, k);
}

/* t's child `name` of n, copied in from the store if t has not gone there yet. */
static struct xs_node *kid(struct xs_tx *t, struct xs_node *n, const char *name, size_t len)
{
    struct xs_node *k = named_kid(n, name, len), *s;
    if (k || !t || n->kids_loaded || n->gen == NO_GEN || !(s = original(t, n)))
        return k;
    k = named_kid(s, name, len);
    return k ? copy_in(t, n, k) : NULL;
}

static void load_subtree(struct xs_tx *t, struct xs_node *n)
{
    load_kids(t, n);
    for (struct xs_node *k = n->child; k; k = k->next)
        load_subtree(t, k);
}

/* ---- permissions and paths ---- */

static int perm_of(uint32_t domid, const struct xs_perm *p, uint32_t np)
{
    if (domid == 0 || p[0].domid == domid)
        return PERM_READ | PERM_WRITE | PERM_OWNER;
    for (uint32_t i = 1; i < np; i++)
        if (p[i].domid == domid)
            return p[i].perm;
    return p[0].perm;
}

/* The request's path made absolute (relative ones live under /local/domain/<domid>) and
 * checked as xenstored checks names: 0 or EINVAL. */
static int canonical(uint32_t domid, const char *s, char *out, int *relative)
{
    size_t n = strlen(s);
    *relative = s[0] != '/';
    if (*relative) {
        if (n > XENSTORE_REL_PATH_MAX)
            return XEN_EINVAL;
        if (snprintf(out, XENSTORE_ABS_PATH_MAX + 1, "/local/domain/%u/%s", domid, s)
            > XENSTORE_ABS_PATH_MAX)
            return XEN_EINVAL;
    } else {
        if (n > XENSTORE_ABS_PATH_MAX)
            return XEN_EINVAL;
        memcpy(out, s, n + 1);
    }
    n = strlen(out);
    if (n > 1 && out[n - 1] == '/')
        return XEN_EINVAL;
    for (size_t i = 0; i < n; i++) {
        char ch = out[i];
        if (ch == '/' && out[i + 1] == '/')
            return XEN_EINVAL;
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9')
              || ch == '-' || ch == '/' || ch == '_' || ch == '@'))
            return XEN_EINVAL;
    }
    return 0;
}

/* The node at an absolute path, or NULL; *deepest is the last node on the way that
 * exists and *rest the offset in path of what is missing below it. */
static struct xs_node *walk(struct xs_tx *t, const char *path, struct xs_node **deepest,
                            size_t *rest)
{
    struct xs_node *n = *root_of(t);
    size_t i = 1;
    while (path[i - 1] && path[i]) {
        const char *comp = path + i;
        size_t len = strcspn(comp, "/");
        struct xs_node *k = kid(t, n, comp, len);
        if (!k) {
            *deepest = n;
            *rest = i;
            return NULL;
        }
        n = k;
        i += len + 1;
        if (!comp[len])
            break;
    }
    *deepest = n;
    *rest = strlen(path);
    return n;
}

/* The node at path if c may access it with `need`: 0, ENOENT (nothing there, and c may
 * read what is above it), or EACCES. */
static int get_node(struct xs_conn *c, struct xs_tx *t, const char *path, int need,
                    struct xs_node **out)
{
    struct xs_node *deep;
    size_t rest;
    struct xs_node *n = walk(t, path, &deep, &rest);
    if (!n) {
        if (t)
            deep->accessed = 1;         /* a child appearing there is a conflict */
        return perm_of(c->domid, deep->perms, deep->nperms) & PERM_READ ? XEN_ENOENT : XEN_EACCES;
    }
    if (t)
        n->accessed = 1;
    if ((perm_of(c->domid, n->perms, n->nperms) & need) != need)
        return XEN_EACCES;
    *out = n;
    return 0;
}

/* Record a change: fired after the reply, or at commit for a transaction. */
static int note_change(struct xs_tx *t, struct xs_after *after, const char *path, int removed,
                       const struct xs_node *n)
{
    struct xs_change *ch = calloc(1, sizeof(*ch));
    if (!ch || !(ch->path = strdup(path)) ||
        !(ch->perms = malloc(n->nperms * sizeof(*n->perms)))) {
        if (ch)
            free(ch->path);
        free(ch);
        return XEN_ENOMEM;
    }
    ch->removed = removed;
    memcpy(ch->perms, n->perms, n->nperms * sizeof(*n->perms));
    ch->nperms = n->nperms;
    if (t) {
        *t->tail = ch;
        t->tail = &ch->next;
        t->nchanges++;
    } else {
        ch->next = after->changes;
        after->changes = ch;
    }
    return 0;
}

static void free_changes(struct xs_change *ch)
{
    while (ch) {
        struct xs_change *next = ch->next;
        free(ch->path);
        free(ch->perms);
        free(ch);
        ch = next;
    }
}

/* ---- the operations, on the tree of transaction t (NULL: the store itself) ---- */

/* The node at path, created with its missing parents if need be (each new node copies
 * the permissions of the node above it and, made by a domain, is owned by it). */
static int make_node(struct xs_conn *c, struct xs_tx *t, const char *path, struct xs_node **out,
                     int *created)
{
    struct xs_node *deep, *n;
    size_t rest, i;
    uint32_t missing = 0;

    *created = 0;
    n = walk(t, path, &deep, &rest);
    if (t) {
        if (t->error)
            return t->error;
        (n ? n : deep)->accessed = 1;
    }
    if (n) {
        if (!(perm_of(c->domid, n->perms, n->nperms) & PERM_WRITE))
            return XEN_EACCES;
        *out = n;
        return 0;
    }
    if (!(perm_of(c->domid, deep->perms, deep->nperms) & PERM_WRITE))
        return XEN_EACCES;
    for (i = rest; path[i]; i++)
        missing += path[i] == '/';
    missing++;
    if (c->domid && owned_now(c, t) + missing > quota.entries)
        return XEN_ENOSPC;
    if (t && tx_nodes + missing > TX_NODES_MAX)
        return XEN_ENOMEM;
    n = deep;
    for (i = rest; path[i - 1] && path[i]; ) {
        const char *comp = path + i;
        size_t len = strcspn(comp, "/");
        struct xs_node *k = node_new(comp, len, n->perms, n->nperms);
        if (!k)
            return XEN_ENOMEM;
        if (c->domid)
            k->perms[0].domid = (uint16_t)c->domid;
        touch_kids(t, n);
        node_link(n, k);
        touch(t, k);
        k->kids_loaded = 1;             /* new: nothing below it anywhere */
        account(c, t, k->perms[0].domid, 1);
        n = k;
        i += len + (comp[len] ? 1 : 0);
        if (!comp[len])
            break;
    }
    *created = 1;
    *out = n;
    return 0;
}

static int op_write(struct xs_conn *c, struct xs_tx *t, const char *path, const uint8_t *val,
                    uint32_t len, struct xs_after *after)
{
    struct xs_node *n;
    uint8_t *copy = NULL;
    int created, rc;

    if (c->domid && len > quota.value_bytes)
        return XEN_ENOSPC;
    if (len && !(copy = malloc(len)))
        return XEN_ENOMEM;
    if ((rc = make_node(c, t, path, &n, &created))) {
        free(copy);
        return rc;
    }
    if (len)
        memcpy(copy, val, len);
    free(n->value);
    n->value = copy;
    n->len = len;
    touch(t, n);
    return note_change(t, after, path, 0, n);
}

static int op_mkdir(struct xs_conn *c, struct xs_tx *t, const char *path, struct xs_after *after)
{
    struct xs_node *n, *deep;
    size_t rest;
    int created, rc;

    if ((n = walk(t, path, &deep, &rest))) {
        if (t)
            n->accessed = 1;
        return t ? t->error : 0;        /* already there: nothing changes */
    }
    if ((rc = make_node(c, t, path, &n, &created)))
        return rc;
    return note_change(t, after, path, 0, n);
}

static int op_rm(struct xs_conn *c, struct xs_tx *t, const char *path, struct xs_after *after)
{
    struct xs_node *n, *deep;
    size_t rest;
    uint32_t mine = 0, total;
    int rc;

    if (!strcmp(path, "/"))
        return XEN_EINVAL;
    n = walk(t, path, &deep, &rest);
    if (t && t->error)
        return t->error;
    if (t)
        (n ? n : deep)->accessed = 1;
    if (!n) {   /* absent is fine if its parent is there (Xen's rule) */
        if (!(perm_of(c->domid, deep->perms, deep->nperms) & PERM_READ))
            return XEN_EACCES;          /* and says nothing about what c may not see */
        return path[rest + strcspn(path + rest, "/")] ? XEN_ENOENT : 0;
    }
    if (!(perm_of(c->domid, n->perms, n->nperms) & PERM_WRITE))
        return XEN_EACCES;
    if (t) {
        load_subtree(t, n);             /* its nodes leave the domain's count */
        if (t->error)
            return t->error;
    }
    if ((rc = note_change(t, after, path, 1, n)))
        return rc;
    touch_kids(t, n->parent);
    node_unlink(n);
    if (t) {
        total = subtree_size(n, c->domid, &mine);
        t->nodes -= total;
        tx_nodes -= total;
        t->own_delta -= (int32_t)mine;
    } else {
        store_nodes -= subtree_size(n, ~0u, &mine);
        count_owners(n, -1);
    }
    node_free(n);
    return 0;
}

static void list_perms(const struct xs_node *n, struct xs_reply *r)
{
    static const char letter[4] = { 'n', 'r', 'w', 'b' };
    r->len = 0;
    for (uint32_t i = 0; i < n->nperms; i++) {
        int k = snprintf((char *)r->data + r->len, sizeof(r->data) - r->len, "%c%u",
                         letter[n->perms[i].perm & 3], n->perms[i].domid);
        r->len += (uint32_t)k + 1;      /* the NUL snprintf wrote ends this entry */
    }
}

/* "path\0perm\0perm\0...": each perm a letter r/w/b/n and a domid. */
static int op_set_perms(struct xs_conn *c, struct xs_tx *t, const char *path, const char *list,
                        uint32_t list_len, struct xs_after *after)
{
    struct xs_perm perms[64];
    uint32_t np = 0, pos = 0;
    struct xs_node *n;
    int rc;

    while (pos < list_len) {
        const char *s = list + pos;
        size_t len = strlen(s);
        unsigned long id = 0;
        int perm;
        pos += (uint32_t)len + 1;
        switch (s[0]) {
        case 'n': perm = PERM_NONE; break;
        case 'r': perm = PERM_READ; break;
        case 'w': perm = PERM_WRITE; break;
        case 'b': perm = PERM_READ | PERM_WRITE; break;
        default: return XEN_EINVAL;
        }
        if (len < 2 || len > 6)
            return XEN_EINVAL;
        for (size_t i = 1; i < len; i++) {
            if (s[i] < '0' || s[i] > '9')
                return XEN_EINVAL;
            id = id * 10 + (unsigned long)(s[i] - '0');
        }
        if (id > 0xFFFF)
            return XEN_EINVAL;
        if (np == sizeof(perms) / sizeof(perms[0]) || (c->domid && np >= quota.perms))
            return XEN_ENOSPC;
        perms[np].domid = (uint16_t)id;
        perms[np].perm = (uint8_t)perm;
        np++;
    }
    if (!np)
        return XEN_EINVAL;
    if ((rc = get_node(c, t, path, PERM_WRITE | PERM_OWNER, &n)))
        return rc;
    if (c->domid && perms[0].domid != n->perms[0].domid)
        return XEN_EPERM;               /* a domain may not give its nodes away */
    struct xs_perm *copy = malloc(np * sizeof(*copy));
    if (!copy)
        return XEN_ENOMEM;
    memcpy(copy, perms, np * sizeof(*copy));
    account(c, t, n->perms[0].domid, -1);  /* the node moves to its new owner's count */
    account(c, t, perms[0].domid, 1);
    free(n->perms);
    n->perms = copy;
    n->nperms = np;
    touch(t, n);
    return note_change(t, after, path, 0, n);
}

/* ---- watches and the output queue ---- */

static uint32_t out_free(const struct xs_conn *c)
{
    return OUT_BYTES - (c->out_prod - c->out_cons);
}

static void out_put(struct xs_conn *c, const void *buf, uint32_t len)
{
    const uint8_t *b = buf;
    for (uint32_t i = 0; i < len; i++)
        c->out[c->out_prod++ & (OUT_BYTES - 1)] = b[i];
}

static void queue_msg(struct xs_conn *c, uint32_t type, uint32_t req_id, uint32_t tx_id,
                      const void *payload, uint32_t len)
{
    struct xsd_sockmsg h = { .type = type, .req_id = req_id, .tx_id = tx_id, .len = len };
    out_put(c, &h, sizeof(h));
    out_put(c, payload, len);
}

static void queue_event(struct xs_conn *c, struct xs_watch *w, const char *path)
{
    char prefix[32];
    uint8_t buf[XENSTORE_PAYLOAD_MAX];
    size_t plen, tlen = strlen(w->token);
    int k = snprintf(prefix, sizeof(prefix), "/local/domain/%u/", c->domid);

    if (w->relative && !strncmp(path, prefix, (size_t)k))
        path += k;
    plen = strlen(path);
    if (plen + tlen + 2 > sizeof(buf) || out_free(c) < sizeof(struct xsd_sockmsg) + plen + tlen + 2) {
        c->events_dropped++;            /* the guest does not read its ring: bounded, so lost */
        return;
    }
    memcpy(buf, path, plen + 1);
    memcpy(buf + plen + 1, w->token, tlen + 1);
    queue_msg(c, XS_WATCH_EVENT, 0, 0, buf, (uint32_t)(plen + tlen + 2));
}

/* path is w's path, or below it. */
static int under(const char *path, const char *w)
{
    size_t n = strlen(w);
    if (!strcmp(w, "/"))
        return path[0] == '/';
    return !strncmp(path, w, n) && (path[n] == 0 || path[n] == '/');
}

static void flush(struct xs_conn *c);

static void fire(struct xs_change *ch)
{
    for (struct xs_conn *c = conn_list; c; c = c->next) {
        uint32_t before = c->out_prod;
        if (c->error || !(perm_of(c->domid, ch->perms, ch->nperms) & PERM_READ))
            continue;
        for (struct xs_watch *w = c->watches; w; w = w->next) {
            if (under(ch->path, w->path))
                queue_event(c, w, ch->path);
            else if (ch->removed && under(w->path, ch->path))
                queue_event(c, w, w->path);
        }
        if (c->out_prod != before)
            flush(c);
    }
    for (struct host_watch *h = host_watches; h; h = h->next)
        if (under(ch->path, h->path) || (ch->removed && under(h->path, ch->path)))
            h->fn(h->arg);
}

int hv_xs_host_watch(const char *path, void (*fn)(void *arg), void *arg)
{
    struct host_watch *h;
    if (strlen(path) > XENSTORE_ABS_PATH_MAX || !(h = calloc(1, sizeof(*h))))
        return -XEN_ENOMEM;
    strcpy(h->path, path);
    h->fn = fn;
    h->arg = arg;
    pthread_mutex_lock(&xs_lock);
    h->next = host_watches;
    host_watches = h;
    pthread_mutex_unlock(&xs_lock);
    return 0;
}

void hv_xs_host_unwatch(void *arg)
{
    pthread_mutex_lock(&xs_lock);
    for (struct host_watch **p = &host_watches; *p; ) {
        struct host_watch *h = *p;
        if (h->arg == arg) {
            *p = h->next;
            free(h);
        } else {
            p = &h->next;
        }
    }
    pthread_mutex_unlock(&xs_lock);
}

static void free_watch(struct xs_watch *w)
{
    free(w->path);
    free(w->token);
    free(w);
}

static void free_tx(struct xs_tx *t)
{
    if (t->root) {
        node_free(t->root);
        tx_nodes -= t->nodes;
    }
    free_changes(t->changes);
    free(t);
}

static void drop_watches_and_txs(struct xs_conn *c)
{
    while (c->watches) {
        struct xs_watch *w = c->watches;
        c->watches = w->next;
        free_watch(w);
    }
    while (c->txs) {
        struct xs_tx *t = c->txs;
        c->txs = t->next;
        free_tx(t);
    }
    c->nwatches = c->ntxs = 0;
}

static int op_watch(struct xs_conn *c, const char *path, const char *token, struct xs_after *after)
{
    char abs[XENSTORE_ABS_PATH_MAX + 1];
    int relative = 0, rc;
    struct xs_watch *w;

    if (c == &host)
        return XEN_EINVAL;              /* trapless has no ring to deliver events on */
    if (path[0] == '@') {
        if (strcmp(path, "@introduceDomain") && strcmp(path, "@releaseDomain"))
            return XEN_EINVAL;
        strcpy(abs, path);
    } else if ((rc = canonical(c->domid, path, abs, &relative))) {
        return rc;
    }
    for (w = c->watches; w; w = w->next)
        if (!strcmp(w->path, abs) && !strcmp(w->token, token))
            return XEN_EEXIST;
    if (c->domid && c->nwatches >= quota.watches)
        return XEN_E2BIG;
    if (!(w = calloc(1, sizeof(*w))) || !(w->path = strdup(abs)) || !(w->token = strdup(token))) {
        if (w)
            free(w->path);
        free(w);
        return XEN_ENOMEM;
    }
    w->relative = relative;
    w->next = c->watches;
    c->watches = w;
    c->nwatches++;
    after->new_watch = w;
    return 0;
}

static int op_unwatch(struct xs_conn *c, const char *path, const char *token)
{
    char abs[XENSTORE_ABS_PATH_MAX + 1];
    int relative, rc;

    if (path[0] == '@')
        snprintf(abs, sizeof(abs), "%s", path);
    else if ((rc = canonical(c->domid, path, abs, &relative)))
        return rc;
    for (struct xs_watch **pw = &c->watches; *pw; pw = &(*pw)->next) {
        struct xs_watch *w = *pw;
        if (!strcmp(w->path, abs) && !strcmp(w->token, token)) {
            *pw = w->next;
            free_watch(w);
            c->nwatches--;
            return 0;
        }
    }
    return XEN_ENOENT;
}

/* ---- transactions ---- */

static struct xs_tx *find_tx(struct xs_conn *c, uint32_t id)
{
    for (struct xs_tx *t = c->txs; t; t = t->next)
        if (t->id == id)
            return t;
    return NULL;
}

static int op_tx_start(struct xs_conn *c, struct xs_reply *r)
{
    struct xs_tx *t;
    char id[16];

    if (c->domid && c->ntxs >= quota.transactions)
        return XEN_ENOSPC;
    root_of(NULL);
    if (tx_nodes >= TX_NODES_MAX)
        return XEN_ENOMEM;              /* the host's bound on all transactions' copies */
    if (!(t = calloc(1, sizeof(*t))))
        return XEN_ENOMEM;
    if (!(t->root = node_copy(store))) {
        free(t);
        return XEN_ENOMEM;
    }
    t->nodes = 1;
    tx_nodes++;
    t->tail = &t->changes;
    do {                                /* ids are never 0 (no transaction) nor in use */
        t->id = ++c->next_tx;
    } while (t->id == 0 || find_tx(c, t->id));
    t->next = c->txs;
    c->txs = t;
    c->ntxs++;
    snprintf(id, sizeof(id), "%u", t->id);
    reply_str(r, XS_TRANSACTION_START, id);
    return 0;
}

/* Is the store's node at copy n's path the one n copied? (Apart, and not inlined, so
 * that the path buffer is not on the stack of every level of still_current.) */
__attribute__((noinline)) static int copy_is_current(const struct xs_node *n)
{
    char path[XENSTORE_ABS_PATH_MAX + 1];
    struct xs_node *deep, *s;
    size_t rest;
    node_path(n, path);
    s = walk(NULL, path, &deep, &rest);
    return s && s->gen == n->gen;
}

/* Does every node the transaction read or changed still have the generation it copied? */
static int still_current(const struct xs_node *n)
{
    if (n->gen == NO_GEN)
        return 1;                       /* its own: its parent's list of children says */
    if (n->accessed && !copy_is_current(n))
        return 0;
    for (const struct xs_node *k = n->child; k; k = k->next)
        if (!still_current(k))
            return 0;
    return 1;
}

/* Move t's changes below copy n into store node s (which it matched, generation and
 * all). Values, permissions and new subtrees move over: nothing is allocated, so a
 * commit cannot fail half done. */
static void apply(struct xs_tx *t, struct xs_node *n, struct xs_node *s, uint64_t gen)
{
    if (n->changed) {
        uint8_t *v = s->value;
        struct xs_perm *p = s->perms;
        uint32_t len = s->len, np = s->nperms;
        if (s->perms[0].domid < NR_DOMIDS)
            owned[s->perms[0].domid]--;
        if (n->perms[0].domid < NR_DOMIDS)
            owned[n->perms[0].domid]++;
        s->value = n->value, s->len = n->len, s->perms = n->perms, s->nperms = n->nperms;
        n->value = v, n->len = len, n->perms = p, n->nperms = np;
        s->gen = gen;
    }
    if (n->kids_changed) {              /* the ones t removed go (and ones it made anew) */
        struct xs_node *k = s->child, *next;
        for (; k; k = next) {
            const struct xs_node *m = n->child;
            uint32_t mine = 0;
            next = k->next;
            while (m && (m->gen == NO_GEN || strcmp(m->name, k->name)))
                m = m->next;
            if (m)
                continue;
            node_unlink(k);
            store_nodes -= subtree_size(k, ~0u, &mine);
            count_owners(k, -1);
            node_free(k);
        }
        s->gen = gen;
    }
    struct xs_node *k = n->child, *next;
    for (; k; k = next) {
        struct xs_node *m = s->child;
        next = k->next;
        if (k->gen != NO_GEN) {         /* a copy: its store node is there (still_current) */
            while (m && strcmp(m->name, k->name))
                m = m->next;
            if (m)
                apply(t, k, m, gen);
        } else {                        /* made by t: the subtree moves over whole */
            uint32_t mine = 0, total = subtree_size(k, ~0u, &mine);
            node_unlink(k);
            t->nodes -= total;
            tx_nodes -= total;
            node_link(s, k);
            store_nodes += total;
            count_owners(k, 1);
            set_gen(k, gen);
        }
    }
}

static int op_tx_end(struct xs_conn *c, struct xs_tx *t, int commit, struct xs_after *after)
{
    int rc = 0;
    struct xs_tx **pt = &c->txs;
    while (*pt != t)
        pt = &(*pt)->next;
    *pt = t->next;
    c->ntxs--;
    if (commit && t->error) {
        rc = t->error;                  /* it could not copy what it needed */
    } else if (commit && (t->stale || !still_current(t->root))) {
        rc = XEN_EAGAIN;                /* a node it used was changed meanwhile */
    } else if (commit) {
        uint64_t gen = ++store_gen;     /* one generation for all its changes */
        apply(t, t->root, store, gen);
        after->changes = t->changes;    /* their watches fire now */
        t->changes = NULL;
    }
    free_tx(t);
    return rc;
}

/* ---- one request ---- */

/* payload is exactly n NUL-terminated strings: their starts, or 0 if not. */
static int strings(const uint8_t *p, uint32_t len, const char **out, int n)
{
    uint32_t pos = 0;
    for (int i = 0; i < n; i++) {
        const uint8_t *nul = pos < len ? memchr(p + pos, 0, len - pos) : NULL;
        if (!nul)
            return 0;
        out[i] = (const char *)p + pos;
        pos = (uint32_t)(nul - p) + 1;
    }
    return pos == len;
}

static int parse_domid(const char *s, uint32_t *domid)
{
    uint32_t v = 0;
    if (!*s || strlen(s) > 5)
        return XEN_EINVAL;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return XEN_EINVAL;
        v = v * 10 + (uint32_t)(*s - '0');
    }
    if (v > 0xFFFF)
        return XEN_EINVAL;
    *domid = v;
    return 0;
}

/* Answer one message from c into r; what it changed is left in after. */
static void handle(struct xs_conn *c, const struct xsd_sockmsg *h, const uint8_t *p,
                   struct xs_reply *r, struct xs_after *after)
{
    char path[XENSTORE_ABS_PATH_MAX + 1];
    const char *s[2];
    struct xs_tx *t = NULL;
    struct xs_node *n;
    int rc = 0, relative;
    uint32_t domid;

    reply_str(r, h->type, "OK");
    c->requests++;
    if (h->tx_id && !(t = find_tx(c, h->tx_id))) {
        reply_error(r, XEN_ENOENT);     /* no such transaction */
        return;
    }
    if (t && t->nchanges >= TX_CHANGES_MAX &&
        (h->type == XS_WRITE || h->type == XS_MKDIR || h->type == XS_RM || h->type == XS_SET_PERMS)) {
        reply_error(r, XEN_ENOSPC);
        return;
    }
    /* The requests naming one path: it must be a string, and a valid name. */
    switch (h->type) {
    case XS_DIRECTORY: case XS_READ: case XS_GET_PERMS: case XS_MKDIR: case XS_RM:
        if (!strings(p, h->len, s, 1)) {
            reply_error(r, XEN_EINVAL);
            return;
        }
        /* fall through */
    case XS_WRITE: case XS_SET_PERMS:
        if (!memchr(p, 0, h->len)) {
            reply_error(r, XEN_EINVAL);
            return;
        }
        if ((rc = canonical(c->domid, (const char *)p, path, &relative))) {
            reply_error(r, rc);
            return;
        }
    }

    switch (h->type) {
    case XS_READ:
        if (!(rc = get_node(c, t, path, PERM_READ, &n))) {
            r->type = XS_READ;
            r->len = n->len;
            memcpy(r->data, n->value, n->len);
        }
        break;
    case XS_DIRECTORY:
        if (!(rc = get_node(c, t, path, PERM_READ, &n))) {
            load_kids(t, n);
            r->len = 0;
            for (struct xs_node *k = n->child; k && !rc; k = k->next) {
                size_t len = strlen(k->name) + 1;
                if (r->len + len > sizeof(r->data))
                    rc = XEN_E2BIG;     /* too many to list in one reply */
                else {
                    memcpy(r->data + r->len, k->name, len);
                    r->len += (uint32_t)len;
                }
            }
        }
        break;
    case XS_GET_PERMS:
        if (!(rc = get_node(c, t, path, PERM_READ, &n)))
            list_perms(n, r);
        break;
    case XS_WRITE: {
        uint32_t off = (uint32_t)strlen((const char *)p) + 1;
        rc = op_write(c, t, path, p + off, h->len - off, after);
        break;
    }
    case XS_MKDIR:
        rc = op_mkdir(c, t, path, after);
        break;
    case XS_RM:
        rc = op_rm(c, t, path, after);
        break;
    case XS_SET_PERMS: {
        uint32_t off = (uint32_t)strlen((const char *)p) + 1;
        if (p[h->len - 1] != 0)
            rc = XEN_EINVAL;
        else
            rc = op_set_perms(c, t, path, (const char *)p + off, h->len - off, after);
        break;
    }
    case XS_WATCH:
    case XS_UNWATCH:
        if (!strings(p, h->len, s, 2))
            rc = XEN_EINVAL;
        else if (h->type == XS_WATCH)
            rc = op_watch(c, s[0], s[1], after);
        else
            rc = op_unwatch(c, s[0], s[1]);
        break;
    case XS_TRANSACTION_START:
        rc = t ? XEN_EBUSY : op_tx_start(c, r);
        break;
    case XS_TRANSACTION_END:
        if (!t)
            rc = XEN_ENOENT;
        else if (!strings(p, h->len, s, 1) || (strcmp(s[0], "T") && strcmp(s[0], "F")))
            rc = XEN_EINVAL;
        else {
            rc = op_tx_end(c, t, s[0][0] == 'T', after);
            t = NULL;                   /* gone, committed or not */
        }
        break;
    case XS_GET_DOMAIN_PATH:
        if (!strings(p, h->len, s, 1) || (rc = parse_domid(s[0], &domid)))
            rc = XEN_EINVAL;
        else {
            snprintf(path, sizeof(path), "/local/domain/%u", domid);
            reply_str(r, XS_GET_DOMAIN_PATH, path);
        }
        break;
    case XS_RESET_WATCHES:
        drop_watches_and_txs(c);
        break;
    case XS_IS_DOMAIN_INTRODUCED:
        if (c->domid)
            rc = XEN_EACCES;
        else if (!strings(p, h->len, s, 1) || (rc = parse_domid(s[0], &domid)))
            rc = XEN_EINVAL;
        else
            reply_str(r, h->type, domid < NR_DOMIDS && conns[domid] ? "T" : "F");
        break;
    case XS_CONTROL: case XS_INTRODUCE: case XS_RELEASE: case XS_RESUME: case XS_SET_TARGET:
        /* dom0's tools: here the toolstack attaches rings itself (hv_xs_attach) */
        rc = c->domid ? XEN_EACCES : XEN_ENOSYS;
        break;
    default:                            /* unknown, reply-only, or optional and absent */
        rc = XEN_ENOSYS;
    }
    if (!rc && t && t->error)
        rc = t->error;                  /* it could not copy what it needed */
    if (rc)
        reply_error(r, rc);
}

/* After the reply: watches fire. */
static void finish(struct xs_conn *c, struct xs_after *after)
{
    if (after->new_watch) {
        struct xs_watch *w = after->new_watch;
        queue_event(c, w, w->path);   /* relative watches hear relative paths */
        flush(c);
    }
    for (struct xs_change *ch = after->changes; ch; ch = ch->next)
        fire(ch);
    free_changes(after->changes);
}

/* ---- the ring ---- */

static struct xenstore_domain_interface *ring_of(struct xs_conn *c)
{
    if (!c->d || c->error || !hv_mm_frame_usable(c->d, c->gpa >> HV_PAGE_SHIFT))
        return NULL;
    return (struct xenstore_domain_interface *)(c->d->ram + c->gpa);
}

/* Stop serving a ring the guest broke, and say why where it can see it. */
static void ring_broken(struct xs_conn *c, struct xenstore_domain_interface *intf, uint32_t why)
{
    c->error = why;
    __atomic_store_n(&intf->error, why, __ATOMIC_RELEASE);
}

/* Move queued output into rsp as far as it has room; 1 if anything moved. */
static int push_out(struct xs_conn *c, struct xenstore_domain_interface *intf)
{
    uint32_t cons = __atomic_load_n(&intf->rsp_cons, __ATOMIC_ACQUIRE);
    uint32_t prod = __atomic_load_n(&intf->rsp_prod, __ATOMIC_ACQUIRE);
    uint32_t used = prod - cons, n = 0;

    if (used > XENSTORE_RING_SIZE) {
        ring_broken(c, intf, XENSTORE_ERROR_RINGIDX);
        return 0;
    }
    while (n < XENSTORE_RING_SIZE - used && c->out_cons != c->out_prod)
        intf->rsp[(prod + n++) & RING_MASK] = (char)c->out[c->out_cons++ & (OUT_BYTES - 1)];
    /* The bytes must be visible before the index that publishes them. */
    __atomic_store_n(&intf->rsp_prod, prod + n, __ATOMIC_RELEASE);
    return n != 0;
}

static void flush(struct xs_conn *c)
{
    struct xenstore_domain_interface *intf = ring_of(c);
    if (intf && push_out(c, intf))
        hv_evtchn_backend_notify(c->d, c->port);
}

static void reset_connection(struct xs_conn *c, struct xenstore_domain_interface *intf)
{
    /* The guest asked to start over (XENSTORE_RECONNECT): what was in flight is gone. */
    drop_watches_and_txs(c);
    c->in_len = 0;
    c->out_cons = c->out_prod;
    c->error = XENSTORE_ERROR_NONE;
    intf->req_cons = __atomic_load_n(&intf->req_prod, __ATOMIC_ACQUIRE);
    intf->rsp_prod = __atomic_load_n(&intf->rsp_cons, __ATOMIC_ACQUIRE);
    intf->error = XENSTORE_ERROR_NONE;
    __atomic_store_n(&intf->connection, XENSTORE_CONNECTED, __ATOMIC_RELEASE);
}

/* The guest sent on its store port: take its requests (at most one ring's worth), answer
 * them, and give it what waits in the output queue. Caller holds xs_lock. */
static int serve(struct xs_conn *c)
{
    struct xenstore_domain_interface *intf;
    struct xs_reply r;
    uint32_t taken = 0;
    int notify = 0;

    if (!c->d || !hv_mm_frame_usable(c->d, c->gpa >> HV_PAGE_SHIFT))
        return 0;
    intf = (struct xenstore_domain_interface *)(c->d->ram + c->gpa);
    if (__atomic_load_n(&intf->connection, __ATOMIC_ACQUIRE) == XENSTORE_RECONNECT) {
        reset_connection(c, intf);
        notify = 1;
    }
    if (c->error)
        return notify;
    notify |= push_out(c, intf);
    while (!c->error && taken < XENSTORE_RING_SIZE) {
        uint32_t cons = __atomic_load_n(&intf->req_cons, __ATOMIC_ACQUIRE);
        uint32_t prod = __atomic_load_n(&intf->req_prod, __ATOMIC_ACQUIRE);
        uint32_t avail = prod - cons, want, n;
        struct xsd_sockmsg *h = (struct xsd_sockmsg *)c->in;

        if (avail > XENSTORE_RING_SIZE) {
            ring_broken(c, intf, XENSTORE_ERROR_RINGIDX);
            break;
        }
        /* Each message makes a reply (and maybe an event): take bytes only while both
         * would fit in the output queue, so it never overflows; the guest's next
         * notification (it read replies) goes on from here. */
        if (!avail || out_free(c) < 2 * MSG_MAX)
            break;
        want = c->in_len < sizeof(*h) ? (uint32_t)sizeof(*h) - c->in_len
                                      : (uint32_t)sizeof(*h) + h->len - c->in_len;
        n = avail < want ? avail : want;
        if (n > XENSTORE_RING_SIZE - taken)
            n = XENSTORE_RING_SIZE - taken;
        for (uint32_t i = 0; i < n; i++)
            c->in[c->in_len++] = (uint8_t)intf->req[(cons + i) & RING_MASK];
        /* Reading the bytes must finish before the guest may reuse their slots. */
        __atomic_store_n(&intf->req_cons, cons + n, __ATOMIC_RELEASE);
        taken += n;
        notify = 1;
        if (c->in_len == sizeof(*h) && h->len > XENSTORE_PAYLOAD_MAX) {
            ring_broken(c, intf, XENSTORE_ERROR_PROTO);     /* xenstored drops it too */
            break;
        }
        if (c->in_len >= sizeof(*h) && c->in_len == sizeof(*h) + h->len) {
            struct xs_after after = { 0 };
            struct xsd_sockmsg hdr = *h;
            handle(c, &hdr, c->in + sizeof(hdr), &r, &after);
            queue_msg(c, r.type, hdr.req_id, hdr.tx_id, r.data, r.len);
            c->in_len = 0;
            finish(c, &after);
            push_out(c, intf);
        }
    }
    if (!c->error)
        notify |= push_out(c, intf);
    return notify;
}

static void xs_kick(struct hv_domain *d)
{
    int notify = 0;
    uint32_t port = 0;
    pthread_mutex_lock(&xs_lock);
    struct xs_conn *c = d->domid < NR_DOMIDS ? conns[d->domid] : NULL;
    if (c && c->d == d) {
        notify = serve(c);
        port = c->port;
    }
    pthread_mutex_unlock(&xs_lock);
    if (notify)
        hv_evtchn_backend_notify(d, port);
}

/* @introduceDomain / @releaseDomain: every domain watching them hears (as before Xen
 * gave the special nodes permissions; there is no way to set them here). */
static void fire_special(const char *path)
{
    static const struct xs_perm everyone = { 0, PERM_READ };
    struct xs_change ch = { .path = (char *)path, .perms = (struct xs_perm *)&everyone, .nperms = 1 };
    fire(&ch);
}

/* Drop a connection and all it holds. Caller holds xs_lock. */
static void forget(struct xs_conn *c)
{
    conns[c->domid] = NULL;
    for (struct xs_conn **pc = &conn_list; *pc; pc = &(*pc)->next)
        if (*pc == c) {
            *pc = c->next;
            break;
        }
    drop_watches_and_txs(c);
    free(c);
}

int hv_xs_attach(struct hv_domain *d, uint64_t ring_gpa)
{
    struct xenstore_domain_interface *intf;
    struct xs_conn *c;
    int port;

    if (ring_gpa % HV_PAGE_SIZE || !hv_gpa_valid(d, ring_gpa, HV_PAGE_SIZE))
        return -XEN_EINVAL;
    if (d->domid == 0 || d->domid >= NR_DOMIDS)
        return -XEN_EINVAL;
    if (!(c = calloc(1, sizeof(*c))))
        return -XEN_ENOMEM;
    pthread_mutex_lock(&xs_lock);
    if (conns[d->domid] && conns[d->domid]->d == d) {
        pthread_mutex_unlock(&xs_lock);
        free(c);
        return -XEN_EEXIST;
    }
    if (conns[d->domid])                /* its domid was reused (as events.c's registry does): */
        forget(conns[d->domid]);        /* the older domain's ring is no longer served */
    port = hv_evtchn_bind_backend(d, xs_kick);
    if (port < 0) {
        pthread_mutex_unlock(&xs_lock);
        free(c);
        return port;
    }
    c->domid = d->domid;
    c->d = d;
    c->gpa = ring_gpa;
    c->port = (uint32_t)port;
    intf = (struct xenstore_domain_interface *)(d->ram + ring_gpa);
    memset(intf, 0, sizeof(*intf));
    intf->server_features = XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR;
    intf->evtchn_port = (uint32_t)port;
    conns[d->domid] = c;
    c->next = conn_list;
    conn_list = c;
    root_of(NULL);
    fire_special("@introduceDomain");
    pthread_mutex_unlock(&xs_lock);
    return port;
}

void hv_xs_detach(struct hv_domain *d)
{
    struct xs_conn *c;
    pthread_mutex_lock(&xs_lock);
    c = d->domid < NR_DOMIDS ? conns[d->domid] : NULL;
    if (c && c->d == d) {
        forget(c);
        fire_special("@releaseDomain");
    }
    pthread_mutex_unlock(&xs_lock);
}

int hv_xs_request(uint32_t domid, uint32_t type, uint32_t tx_id, const uint8_t *payload,
                  uint32_t len, uint32_t *reply_type, uint8_t *reply)
{
    struct xsd_sockmsg h = { .type = type, .req_id = 0, .tx_id = tx_id, .len = len };
    struct xs_after after = { 0 };
    struct xs_reply *r;
    struct xs_conn *c;

    if (len > XENSTORE_PAYLOAD_MAX)
        return -XEN_E2BIG;
    if (!(r = malloc(sizeof(*r))))
        return -XEN_ENOMEM;
    pthread_mutex_lock(&xs_lock);
    c = domid == 0 ? &host : domid < NR_DOMIDS ? conns[domid] : NULL;
    if (!c) {
        pthread_mutex_unlock(&xs_lock);
        free(r);
        return -XEN_ESRCH;
    }
    root_of(NULL);
    handle(c, &h, payload, r, &after);
    finish(c, &after);
    pthread_mutex_unlock(&xs_lock);
    *reply_type = r->type;
    memcpy(reply, r->data, r->len);
    len = r->len;
    free(r);
    return (int)len;
}

void hv_xs_get_quota(struct hv_xs_quota *q)
{
    pthread_mutex_lock(&xs_lock);
    *q = quota;
    pthread_mutex_unlock(&xs_lock);
}

void hv_xs_set_quota(const struct hv_xs_quota *q)
{
    pthread_mutex_lock(&xs_lock);
    quota = *q;
    pthread_mutex_unlock(&xs_lock);
}

int hv_xs_stats(uint32_t domid, struct hv_xs_stats *out)
{
    struct xs_conn *c;
    pthread_mutex_lock(&xs_lock);
    c = domid < NR_DOMIDS ? conns[domid] : NULL;
    if (c) {
        out->entries = owned[domid];
        out->watches = c->nwatches;
        out->transactions = c->ntxs;
        out->ring_error = c->error;
        out->requests = c->requests;
        out->events_dropped = c->events_dropped;
        out->tx_nodes = 0;
        for (struct xs_tx *t = c->txs; t; t = t->next)
            out->tx_nodes += t->nodes;
    }
    pthread_mutex_unlock(&xs_lock);
    return c ? 0 : -XEN_ESRCH;
}
