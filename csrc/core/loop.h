/* The event loop: one io_uring per worker thread. Every submission carries a
 * pointer to a struct loop_op whose fn receives the completion. Other
 * threads talk to a loop only through its inbox (lock-free stack + eventfd);
 * work that should happen once per loop turn (flushing output, committing
 * the spool) is queued as a task and runs before the loop next waits. */
#ifndef CORE_LOOP_H
#define CORE_LOOP_H

#include <liburing.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "core/buf.h"
#include "core/mpsc.h"
#include "core/timer.h"

struct loop;
struct loop_op;

typedef void (*loop_op_fn)(struct loop_op *op, struct io_uring_cqe *cqe);
struct loop_op {
    loop_op_fn fn;
};

/* A message from another thread; fn runs on the loop's thread. */
struct loop_msg {
    struct mpsc_node node;
    void (*fn)(struct loop *l, struct loop_msg *m);
};

/* End-of-turn work; queued at most once until it runs. */
struct loop_task {
    struct loop_task *next;
    void (*fn)(struct loop_task *t);
    bool queued;
};

#define LOOP_BUF_GROUP 1

struct loop {
    struct io_uring ring;
    struct bufring bufs;
    struct timer_wheel timers;
    int id;
    atomic_bool stop;
    unsigned ring_flags;       /* setup flags the kernel accepted */

    int inbox_fd;              /* eventfd */
    uint64_t inbox_val;
    struct loop_op inbox_op;
    mpsc_stack inbox;

    struct loop_task *tasks, **tasks_tail;
    void *owner;               /* the worker that runs this loop */
    bool dead;                 /* ring gone; late messages only free memory */
};

/* Create the ring (SINGLE_ISSUER|DEFER_TASKRUN when the kernel has them),
 * the receive buffer ring and the inbox. Call on the thread that runs it. */
int loop_init(struct loop *l, int id, unsigned entries, unsigned nbufs, unsigned bufsize);
/* Tear down the ring. The inbox stays usable (posts after this are kept)
 * until loop_close_inbox, so late replies from other threads stay safe. */
void loop_destroy(struct loop *l);
/* Run what was posted after loop_destroy (with dead set), then close the
 * inbox. Call once no other thread can post. */
void loop_close_inbox(struct loop *l);

/* An SQE, submitting first when the ring is full; never NULL. */
struct io_uring_sqe *loop_sqe(struct loop *l);
static inline void loop_sqe_set_op(struct io_uring_sqe *sqe, struct loop_op *op)
{
    io_uring_sqe_set_data(sqe, op);
}

/* Run until loop_stop(); each turn: tasks, submit and wait, completions,
 * timers, inbox. */
void loop_run(struct loop *l);
/* Thread-safe: ask the loop to return from loop_run. */
void loop_stop(struct loop *l);
/* Thread-safe: post m to the loop; fn runs on the loop thread. */
void loop_post(struct loop *l, struct loop_msg *m);
/* Loop thread only: run t->fn at the end of this turn. */
void loop_defer(struct loop *l, struct loop_task *t);

#endif
