/*
 * shadow-holder: the resting form of a shadow (hijack/shadow/holder.py).
 *
 * A shadow that has nothing to relay only holds descriptors: at home it follows
 * its process (closes what the process closed, ends when it ends), holding it
 * keeps them for a restore. This program does exactly that in a few hundred
 * KiB, in the same process (same pid, session, credentials, descriptors and
 * control socket) that the Python shadow (hijack/shadow/program.py) was and
 * becomes again: every control request but `release` makes it execve that
 * Python shadow with its whole state on the command line and the request's
 * connection unread, and the Python shadow execs back into this program once
 * it is idle again. So the control protocol (docs/protocol.md) has one
 * implementation, in Python; this one only decides when to hand over.
 *
 * `status` and `hello` it answers itself, with the answer the Python shadow
 * gave as it rested (--status-fd: a memfd holding that line), as long as it
 * still holds the same descriptors: `hijack status` on a node of many resting
 * shadows wakes none. Once it let one go (the process closed it, a member
 * ended), the next `status` wakes Python, which describes them anew.
 *
 * Usage (written by holder.py, never by hand):
 *   shadow-holder hijack.shadow --python INTERP --target PID --control PATH --log PATH
 *     --listener FD --mode home|holding --started-at SECONDS
 *     [--held N=FD,...] [--member PID:FOLLOWING:N=FD,...]... [--status-fd FD]
 * (The second word names it a shadow for whoever reads its command line: hijack's
 * own refusal to take a shadow as a target, `ps`.) Descriptors named are
 * inherited (not close-on-exec). Exit status 0, or 1
 * with a line in the log for arguments it cannot use.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_KEYS 4096
#define MAX_MEMBERS 256
#define FOLLOW_INTERVAL_MS 1000 /* as program.py's FOLLOW_INTERVAL */
#define PEEK_WAIT_MS 3000       /* a request's line arrives within control.request's timeout */
#define LINE_MAX 4096           /* release requests are short; longer ones go to Python */

struct key {
    int owner; /* 0: the target; else a member's pid */
    int number;
    int fd;
};

struct member {
    int pid;
    int following;
    int handle; /* its pidfd while followed, else -1 */
};

static struct key keys[MAX_KEYS];
static int key_count;
static struct member members[MAX_MEMBERS];
static int member_count;
static int target_pid, listener = -1, target_handle = -1, log_fd = 2;
static int home_mode = 1;
static const char *python, *control_path, *log_path, *started_at;
static volatile sig_atomic_t terminated;
static char *status_answer; /* the Python shadow's last `status` answer, a line */
static size_t status_length;
static int changed;         /* a descriptor was let go since: that answer is stale */

static void say(const char *format, ...)
{
    char text[1024], line[1200];
    va_list args;
    va_start(args, format);
    vsnprintf(text, sizeof text, format, args);
    va_end(args);
    time_t now = time(NULL);
    struct tm local;
    localtime_r(&now, &local);
    int n = snprintf(line, sizeof line, "%02d:%02d:%02d shadow[%d]: %s\n", local.tm_hour,
                     local.tm_min, local.tm_sec, (int)getpid(), text);
    if (n > 0 && write(log_fd, line, (size_t)n) < 0) {
        /* nowhere else to say it */
    }
}

static int named(int fd)
{
    for (int i = 0; i < key_count; i++)
        if (keys[i].fd == fd)
            return 1;
    return 0;
}

/* Close fd, but for 0, 1 or 2: /dev/null takes its place, so that no descriptor made later
 * (a control connection) takes a standard number and receives what is written there
 * (hijack.sys.process.fill_standard_descriptors says why). */
static void close_keeping_standard(int fd)
{
    if (fd > 2) {
        close(fd);
        return;
    }
    int null = open("/dev/null", O_RDWR);
    if (null >= 0 && null != fd) {
        dup2(null, fd);
        close(null);
    }
}

static void drop_key(int index)
{
    int fd = keys[index].fd;
    changed = 1;
    keys[index] = keys[--key_count];
    if (!named(fd)) /* a description members share is closed once no key names it */
        close_keeping_standard(fd);
}

static int same_file(int fd, const char *path)
{
    struct stat ours, theirs;
    if (fstat(fd, &ours) < 0 || stat(path, &theirs) < 0)
        return 0;
    return ours.st_dev == theirs.st_dev && ours.st_ino == theirs.st_ino;
}

static void follow(int owner, int pid)
{
    char path[64];
    for (int i = 0; i < key_count;) {
        if (keys[i].owner != owner) {
            i++;
            continue;
        }
        snprintf(path, sizeof path, "/proc/%d/fd/%d", pid, keys[i].number);
        if (same_file(keys[i].fd, path)) {
            i++;
            continue;
        }
        say("process %d closed or replaced fd %d; releasing our copy", pid, keys[i].number);
        drop_key(i); /* the last key moved into i: look at it next */
    }
}

static void member_exited(int index)
{
    int pid = members[index].pid, count = 0;
    changed = 1;
    for (int i = 0; i < key_count; i++)
        count += keys[i].owner == pid;
    say("member %d exited; releasing its %d descriptors", pid, count);
    for (int i = 0; i < key_count;) {
        if (keys[i].owner == pid)
            drop_key(i);
        else
            i++;
    }
    if (members[index].handle >= 0)
        close(members[index].handle);
    members[index] = members[--member_count];
}

static void end(const char *reason)
{
    unlink(control_path);
    if (*reason) {
        char path[4200];
        const char *slash = strrchr(control_path, '/');
        int length = slash ? (int)(slash - control_path) : 1;
        snprintf(path, sizeof path, "%.*s/ended", length, slash ? control_path : ".");
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd >= 0) {
            dprintf(fd, "%s\n", reason);
            close(fd);
        }
    }
    say("shadow ends");
    exit(0);
}

static int pidfd_open(int pid)
{
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

static void usage(const char *why)
{
    say("shadow-holder: %s", why);
    exit(1);
}

static void add_keys(int owner, char *list)
{
    for (char *item = strtok(list, ","); item; item = strtok(NULL, ",")) {
        int number, fd;
        if (sscanf(item, "%d=%d", &number, &fd) != 2 || key_count == MAX_KEYS)
            usage("a bad descriptor list");
        keys[key_count++] = (struct key){owner, number, fd};
    }
}

static void add_member(char *text)
{
    int pid, following, used = 0;
    if (sscanf(text, "%d:%d:%n", &pid, &following, &used) != 2 || member_count == MAX_MEMBERS)
        usage("a bad member");
    members[member_count++] = (struct member){pid, following, -1};
    add_keys(pid, text + used);
}

/* Answer `release` as program.py does for a shadow with nothing relayed: it ends at once. */
static int release_reason(const char *line, char *reason, size_t size)
{
    if (!strstr(line, "\"op\":\"release\""))
        return 0;
    const char *found = strstr(line, "\"reason\":\"");
    if (!found) {
        snprintf(reason, size, "released");
        return 1;
    }
    found += strlen("\"reason\":\"");
    const char *close = strchr(found, '"');
    if (!close || memchr(found, '\\', (size_t)(close - found)))
        return 0; /* escapes: Python reads it */
    snprintf(reason, size, "%.*s", (int)(close - found), found);
    if (!*reason)
        snprintf(reason, size, "released");
    return 1;
}

static void read_status(int fd)
{
    struct stat about;
    if (fstat(fd, &about) == 0 && about.st_size > 0 && (status_answer = malloc((size_t)about.st_size))) {
        ssize_t got = pread(fd, status_answer, (size_t)about.st_size, 0);
        if (got == about.st_size && status_answer[got - 1] == '\n') {
            status_length = (size_t)got;
        } else {
            free(status_answer);
            status_answer = NULL;
        }
    }
    close(fd);
}

static char **arguments;
static int argument_count, argument_room;

static void push(const char *text)
{
    if (argument_count + 2 > argument_room) {
        argument_room = argument_room ? argument_room * 2 : 64;
        arguments = realloc(arguments, sizeof *arguments * (size_t)argument_room);
        if (!arguments)
            abort();
    }
    arguments[argument_count++] = strdup(text);
    arguments[argument_count] = NULL;
}

static void push_keys(int owner, char *buffer, size_t size)
{
    size_t used = 0;
    buffer[0] = 0;
    for (int i = 0; i < key_count; i++)
        if (keys[i].owner == owner && used < size)
            used += (size_t)snprintf(buffer + used, size - used, "%s%d=%d", used ? "," : "",
                                     keys[i].number, keys[i].fd);
}

/* Become the Python shadow, with `connection` (a request not yet read) for it to answer.
 * Returns only if it cannot: then we hold on as we are (what we hold is not dropped). */
static void to_python(int connection)
{
    static char list[MAX_KEYS * 24], number[32];
    for (int i = 0; i < argument_count; i++)
        free(arguments[i]);
    argument_count = 0;
    push(python);
    push("-m");
    push("hijack.shadow");
    push("--target");
    snprintf(number, sizeof number, "%d", target_pid);
    push(number);
    push("--control");
    push(control_path);
    push("--log");
    push(log_path);
    push("--listener");
    snprintf(number, sizeof number, "%d", listener);
    push(number);
    push("--pending");
    snprintf(number, sizeof number, "%d", connection);
    push(number);
    push("--mode");
    push(home_mode ? "home" : "holding");
    push("--started-at");
    push(started_at);
    push_keys(0, list, sizeof list);
    if (list[0]) {
        push("--held");
        push(list);
    }
    for (int m = 0; m < member_count; m++) {
        size_t used = (size_t)snprintf(list, sizeof list, "%d:%d:", members[m].pid,
                                       members[m].handle >= 0);
        push_keys(members[m].pid, list + used, sizeof list - used);
        push("--member");
        push(list);
    }
    /* Our pidfds and log are close-on-exec: Python opens its own. */
    execv(python, arguments);
    say("cannot run %s: %s; holding on, the request unanswered", python, strerror(errno));
}

static void serve_connection(int connection)
{
    struct ucred peer;
    socklen_t length = sizeof peer;
    if (getsockopt(connection, SOL_SOCKET, SO_PEERCRED, &peer, &length) < 0 ||
        (peer.uid != 0 && peer.uid != getuid())) {
        /* The socket's mode already keeps others out (as program.py). */
        say("refused a control connection from uid %d", length ? (int)peer.uid : -1);
        close(connection);
        return;
    }
    char line[LINE_MAX + 1];
    ssize_t got = 0;
    struct pollfd waiting = {connection, POLLIN, 0};
    /* Peek, so that Python reads the request whole (its descriptors too) if it is not ours. */
    for (int tries = 0; tries < PEEK_WAIT_MS / 2 && poll(&waiting, 1, PEEK_WAIT_MS) > 0; tries++) {
        got = recv(connection, line, LINE_MAX, MSG_PEEK | MSG_DONTWAIT);
        if (got <= 0 || memchr(line, '\n', (size_t)got) || got == LINE_MAX)
            break;
        struct timespec pause = {0, 2000000};
        nanosleep(&pause, NULL); /* more of the line is on its way */
    }
    if (got <= 0) {
        close(connection);
        return;
    }
    line[got] = 0;
    char reason[512];
    int whole = memchr(line, '\n', (size_t)got) != NULL;
    if (whole && status_answer && !changed &&
        (strstr(line, "\"op\":\"status\"") || strstr(line, "\"op\":\"hello\""))) {
        if (recv(connection, line, (size_t)got, MSG_DONTWAIT) < 0) {
            /* read or not, the answer goes */
        }
        if (send(connection, status_answer, status_length, MSG_NOSIGNAL) < 0) {
            /* the asker left: nothing to tell */
        }
        close(connection);
        return;
    }
    if (whole && release_reason(line, reason, sizeof reason)) {
        say("%s; the shadow ends once its streams are drained", reason);
        const char answer[] = "{\"ok\":true}\n";
        if (send(connection, answer, sizeof answer - 1, MSG_NOSIGNAL) < 0) {
            /* the asker left: nothing to tell */
        }
        close(connection);
        end(reason);
    }
    to_python(connection);
    close(connection);
}

static void on_terminate(int signal_number)
{
    (void)signal_number;
    terminated = 1;
}

int main(int argc, char **argv)
{
    char *held = NULL;
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *name = argv[i];
        char *value = argv[i + 1];
        if (!strcmp(name, "--python"))
            python = value;
        else if (!strcmp(name, "--target"))
            target_pid = atoi(value);
        else if (!strcmp(name, "--control"))
            control_path = value;
        else if (!strcmp(name, "--log"))
            log_path = value;
        else if (!strcmp(name, "--listener"))
            listener = atoi(value);
        else if (!strcmp(name, "--mode"))
            home_mode = !strcmp(value, "home");
        else if (!strcmp(name, "--started-at"))
            started_at = value;
        else if (!strcmp(name, "--held"))
            held = value;
        else if (!strcmp(name, "--member"))
            add_member(value);
        else if (!strcmp(name, "--status-fd"))
            read_status(atoi(value));
    }
    for (int fd = 0; fd <= 2; fd++)
        if (fcntl(fd, F_GETFD) < 0)
            close_keeping_standard(fd);
    if (log_path) {
        int fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
        if (fd >= 0)
            log_fd = fd;
    }
    if (!python || !control_path || !log_path || listener < 0 || target_pid <= 0 || !started_at)
        usage("missing arguments");
    if (held)
        add_keys(0, held);
    fcntl(listener, F_SETFD, 0); /* Python takes it again by number */
    struct sigaction terminate = {.sa_handler = on_terminate};
    sigaction(SIGTERM, &terminate, NULL);
    signal(SIGINT, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);

    if (home_mode) {
        target_handle = pidfd_open(target_pid);
        if (target_handle < 0) {
            say("target %d exited; the shadow ends", target_pid);
            char reason[64];
            snprintf(reason, sizeof reason, "process %d exited", target_pid);
            end(reason);
        }
    }
    for (int m = 0; m < member_count;) {
        if (members[m].following && (members[m].handle = pidfd_open(members[m].pid)) < 0) {
            member_exited(m); /* it ended while we changed form */
            continue;
        }
        m++;
    }
    say("resting: holding %d descriptors of process %d and its members", key_count, target_pid);

    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long next_follow = now.tv_sec * 1000LL + now.tv_nsec / 1000000 + FOLLOW_INTERVAL_MS;
    for (;;) {
        struct pollfd watched[2 + MAX_MEMBERS];
        int count = 0;
        watched[count++] = (struct pollfd){listener, POLLIN, 0};
        if (target_handle >= 0)
            watched[count++] = (struct pollfd){target_handle, POLLIN, 0};
        int first_member = count;
        for (int m = 0; m < member_count; m++)
            watched[count++] = (struct pollfd){members[m].handle, POLLIN, 0};
        clock_gettime(CLOCK_MONOTONIC, &now);
        long long wait = next_follow - (now.tv_sec * 1000LL + now.tv_nsec / 1000000);
        int ready = poll(watched, (nfds_t)count, wait > 0 ? (int)wait : 0);
        if (terminated) { /* as program.py's SIGTERM: no word left beside the socket */
            say("shadow ends");
            exit(0);
        }
        if (ready < 0 && errno != EINTR) {
            say("poll failed: %s", strerror(errno));
            exit(1);
        }
        if (ready > 0) {
            if (target_handle >= 0 && watched[1].revents) {
                say("target %d exited; the shadow ends", target_pid);
                char reason[64];
                snprintf(reason, sizeof reason, "process %d exited", target_pid);
                end(reason);
            }
            for (int i = count - 1; i >= first_member; i--)
                if (watched[i].revents)
                    member_exited(i - first_member);
            if (watched[0].revents & POLLIN) {
                int connection = accept4(listener, NULL, NULL, 0);
                if (connection >= 0)
                    serve_connection(connection);
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec * 1000LL + now.tv_nsec / 1000000 >= next_follow) {
            if (home_mode)
                follow(0, target_pid);
            for (int m = 0; m < member_count; m++)
                if (members[m].handle >= 0)
                    follow(members[m].pid, members[m].pid);
            next_follow = now.tv_sec * 1000LL + now.tv_nsec / 1000000 + FOLLOW_INTERVAL_MS;
        }
    }
}
