/* Hook bridge between workers and Python (see bridge.h). */
#include "py/bridge.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

int bridge_init(struct bridge *b)
{
    atomic_init(&b->head, (struct mpsc_node *)NULL);
    b->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return b->efd < 0 ? -errno : 0;
}

void bridge_destroy(struct bridge *b)
{
    struct hook_req *r = bridge_take_all(b);
    while (r) {
        struct hook_req *next = hook_req_next(r);
        hook_req_free(r);
        r = next;
    }
    if (b->efd >= 0) close(b->efd);
    b->efd = -1;
}

struct hook_req *hook_req_new(enum hook_kind kind, const char *const *args, const size_t *lens)
{
    size_t extra = 0;
    for (int i = 0; i < HARG_COUNT; i++)
        if (args[i]) extra += lens[i] + 1;
    struct hook_req *r = calloc(1, sizeof *r + extra);
    if (!r) return NULL;
    r->kind = kind;
    char *p = (char *)(r + 1);
    for (int i = 0; i < HARG_COUNT; i++) {
        if (!args[i]) continue;
        memcpy(p, args[i], lens[i]);
        p[lens[i]] = 0;
        r->args[i] = p;
        r->arg_lens[i] = lens[i];
        p += lens[i] + 1;
    }
    return r;
}

void hook_req_free(struct hook_req *r) { free(r); }

void bridge_submit(struct bridge *b, struct hook_req *r)
{
    if (mpsc_push(&b->head, &r->node)) {
        uint64_t one = 1;
        ssize_t w = write(b->efd, &one, sizeof one);
        (void)w;
    }
}

struct hook_req *bridge_take_all(struct bridge *b)
{
    uint64_t v;
    ssize_t rd = read(b->efd, &v, sizeof v);
    (void)rd;
    struct mpsc_node *n = mpsc_take_all(&b->head);
    return n ? (struct hook_req *)((char *)n - offsetof(struct hook_req, node)) : NULL;
}

static void reply_on_loop(struct loop *l, struct loop_msg *m)
{
    (void)l;
    struct hook_req *r = (struct hook_req *)m;
    r->done(r);
}

void bridge_reply(struct hook_req *r)
{
    if (!r->loop) {
        hook_req_free(r);
        return;
    }
    r->msg.fn = reply_on_loop;
    loop_post(r->loop, &r->msg);
}
