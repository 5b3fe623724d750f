/* Logging: one write(2) per line to stderr so worker threads never
 * interleave, with a level set once at start. */
#ifndef CORE_LOG_H
#define CORE_LOG_H

enum log_level { LOG_ERROR = 0, LOG_WARN, LOG_INFO, LOG_DEBUG };

extern int log_level_current;

void log_set_level(int level);
void log_msg(int level, const char *subsys, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define log_error(sub, ...) log_msg(LOG_ERROR, sub, __VA_ARGS__)
#define log_warn(sub, ...) log_msg(LOG_WARN, sub, __VA_ARGS__)
#define log_info(sub, ...) \
    do { if (log_level_current >= LOG_INFO) log_msg(LOG_INFO, sub, __VA_ARGS__); } while (0)
#define log_debug(sub, ...) \
    do { if (log_level_current >= LOG_DEBUG) log_msg(LOG_DEBUG, sub, __VA_ARGS__); } while (0)

#endif
