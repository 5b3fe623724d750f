/* The hook bridge: workers post requests for Python (a lock-free stack and
 * an eventfd the Python side waits on), the Python side posts each reply
 * back to the worker's loop. A session waiting for a reply is suspended;
 * its worker goes on with everything else. */
#ifndef PY_BRIDGE_H
#define PY_BRIDGE_H

#include <stdatomic.h>
#include <stddef.h>

#include "core/config.h"
#include "core/loop.h"

enum hook_action {
    HOOK_ACCEPT = 0,      /* go on with the engine's own policy */
    HOOK_REJECT,
    HOOK_TEMPFAIL,
    HOOK_AUTHENTICATED,   /* auth hook: the credentials are good */
};

/* Session fields every request carries. */
enum { HARG_SESSION_ID = 0, HARG_PEER_IP, HARG_LISTENER, HARG_HELO, HARG_AUTH_USER,
       HARG_1, HARG_2, HARG_3, HARG_COUNT };

struct hook_req {
    struct loop_msg msg;              /* carries the reply to the worker */
    struct mpsc_node node;            /* bridge stack link */
    enum hook_kind kind;
    struct loop *loop;                /* NULL for events (no reply) */
    void (*done)(struct hook_req *r); /* on the loop thread, after reply */
    void *owner;
    int peer_port;
    int tls;
    const char *args[HARG_COUNT];     /* copies, NULL when absent */
    size_t arg_lens[HARG_COUNT];
    const char *data;                 /* DATA hook: message bytes, owned by the session */
    size_t data_len;
    /* reply */
    int action;
    int code;
    char text[512];
};

struct bridge {
    mpsc_stack head;
    int efd;
};

int bridge_init(struct bridge *b);
void bridge_destroy(struct bridge *b);

/* One allocation holding the request and copies of every argument. */
struct hook_req *hook_req_new(enum hook_kind kind, const char *const *args, const size_t *lens);
void hook_req_free(struct hook_req *r);

/* Worker side: hand r to Python. */
void bridge_submit(struct bridge *b, struct hook_req *r);
/* Python side: take every pending request, oldest first; walk them with
 * hook_req_next. */
struct hook_req *bridge_take_all(struct bridge *b);
static inline struct hook_req *hook_req_next(const struct hook_req *r)
{
    return r->node.next ? (struct hook_req *)((char *)r->node.next - offsetof(struct hook_req, node))
                        : NULL;
}
/* Python side: send the filled-in reply back (events are just freed). */
void bridge_reply(struct hook_req *r);

#endif
