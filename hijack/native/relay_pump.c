/*
 * relay-pump: the home shadow's native data path for relays, plain and encrypted
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
 * An encrypted relay (OP_ADD_TLS) goes the same way, its records sealed and opened
 * here with the keys the shadow hands over (TLS 1.3, AES-GCM through libcrypto): the
 * out pipe holds ciphertext, the in pipe plaintext; the relay's plaintext is the node's
 * frames (DATA for the original, ACKs counted); anything else (another record type,
 * another frame, a record that does not open) is given back, unopened, to the shadow.
 *
 * The node's forwarder (hijack/node/forwarder.py) hands its end of an encrypted relay
 * over the same way (OP_ADD_FORWARD), the other way round: its "original" is its end of
 * the loopback connection to the moved process, whose bytes go to the shadow as DATA
 * frames; the shadow's records carry the stream's bytes raw, delivered as they open (the
 * in pipe holds up to the forwarder's LIMIT of them for a process that does not read);
 * and it sends the forwarder's ACKs (bytes in the process's socket, its room), with the
 * process's next DATA, or ACK_DELAY after a write once the socket acknowledged all.
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
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

enum { OP_ADD = 1, OP_STOP = 2, OP_QUERY = 3, OP_ADD_TLS = 4, OP_ADD_FORWARD = 5 };
enum { EV_RETURNED = 1, EV_COUNTS = 2 };
enum {
    STOPPED = 0,        /* asked for */
    ORIGINAL_EOF = 1,   /* the original's peer finished writing */
    RELAY_EOF = 2,      /* the process finished writing */
    ORIGINAL_ERROR = 3, /* reading or writing the original failed: err */
    RELAY_ERROR = 4,    /* reading or writing the relay failed: err */
    TLS_OTHER = 5,      /* a record or frame it does not carry (an alert, END): the shadow's */
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

/* OP_ADD_TLS: after struct request, each direction's key, iv and next record number. */
struct tls_keys {
    uint32_t key_len; /* 16 or 32: AES-128-GCM or AES-256-GCM */
    uint32_t unused;
    uint8_t out_key[32], out_iv[12]; /* sealing what the original sends */
    uint8_t in_key[32], in_iv[12];   /* opening what the relay sends */
    uint64_t out_seq, in_seq;
} __attribute__((packed));

/* OP_ADD_FORWARD, after struct tls_keys: the forwarder's counts at the hand-over. */
struct forward_start {
    uint64_t delivered; /* bytes written to the process's socket, in all */
    uint64_t acked;     /* what the forwarder's last ACK said */
} __attribute__((packed));

/* A TLS pair's report: struct report, then this, then `cipher_len` bytes of ciphertext not
 * opened yet (a record cut short, or one it does not carry) and `frame_len` bytes of
 * plaintext not parsed yet (a frame cut short, or what follows one it does not carry;
 * forwarding: bytes for the process the in pipe did not take, after the pipe's). */
struct tls_tail {
    uint64_t out_seq, in_seq;
    uint64_t acked;     /* the last ACK's count (if acks); forwarding: the last we sent */
    uint32_t room;      /* and its room */
    uint32_t acks;      /* ACKs taken since OP_ADD_TLS (sent, forwarding) */
    uint32_t data_left; /* bytes of the DATA frame under way not read yet */
    uint32_t cipher_len, frame_len;
} __attribute__((packed));

#define RECORD_HEADER 5
#define MAX_PLAIN 16384
#define TAG 16
#define MAX_RECORD (MAX_PLAIN + 256)
#define FRAME_HEADER 5 /* KIND:u8 LENGTH:u32 (hijack/node/forwarder.py) */
#define CIPHER_CAP (65536 + 2 * (RECORD_HEADER + MAX_RECORD))
enum { FRAME_DATA = 1, FRAME_ACK = 3 };
#define ACK_FRAME (FRAME_HEADER + 12) /* u64 count, u32 room */
/* As the forwarder's ACK_DELAY and ACK_POLL (hijack/node/forwarder.py), in ms. */
#define ACK_DELAY_MS 2
#define ACK_POLL_MS 5
#define TCPI_SND_WND 228 /* offset of tcpi_snd_wnd in struct tcp_info (Linux 6.2) */

struct tls {
    EVP_CIPHER_CTX *seal, *open;
    uint8_t out_iv[12], in_iv[12];
    uint64_t out_seq, in_seq;
    uint8_t cipher[CIPHER_CAP]; /* from the relay, not opened yet */
    size_t cipher_len;
    /* plaintext not parsed: a frame's head, or the rest; forwarding: what the in pipe
     * did not take of a record's (its pages part-filled: a pipe's size is in pages) */
    uint8_t frame[MAX_PLAIN + 64];
    size_t frame_len;
    uint32_t data_left;
    uint64_t acked;
    uint32_t room, acks;
    int other; /* met a record or frame it does not carry: give back */
    /* The forwarder's end (OP_ADD_FORWARD): the relay's records are raw bytes, what the
     * original sends goes as DATA frames, ACKs are ours to send. */
    int forward;
    uint64_t base;       /* bytes delivered to the original before the hand-over */
    uint64_t written_at; /* now_ms() of the last write to the original */
    int ack_due;         /* an ACK counted, to go once the out pipe is empty */
    uint64_t ack_sent;   /* the count of the last ACK sent (or sealed into the out pipe) */
};

struct pair {
    uint32_t id;
    int fds[FDS];
    struct direction out, in;
    struct tls *tls; /* an encrypted relay's (OP_ADD_TLS), else NULL */
    struct pair *next;
};

/* What a direction with nothing queued reads, sent on at once: a small message
 * costs a recv and a send, not a splice in and a splice out. */
#define BUFFER_SIZE 65536
static char buffer[BUFFER_SIZE];

static struct pair *pairs;
static int epoll_fd, control_fd;
static int forwarding; /* pairs of the forwarder's end (OP_ADD_FORWARD): ACKs to time */

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

static void send_tls_report(const struct report *report, struct tls *tls) {
    /* Forwarding: the last ACK that left, not one counted and waiting (ack_due): the
     * forwarder sends that one again. */
    uint64_t acked = tls->forward ? tls->ack_sent : tls->acked;
    struct tls_tail tail = {tls->out_seq, tls->in_seq, acked, tls->room, tls->acks,
                            tls->data_left, (uint32_t)tls->cipher_len, (uint32_t)tls->frame_len};
    struct iovec iov[4] = {{(void *)report, sizeof *report}, {&tail, sizeof tail},
                           {tls->cipher, tls->cipher_len}, {tls->frame, tls->frame_len}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 4};
    while (sendmsg(control_fd, &msg, 0) < 0)
        if (errno != EINTR)
            exit(0); /* the shadow is gone */
}

static void give_back(struct pair *pair, int reason, int err) {
    struct report report = {EV_RETURNED, pair->id, reason, err, pair->out.moved,
                            pair->in.moved, pair->out.held, pair->in.held};
    struct tls *tls = pair->tls;
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, pair->fds[ORIGINAL], NULL);
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, pair->fds[RELAY], NULL);
    for (int i = 0; i < FDS; i++)
        close(pair->fds[i]); /* ours: the shadow holds its own */
    struct pair **link = &pairs;
    while (*link != pair)
        link = &(*link)->next;
    *link = pair->next;
    free(pair);
    /* after closing: the shadow may close the stream at once */
    if (tls) {
        forwarding -= tls->forward;
        send_tls_report(&report, tls);
        EVP_CIPHER_CTX_free(tls->seal);
        EVP_CIPHER_CTX_free(tls->open);
        OPENSSL_cleanse(tls, sizeof *tls);
        free(tls);
    } else {
        send_report(&report);
    }
}

/* Send `size` bytes of `data` to `d`'s sink; what it does not take goes to `d`'s pipe,
 * which the caller knows to be empty and big enough. The errno of a send that failed
 * (the bytes are in the pipe then), or 0. */
static int send_or_keep(struct direction *d, const void *data, size_t size) {
    const char *bytes = data;
    ssize_t put = send(d->sink, bytes, size, MSG_DONTWAIT | MSG_NOSIGNAL);
    int failed = put < 0 && errno != EAGAIN && errno != EINTR ? errno : 0;
    if (put < 0)
        put = 0;
    while ((size_t)put < size) {
        ssize_t kept = write(d->pipe_write, bytes + put, size - (size_t)put);
        if (kept < 0 && errno != EINTR)
            die("write to an empty pipe");
        if (kept > 0) {
            put += kept;
            d->held += kept;
        }
    }
    return failed;
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
    /* The pipe is empty and at least `room` big: it takes what the sink does not. */
    int failed = send_or_keep(d, buffer, (size_t)got);
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


/* -- encrypted relays: TLS 1.3 records (RFC 8446, 5.2), sealed and opened here -------- */

static void nonce_of(const uint8_t iv[12], uint64_t seq, uint8_t nonce[12]) {
    memcpy(nonce, iv, 12);
    for (int i = 0; i < 8; i++)
        nonce[11 - i] ^= (uint8_t)(seq >> (8 * i));
}

/* `len` bytes of `plain` (at most MAX_PLAIN) as one record at `out`: its size. */
static size_t seal_record(struct tls *tls, const uint8_t *plain, size_t len, uint8_t *out) {
    size_t body = len + 1 + TAG;
    uint8_t nonce[12], type = 23;
    int n;
    out[0] = 23, out[1] = 3, out[2] = 3, out[3] = (uint8_t)(body >> 8), out[4] = (uint8_t)body;
    nonce_of(tls->out_iv, tls->out_seq++, nonce);
    if (EVP_EncryptInit_ex(tls->seal, NULL, NULL, NULL, nonce) != 1 ||
        EVP_EncryptUpdate(tls->seal, NULL, &n, out, RECORD_HEADER) != 1 ||
        EVP_EncryptUpdate(tls->seal, out + RECORD_HEADER, &n, plain, (int)len) != 1 ||
        EVP_EncryptUpdate(tls->seal, out + RECORD_HEADER + len, &n, &type, 1) != 1 ||
        EVP_EncryptFinal_ex(tls->seal, out + RECORD_HEADER + len + 1, &n) != 1 ||
        EVP_CIPHER_CTX_ctrl(tls->seal, EVP_CTRL_GCM_GET_TAG, TAG,
                            out + RECORD_HEADER + len + 1) != 1) {
        fprintf(stderr, "relay-pump: sealing a record failed\n");
        exit(1);
    }
    return RECORD_HEADER + body;
}

/* Open the record at the head of tls->cipher (whole: `size` bytes) into `plain`: its data's
 * length, or -1 if it does not open or is not application data (left where it is, its
 * number not taken: the shadow opens it again and does what it says). */
static ssize_t open_record(struct tls *tls, size_t size, uint8_t *plain) {
    uint8_t nonce[12];
    int n, total;
    size_t body = size - RECORD_HEADER - TAG;
    nonce_of(tls->in_iv, tls->in_seq, nonce);
    if (EVP_DecryptInit_ex(tls->open, NULL, NULL, NULL, nonce) != 1 ||
        EVP_DecryptUpdate(tls->open, NULL, &n, tls->cipher, RECORD_HEADER) != 1 ||
        EVP_DecryptUpdate(tls->open, plain, &n, tls->cipher + RECORD_HEADER, (int)body) != 1)
        return -1;
    total = n;
    if (EVP_CIPHER_CTX_ctrl(tls->open, EVP_CTRL_GCM_SET_TAG, TAG,
                            tls->cipher + RECORD_HEADER + body) != 1 ||
        EVP_DecryptFinal_ex(tls->open, plain + total, &n) != 1)
        return -1;
    total += n;
    while (total > 0 && plain[total - 1] == 0) /* padding */
        total--;
    if (total == 0 || plain[total - 1] != 23)
        return -1;
    tls->in_seq++;
    return total - 1;
}

/* Put `len` bytes for the original: sent at once while nothing waits in the in pipe, the
 * rest to the pipe. It has room (a record's data at most, and it was empty when the record
 * was opened), but for the forwarder's end, which fills it (in_room()): there what it does
 * not take (its pages part-filled) waits in tls->frame, empty until then. `data` may be
 * tls->frame itself. 0, or the errno of a failed send. */
static int deliver(struct pair *pair, const uint8_t *data, size_t len) {
    struct direction *d = &pair->in;
    struct tls *tls = pair->tls;
    ssize_t put = 0;
    if (d->held == 0) {
        put = send(d->sink, data, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (put < 0) {
            if (errno != EAGAIN && errno != EINTR)
                return errno;
            put = 0;
        }
    }
    while ((size_t)put < len) {
        ssize_t kept = write(d->pipe_write, data + put, len - (size_t)put);
        if (kept < 0 && errno == EAGAIN && tls->forward)
            break;
        if (kept < 0 && errno != EINTR)
            die("write to a pipe with room");
        if (kept > 0) {
            put += kept;
            d->held += kept;
        }
    }
    if (tls->forward) {
        memmove(tls->frame, data + put, len - (size_t)put);
        tls->frame_len = len - (size_t)put;
    }
    d->moved += (int64_t)len;
    return 0;
}

/* Forwarding: what the in pipe did not take, to it (or to the process) now: 0, or the
 * errno of a failed send. */
static int flush_overflow(struct pair *pair) {
    struct tls *tls = pair->tls;
    size_t len = tls->frame_len;
    if (!len)
        return 0;
    tls->frame_len = 0;
    pair->in.moved -= (int64_t)len; /* counted again */
    return deliver(pair, tls->frame, len);
}

/* The frames of a record's plaintext (`plain`, `len`): DATA for the original, ACKs
 * counted; at any other frame (END) it stops, the rest kept for the shadow (tls->frame).
 * A frame's head is looked at as soon as it is whole, even at the record's last byte: an
 * END (no body) that ends a record is seen now, not when a next record comes (none may).
 * 0, or the errno of a failed send to the original. */
static int take_frames(struct pair *pair, const uint8_t *plain, size_t len) {
    struct tls *tls = pair->tls;
    size_t at = 0;
    if (tls->forward) /* the shadow's records carry the stream's bytes as they are */
        return deliver(pair, plain, len);
    for (;;) {
        if (tls->data_left) {
            if (at == len)
                break;
            size_t part = len - at < tls->data_left ? len - at : tls->data_left;
            int failed = deliver(pair, plain + at, part);
            if (failed)
                return failed;
            tls->data_left -= (uint32_t)part;
            at += part;
            continue;
        }
        /* A frame's head (an ACK: its body too) gathers in tls->frame. */
        size_t want = FRAME_HEADER;
        if (tls->frame_len >= FRAME_HEADER) {
            uint32_t length;
            memcpy(&length, tls->frame + 1, 4);
            if (tls->frame[0] == FRAME_DATA) {
                tls->data_left = length;
                tls->frame_len = 0;
                continue;
            }
            if (tls->frame[0] != FRAME_ACK || length > 16) {
                tls->other = 1;
                break;
            }
            want += length;
        }
        if (tls->frame_len == want) { /* a whole ACK: u64 count, u32 room (or none) */
            memcpy(&tls->acked, tls->frame + FRAME_HEADER, 8);
            tls->room = 0;
            if (want == FRAME_HEADER + 12)
                memcpy(&tls->room, tls->frame + FRAME_HEADER + 8, 4);
            tls->acks++;
            tls->frame_len = 0;
            continue;
        }
        if (at == len)
            break;
        size_t part = want - tls->frame_len < len - at ? want - tls->frame_len : len - at;
        memcpy(tls->frame + tls->frame_len, plain + at, part);
        tls->frame_len += part;
        at += part;
    }
    if (tls->other) { /* the rest of the record, after the frame's head already kept */
        memcpy(tls->frame + tls->frame_len, plain + at, len - at);
        tls->frame_len += len - at;
    }
    return 0;
}

/* Splice what `d`'s pipe holds to its sink: 0, or `sink_error` with errno in *err. */
static int drain_pipe(struct direction *d, int sink_error, int *err) {
    while (d->held > 0) {
        ssize_t put = splice(d->pipe_read, NULL, d->sink, NULL, (size_t)d->held,
                             SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (put > 0) {
            d->held -= put;
            continue;
        }
        if (put < 0 && errno != EAGAIN && errno != EINTR) {
            *err = errno;
            return sink_error;
        }
        break;
    }
    return 0;
}

/* Whether a record's data surely has a place: while the in pipe holds nothing; forwarding,
 * while the pipe seems to have room for one and took all it was given (what it does not
 * take waits in tls->frame), so that it holds what the process does not read yet. */
static int in_room(const struct pair *pair) {
    if (pair->tls->forward)
        return pair->tls->frame_len == 0 && pair->in.held + MAX_PLAIN <= pair->in.size;
    return pair->in.held == 0;
}

/* Open the whole records tls->cipher holds while a record's data has a place: 0, or why it
 * stopped. */
static int open_records(struct pair *pair, int *err) {
    static uint8_t plain[MAX_RECORD];
    struct tls *tls = pair->tls;
    while (!tls->other && in_room(pair) && tls->cipher_len >= RECORD_HEADER) {
        size_t length = (size_t)tls->cipher[3] << 8 | tls->cipher[4];
        if (tls->cipher[0] != 23 || length > MAX_RECORD || length <= TAG) {
            tls->other = 1; /* the shadow's own layer says what is wrong with it */
            break;
        }
        if (tls->cipher_len < RECORD_HEADER + length)
            break;
        ssize_t len = open_record(tls, RECORD_HEADER + length, plain);
        if (len < 0) {
            tls->other = 1;
            break;
        }
        tls->cipher_len -= RECORD_HEADER + length;
        memmove(tls->cipher, tls->cipher + RECORD_HEADER + length, tls->cipher_len);
        int failed = take_frames(pair, plain, (size_t)len);
        if (failed) {
            *err = failed;
            return ORIGINAL_ERROR;
        }
    }
    return 0;
}

/* The relay -> original direction of an encrypted relay: records opened, frames taken;
 * what the original does not take waits in the pipe (plaintext), as on a plain one. */
static int pump_tls_in(struct pair *pair, int *err) {
    struct direction *d = &pair->in;
    struct tls *tls = pair->tls;
    int drained = 0;
    for (;;) {
        int stop = drain_pipe(d, ORIGINAL_ERROR, err);
        if (!stop && tls->forward && (*err = flush_overflow(pair)))
            stop = ORIGINAL_ERROR;
        if (!stop)
            stop = open_records(pair, err);
        if (stop)
            return stop;
        if (d->held > 0) {
            stop = drain_pipe(d, ORIGINAL_ERROR, err);
            if (stop)
                return stop;
            if (d->held == 0)
                continue;
            if (!in_room(pair))
                return 0; /* the original's room: an event of its own */
        }
        if (tls->other)
            return TLS_OTHER;
        if (drained && !d->hup)
            return 0;
        size_t room = CIPHER_CAP - tls->cipher_len;
        ssize_t got = recv(d->source, tls->cipher + tls->cipher_len, room, MSG_DONTWAIT);
        if (got == 0)
            return RELAY_EOF;
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            *err = errno;
            return RELAY_ERROR;
        }
        tls->cipher_len += (size_t)got;
        drained = (size_t)got < room;
    }
}

/* -- the forwarder's ACKs (OP_ADD_FORWARD); what an encrypted relay's original sends ----- */

static uint64_t now_ms(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000 + (uint64_t)now.tv_nsec / 1000000;
}

/* Bytes for the process not written to its socket yet: the in pipe's, tls->frame's. */
static int64_t undelivered(const struct pair *pair) {
    return pair->in.held + (int64_t)pair->tls->frame_len;
}

/* Bytes written to the process's socket, in all. */
static uint64_t delivered(const struct pair *pair) {
    return pair->tls->base + (uint64_t)(pair->in.moved - undelivered(pair));
}

/* Bytes the process's socket's peer (the process) has not acknowledged (SIOCOUTQ), or -1. */
static int unacknowledged(int fd) {
    int queued = 0;
    return ioctl(fd, SIOCOUTQ, &queued) < 0 ? -1 : queued;
}

/* Whether the process's socket acknowledged all it was written since our last ACK: then
 * counted as acknowledged (the caller sends the ACK). */
static int acknowledged(struct pair *pair) {
    uint64_t count = delivered(pair);
    if (count > pair->tls->acked && unacknowledged(pair->fds[ORIGINAL]) == 0) {
        pair->tls->acked = count;
        return 1;
    }
    return 0;
}

/* Our last ACK's frame at `out` (ACK_FRAME bytes): the count, and the room left in the
 * process's socket (the window it advertises, less what waits for it there and here). */
static void ack_frame(struct pair *pair, uint8_t *out) {
    uint8_t info[TCPI_SND_WND + 4];
    socklen_t size = sizeof info;
    uint32_t window = 0, length = 12;
    int fd = pair->fds[ORIGINAL];
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &size) == 0 && size >= sizeof info)
        memcpy(&window, info + TCPI_SND_WND, 4);
    int queued = unacknowledged(fd);
    int64_t room = (int64_t)window - (queued > 0 ? queued : 0) - undelivered(pair);
    uint32_t room32 = room < 0 ? 0 : room > UINT32_MAX ? UINT32_MAX : (uint32_t)room;
    out[0] = FRAME_ACK;
    memcpy(out + 1, &length, 4);
    memcpy(out + FRAME_HEADER, &pair->tls->acked, 8);
    memcpy(out + FRAME_HEADER + 8, &room32, 4);
    pair->tls->acks++;
    pair->tls->ack_sent = pair->tls->acked;
}

/* Send our last ACK alone (the out pipe is empty): 0, or RELAY_ERROR. */
static int send_ack(struct pair *pair, int *err) {
    uint8_t frame[ACK_FRAME], record[RECORD_HEADER + ACK_FRAME + 1 + TAG];
    ack_frame(pair, frame);
    pair->tls->ack_due = 0;
    int failed = send_or_keep(&pair->out, record, seal_record(pair->tls, frame, ACK_FRAME, record));
    if (failed) {
        *err = failed;
        return RELAY_ERROR;
    }
    return 0;
}

/* The original -> relay direction of an encrypted relay: what the original sends, sealed as
 * it comes; ciphertext the relay does not take waits in the pipe. The forwarder's end sends
 * it as DATA frames, its ACK ahead of them when the process's socket acknowledged all it
 * was written (the answer brought TCP's acknowledgement: one record for both). */
static int pump_tls_out(struct pair *pair, int *err) {
    static uint8_t staged[ACK_FRAME + FRAME_HEADER + BUFFER_SIZE];
    static uint8_t sealed[sizeof staged + (sizeof staged / MAX_PLAIN + 1) * (RECORD_HEADER + 1 + TAG)];
    struct direction *d = &pair->out;
    struct tls *tls = pair->tls;
    uint8_t *data = staged + ACK_FRAME + FRAME_HEADER;
    /* Room for every record's overhead and our frames in the pipe (at least a page: 4096). */
    size_t room = (d->size < BUFFER_SIZE ? (size_t)d->size : BUFFER_SIZE) - 1024;
    for (;;) {
        int stop = drain_pipe(d, RELAY_ERROR, err);
        if (stop || d->held > 0)
            return stop;
        if (tls->ack_due) {
            stop = send_ack(pair, err);
            if (stop)
                return stop;
            continue;
        }
        ssize_t got = recv(d->source, data, room, MSG_DONTWAIT);
        if (got == 0)
            return ORIGINAL_EOF;
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            *err = errno;
            return ORIGINAL_ERROR;
        }
        d->moved += got;
        size_t start = ACK_FRAME + FRAME_HEADER, end = start + (size_t)got, size = 0;
        if (tls->forward) {
            uint32_t length = (uint32_t)got;
            start = ACK_FRAME;
            staged[ACK_FRAME] = FRAME_DATA;
            memcpy(staged + ACK_FRAME + 1, &length, 4);
            if (acknowledged(pair)) {
                ack_frame(pair, staged);
                start = 0;
            }
        }
        for (size_t at = start; at < end; at += MAX_PLAIN) {
            size_t len = end - at < MAX_PLAIN ? end - at : MAX_PLAIN;
            size += seal_record(tls, staged + at, len, sealed + size);
        }
        int failed = send_or_keep(d, sealed, size); /* the pipe is empty: it takes the rest */
        if (failed) {
            *err = failed;
            return RELAY_ERROR;
        }
        if ((size_t)got < room && !d->hup)
            return 0;
    }
}

/* The forwarder's ACKs that no answer of the process took along: for each of its relays
 * whose process's socket acknowledged all it was written (looked at ACK_DELAY after the
 * last write, then every ACK_POLL). The epoll_wait timeout that brings the next look: -1
 * if none is due. */
static int acknowledge_all(void) {
    int timeout = -1;
    uint64_t now = now_ms();
    struct pair *next;
    for (struct pair *pair = pairs; pair; pair = next) {
        next = pair->next; /* a failed send gives `pair` back (freed) */
        struct tls *tls = pair->tls;
        if (!tls || !tls->forward || delivered(pair) <= tls->acked)
            continue;
        if (now - tls->written_at < ACK_DELAY_MS) {
            timeout = ACK_DELAY_MS;
            continue;
        }
        if (acknowledged(pair)) {
            int err = 0, stop = 0;
            tls->ack_due = 1;
            if (pair->out.held == 0)
                stop = send_ack(pair, &err);
            if (stop)
                give_back(pair, stop, err);
            continue;
        }
        if (timeout < 0)
            timeout = ACK_POLL_MS;
    }
    return timeout;
}

static struct tls *make_tls(const struct tls_keys *keys) {
    const EVP_CIPHER *cipher = keys->key_len == 16   ? EVP_aes_128_gcm()
                               : keys->key_len == 32 ? EVP_aes_256_gcm()
                                                     : NULL;
    struct tls *tls = cipher ? calloc(1, sizeof *tls) : NULL;
    if (!tls)
        return NULL;
    tls->seal = EVP_CIPHER_CTX_new();
    tls->open = EVP_CIPHER_CTX_new();
    if (!tls->seal || !tls->open ||
        EVP_EncryptInit_ex(tls->seal, cipher, NULL, keys->out_key, NULL) != 1 ||
        EVP_DecryptInit_ex(tls->open, cipher, NULL, keys->in_key, NULL) != 1) {
        fprintf(stderr, "relay-pump: cannot set up AES-GCM\n");
        exit(1);
    }
    memcpy(tls->out_iv, keys->out_iv, 12);
    memcpy(tls->in_iv, keys->in_iv, 12);
    tls->out_seq = keys->out_seq;
    tls->in_seq = keys->in_seq;
    return tls;
}

/* Pump the directions `out` and `in` (either may be 0: left as it is). */
static void pump_pair(struct pair *pair, int out, int in) {
    int err = 0, stop = 0;
    struct tls *tls = pair->tls;
    if (tls) {
        uint64_t before = tls->forward ? delivered(pair) : 0;
        if (out)
            stop = pump_tls_out(pair, &err);
        if (!stop && in)
            stop = pump_tls_in(pair, &err);
        if (!stop && tls->forward && delivered(pair) != before)
            tls->written_at = now_ms();
        if (stop)
            give_back(pair, stop, err);
        return;
    }
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
    struct {
        struct request request;
        struct tls_keys keys;
        struct forward_start start;
    } __attribute__((packed)) message;
    struct request request;
    char cmsg_space[CMSG_SPACE(sizeof(int) * FDS)];
    struct iovec iov = {&message, sizeof message};
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
    memcpy(&request, &message.request, sizeof request);
    int forward = request.op == OP_ADD_FORWARD;
    int encrypted = request.op == OP_ADD_TLS || forward;
    int adding = request.op == OP_ADD || encrypted;
    size_t expected = sizeof request + (encrypted ? sizeof message.keys : 0) +
                      (forward ? sizeof message.start : 0);
    struct tls *tls = NULL;
    if (got == (ssize_t)expected && encrypted) {
        tls = make_tls(&message.keys);
        OPENSSL_cleanse(&message.keys, sizeof message.keys);
    }
    if (tls && forward) {
        tls->forward = 1;
        tls->base = message.start.delivered;
        tls->acked = tls->ack_sent = message.start.acked;
        tls->written_at = now_ms();
        forwarding++;
    }
    if (got != (ssize_t)expected || adding != (count == FDS) || (encrypted && !tls)) {
        for (int i = 0; i < count; i++)
            close(fds[i]);
        fprintf(stderr, "relay-pump: a malformed request\n");
        exit(1);
    }
    struct pair *pair = find(request.id);
    if (adding) {
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
        pair->tls = tls;
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

/* HIJACK_BUSY_POLL_US (off by default): after each batch of events, look for the next
 * one without sleeping for up to that long. A request/response load's next message often
 * comes within tens of us; asleep, the pump waits for its wakeup, which on a virtual
 * machine whose other vCPU idles costs tens of us itself (bench/links.py, the one-CPU
 * line). The price is CPU: up to that long of spinning per batch, taken from the
 * processes the pump relays for if the machine has no CPU to spare. */
static long busy_poll_ns;
#define BUSY_POLL_MAX_US 10000

static int wait_events(struct epoll_event *events, int timeout) {
    if (busy_poll_ns > 0) {
        struct timespec start, now;
        clock_gettime(CLOCK_MONOTONIC, &start);
        do {
            int ready = epoll_wait(epoll_fd, events, 64, 0);
            if (ready != 0)
                return ready;
            clock_gettime(CLOCK_MONOTONIC, &now);
        } while ((now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec) <
                 busy_poll_ns);
    }
    return epoll_wait(epoll_fd, events, 64, timeout);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: relay-pump CONTROL_FD\n");
        return 2;
    }
    control_fd = atoi(argv[1]);
    const char *busy = getenv("HIJACK_BUSY_POLL_US");
    long busy_us = busy ? strtol(busy, NULL, 10) : 0;
    if (busy_us > 0)
        busy_poll_ns = (busy_us < BUSY_POLL_MAX_US ? busy_us : BUSY_POLL_MAX_US) * 1000L;
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
    int timeout = -1;
    for (;;) {
        int ready = wait_events(events, timeout);
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
        /* A shadow's pump has no ACKs to time: no walk over its streams per wakeup. */
        timeout = forwarding ? acknowledge_all() : -1;
    }
}
