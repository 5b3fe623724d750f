/* One background thread for work too slow for a worker's loop (password
 * hashing): jobs go in through a lock-free stack and an eventfd, and each
 * result is posted back to the loop that asked. */
#ifndef CORE_OFFLOAD_H
#define CORE_OFFLOAD_H

#include "core/loop.h"
#include "core/mpsc.h"

struct offload_job {
    struct loop_msg msg;                 /* posted back to `loop` when done */
    struct mpsc_node node;
    struct loop *loop;
    void (*work)(struct offload_job *j); /* runs on the offload thread */
};

int offload_start(void);
void offload_submit(struct offload_job *j);
void offload_stop(void);

#endif
