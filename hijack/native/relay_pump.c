/*
 * relay-pump: the home shadow's native data path for plain relays
 * (hijack/shadow/pump.py drives it; see there for why it exists).
 *
 * The shadow hands it a stream in its steady state: the original's socket,
 * the relay's socket and the two kernel pipes the stream's bytes pass through
 * (original -> out pipe -> relay, relay -> in pipe -> original), with what the
 * pipes already hold. It pumps both directions in one epoll loop (edge
 * triggered): a direction with nothing queued reads into a buffer and sends at
 * once, and whatever its sink does not take goes to the pipe, which then
 * splices on first; a read that fills the buffer (a bulk stream) has the rest
 * of the event spliced through the pipe. An event moves only the direction it concerns (its
 * source readable, or its sink writable while its pipe holds some), and a
 * read shorter than asked for means its source is drained (the next byte
 * that comes is an event of its own): a message costs an epoll_wait, a recv
 * and a send, no read that finds nothing. It goes on until the shadow
 * asks for the stream back or one side ends or fails: then it lets go of the
 * stream's descriptors and says what it moved, what the pipes hold (nothing
 * is ever held anywhere else between two requests) and why it stopped.
 * Everything past the steady state (a move, an end, a reset) stays the
 * shadow's.
 *
 * Control: a SOCK_SEQPACKET socket at descriptor argv[1]; one message each way
 * per request or event (struct request / struct report below, little endian).
 * It ends when the shadow closes it (or dies, which closes it too).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

enum { OP_ADD = 1, OP_STOP = 2, OP_QUERY = 3 };
enum { EV_RETURNED = 1, EV_COUNTS = 2 };
enum {
    STOPPED = 0,        /* asked for */
    ORIGINAL_EOF = 1,   /* the original's peer finished writing */
    RELAY_EOF = 2,      /* the process finished writing */
    ORIGINAL_ERROR = 3, /* reading or writing the original failed: err */
    RELAY_ERROR = 4,    /* reading or writing the relay failed: err */
};
enum { MOVED = 100, DRAINED = 101 }; /* pass_through() moved some (DRAINED: all there was) */
enum { ORIGINAL, RELAY, OUT_READ, OUT_WRITE, IN_READ, IN_WRITE, FDS };

struct request {
    uint32_t op;
    uint32_t id;
    int64_t out_held; /* OP_ADD: bytes the pipes hold already */
    int64_t in_held;
};

struct report {
    uint32_t event;
    uint32_t id;
    int32_t reason;
    int32_t err;
    int64_t bytes_out; /* spliced from the original since OP_ADD */
    int64_t bytes_in;  /* spliced from the relay since OP_ADD */
    int64_t out_held;
    int64_t in_held;
};

struct direction {
    int source, pipe_read, pipe_write, sink;
    int64_t held, size, moved;
    int full; /* no pipe slot free below its size: wait for the sink */
    /* An event of its source said the peer finished writing (EPOLLRDHUP): a short read
     * no longer means drained, the end may wait behind the bytes (come with them, it
     * made no edge of its own). */
    int hup;
};

struct pair {
    uint32_t id;
    int fds[FDS];
    struct direction out, in;
    struct pair *next;
};

/* What a direction with nothing queued reads, sent on at once: a small message
 * costs a recv and a send, not a splice in and a splice out. */
#define BUFFER_SIZE 65536
static char buffer[BUFFER_SIZE];

static struct pair *pairs;
static int epoll_fd, control_fd;

static void die(const char *what) {
    fprintf(stderr, "relay-pump: %s: %s\n", what, strerror(errno));
    exit(1);
}

static struct pair *find(uint32_t id) {
    for (struct pair *pair = pairs; pair; pair = pair->next)
        if (pair->id == id)
            return pair;
    return NULL;
}

static void send_report(const struct report *report) {
    while (send(control_fd, report, sizeof *report, 0) < 0)
        if (errno != EINTR)
            exit(0); /* the shadow is gone */
}

static void give_back(struct pair *pair, int reason, int err) {
    struct report report = {EV_RETURNED, pair->id, reason, err, pair->out.moved,
                            pair->in.moved, pair->out.held, pair->in.held};
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, pair->fds[ORIGINAL], NULL);
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, pair->fds[RELAY], NULL);
    for (int i = 0; i < FDS; i++)
        close(pair->fds[i]); /* ours: the shadow holds its own */
    struct pair **link = &pairs;
    while (*link != pair)
        link = &(*link)->next;
    *link = pair->next;
    free(pair);
    send_report(&report); /* after closing: the shadow may close the stream at once */
}

/* Read what `d`'s source has (nothing queued) and send it on; what the sink does
 * not take now goes to the pipe, where the shadow finds it if it takes the stream
 * back. MOVED: moved some, DRAINED: moved all there was (a short read of a
 * stream socket empties its queue), 0: nothing there, else why it stopped (as
 * pump()). */
static int pass_through(struct direction *d, int source_end, int sink_error, int *err) {
    size_t room = d->size < BUFFER_SIZE ? (size_t)d->size : BUFFER_SIZE;
    ssize_t got = recv(d->source, buffer, room, MSG_DONTWAIT);
    if (got == 0)
        return source_end;
    if (got < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        *err = errno;
        return source_end == ORIGINAL_EOF ? ORIGINAL_ERROR : RELAY_ERROR;
    }
    d->moved += got;
    ssize_t put = send(d->sink, buffer, (size_t)got, MSG_DONTWAIT | MSG_NOSIGNAL);
    int failed = put < 0 && errno != EAGAIN && errno != EINTR ? errno : 0;
    if (put < 0)
        put = 0;
    while (put < got) { /* the pipe is empty and at least `room` big: it takes it all */
        ssize_t kept = write(d->pipe_write, buffer + put, (size_t)(got - put));
        if (kept < 0 && errno != EINTR)
            die("write to an empty pipe");
        if (kept > 0) {
            put += kept;
            d->held += kept;
        }
    }
    if (failed) {
        *err = failed;
        return sink_error;
    }
    return (size_t)got < room ? DRAINED : MOVED;
}

/* Move what is there in one direction: 0 while it goes on, else why it stopped
 * (reason, with errno in *err). A message passes through the buffer; once a read
 * fills it (a bulk stream, not a message), the rest of this event is spliced
 * through the pipe, the pages never copied here: half the CPU per byte of
 * recv/send (0.30 against 0.56-0.60 s per GB relayed, bench/links.py). */
static int pump(struct direction *d, int source_end, int sink_error, int *err) {
    int bulk = 0;
    for (;;) {
        int progress = 0;
        if (d->held == 0 && !bulk) {
            int passed = pass_through(d, source_end, sink_error, err);
            if (passed == DRAINED && !d->hup)
                return 0;
            if (passed != MOVED)
                return passed;
            bulk = 1;
            continue;
        }
        if (!d->full && d->held < d->size) {
            ssize_t got = splice(d->source, NULL, d->pipe_write, NULL, (size_t)(d->size - d->held),
                                 SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (got > 0) {
                d->held += got;
                d->moved += got;
                progress = 1;
            } else if (got == 0) {
                return source_end;
            } else if (errno == EAGAIN) {
                d->full = d->held > 0; /* no data, or no free slot: the latter while holding */
            } else if (errno != EINTR) {
                *err = errno;
                return source_end == ORIGINAL_EOF ? ORIGINAL_ERROR : RELAY_ERROR;
            }
        }
        if (d->held > 0) {
            ssize_t put = splice(d->pipe_read, NULL, d->sink, NULL, (size_t)d->held,
                                 SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (put > 0) {
                d->held -= put;
                d->full = 0;
                progress = 1;
            } else if (put < 0 && errno != EAGAIN && errno != EINTR) {
                *err = errno;
                return sink_error;
            }
        }
        if (!progress)
            return 0;
    }
}

/* Pump the directions `out` and `in` (either may be 0: left as it is). */
static void pump_pair(struct pair *pair, int out, int in) {
    int err = 0, stop = 0;
    if (out)
        stop = pump(&pair->out, ORIGINAL_EOF, RELAY_ERROR, &err);
    if (!stop && in)
        stop = pump(&pair->in, RELAY_EOF, ORIGINAL_ERROR, &err);
    if (stop)
        give_back(pair, stop, err);
}

/* An event's data: the pair's id and which of its sockets (ORIGINAL or RELAY). */
#define EVENT_DATA(id, which) ((uint64_t)(id) << 1 | (uint64_t)(which))

/* What an event of `which` of `pair` concerns: the direction it is the source of
 * when there is something to read (or an end, or an error), the one it is the sink
 * of when it can be written and that direction's pipe holds some. */
static void on_socket(struct pair *pair, int which, uint32_t events) {
    struct direction *sink = which == ORIGINAL ? &pair->in : &pair->out;
    int readable = (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0;
    int drains = (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) != 0 && sink->held > 0;
    if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        (which == ORIGINAL ? &pair->out : &pair->in)->hup = 1;
    pump_pair(pair, which == ORIGINAL ? readable : drains, which == ORIGINAL ? drains : readable);
}

static void watch(struct pair *pair, int fd, int which) {
    struct epoll_event event = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET};
    event.data.u64 = EVENT_DATA(pair->id, which);
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event) < 0)
        die("epoll_ctl");
}

static void on_control(void) {
    struct request request;
    char cmsg_space[CMSG_SPACE(sizeof(int) * FDS)];
    struct iovec iov = {&request, sizeof request};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cmsg_space,
                         .msg_controllen = sizeof cmsg_space};
    ssize_t got = recvmsg(control_fd, &msg, MSG_CMSG_CLOEXEC);
    if (got == 0)
        exit(0); /* the shadow closed it: it ends */
    if (got < 0) {
        if (errno == EINTR || errno == EAGAIN)
            return;
        exit(0);
    }
    int fds[FDS], count = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            memcpy(fds, CMSG_DATA(c), sizeof(int) * (size_t)count);
        }
    if (got != sizeof request || (request.op == OP_ADD) != (count == FDS)) {
        for (int i = 0; i < count; i++)
            close(fds[i]);
        fprintf(stderr, "relay-pump: a malformed request\n");
        exit(1);
    }
    struct pair *pair = find(request.id);
    if (request.op == OP_ADD) {
        if (pair)
            give_back(pair, STOPPED, 0); /* not expected: the shadow adds a stream once */
        pair = calloc(1, sizeof *pair);
        if (!pair)
            die("calloc");
        pair->id = request.id;
        memcpy(pair->fds, fds, sizeof fds);
        int64_t out_size = fcntl(fds[OUT_WRITE], F_GETPIPE_SZ);
        int64_t in_size = fcntl(fds[IN_WRITE], F_GETPIPE_SZ);
        pair->out = (struct direction){fds[ORIGINAL], fds[OUT_READ], fds[OUT_WRITE], fds[RELAY],
                                       request.out_held, out_size, 0, 0, 0};
        pair->in = (struct direction){fds[RELAY], fds[IN_READ], fds[IN_WRITE], fds[ORIGINAL],
                                      request.in_held, in_size, 0, 0, 0};
        pair->next = pairs;
        pairs = pair;
        watch(pair, fds[ORIGINAL], ORIGINAL);
        watch(pair, fds[RELAY], RELAY);
        pump_pair(pair, 1, 1); /* what came before it was watched (an end: its first event) */
    } else if (request.op == OP_STOP) {
        /* Unknown: it came back by itself already (that report is on its way). */
        if (pair)
            give_back(pair, STOPPED, 0);
    } else if (request.op == OP_QUERY) {
        struct report report = {EV_COUNTS, request.id, -1, 0, 0, 0, 0, 0};
        if (pair) {
            report.reason = 0;
            report.bytes_out = pair->out.moved;
            report.bytes_in = pair->in.moved;
            report.out_held = pair->out.held;
            report.in_held = pair->in.held;
        }
        send_report(&report);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: relay-pump CONTROL_FD\n");
        return 2;
    }
    control_fd = atoi(argv[1]);
    /* No PR_SET_PDEATHSIG: it fires when the thread that started us ends, which
     * need not be the shadow's end. A shadow gone closes the control socket: we
     * read its end and exit. */
    /* Six descriptors a stream: as many as the hard limit allows (past it an ADD's
     * descriptors are cut short, we end, and the shadow pumps in Python). */
    struct rlimit files;
    if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
        files.rlim_cur = files.rlim_max;
        setrlimit(RLIMIT_NOFILE, &files);
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd < 0)
        die("epoll_create1");
    struct epoll_event event = {.events = EPOLLIN};
    event.data.u64 = UINT64_MAX;
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, control_fd, &event) < 0)
        die("epoll_ctl");
    struct epoll_event events[64];
    for (;;) {
        int ready = epoll_wait(epoll_fd, events, 64, -1);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < ready; i++) {
            if (events[i].data.u64 == UINT64_MAX) {
                on_control();
                continue;
            }
            struct pair *pair = find((uint32_t)(events[i].data.u64 >> 1));
            if (pair) /* else given back by an earlier event of this batch */
                on_socket(pair, (int)(events[i].data.u64 & 1), events[i].events);
        }
    }
}
