/* The engine's configuration as C sees it: built once from the Python
 * configuration (mailengine/config.py validates and names bad keys), then
 * read-only and shared by every worker. */
#ifndef CORE_CONFIG_H
#define CORE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/conn.h"

enum listener_kind { LISTENER_MX = 0, LISTENER_SUBMISSION, LISTENER_SMTPS, LISTENER_POP3,
                     LISTENER_POP3S };

struct listener_cfg {
    char *name;
    enum listener_kind kind;
    char *host;
    int port;
    int *fds;            /* one SO_REUSEPORT socket per worker */
};

struct cidr {
    uint8_t family;      /* AF_INET / AF_INET6 */
    uint8_t prefix;
    uint8_t addr[16];
};

struct smtp_limits {
    size_t max_command_line;     /* RFC 5321 §4.5.3.1.4 plus extension room */
    size_t max_text_line;        /* longest DATA line accepted */
    size_t max_message_size;     /* SIZE */
    unsigned max_recipients;
    unsigned max_errors;
    unsigned max_auth_failures;
    uint64_t auth_fail_delay_ms;
    uint64_t command_timeout_ms;
    uint64_t data_timeout_ms;
    uint64_t session_timeout_ms;
    uint64_t pop3_idle_timeout_ms;  /* POP3 autologout (RFC 1939 §3) */
    unsigned max_connections;
    unsigned max_connections_per_ip;
};

enum hook_kind {
    HOOK_CONNECT = 0, HOOK_HELO, HOOK_MAIL, HOOK_RCPT, HOOK_DATA, HOOK_AUTH,
    EVENT_RECEIVED,
    EVENT_DELIVERY,               /* a recipient's outcome (JSON line) */
    HOOK_POLICY,                  /* destination_policy(domain, mx_hosts) */
    HOOK_DELIVER,                 /* deliver(user, message) -> folder or Reject */
    HOOK_KIND_COUNT
};

struct users;
struct aliases;
struct tls_ctx;
struct delivery_cfg;

struct me_config {
    char *data_dir;
    char *hostname;
    int workers;
    struct listener_cfg *listeners;
    size_t nlisteners;
    char **domains;              /* lower case */
    size_t ndomains;
    struct cidr *trusted;
    size_t ntrusted;
    struct users *users;
    struct aliases *aliases;     /* virtual aliases and catch-alls (store/aliases.h) */
    struct tls_ctx *tls;
    bool allow_plain_auth;
    bool reject_unknown_local;   /* local recipients must be users */
    struct smtp_limits limits;
    unsigned hooks;              /* 1u << enum hook_kind for each registered */
    struct delivery_cfg *delivery;   /* outbound delivery (queue/queue.h) */
    int log_level;
};

bool config_is_local_domain(const struct me_config *cfg, const char *domain, size_t len);
bool config_is_trusted(const struct me_config *cfg, const struct conn_addr *a);

#endif
