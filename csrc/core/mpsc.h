/* A lock-free many-producer, one-consumer stack: producers push one node
 * with a CAS, the consumer takes the whole stack at once (so there is no
 * ABA) and gets it back oldest first. Used for every hand-off between
 * threads: a loop's inbox, the offload queue, the hook bridge. */
#ifndef CORE_MPSC_H
#define CORE_MPSC_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

struct mpsc_node {
    struct mpsc_node *next;
};

typedef _Atomic(struct mpsc_node *) mpsc_stack;

/* Push n; true when the stack was empty, i.e. the consumer needs a wake-up
 * (it takes everything at once, so later pushes ride on that wake-up). */
static inline bool mpsc_push(mpsc_stack *s, struct mpsc_node *n)
{
    struct mpsc_node *head = atomic_load_explicit(s, memory_order_relaxed);
    do {
        n->next = head;
    } while (!atomic_compare_exchange_weak_explicit(s, &head, n, memory_order_release,
                                                    memory_order_relaxed));
    return head == NULL;
}

/* Take every node, oldest first (NULL when empty). */
static inline struct mpsc_node *mpsc_take_all(mpsc_stack *s)
{
    struct mpsc_node *n = atomic_exchange_explicit(s, NULL, memory_order_acquire);
    struct mpsc_node *rev = NULL;
    while (n) {
        struct mpsc_node *next = n->next;
        n->next = rev;
        rev = n;
        n = next;
    }
    return rev;
}

#endif
