/*
 * relay-floor: the least a relay can be, for bench/relay_floor.py. A TCP relay
 * (listen here, connect each client to a backend) that keeps no guarantee at
 * all — no counts, no pipes, no moves, blocking sends of small messages —
 * either pumped in user space (one epoll loop, a recv and a send a message, as
 * hijack's relay-pump) or forwarded in the kernel: a sockmap whose sk_skb
 * verdict program (hand-assembled below: socket cookie -> peer's index in a
 * hash map) redirects every skb to the peer socket's egress, never waking this
 * program. What it measures: how far any relay on these nodes gets, beside
 * hijack's own. Not part of hijack.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static int bpf(int cmd, union bpf_attr *attr) { return (int)syscall(__NR_bpf, cmd, attr, sizeof *attr); }
#define MAXC 64
static int sockmap, cookies;
static char vlog[65536];

static int load_prog(void) {
    struct bpf_insn p[] = {
        {BPF_ALU64 | BPF_MOV | BPF_X, 6, 1, 0, 0},                 /* r6 = ctx */
        {BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_get_socket_cookie}, /* r0 = cookie */
        {BPF_STX | BPF_MEM | BPF_DW, 10, 0, -8, 0},                 /* *(r10-8) = r0 */
        {BPF_LD | BPF_DW | BPF_IMM, 1, BPF_PSEUDO_MAP_FD, 0, cookies}, {0, 0, 0, 0, 0},
        {BPF_ALU64 | BPF_MOV | BPF_X, 2, 10, 0, 0},
        {BPF_ALU64 | BPF_ADD | BPF_K, 2, 0, 0, -8},
        {BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_map_lookup_elem},
        {BPF_JMP | BPF_JNE | BPF_K, 0, 0, 2, 0},                   /* found: skip 2 */
        {BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, SK_PASS},
        {BPF_JMP | BPF_EXIT, 0, 0, 0, 0},
        {BPF_LDX | BPF_MEM | BPF_W, 3, 0, 0, 0},                    /* r3 = peer index */
        {BPF_ALU64 | BPF_MOV | BPF_X, 1, 6, 0, 0},
        {BPF_LD | BPF_DW | BPF_IMM, 2, BPF_PSEUDO_MAP_FD, 0, sockmap}, {0, 0, 0, 0, 0},
        {BPF_ALU64 | BPF_MOV | BPF_K, 4, 0, 0, 0},
        {BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_sk_redirect_map},
        {BPF_JMP | BPF_EXIT, 0, 0, 0, 0},
    };
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.prog_type = BPF_PROG_TYPE_SK_SKB;
    a.insns = (uint64_t)(uintptr_t)p;
    a.insn_cnt = sizeof p / sizeof p[0];
    a.license = (uint64_t)(uintptr_t) "GPL";
    a.log_buf = (uint64_t)(uintptr_t)vlog;
    a.log_size = sizeof vlog;
    a.log_level = 1;
    int fd = bpf(BPF_PROG_LOAD, &a);
    if (fd < 0) {
        fprintf(stderr, "prog load: %s\n%s\n", strerror(errno), vlog);
        exit(1);
    }
    return fd;
}

static int make_map(int type, int key, int value, int entries) {
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.map_type = type;
    a.key_size = key;
    a.value_size = value;
    a.max_entries = entries;
    int fd = bpf(BPF_MAP_CREATE, &a);
    if (fd < 0) {
        perror("map create");
        exit(1);
    }
    return fd;
}

static void map_put(int map, void *key, void *value) {
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.map_fd = map;
    a.key = (uint64_t)(uintptr_t)key;
    a.value = (uint64_t)(uintptr_t)value;
    if (bpf(BPF_MAP_UPDATE_ELEM, &a) < 0) {
        perror("map update");
        exit(1);
    }
}

static uint64_t cookie(int fd) {
    uint64_t c;
    socklen_t l = sizeof c;
    if (getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &l) < 0) {
        perror("SO_COOKIE");
        exit(1);
    }
    return c;
}

static char buf[65536];
int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: sockrelay PORT BACKEND_IP BACKEND_PORT pump|sockmap\n");
        return 2;
    }
    int kernel = strcmp(argv[4], "sockmap") == 0;
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (bind(l, (void *)&sa, sizeof sa) < 0 || listen(l, 64) < 0) {
        perror("listen");
        return 1;
    }
    struct sockaddr_in back = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    inet_pton(AF_INET, argv[2], &back.sin_addr);
    int ep = epoll_create1(0);
    if (kernel) {
        sockmap = make_map(BPF_MAP_TYPE_SOCKMAP, 4, 4, 2 * MAXC);
        cookies = make_map(BPF_MAP_TYPE_HASH, 8, 4, 2 * MAXC);
        int prog = load_prog();
        union bpf_attr a;
        memset(&a, 0, sizeof a);
        a.target_fd = sockmap;
        a.attach_bpf_fd = prog;
        a.attach_type = BPF_SK_SKB_VERDICT;
        if (bpf(BPF_PROG_ATTACH, &a) < 0) {
            perror("attach");
            return 1;
        }
    }
    int peer[1024];
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.fd = l;
    epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
    int n = 0;
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        struct epoll_event evs[64];
        int r = epoll_wait(ep, evs, 64, -1);
        for (int i = 0; i < r; i++) {
            int fd = evs[i].data.fd;
            if (fd == l) {
                int c = accept(l, NULL, NULL);
                int b = socket(AF_INET, SOCK_STREAM, 0);
                if (connect(b, (void *)&back, sizeof back) < 0) {
                    perror("connect");
                    return 1;
                }
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                if (kernel) {
                    uint32_t ic = 2 * n, ib = 2 * n + 1;
                    uint64_t cc = cookie(c), cb = cookie(b);
                    map_put(cookies, &cc, &ib);
                    map_put(cookies, &cb, &ic);
                    map_put(sockmap, &ic, &c);
                    map_put(sockmap, &ib, &b);
                    /* What came before the map held it was not seen by the program. */
                    for (int k = 0; k < 50; k++) { /* 5 ms: the first request's race */
                        ssize_t got = recv(c, buf, sizeof buf, MSG_DONTWAIT);
                        if (got > 0)
                            send(b, buf, (size_t)got, MSG_NOSIGNAL);
                        usleep(100);
                    }
                } else {
                    peer[c] = b;
                    peer[b] = c;
                    ev.events = EPOLLIN;
                    ev.data.fd = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                    ev.data.fd = b;
                    epoll_ctl(ep, EPOLL_CTL_ADD, b, &ev);
                }
                n++;
                continue;
            }
            ssize_t got = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
            if (got <= 0) {
                if (got < 0 && errno == EAGAIN)
                    continue;
                close(peer[fd]);
                close(fd);
                continue;
            }
            if (send(peer[fd], buf, (size_t)got, MSG_NOSIGNAL) != got)
                return 1; /* experiment: blocking send, small messages */
        }
    }
}
