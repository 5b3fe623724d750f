/* Timer wheel, one per worker: a hashed wheel of 10 ms ticks. Arming,
 * re-arming and cancelling are O(1), so every connection can keep idle and
 * total deadlines that move on each command. */
#ifndef CORE_TIMER_H
#define CORE_TIMER_H

#include <stdint.h>

#define TIMER_TICK_MS 10
#define TIMER_SLOTS 1024

struct timer {
    struct timer *next, *prev;   /* NULL prev: not armed */
    uint64_t due_tick;
    void (*fn)(struct timer *t);
};

struct timer_wheel {
    struct timer slots[TIMER_SLOTS];   /* list heads */
    uint64_t now_tick;                 /* last tick processed */
    uint64_t armed;
};

uint64_t timer_now_ms(void);           /* CLOCK_MONOTONIC in ms */
void timer_wheel_init(struct timer_wheel *w);
/* Arm (or re-arm) t to fire after ms milliseconds. */
void timer_arm(struct timer_wheel *w, struct timer *t, uint64_t ms);
void timer_cancel(struct timer_wheel *w, struct timer *t);
static inline int timer_armed(const struct timer *t) { return t->prev != 0; }
/* Fire every timer due by now. */
void timer_wheel_advance(struct timer_wheel *w);

#endif
