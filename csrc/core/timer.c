/* Hashed timer wheel (see timer.h). */
#include "core/timer.h"

#include <time.h>

uint64_t timer_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t now_tick(void) { return timer_now_ms() / TIMER_TICK_MS; }

void timer_wheel_init(struct timer_wheel *w)
{
    for (int i = 0; i < TIMER_SLOTS; i++) w->slots[i].next = w->slots[i].prev = &w->slots[i];
    w->now_tick = now_tick();
    w->armed = 0;
}

void timer_cancel(struct timer_wheel *w, struct timer *t)
{
    if (!t->prev) return;
    t->prev->next = t->next;
    t->next->prev = t->prev;
    t->next = t->prev = 0;
    w->armed--;
}

void timer_arm(struct timer_wheel *w, struct timer *t, uint64_t ms)
{
    timer_cancel(w, t);
    /* An empty wheel is not swept while the loop sleeps: catch its clock up
     * so a new timer is not based on a stale tick. */
    if (w->armed == 0) w->now_tick = now_tick();
    uint64_t ticks = (ms + TIMER_TICK_MS - 1) / TIMER_TICK_MS;
    if (ticks == 0) ticks = 1;
    /* Base on the wheel's own clock so a timer never lands in a slot that
     * was already swept for its tick. */
    t->due_tick = w->now_tick + ticks;
    struct timer *head = &w->slots[t->due_tick % TIMER_SLOTS];
    t->next = head->next;
    t->prev = head;
    head->next->prev = t;
    head->next = t;
    w->armed++;
}

void timer_wheel_advance(struct timer_wheel *w)
{
    uint64_t target = now_tick();
    if (w->armed == 0) {
        w->now_tick = target;
        return;
    }
    /* After a long sleep one sweep of every slot suffices: each timer's
     * due tick is compared, not just its slot. */
    uint64_t from = w->now_tick + 1;
    if (target >= from + TIMER_SLOTS) from = target - TIMER_SLOTS + 1;
    for (uint64_t tick = from; tick <= target; tick++) {
        w->now_tick = tick;
        struct timer *head = &w->slots[tick % TIMER_SLOTS];
        struct timer *t = head->next;
        while (t != head) {
            if (t->due_tick <= target) {
                timer_cancel(w, t);
                t->fn(t);          /* may arm or cancel others: rescan */
                t = head->next;
            } else {
                t = t->next;
            }
        }
    }
    w->now_tick = target;
}
