/* One background thread for work too slow for a worker's loop (password
 * hashing): jobs go in through a lock-free stack and an eventfd, and each
 * result is posted back to the loop that asked. */
#ifndef CORE_OFFLOAD_H
#define CORE_OFFLOAD_H

#include "core/loop.h"
#include "core/mpsc.h"

#include <stdatomic.h>

struct offload_job {
    struct loop_msg msg;                 /* posted back to `loop` when done */
    struct mpsc_node node;
    struct loop *loop;
    void (*work)(struct offload_job *j); /* runs on the offload thread */
    atomic_int *outstanding;             /* decremented once posted back */
};

int offload_start(void);
/* Queue j; *j->outstanding (if set) counts it until its result is posted. */
void offload_submit(struct offload_job *j);
void offload_stop(void);

#endif
