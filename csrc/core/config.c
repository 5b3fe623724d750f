/* Questions the protocol code asks of the configuration. */
#include "core/config.h"

#include <string.h>
#include <strings.h>
#include <sys/socket.h>

bool config_is_local_domain(const struct me_config *cfg, const char *domain, size_t len)
{
    /* A trailing dot names the same domain. */
    if (len > 0 && domain[len - 1] == '.') len--;
    for (size_t i = 0; i < cfg->ndomains; i++)
        if (strlen(cfg->domains[i]) == len && strncasecmp(cfg->domains[i], domain, len) == 0)
            return true;
    return false;
}

bool config_is_trusted(const struct me_config *cfg, const struct conn_addr *a)
{
    for (size_t i = 0; i < cfg->ntrusted; i++) {
        const struct cidr *c = &cfg->trusted[i];
        if (c->family != a->family) continue;
        unsigned bits = c->prefix, full = bits / 8, rest = bits % 8;
        if (memcmp(c->addr, a->addr, full) != 0) continue;
        if (rest) {
            uint8_t mask = (uint8_t)(0xff << (8 - rest));
            if ((c->addr[full] & mask) != (a->addr[full] & mask)) continue;
        }
        return true;
    }
    return false;
}
