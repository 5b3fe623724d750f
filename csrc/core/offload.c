/* Background threads for slow work (see offload.h): OFFLOAD_THREADS
 * threads, each with its own lock-free stack and eventfd; submit spreads
 * jobs over them round robin (or by key, for jobs that must stay in
 * order), so posting a job never takes a lock. */
#include "core/offload.h"

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdatomic.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct offload_thread {
    mpsc_stack jobs;
    int fd;
    pthread_t thread;
    bool running;
};

static struct offload_thread threads[OFFLOAD_THREADS];
static atomic_uint next_thread;
static atomic_bool quit;
static int users;

static void *offload_main(void *arg)
{
    struct offload_thread *t = arg;
    for (;;) {
        uint64_t v;
        if (read(t->fd, &v, sizeof v) < 0 && errno != EINTR) break;
        struct mpsc_node *n = mpsc_take_all(&t->jobs);
        while (n) {
            struct mpsc_node *next = n->next;
            struct offload_job *j = (struct offload_job *)((char *)n - offsetof(struct offload_job, node));
            j->work(j);
            /* After the post the loop owns (and may free) j. */
            atomic_int *outstanding = j->outstanding;
            loop_post(j->loop, &j->msg);
            if (outstanding) atomic_fetch_sub(outstanding, 1);
            n = next;
        }
        /* Quit only with nothing left: every job gets its answer. */
        if (atomic_load(&quit) && atomic_load(&t->jobs) == NULL) break;
    }
    return NULL;
}

static void stop_threads(void)
{
    atomic_store(&quit, true);
    for (int i = 0; i < OFFLOAD_THREADS; i++) {
        struct offload_thread *t = &threads[i];
        if (t->running) {
            uint64_t one = 1;
            ssize_t w = write(t->fd, &one, sizeof one);
            (void)w;
            pthread_join(t->thread, NULL);
            t->running = false;
        }
        if (t->fd >= 0) close(t->fd);
        t->fd = -1;
    }
}

int offload_start(void)
{
    if (users++ > 0) return 0;
    atomic_store(&quit, false);
    for (int i = 0; i < OFFLOAD_THREADS; i++) threads[i].fd = -1;
    for (int i = 0; i < OFFLOAD_THREADS; i++) {
        struct offload_thread *t = &threads[i];
        t->fd = eventfd(0, EFD_CLOEXEC);
        int rc = t->fd < 0 ? errno : pthread_create(&t->thread, NULL, offload_main, t);
        if (rc != 0) {
            stop_threads();
            users--;
            return -rc;
        }
        t->running = true;
    }
    return 0;
}

static void submit_to(struct offload_thread *t, struct offload_job *j)
{
    if (j->outstanding) atomic_fetch_add(j->outstanding, 1);
    if (mpsc_push(&t->jobs, &j->node)) {
        uint64_t one = 1;
        ssize_t w = write(t->fd, &one, sizeof one);
        (void)w;
    }
}

void offload_submit(struct offload_job *j)
{
    submit_to(&threads[atomic_fetch_add(&next_thread, 1) % OFFLOAD_THREADS], j);
}

void offload_submit_keyed(struct offload_job *j, uint64_t key)
{
    submit_to(&threads[key % OFFLOAD_THREADS], j);
}

void offload_stop(void)
{
    if (users == 0 || --users > 0) return;
    stop_threads();
}
