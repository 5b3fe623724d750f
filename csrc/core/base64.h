/* Base64 for SASL (SMTP AUTH, POP3 AUTH): strict RFC 4648 §4, padding
 * required, no white space, no characters outside the alphabet. */
#ifndef CORE_BASE64_H
#define CORE_BASE64_H

#include <stddef.h>

/* Decode in (len bytes) into out (cap bytes): the length decoded, or -1 for
 * bad base64 or a result that would not fit. */
long b64_decode(const char *in, size_t len, char *out, size_t cap);

#endif
