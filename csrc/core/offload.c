/* Background thread for slow work (see offload.h). */
#include "core/offload.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/eventfd.h>
#include <unistd.h>

static _Atomic(struct offload_job *) jobs;
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
        struct offload_job *j = atomic_exchange(&jobs, NULL);
        struct offload_job *rev = NULL;
        while (j) {
            struct offload_job *next = j->next;
            j->next = rev;
            rev = j;
            j = next;
        }
        while (rev) {
            struct offload_job *next = rev->next;
            rev->work(rev);
            loop_post(rev->loop, &rev->msg);
            rev = next;
        }
        if (atomic_load(&quit)) break;
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
    struct offload_job *head = atomic_load(&jobs);
    do {
        j->next = head;
    } while (!atomic_compare_exchange_weak(&jobs, &head, j));
    uint64_t one = 1;
    ssize_t w = write(job_fd, &one, sizeof one);
    (void)w;
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
