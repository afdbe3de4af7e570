/*
 * worker-exec: starts a model worker as a user of its own inside the gateway's image, where the
 * gateway itself runs as an unprivileged user and cannot change users.
 *
 * Installed set-user-ID root, mode 4750, group of the gateway: only the gateway's user can run it.
 * It does one thing: take a worker user id from the image's worker range, drop every privilege to
 * that id and the workers' group (no supplementary groups, no new privileges afterwards), and
 * start the image's Python on the worker module. A compromised gateway gains nothing from it but
 * a process with fewer rights than its own: the worker range owns no file, and holds no key.
 *
 *   worker-exec UID -- ARG...      runs PYTHON -P -m gateway.workers.worker ARG... as UID:GID
 *   worker-exec --signal PID TERM|KILL
 *                                  signals the process group of the caller's own worker PID (a
 *                                  child of the caller, in the worker range, leading its group):
 *                                  the gateway cannot signal another user's process itself
 *
 * It needs the container's bounding set to keep CAP_SETUID and CAP_SETGID and no
 * no-new-privileges flag; without them it exits 126 saying so, and the gateway refuses to start
 * workers rather than run them as itself.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#ifndef GATEWAY_UID
#error "build with -DGATEWAY_UID=..."
#endif
#ifndef WORKER_GID
#error "build with -DWORKER_GID=..."
#endif
#ifndef WORKER_UID_BASE
#error "build with -DWORKER_UID_BASE=..."
#endif
#ifndef PYTHON
#error "build with -DPYTHON=\"/path/to/python\""
#endif
#define WORKER_UID_COUNT 4096
#define MAX_ARGS 64

static int fail(const char *what) {
    fprintf(stderr, "worker-exec: %s: %s (the container needs CAP_SETUID and CAP_SETGID, "
                    "without no-new-privileges)\n", what, strerror(errno));
    return 126;
}

static int in_range(long uid) {
    return uid >= WORKER_UID_BASE && uid < WORKER_UID_BASE + WORKER_UID_COUNT;
}

/* The caller's worker: its parent is the caller, its real user in the worker range, and it
 * leads its own process group (the gateway starts each worker in a new session). */
static int signal_worker(const char *pid_text, const char *name) {
    char *end = NULL;
    errno = 0;
    long pid = strtol(pid_text, &end, 10);
    int sig = strcmp(name, "TERM") == 0 ? SIGTERM : strcmp(name, "KILL") == 0 ? SIGKILL : 0;
    if (errno || *end || pid <= 1 || !sig) {
        fprintf(stderr, "usage: worker-exec --signal PID TERM|KILL\n");
        return 2;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/status", pid);
    FILE *status = fopen(path, "r");
    if (!status) return 3;  /* already gone */
    char line[256];
    long ppid = -1, uid = -1, pgid = -1;
    while (fgets(line, sizeof line, status)) {
        if (sscanf(line, "PPid: %ld", &ppid) == 1) continue;
        if (sscanf(line, "Uid: %ld", &uid) == 1) continue;
        if (sscanf(line, "NSpgid: %ld", &pgid) == 1) continue;
    }
    fclose(status);
    if (pgid == -1) pgid = getpgid((pid_t)pid);
    if (ppid != (long)getppid() || !in_range(uid) || pgid != pid) {
        fprintf(stderr, "worker-exec: %ld is not one of the caller's workers\n", pid);
        return 126;
    }
    /* Become the worker's user to signal it: that needs CAP_SETUID only, not CAP_KILL. */
    if (setgroups(0, NULL) != 0) return fail("setgroups");
    if (setresgid(WORKER_GID, WORKER_GID, WORKER_GID) != 0) return fail("setresgid");
    if (setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) != 0) return fail("setresuid");
    if (kill(-(pid_t)pid, sig) != 0) return fail("kill");
    return 0;
}

int main(int argc, char **argv) {
    if (getuid() != GATEWAY_UID) {
        fprintf(stderr, "worker-exec: only the gateway's user (%d) may start workers\n", GATEWAY_UID);
        return 126;
    }
    if (argc == 4 && strcmp(argv[1], "--signal") == 0) return signal_worker(argv[2], argv[3]);
    if (argc < 3 || strcmp(argv[2], "--") != 0 || argc - 3 > MAX_ARGS) {
        fprintf(stderr, "usage: worker-exec UID -- ARG...\n");
        return 2;
    }
    char *end = NULL;
    errno = 0;
    long uid = strtol(argv[1], &end, 10);
    if (errno || *end || !in_range(uid)) {
        fprintf(stderr, "worker-exec: %s is not a worker user id (%d to %d)\n", argv[1], WORKER_UID_BASE,
                WORKER_UID_BASE + WORKER_UID_COUNT - 1);
        return 2;
    }
    if (setgroups(0, NULL) != 0) return fail("setgroups");
    if (setresgid(WORKER_GID, WORKER_GID, WORKER_GID) != 0) return fail("setresgid");
    if (setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) != 0) return fail("setresuid");
    if (setuid(0) == 0 || geteuid() != (uid_t)uid) {  /* the drop must be irreversible */
        fprintf(stderr, "worker-exec: privileges could be regained; refusing\n");
        return 126;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return fail("no_new_privs");

    char *args[MAX_ARGS + 5];
    int n = 0;
    args[n++] = PYTHON;
    args[n++] = "-P";
    args[n++] = "-m";
    args[n++] = "gateway.workers.worker";
    for (int i = 3; i < argc; i++) args[n++] = argv[i];
    args[n] = NULL;
    execv(PYTHON, args);
    return fail("exec " PYTHON);
}
