/*
 * drainctl's one-file launcher: unpack the bundle once per container, then exec it.
 *
 * dist/drainctl = this program (static, no libc needed in the image) + a gzip'ed tar of the
 * PyInstaller onedir bundle (glibc and its loader included) + a trailer. On each start:
 *   1. find a base directory: $DRAINCTL_RUNTIME_DIR if set, else $TMPDIR, /tmp, /dev/shm;
 *      each must be writable and allow exec (shared libraries are mmap'ed PROT_EXEC);
 *   2. <base>/drainctl-<uid>/<bundle id>/ already there (a previous start in this container,
 *      e.g. `run` before `prestop`): use it; else unpack into a private temporary directory and
 *      rename(2) it into place, so a reader never sees half a bundle and two starters cannot
 *      collide (the loser of the rename removes its copy). A bundle whose program or loader
 *      is gone (a tmp cleaner) is replaced; temporaries of starts killed midway (flock(2)ed by
 *      their owner while it lives) are removed;
 *   3. execv(2) the bundle's program through the bundle's loader, with our arguments and our
 *      environment plus two variables of ours (below), which the bundle takes out again.
 * exec, not fork: the Python side *is* this process, so it is PID 1 and gets the signals and
 * the orphans itself. PyInstaller's own onefile mode forks and waits instead: its bootloader
 * stays PID 1, never reaps orphans (measured: 20 of 20 left as zombies) and unpacks again on
 * every start (docs/frozen-binary.md has the numbers).
 *
 * The bundle carries glibc and its loader, and runs through that loader (`ld.so --library-path
 * <bundle>/_internal <bundle>/drainctl ...`), so it needs no libc in the image (scratch, Alpine)
 * and no particular glibc version (UBI 8, Ubuntu 20.04 have older ones). PyInstaller's
 * bootloader supports being started this way: it sees that /proc/self/exe is ld.so and finds
 * itself from its argv[0], which ld.so sets to the program's path. --library-path is not
 * exported to anything the bundle starts.
 *
 * The app must get exactly the environment drainctl got, but PyInstaller's bootloader changes
 * LD_LIBRARY_PATH (saving it in LD_LIBRARY_PATH_ORIG, but not an empty one, and overwriting a
 * user's LD_LIBRARY_PATH_ORIG) and sets or clears _PYI_* and PYINSTALLER_* variables. So the
 * launcher records those variables as it received them in _DRAINCTL_ORIG_ENV (hex of
 * "NAME=VALUE\0"..., empty when there were none), and child.child_environ puts them back.
 * _DRAINCTL_LAUNCHER carries our argv[0] (e.g. /drainctl) to build/rthook_launcher.py.
 *
 * Signals: as PID 1, a signal whose action is the default is dropped by the kernel, so a SIGTERM
 * during the unpack or Python's start-up would be lost and the container would run until the
 * runtime's SIGKILL. The first thing main() does is block every catchable signal; the blocked
 * mask survives execve(2) (signal(7)), so such a signal waits, pending, until drainctl's Python
 * takes it. The mask we were started with goes to Python in _DRAINCTL_SIGMASK (hex, bit n-1 for
 * signal n, as SigBlk in /proc/PID/status), and the app gets exactly that one.
 *
 * _DRAINCTL_UNPACK_ONLY=1: unpack (or find the bundle) and exit 0 instead of exec'ing it. drainctl
 * runs it when the unpacked bundle was removed under it (a tmp cleaner), to put it back.
 *
 * Failure is one line on stderr and exit 125 (the runtime's own failure, as `docker run`).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <ftw.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <sys/types.h>
#include <unistd.h>
#include <zlib.h>

#define EXIT_LAUNCHER 125
#define MAGIC "DRNCTL\x01\x00"

/* Written by build/freeze.py after the payload, little-endian (x86_64, aarch64). */
struct trailer {
    char id[32];       /* hex digest of the payload: the bundle's directory name */
    char interp[64];   /* the loader's path inside the bundle, e.g. _internal/ld-linux-x86-64.so.2 */
    char program[32];  /* the executable inside the bundle, e.g. drainctl */
    uint64_t offset;   /* where the gzip'ed tar starts in this file */
    uint64_t size;
    char magic[8];
};

/* The variables PyInstaller's bootloader may set, change or clear (pyi_main.c, pyi_utils.c). */
static const char *const BOOTLOADER_OWNED[] = {"LD_LIBRARY_PATH", "_PYI_", "PYINSTALLER_", "_MEIPASS", NULL};
#define RECORD "_DRAINCTL_ORIG_ENV"

static char reasons[2048]; /* why each base directory was refused, for the one-line error */

static void note(const char *fmt, ...)
{
    size_t used = strlen(reasons);
    va_list ap;
    if (used && used + 2 < sizeof(reasons)) {
        strcat(reasons, "; ");
        used += 2;
    }
    va_start(ap, fmt);
    vsnprintf(reasons + used, sizeof(reasons) - used, fmt, ap);
    va_end(ap);
}

static void die(const char *fmt, ...)
{
    char line[2600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    dprintf(2, "drainctl: %s\n", line);
    exit(EXIT_LAUNCHER);
}

static int read_full(gzFile gz, void *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        int n = gzread(gz, (char *)buf + done, (unsigned)(len - done > 1u << 20 ? 1u << 20 : len - done));
        if (n <= 0)
            return -1;
        done += (size_t)n;
    }
    return 0;
}

static unsigned long long octal(const char *field, size_t len)
{
    unsigned long long value = 0;
    for (size_t i = 0; i < len && field[i]; i++) {
        if (field[i] == ' ')
            continue;
        if (field[i] < '0' || field[i] > '7')
            break;
        value = value * 8 + (unsigned)(field[i] - '0');
    }
    return value;
}

/* Entry names come from our own build, but a bad one must never write outside the bundle. */
static int safe_name(const char *name)
{
    if (name[0] == '/' || name[0] == 0)
        return 0;
    for (const char *p = name; *p;) {
        if (p[0] == '.' && p[1] == '.' && (p[2] == '/' || p[2] == 0))
            return 0;
        p = strchr(p, '/');
        if (!p)
            break;
        p++;
    }
    return 1;
}

/* Unpack the ustar payload into dest (which exists, mode 0700). Returns 0 or an errno. */
static int unpack(int fd, const struct trailer *t, const char *dest)
{
    int copy = dup(fd);
    if (copy < 0 || lseek(copy, (off_t)t->offset, SEEK_SET) < 0)
        return errno;
    gzFile gz = gzdopen(copy, "rb");
    if (!gz)
        return ENOMEM;
    gzbuffer(gz, 1 << 17);
    static char buf[1 << 17];
    unsigned char header[512];
    int err = 0;
    for (;;) {
        if (read_full(gz, header, sizeof(header)) < 0) {
            err = EIO;
            break;
        }
        if (header[0] == 0)
            break; /* the end-of-archive block */
        char name[260], path[PATH_MAX];
        const char *h = (const char *)header;
        if (h[345])
            snprintf(name, sizeof(name), "%.155s/%.100s", h + 345, h);
        else
            snprintf(name, sizeof(name), "%.100s", h);
        unsigned long long size = octal(h + 124, 12);
        unsigned mode = (unsigned)octal(h + 100, 8) & 0700;
        char type = h[156];
        if (!safe_name(name) || strlen(dest) + strlen(name) + 2 > sizeof(path)) {
            err = EINVAL;
            break;
        }
        snprintf(path, sizeof(path), "%s/%s", dest, name);
        if (type == '5') {
            if (mkdir(path, 0700) < 0 && errno != EEXIST) {
                err = errno;
                break;
            }
        } else if (type == '2') {
            char target[101];
            snprintf(target, sizeof(target), "%.100s", h + 157);
            if (symlink(target, path) < 0) {
                err = errno;
                break;
            }
        } else if (type == '0' || type == 0) {
            int out = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode | 0600);
            if (out < 0) {
                err = errno;
                break;
            }
            unsigned long long left = size;
            while (left > 0 && !err) {
                size_t chunk = left > sizeof(buf) ? sizeof(buf) : (size_t)left;
                if (read_full(gz, buf, chunk) < 0) {
                    err = EIO;
                    break;
                }
                for (size_t off = 0; off < chunk;) {
                    ssize_t n = write(out, buf + off, chunk - off);
                    if (n < 0) {
                        err = errno; /* ENOSPC on a small tmpfs is the likely one */
                        break;
                    }
                    off += (size_t)n;
                }
                left -= chunk;
            }
            if (close(out) < 0 && !err)
                err = errno;
            if (err)
                break;
            size = (size + 511) / 512 * 512 - size; /* skip the padding to the next block */
            if (size && read_full(gz, buf, (size_t)size) < 0) {
                err = EIO;
                break;
            }
        } else {
            err = EINVAL; /* freeze.py writes only directories, files and symlinks */
            break;
        }
    }
    gzclose(gz);
    return err;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

static void remove_tree(const char *path)
{
    nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static int is_dir(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* The bundle is there and usable: a directory alone is not enough, a tmp cleaner removes files
 * (by age) before directories. */
static int is_complete(const char *program, const char *loader)
{
    struct stat st;
    return stat(program, &st) == 0 && S_ISREG(st.st_mode) && stat(loader, &st) == 0 &&
           S_ISREG(st.st_mode);
}

/* Leftovers of starts killed while unpacking (an OOM kill, the runtime's SIGKILL): any
 * dot-directory in <base>/drainctl-<uid> that nobody holds locked. A start that is unpacking holds
 * its temporary flock(2)ed, and the kernel drops the lock when that process dies. */
static void remove_stale_temporaries(const char *top)
{
    DIR *dir = opendir(top);
    if (!dir)
        return;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        const char *name = entry->d_name;
        if (name[0] != '.' || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
            continue;
        char path[PATH_MAX];
        if (strlen(top) + strlen(name) + 2 > sizeof(path))
            continue;
        snprintf(path, sizeof(path), "%s/%s", top, name);
        int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            continue;
        if (flock(fd, LOCK_EX | LOCK_NB) == 0)
            remove_tree(path); /* under the lock: its owner, were it alive, would retry */
        close(fd);
    }
    closedir(dir);
}

static int unpack_only; /* _DRAINCTL_UNPACK_ONLY=1: see the top of this file */

/* Try one base directory; returns only if it cannot be used (the reason is noted). */
static void try_base(const char *base, int self, const struct trailer *t, char **argv)
{
    char top[PATH_MAX], bundle[PATH_MAX], program[PATH_MAX], temp[PATH_MAX], loader[PATH_MAX];
    uid_t uid = geteuid();
    struct stat st;
    struct statvfs vfs;

    /* Bounded so that no path below can be cut short (PATH_MAX is 4096). */
    if (strlen(base) > 1024) {
        note("%.64s...: path too long", base);
        return;
    }
    snprintf(top, sizeof(top), "%s/drainctl-%u", base, (unsigned)uid);
    if (mkdir(top, 0700) < 0 && errno != EEXIST) {
        note("%s: %s", base, strerror(errno));
        return;
    }
    /* Ours alone: anyone who could write here could put code in PID 1 (cf. ssh-agent's checks). */
    if (lstat(top, &st) < 0 || !S_ISDIR(st.st_mode) || st.st_uid != uid || (st.st_mode & 077)) {
        note("%s: not a directory of uid %u with mode 0700", top, (unsigned)uid);
        return;
    }
    if (statvfs(top, &vfs) == 0 && (vfs.f_flag & ST_NOEXEC)) {
        note("%s: mounted noexec", base);
        return;
    }
    snprintf(bundle, sizeof(bundle), "%s/%.32s", top, t->id);
    snprintf(program, sizeof(program), "%s/%.32s", bundle, t->program);
    snprintf(loader, sizeof(loader), "%s/%.64s", bundle, t->interp);
    remove_stale_temporaries(top);
    if (!is_complete(program, loader)) {
        /* A name of this start's own. Not the pid alone: every container's PID 1 is pid 1, and
         * two containers can share the directory (a pod's /dev/shm, a shared emptyDir); with
         * pid-named temporaries one start deleted the other's unpack under its feet (seen in
         * tests/e2e: two pods starting at once, "cannot exec the unpacked bundle"). It is
         * flock(2)ed while we unpack, so remove_stale_temporaries() leaves it alone. */
        int lock = -1;
        for (int attempt = 0; attempt < 3 && lock < 0; attempt++) {
            uint64_t nonce = 0;
            if (getrandom(&nonce, sizeof(nonce), GRND_NONBLOCK) != sizeof(nonce)) {
                struct timespec now;
                clock_gettime(CLOCK_REALTIME, &now);
                nonce = ((uint64_t)now.tv_sec << 30) ^ (uint64_t)now.tv_nsec ^
                        (uint64_t)(uintptr_t)&now ^ (uint64_t)attempt;
            }
            snprintf(temp, sizeof(temp), "%s/.%.32s.%d.%016llx", top, t->id, (int)getpid(),
                     (unsigned long long)nonce);
            if (mkdir(temp, 0700) < 0) {
                note("%s: %s", base, strerror(errno));
                return;
            }
            lock = open(temp, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (lock < 0) {
                note("%s: cannot open %s (%s)", base, temp, strerror(errno));
                remove_tree(temp);
                return;
            }
            /* A file system without flock(2) (some FUSE ones): unpack unlocked. The clean-up
             * cannot lock anything there either, so it removes nothing. */
            if (flock(lock, LOCK_EX) < 0)
                break;
            /* Another start's clean-up can have taken it for stale between our mkdir and
             * flock, and removed it (it holds the lock until it is gone): take a new name. */
            if (fstat(lock, &st) < 0 || st.st_nlink == 0) {
                close(lock);
                lock = -1;
            }
        }
        if (lock < 0) {
            note("%s: cannot create a temporary directory of our own", base);
            return;
        }
        int err = unpack(self, t, temp);
        if (!err && rename(temp, bundle) < 0) {
            if (errno != EEXIST && errno != ENOTEMPTY)
                err = errno;
            else if (!is_complete(program, loader)) {
                /* What is there was damaged (files removed by a tmp cleaner): move it aside,
                 * under a dot-name that the clean-up of stale temporaries removes, and retry. */
                char aside[PATH_MAX];
                snprintf(aside, sizeof(aside), "%s.damaged", temp);
                if (rename(bundle, aside) == 0)
                    remove_tree(aside);
                if (rename(temp, bundle) < 0 && errno != EEXIST && errno != ENOTEMPTY)
                    err = errno;
            }
        }
        if (err) {
            remove_tree(temp);
            close(lock);
            note("%s: cannot unpack (%s)", base, strerror(err));
            return;
        }
        if (is_dir(temp))
            remove_tree(temp); /* another start unpacked the same bundle first: use theirs */
        close(lock);
    }
    if (unpack_only) {
        if (!is_complete(program, loader)) {
            note("%s: the bundle vanished as soon as it was unpacked", base);
            return;
        }
        exit(0);
    }
    /* argv for the loader: ld.so --library-path DIR PROGRAM ARG... (ld.so(8)). The program is
     * named by its path, not by our argv[0]: that path becomes its argv[0], from which
     * PyInstaller's bootloader (knowing it was started through ld.so) finds its archive. */
    char libs[PATH_MAX];
    snprintf(libs, sizeof(libs), "%s/_internal", bundle);
    int argc = 0;
    while (argv[argc])
        argc++;
    char **args = calloc((size_t)argc + 5, sizeof(char *));
    if (!args)
        die("out of memory");
    args[0] = loader;
    args[1] = "--library-path";
    args[2] = libs;
    args[3] = program;
    for (int i = 1; i < argc; i++)
        args[3 + i] = argv[i];
    execv(loader, args);
    free(args);
    note("%s: cannot exec the unpacked bundle (%s)", base, strerror(errno));
}

extern char **environ;

/* setenv(RECORD, hex of every bootloader-owned "NAME=VALUE\0" as we got it). */
static void record_environment(void)
{
    static const char hex[] = "0123456789abcdef";
    size_t len = 0;
    for (char **e = environ; *e; e++)
        for (const char *const *p = BOOTLOADER_OWNED; *p; p++)
            if (strncmp(*e, *p, strlen(*p)) == 0) {
                len += 2 * (strlen(*e) + 1);
                break;
            }
    char *out = malloc(len + 1), *w = out;
    if (!out)
        die("out of memory");
    for (char **e = environ; *e; e++)
        for (const char *const *p = BOOTLOADER_OWNED; *p; p++)
            if (strncmp(*e, *p, strlen(*p)) == 0) {
                for (const unsigned char *c = (const unsigned char *)*e;; c++) {
                    *w++ = hex[*c >> 4];
                    *w++ = hex[*c & 15];
                    if (!*c)
                        break;
                }
                break;
            }
    *w = 0;
    if (setenv(RECORD, out, 1) < 0)
        die("cannot record the environment: %s", strerror(errno));
    free(out);
}

/* setenv("_DRAINCTL_SIGMASK", the mask we were started with): see the top of this file. */
static void record_mask(const sigset_t *mask)
{
    unsigned long long bits = 0;
    char hex[17];
    for (int n = 1; n <= 64; n++)
        if (sigismember(mask, n) == 1)
            bits |= 1ULL << (n - 1);
    snprintf(hex, sizeof(hex), "%016llx", bits);
    if (setenv("_DRAINCTL_SIGMASK", hex, 1) < 0)
        die("cannot record the signal mask: %s", strerror(errno));
}

int main(int argc, char **argv)
{
    (void)argc;
    /* First of all: block every catchable signal, so none is lost while we unpack and Python
     * starts (see the top of this file). glibc's sigfillset leaves out the two it reserves for
     * its threads (32, 33: nptl(7)); SIGKILL and SIGSTOP cannot be blocked. */
    sigset_t all, inherited;
    sigfillset(&all);
    sigdelset(&all, SIGKILL);
    sigdelset(&all, SIGSTOP);
    if (sigprocmask(SIG_BLOCK, &all, &inherited) < 0)
        sigemptyset(&inherited); /* cannot fail with a valid set; nothing was blocked then */

    int self = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    if (self < 0 && argv[0] && strchr(argv[0], '/'))
        self = open(argv[0], O_RDONLY | O_CLOEXEC);
    if (self < 0)
        die("cannot read this executable (is /proc mounted?): %s", strerror(errno));

    struct trailer t;
    off_t end = lseek(self, 0, SEEK_END);
    if (end < (off_t)sizeof(t) || pread(self, &t, sizeof(t), end - (off_t)sizeof(t)) != (ssize_t)sizeof(t) ||
        memcmp(t.magic, MAGIC, sizeof(t.magic)) != 0)
        die("this executable carries no bundle (a launcher built without build/freeze.py?)");

    const char *only_unpack = getenv("_DRAINCTL_UNPACK_ONLY");
    unpack_only = only_unpack && strcmp(only_unpack, "1") == 0;
    unsetenv(RECORD); /* only ever ours: a stale one (inherited from a parent) is not the truth */
    record_environment();
    record_mask(&inherited);
    /* How we were invoked (e.g. /drainctl): the bundle's runtime hook makes it sys.argv[0] and
     * drops the variable, so `drainctl check` can print the path the image has. */
    if (argv[0] && setenv("_DRAINCTL_LAUNCHER", argv[0], 1) < 0)
        die("cannot record argv[0]: %s", strerror(errno));

    const char *only = getenv("DRAINCTL_RUNTIME_DIR");
    if (only && *only) {
        try_base(only, self, &t, argv);
    } else {
        const char *tmpdir = getenv("TMPDIR");
        if (tmpdir && *tmpdir && strcmp(tmpdir, "/tmp") != 0)
            try_base(tmpdir, self, &t, argv);
        try_base("/tmp", self, &t, argv);
        try_base("/dev/shm", self, &t, argv);
    }
    die("cannot unpack itself into a writable directory that allows exec (%s): mount a writable "
        "volume at /tmp (Kubernetes: an emptyDir) or set DRAINCTL_RUNTIME_DIR to one", reasons);
}
