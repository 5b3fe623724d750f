/* sources: csrc/queue/dsn.c csrc/core/buf.c */
/* libs: -luring */
/* The RFC 3461 parameter readers on arbitrary envelope parameter strings
 * (they come from remote clients through the spool): NOTIFY, RET, ENVID
 * and ORCPT lookups and xtext decoding must stay inside their input and
 * their buffers, and answer consistently with one another. */
#include "queue/dsn.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    if (!s) return 0;
    memcpy(s, data, size);
    s[size] = 0;   /* parameters are text lines: cut at the first NUL */
    unsigned notify = dsn_notify_of(s);
    REQUIRE((notify & ~(unsigned)(DSN_NOTIFY_SUCCESS | DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY |
                                  DSN_NOTIFY_NEVER)) == 0);
    /* NEVER stands alone (RFC 3461 §4.1). */
    REQUIRE(!(notify & DSN_NOTIFY_NEVER) || notify == DSN_NOTIFY_NEVER);
    int ret = dsn_ret_hdrs_of(s);
    REQUIRE(ret == 0 || ret == 1);
    static const char *const keys[] = {"ENVID", "ORCPT", "NOTIFY", "RET"};
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        char small[8], big[1024];
        int a = dsn_param(s, keys[k], big, sizeof big);
        int b = dsn_param(s, keys[k], small, sizeof small);
        REQUIRE(a == 0 || a == -1);
        REQUIRE(b == 0 || b == -1);
        if (a == 0) REQUIRE(strlen(big) < sizeof big);
        /* What fits the small buffer also fits the big one, unchanged. */
        if (b == 0) REQUIRE(a == 0 && strcmp(small, big) == 0);
        if (a == 0) {
            char dec[1024];
            long n = dsn_xtext_decode(big, dec, sizeof dec);
            REQUIRE(n < (long)sizeof dec);
            if (n >= 0) REQUIRE((size_t)n <= strlen(big));
        }
    }
    free(s);
    return 0;
}
