/* Small blocking file-system steps shared by the spool and the store:
 * creating a directory path and making a directory entry durable. */
#ifndef CORE_FSUTIL_H
#define CORE_FSUTIL_H

/* mkdir -p with mode 0700 for every missing part. 0 or -errno. */
int fs_mkdir_p(const char *path);
/* fsync a directory, so names created or renamed in it survive a crash.
 * 0 or -errno. */
int fs_fsync_dir(const char *dir);

#endif
