/*
 * A shell-free test app for tests/test_shellfree.py, built static so the chroot needs nothing
 * else: listen on 127.0.0.1:PORT, print "ready", accept connections and hold each until its
 * client closes, print "bye" and exit 0 on SIGTERM. Also reports its parent pid (1 when the
 * process that started it is PID 1 of the namespace).
 *
 *     holdport PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CLIENTS 64

static volatile sig_atomic_t stop;

static void on_term(int signo)
{
    (void)signo;
    stop = 1;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: holdport PORT\n");
        return 2;
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_term; /* no SA_RESTART: poll(2) returns EINTR */
    sigaction(SIGTERM, &sa, NULL);

    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(listener, 16) < 0) {
        perror("holdport: bind/listen");
        return 1;
    }
    printf("ready ppid=%d\n", (int)getppid());
    fflush(stdout);

    struct pollfd fds[1 + MAX_CLIENTS];
    int count = 1;
    fds[0].fd = listener;
    fds[0].events = POLLIN;
    while (!stop) {
        if (poll(fds, (nfds_t)count, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        if ((fds[0].revents & POLLIN) && count < 1 + MAX_CLIENTS) {
            int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
            if (client >= 0) {
                fds[count].fd = client;
                fds[count].events = POLLIN;
                count++;
            }
        }
        for (int i = count - 1; i >= 1; i--) {
            if (!fds[i].revents)
                continue;
            char buf[256];
            if (read(fds[i].fd, buf, sizeof(buf)) <= 0) { /* the client left */
                close(fds[i].fd);
                fds[i] = fds[--count];
            }
        }
    }
    printf("bye\n");
    fflush(stdout);
    return 0;
}
