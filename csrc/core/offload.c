/* Background thread for slow work (see offload.h). */
#include "core/offload.h"

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdatomic.h>
#include <sys/eventfd.h>
#include <unistd.h>

static mpsc_stack jobs;
static int job_fd = -1;
static pthread_t thread;
static atomic_bool quit;
static int users;

static void *offload_main(void *arg)
{
    (void)arg;
    for (;;) {
        uint64_t v;
        if (read(job_fd, &v, sizeof v) < 0 && errno != EINTR) break;
        struct mpsc_node *n = mpsc_take_all(&jobs);
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
        if (atomic_load(&quit) && atomic_load(&jobs) == NULL) break;
    }
    return NULL;
}

int offload_start(void)
{
    if (users++ > 0) return 0;
    atomic_store(&quit, false);
    job_fd = eventfd(0, EFD_CLOEXEC);
    if (job_fd < 0) {
        users--;
        return -errno;
    }
    int rc = pthread_create(&thread, NULL, offload_main, NULL);
    if (rc != 0) {
        close(job_fd);
        job_fd = -1;
        users--;
        return -rc;
    }
    return 0;
}

void offload_submit(struct offload_job *j)
{
    if (j->outstanding) atomic_fetch_add(j->outstanding, 1);
    if (mpsc_push(&jobs, &j->node)) {
        uint64_t one = 1;
        ssize_t w = write(job_fd, &one, sizeof one);
        (void)w;
    }
}

void offload_stop(void)
{
    if (users == 0 || --users > 0) return;
    atomic_store(&quit, true);
    uint64_t one = 1;
    ssize_t w = write(job_fd, &one, sizeof one);
    (void)w;
    pthread_join(thread, NULL);
    close(job_fd);
    job_fd = -1;
}
