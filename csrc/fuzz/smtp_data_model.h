/* A byte-at-a-time model of the DATA scanner (RFC 5321 §4.5.2 as parse.h
 * states it), written over the whole input with look-ahead instead of saved
 * state. Shared by the unit test and the fuzz target, which both check that
 * smtp_data_scan agrees with it however the input is split. Test code only. */
#ifndef FUZZ_SMTP_DATA_MODEL_H
#define FUZZ_SMTP_DATA_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "smtp/parse.h"

struct smtp_data_model {
    char *out;               /* room for n bytes */
    size_t out_n, used;
    uint32_t flags;
    int done;
};

static inline void smtp_data_model_scan(const char *in, size_t n, size_t max,
                                        struct smtp_data_model *r)
{
    size_t line = 0;
    int bol = 1;

    if (max == 0) max = (size_t)-1;
    r->out_n = 0;
    r->flags = 0;
    r->done = 0;
#define LINE_ADD(k) do { line += (k); if (line > max) r->flags |= SMTP_DATA_LONG_LINE; } while (0)
    for (size_t i = 0; i < n;) {
        char c = in[i];
        if (bol) {
            bol = 0;
            line = 0;
            if (c == '.') {
                LINE_ADD(1);
                if (i + 1 < n && in[i + 1] == '\r') {
                    if (i + 2 < n && in[i + 2] == '\n') {
                        r->done = 1;
                        r->used = i + 3;
                        return;
                    }
                    if (i + 2 == n) break;
                    r->flags |= SMTP_DATA_BARE_CR;
                    LINE_ADD(1);
                    i += 2;
                    continue;
                }
                i++;
                continue;
            }
        }
        if (c == '\r') {
            r->out[r->out_n++] = c;
            if (i + 1 < n && in[i + 1] == '\n') {
                r->out[r->out_n++] = '\n';
                bol = 1;
                i += 2;
                continue;
            }
            if (i + 1 < n) {
                r->flags |= SMTP_DATA_BARE_CR;
                LINE_ADD(1);
            }
            i++;
            continue;
        }
        if (c == '\n') r->flags |= SMTP_DATA_BARE_LF;
        r->out[r->out_n++] = c;
        LINE_ADD(1);
        i++;
    }
#undef LINE_ADD
    r->used = n;
}

#endif
