/* io_uring event loop (see loop.h). */
#include "core/loop.h"

#include <errno.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core/log.h"

static void inbox_arm(struct loop *l);

static void inbox_drain(struct loop *l)
{
    struct mpsc_node *n = mpsc_take_all(&l->inbox);
    while (n) {
        struct mpsc_node *next = n->next;
        struct loop_msg *m = (struct loop_msg *)n;
        m->fn(l, m);
        n = next;
    }
}

static void inbox_on_read(struct loop_op *op, struct io_uring_cqe *cqe)
{
    struct loop *l = (struct loop *)((char *)op - offsetof(struct loop, inbox_op));
    (void)cqe;
    inbox_drain(l);
    inbox_arm(l);
}

static void inbox_arm(struct loop *l)
{
    struct io_uring_sqe *sqe = loop_sqe(l);
    io_uring_prep_read(sqe, l->inbox_fd, &l->inbox_val, sizeof l->inbox_val, 0);
    loop_sqe_set_op(sqe, &l->inbox_op);
}

int loop_init(struct loop *l, int id, unsigned entries, unsigned nbufs, unsigned bufsize)
{
    memset(l, 0, sizeof *l);
    l->inbox_fd = -1;
    l->id = id;
    l->tasks_tail = &l->tasks;
    struct io_uring_params p;
    int rc;
    /* Newest flags first; older kernels refuse them with EINVAL. */
    static const unsigned flag_sets[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL,
        IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL,
        0,
    };
    rc = -EINVAL;
    for (size_t i = 0; i < sizeof flag_sets / sizeof flag_sets[0]; i++) {
        memset(&p, 0, sizeof p);
        p.flags = flag_sets[i] | IORING_SETUP_CQSIZE;
        p.cq_entries = entries * 4;
        rc = io_uring_queue_init_params(entries, &l->ring, &p);
        if (rc == 0) {
            l->ring_flags = flag_sets[i];
            break;
        }
    }
    if (rc < 0) return rc;
    rc = bufring_init(&l->bufs, &l->ring, LOOP_BUF_GROUP, nbufs, bufsize);
    if (rc < 0) {
        io_uring_queue_exit(&l->ring);
        return rc;
    }
    l->inbox_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (l->inbox_fd < 0) {
        rc = -errno;
        bufring_destroy(&l->bufs, &l->ring);
        io_uring_queue_exit(&l->ring);
        return rc;
    }
    atomic_init(&l->inbox, (struct mpsc_node *)NULL);
    atomic_init(&l->stop, false);
    l->inbox_op.fn = inbox_on_read;
    timer_wheel_init(&l->timers);
    inbox_arm(l);
    return 0;
}

void loop_destroy(struct loop *l)
{
    l->dead = true;
    bufring_destroy(&l->bufs, &l->ring);
    io_uring_queue_exit(&l->ring);
}

void loop_close_inbox(struct loop *l)
{
    l->dead = true;
    inbox_drain(l);
    if (l->inbox_fd >= 0) close(l->inbox_fd);
    l->inbox_fd = -1;
}

struct io_uring_sqe *loop_sqe(struct loop *l)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&l->ring);
    while (!sqe) {
        io_uring_submit(&l->ring);
        sqe = io_uring_get_sqe(&l->ring);
    }
    return sqe;
}

void loop_post(struct loop *l, struct loop_msg *m)
{
    if (mpsc_push(&l->inbox, &m->node)) {
        uint64_t one = 1;
        ssize_t w = write(l->inbox_fd, &one, sizeof one);
        (void)w;
    }
}

void loop_stop(struct loop *l)
{
    atomic_store(&l->stop, true);
    uint64_t one = 1;
    ssize_t w = write(l->inbox_fd, &one, sizeof one);
    (void)w;
}

void loop_defer(struct loop *l, struct loop_task *t)
{
    if (t->queued) return;
    t->queued = true;
    t->next = NULL;
    *l->tasks_tail = t;
    l->tasks_tail = &t->next;
}

static void run_tasks(struct loop *l)
{
    /* Tasks may queue more tasks (a flush after a commit); run until none. */
    while (l->tasks) {
        struct loop_task *t = l->tasks;
        l->tasks = t->next;
        if (!l->tasks) l->tasks_tail = &l->tasks;
        t->queued = false;
        t->fn(t);
    }
}

void loop_run(struct loop *l)
{
    while (!atomic_load_explicit(&l->stop, memory_order_relaxed)) {
        run_tasks(l);
        struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = TIMER_TICK_MS * 1000000L};
        if (l->timers.armed == 0) ts.tv_sec = 1, ts.tv_nsec = 0;
        struct io_uring_cqe *cqe;
        int rc = io_uring_submit_and_wait_timeout(&l->ring, &cqe, 1, &ts, NULL);
        if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EBUSY && rc != -EAGAIN)
            log_error("loop", "worker %d: io_uring wait failed: %s", l->id, strerror(-rc));
        unsigned head, n = 0;
        io_uring_for_each_cqe(&l->ring, head, cqe) {
            struct loop_op *op = io_uring_cqe_get_data(cqe);
            if (op) op->fn(op, cqe);
            n++;
            /* Handlers run with the CQE still in the ring; advance in
             * batches so a handler that submits never sees a full CQ. */
        }
        io_uring_cq_advance(&l->ring, n);
        timer_wheel_advance(&l->timers);
        inbox_drain(l);
    }
    run_tasks(l);
}
