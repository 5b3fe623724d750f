/* Background threads for work too slow or too blocking for a worker's
 * loop (password hashing, DKIM signing, store file I/O, Python store
 * calls): jobs go in through lock-free stacks and eventfds, spread round
 * robin over OFFLOAD_THREADS threads, and each result is posted back to the
 * loop that asked. Jobs may run in any order and at the same time: a
 * caller that needs an order waits for one job's answer before the next,
 * or submits them with one key (same key, same thread, run in order). */
#ifndef CORE_OFFLOAD_H
#define CORE_OFFLOAD_H

#include "core/loop.h"
#include "core/mpsc.h"

#include <stdatomic.h>
#include <stdint.h>

#define OFFLOAD_THREADS 4

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
/* Queue j on the thread `key` selects: jobs submitted with one key run one
 * at a time, in the order they were submitted (local deliveries to one
 * mailbox keep their arrival order). */
void offload_submit_keyed(struct offload_job *j, uint64_t key);
void offload_stop(void);

#endif
