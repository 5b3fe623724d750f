/* Small blocking file-system steps shared by the spool and the store:
 * creating a directory path, making a directory entry durable, reading a
 * directory with its errors told apart from its end. */
#ifndef CORE_FSUTIL_H
#define CORE_FSUTIL_H

#include <dirent.h>

/* mkdir -p with mode 0700 for every missing part. 0 or -errno. */
int fs_mkdir_p(const char *path);
/* fsync a directory, so names created or renamed in it survive a crash.
 * 0 or -errno. */
int fs_fsync_dir(const char *dir);
/* The next entry of d; NULL at the end, with *rc set to 0, or -errno when
 * reading failed. Loop: while ((de = fs_readdir(d, &rc))) ... */
struct dirent *fs_readdir(DIR *d, int *rc);

#endif
