/* POP3 load client for benchmarks/bench_pop3.py: one epoll loop drives N
 * connections, each USER/PASS/STAT then RETR 1..n one at a time (every
 * response read to its CRLF.CRLF), then QUIT. No DELE, so runs repeat on the
 * same mailboxes. With -I it only logs in and holds the sessions open.
 *
 * Built by the harness at run time: cc -O2 -o pop3_load pop3_load.c
 * Output: one JSON object on stdout (in -I mode a "ready {...}" line first). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF_CAP 65536
#define LINE_MAX_LEN 1024

enum { S_CONNECT, S_GREET, S_USER, S_PASS, S_STAT, S_RETR_STATUS, S_RETR_BODY, S_QUIT, S_HOLD, S_DONE };

struct client {
    int fd;
    int state;
    char user[256], pass[256];
    unsigned nmsgs, next;      /* STAT count; next message to RETR */
    int term;                  /* bytes of ".\r\n" matched at line start, -1 mid-line */
    uint64_t body_bytes, msgs_done, sum;
    uint32_t crc;              /* running CRC-32 state of the current message */
    size_t len;
    char buf[BUF_CAP];
};

static struct client *clients;
static int nclients, epfd;
static unsigned max_msgs;       /* -m: RETR at most this many per session (0: all) */
static bool checksum, hold;
static int done_count, err_count, held_count;
static uint64_t tot_msgs, tot_bytes, tot_sum;

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void finish(struct client *c, bool ok, const char *why)
{
    if (c->state == S_DONE) return;
    if (!ok) {
        err_count++;
        fprintf(stderr, "# pop3_load: %s: %s\n", c->user, why);
    }
    tot_msgs += c->msgs_done;
    tot_bytes += c->body_bytes;
    tot_sum += c->sum;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = S_DONE;
    done_count++;
}

static bool send_cmd(struct client *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool send_cmd(struct client *c, const char *fmt, ...)
{
    char line[LINE_MAX_LEN];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 2, fmt, ap);
    va_end(ap);
    if (n < 0 || n >= (int)sizeof line - 2) {
        finish(c, false, "command too long");
        return false;
    }
    line[n++] = '\r';
    line[n++] = '\n';
    /* The reply to the previous command has been read whole, so the socket
     * buffer is empty and a short command goes out in one write. */
    ssize_t w = send(c->fd, line, (size_t)n, MSG_NOSIGNAL);
    if (w != n) {
        finish(c, false, w < 0 ? strerror(errno) : "short write");
        return false;
    }
    return true;
}

static void next_retr(struct client *c)
{
    unsigned last = c->nmsgs;
    if (max_msgs && max_msgs < last) last = max_msgs;
    if (c->next <= last) {
        c->state = S_RETR_STATUS;
        send_cmd(c, "RETR %u", c->next);
    } else {
        c->state = S_QUIT;
        send_cmd(c, "QUIT");
    }
}

/* One status line (without CRLF). */
static void on_line(struct client *c, char *line)
{
    bool ok = strncmp(line, "+OK", 3) == 0;
    if (!ok) {
        char why[LINE_MAX_LEN + 64];
        snprintf(why, sizeof why, "state %d: %.900s", c->state, line);
        finish(c, false, why);
        return;
    }
    switch (c->state) {
    case S_GREET:
        c->state = S_USER;
        send_cmd(c, "USER %s", c->user);
        break;
    case S_USER:
        c->state = S_PASS;
        send_cmd(c, "PASS %s", c->pass);
        break;
    case S_PASS:
        if (hold) {
            c->state = S_HOLD;
            held_count++;
            break;
        }
        c->state = S_STAT;
        send_cmd(c, "STAT");
        break;
    case S_STAT: {
        unsigned n = 0;
        if (sscanf(line, "+OK %u", &n) != 1) {
            finish(c, false, "bad STAT reply");
            return;
        }
        c->nmsgs = n;
        c->next = 1;
        next_retr(c);
        break;
    }
    case S_RETR_STATUS:
        c->state = S_RETR_BODY;
        c->term = 0;           /* the status line's CRLF starts a line */
        c->crc = 0xFFFFFFFFu;
        break;
    case S_QUIT:
        finish(c, true, NULL);
        break;
    default:
        finish(c, false, "unexpected line");
        break;
    }
}

/* Body bytes: scan for a line that is exactly ".\r\n". Returns the bytes
 * consumed; sets the state to the next command when the terminator is seen. */
static size_t on_body(struct client *c, const char *p, size_t n)
{
    static const char T[] = ".\r\n";
    size_t i = 0;
    bool end = false;
    while (i < n) {
        if (c->term >= 0) {
            while (i < n && c->term < 3) {
                if (p[i] != T[c->term]) {
                    c->term = -1;
                    break;
                }
                c->term++;
                i++;
            }
            if (c->term == 3) {
                end = true;
                break;
            }
            if (c->term >= 0) break;   /* out of bytes mid-match */
        }
        const char *nl = memchr(p + i, '\n', n - i);
        if (!nl) {
            i = n;
            break;
        }
        i = (size_t)(nl - p) + 1;
        c->term = 0;
    }
    c->body_bytes += i;
    if (checksum) {                  /* CRC-32 (zlib's) of the body incl. ".\r\n" */
        uint32_t crc = c->crc;
        for (size_t k = 0; k < i; k++) crc = crc_table[(crc ^ (unsigned char)p[k]) & 0xFF] ^ (crc >> 8);
        c->crc = crc;
    }
    if (end) {
        c->msgs_done++;
        if (checksum) c->sum += c->crc ^ 0xFFFFFFFFu;
        c->next++;
        next_retr(c);
    }
    return i;
}

static void on_readable(struct client *c)
{
    for (;;) {
        ssize_t r = recv(c->fd, c->buf + c->len, BUF_CAP - c->len, 0);
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            finish(c, false, strerror(errno));
            return;
        }
        if (r == 0) {
            finish(c, c->state == S_QUIT, "connection closed by server");
            return;
        }
        c->len += (size_t)r;
        size_t off = 0;
        while (off < c->len && c->state != S_DONE) {
            if (c->state == S_RETR_BODY) {
                off += on_body(c, c->buf + off, c->len - off);
                continue;
            }
            if (c->state == S_HOLD) {
                finish(c, false, "data on a held session");
                return;
            }
            char *nl = memchr(c->buf + off, '\n', c->len - off);
            if (!nl) {
                if (c->len - off > LINE_MAX_LEN) {
                    finish(c, false, "status line too long");
                    return;
                }
                break;
            }
            *nl = 0;
            if (nl > c->buf + off && nl[-1] == '\r') nl[-1] = 0;
            char *line = c->buf + off;
            off = (size_t)(nl - c->buf) + 1;
            on_line(c, line);
        }
        if (c->state == S_DONE) return;
        memmove(c->buf, c->buf + off, c->len - off);
        c->len -= off;
        if ((size_t)r < BUF_CAP / 2) return;   /* likely drained; epoll says if not */
    }
}

static int load_users(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char line[600];
    int cap = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        char *colon = strchr(line, ':');
        if (!colon || line[0] == '#') continue;
        *colon = 0;
        size_t ul = strlen(line), pl = strlen(colon + 1);
        if (ul >= sizeof clients->user || pl >= sizeof clients->pass) continue;
        if (nclients == cap) {
            cap = cap ? cap * 2 : 64;
            clients = realloc(clients, (size_t)cap * sizeof *clients);
            if (!clients) return -1;
        }
        struct client *c = &clients[nclients++];
        memset(c, 0, offsetof(struct client, buf));
        memcpy(c->user, line, ul + 1);
        memcpy(c->pass, colon + 1, pl + 1);
        c->fd = -1;
    }
    fclose(f);
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: pop3_load -p PORT -u USERFILE [-a ADDR] [-m MAX] [-t SECONDS] [-k] [-I]\n"
                    "  USERFILE: user:password lines, one connection each\n"
                    "  -k  sum of the CRC-32 of every message   -I  log in and hold until stdin closes\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *addr = "127.0.0.1", *ufile = NULL;
    int port = 0, opt;
    double timeout = 300;
    while ((opt = getopt(argc, argv, "a:p:u:m:t:kI")) != -1) {
        switch (opt) {
        case 'a': addr = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'u': ufile = optarg; break;
        case 'm': max_msgs = (unsigned)strtoul(optarg, NULL, 10); break;
        case 't': timeout = atof(optarg); break;
        case 'k': checksum = true; break;
        case 'I': hold = true; break;
        default: usage();
        }
    }
    if (!ufile || port <= 0 || port > 65535) usage();
    crc_init();
    if (load_users(ufile) < 0 || nclients == 0) {
        fprintf(stderr, "pop3_load: cannot read users from %s\n", ufile);
        return 2;
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1) usage();

    double t0 = now(), deadline = t0 + timeout;
    for (int i = 0; i < nclients; i++) {
        struct client *c = &clients[i];
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            fprintf(stderr, "pop3_load: connect #%d: %s\n", i + 1, strerror(errno));
            return 3;
        }
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
        c->state = S_GREET;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    }

    struct epoll_event evs[256];
    bool timed_out = false, announced = false;
    double t_login = 0;
    while (done_count < nclients) {
        if (hold && !announced && held_count + done_count == nclients) {
            t_login = now() - t0;
            printf("ready {\"held\": %d, \"errors\": %d, \"login_s\": %.3f}\n", held_count, err_count,
                   t_login);
            fflush(stdout);
            announced = true;
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
            epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev);
        }
        double left = deadline - now();
        if (left <= 0) {
            timed_out = true;
            break;
        }
        int n = epoll_wait(epfd, evs, 256, left > 1 ? 1000 : (int)(left * 1000) + 1);
        if (n < 0 && errno != EINTR) break;
        for (int i = 0; i < n; i++) {
            struct client *c = evs[i].data.ptr;
            if (c == NULL) {           /* stdin: readable means EOF or a line: release */
                for (int k = 0; k < nclients; k++)
                    if (clients[k].state == S_HOLD) {
                        /* QUIT without waiting: the measurement is over. */
                        send(clients[k].fd, "QUIT\r\n", 6, MSG_NOSIGNAL);
                        clients[k].state = S_QUIT;
                        finish(&clients[k], true, NULL);
                    }
                epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL);
                continue;
            }
            if (c->state != S_DONE) on_readable(c);
        }
    }
    double elapsed = now() - t0;
    int unfinished = nclients - done_count;
    for (int i = 0; i < nclients; i++)
        if (clients[i].state != S_DONE) {
            tot_msgs += clients[i].msgs_done;
            tot_bytes += clients[i].body_bytes;
            close(clients[i].fd);
        }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"conns\": %d, \"messages\": %llu, \"bytes\": %llu, \"elapsed\": %.6f, \"errors\": %d, "
           "\"unfinished\": %d, \"timed_out\": %s, \"checksum\": \"%016llx\", \"cpu_user\": %.3f, "
           "\"cpu_sys\": %.3f}\n",
           nclients, (unsigned long long)tot_msgs, (unsigned long long)tot_bytes, elapsed, err_count,
           unfinished, timed_out ? "true" : "false", (unsigned long long)tot_sum,
           (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6,
           (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
    return (err_count || unfinished) ? 1 : 0;
}
