/*
 * gatewriter: the final gate's real initiator (libiscsi).
 *
 *   gatewriter write URL [--run-id N] [--blocks N] [--depth N] [--fua] [--sync-every K]
 *                        [--count N] [--reconnect-timeout S] [--io-timeout S] [--seed N]
 *   gatewriter verify URL [--blocks N]
 *
 * write: logs in to URL (libiscsi follows a "target moved temporarily" login redirect by itself),
 * then keeps DEPTH writes in flight (the async API), each a whole 4 KiB block chosen at random among
 * the first BLOCKS blocks, never two in flight to one block. A block's content is a 40-byte record
 * (magic "SPRGATE1", block number, write counter, run id, FNV-1a-64 of those 32 bytes; all u64
 * little-endian) repeated 102 times, then 16 bytes of 0xA5. The counter grows by one per write
 * issued, across reconnects. stdout, one line per event, flushed at once:
 *
 *   I <blocks> <block_length>       logged in (first time), volume geometry
 *   A <block> <counter> <fua> <t>    the write was acknowledged GOOD (fua 1: durable at its ack) at
 *                                    wall-clock time t (CLOCK_REALTIME seconds, the clock of the
 *                                    daemons' log timestamps)
 *   F <n>                            SYNCHRONIZE CACHE GOOD: the first n acknowledged writes are durable
 *   X <block> <counter>              the write was sent but not acknowledged (lost connection, error):
 *                                    its content may or may not be on the block
 *   R <n> <seconds>                  reconnected (the n-th time) after <seconds> without a session
 *   E <text>                         a diagnostic (SCSI error, connection loss)
 *   D <acked> <failed>               stopped (after --count acknowledged writes, or SIGTERM/SIGINT)
 *
 * A write that was not acknowledged is issued again to the same block with a new counter. On a
 * connection loss (or no answer for --io-timeout seconds) the session is dropped and a new one is
 * logged in, retried until --reconnect-timeout seconds have passed without one (then exit 2).
 *
 * verify: reads the first BLOCKS blocks and prints one line each:
 *   V <block> <counter> <run_id> | V <block> zero | V <block> bad
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#define BLOCK 4096
#define RECORD 40
#define RECORDS (BLOCK / RECORD)
#define PAD 0xA5
#define MAX_DEPTH 256
static const char MAGIC[8] = {'S', 'P', 'R', 'G', 'A', 'T', 'E', '1'};

static volatile sig_atomic_t stop_requested;
static void on_stop(int sig) { (void)sig; stop_requested = 1; }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double wall_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *detail) {
    fprintf(stderr, "gatewriter: %s: %s\n", what, detail ? detail : "");
    fflush(stdout);
    exit(2);
}

static uint64_t fnv1a64(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static void put64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void encode_block(unsigned char *buf, uint64_t block, uint64_t counter, uint64_t run_id) {
    unsigned char rec[RECORD];
    memcpy(rec, MAGIC, 8);
    put64(rec + 8, block);
    put64(rec + 16, counter);
    put64(rec + 24, run_id);
    put64(rec + 32, fnv1a64(rec, 32));
    for (int i = 0; i < RECORDS; i++) memcpy(buf + i * RECORD, rec, RECORD);
    memset(buf + RECORDS * RECORD, PAD, BLOCK - RECORDS * RECORD);
}

/* 1: valid (out params set), 0: all zeros, -1: bad. */
static int decode_block(const unsigned char *buf, uint64_t block, uint64_t *counter, uint64_t *run_id) {
    int zero = 1;
    for (int i = 0; i < BLOCK; i++)
        if (buf[i]) { zero = 0; break; }
    if (zero) return 0;
    if (memcmp(buf, MAGIC, 8) != 0 || get64(buf + 32) != fnv1a64(buf, 32) || get64(buf + 8) != block)
        return -1;
    for (int i = 1; i < RECORDS; i++)
        if (memcmp(buf, buf + i * RECORD, RECORD) != 0) return -1;
    for (int i = RECORDS * RECORD; i < BLOCK; i++)
        if (buf[i] != PAD) return -1;
    *counter = get64(buf + 16);
    *run_id = get64(buf + 24);
    return 1;
}

/* -- options ------------------------------------------------------------------------------------ */

struct opts {
    const char *mode, *url;
    uint64_t run_id, blocks, count, seed;
    int depth, fua, sync_every;
    double reconnect_timeout, io_timeout;
};

static void usage(void) {
    fprintf(stderr,
            "usage: gatewriter write URL [--run-id N] [--blocks N] [--depth N] [--fua] [--sync-every K]\n"
            "                            [--count N] [--reconnect-timeout S] [--io-timeout S] [--seed N]\n"
            "       gatewriter verify URL [--blocks N]\n");
    exit(2);
}

static struct opts parse(int argc, char **argv) {
    struct opts o = {0};
    o.run_id = 1; o.blocks = 0; o.count = 0; o.seed = (uint64_t)getpid();
    o.depth = 1; o.reconnect_timeout = 30; o.io_timeout = 15;
    static const struct option longs[] = {
        {"run-id", required_argument, 0, 'r'}, {"blocks", required_argument, 0, 'b'},
        {"depth", required_argument, 0, 'd'},  {"fua", no_argument, 0, 'f'},
        {"sync-every", required_argument, 0, 's'}, {"count", required_argument, 0, 'c'},
        {"reconnect-timeout", required_argument, 0, 't'}, {"io-timeout", required_argument, 0, 'i'},
        {"seed", required_argument, 0, 'S'}, {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        switch (c) {
        case 'r': o.run_id = strtoull(optarg, NULL, 0); break;
        case 'b': o.blocks = strtoull(optarg, NULL, 0); break;
        case 'd': o.depth = atoi(optarg); break;
        case 'f': o.fua = 1; break;
        case 's': o.sync_every = atoi(optarg); break;
        case 'c': o.count = strtoull(optarg, NULL, 0); break;
        case 't': o.reconnect_timeout = atof(optarg); break;
        case 'i': o.io_timeout = atof(optarg); break;
        case 'S': o.seed = strtoull(optarg, NULL, 0); break;
        default: usage();
        }
    }
    if (argc - optind != 2) usage();
    o.mode = argv[optind];
    o.url = argv[optind + 1];
    if (o.depth < 1 || o.depth > MAX_DEPTH) die("--depth", "must be 1..256");
    if (o.sync_every < 0) die("--sync-every", "must be >= 0");
    return o;
}

/* -- sessions ------------------------------------------------------------------------------------ */

static struct iscsi_context *login(const char *url_text, int *lun, char *err, size_t errlen) {
    struct iscsi_context *iscsi = iscsi_create_context("iqn.2026-11.io.sparrow:gatewriter");
    if (iscsi == NULL) { snprintf(err, errlen, "iscsi_create_context failed"); return NULL; }
    struct iscsi_url *url = iscsi_parse_full_url(iscsi, url_text);
    if (url == NULL) die("bad URL", iscsi_get_error(iscsi));
    iscsi_set_session_type(iscsi, ISCSI_SESSION_NORMAL);
    iscsi_set_header_digest(iscsi, ISCSI_HEADER_DIGEST_NONE_CRC32C);
    iscsi_set_targetname(iscsi, url->target);
    if (url->user[0]) iscsi_set_initiator_username_pwd(iscsi, url->user, url->passwd);
    iscsi_set_noautoreconnect(iscsi, 1);
    iscsi_set_timeout(iscsi, 5);  /* the login itself */
    *lun = url->lun;
    if (iscsi_full_connect_sync(iscsi, url->portal, url->lun) != 0) {
        snprintf(err, errlen, "%s", iscsi_get_error(iscsi));
        iscsi_destroy_url(url);
        iscsi_destroy_context(iscsi);
        return NULL;
    }
    iscsi_destroy_url(url);
    iscsi_set_timeout(iscsi, 0);  /* commands: our own --io-timeout */
    return iscsi;
}

/* Log in, retrying until `timeout` seconds pass. NULL only when stopping. */
static struct iscsi_context *login_retrying(const char *url, int *lun, double timeout) {
    double start = now_s();
    char err[512] = "";
    for (;;) {
        struct iscsi_context *iscsi = login(url, lun, err, sizeof err);
        if (iscsi != NULL) return iscsi;
        if (stop_requested) return NULL;
        if (now_s() - start > timeout) die("no session within --reconnect-timeout", err);
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

static void read_capacity(struct iscsi_context *iscsi, int lun, uint64_t *nbytes, uint32_t *block_length) {
    struct scsi_task *task = iscsi_readcapacity16_sync(iscsi, lun);
    if (task == NULL || task->status != SCSI_STATUS_GOOD) die("READ CAPACITY(16)", iscsi_get_error(iscsi));
    struct scsi_readcapacity16 *rc = scsi_datain_unmarshall(task);
    if (rc == NULL) die("READ CAPACITY(16)", "cannot unmarshall");
    *block_length = rc->block_length;
    *nbytes = (rc->returned_lba + 1) * (uint64_t)rc->block_length;
    scsi_free_scsi_task(task);
    if (*block_length == 0 || BLOCK % *block_length != 0) die("block length", "does not divide 4096");
}

/* -- write mode ---------------------------------------------------------------------------------- */

enum slot_state { FREE, INFLIGHT, RETRY };

struct slot {
    enum slot_state state;
    uint64_t block, counter;
    int fua;
    unsigned gen;  /* the session it was issued on */
    unsigned char *buf;
};

static struct {
    struct opts o;
    struct iscsi_context *iscsi;
    int lun;
    unsigned gen;
    uint32_t block_length;
    uint64_t blocks, counter, acked, failed;
    struct slot slots[MAX_DEPTH];
    unsigned char *busy;  /* per block: a write to it is in flight */
    int sync_inflight;
    uint64_t acked_at_last_sync;
    double last_progress;
    int lost;  /* the session is gone: drop it and log in again */
    double retry_after;  /* after a SCSI error, writes are issued again from this time on */
} W;

static uint64_t rng_state;
static uint64_t rng(void) {  /* xorshift64* */
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static void write_cb(struct iscsi_context *iscsi, int status, void *command_data, void *private_data) {
    (void)iscsi;
    struct slot *s = private_data;
    struct scsi_task *task = command_data;
    if (s->state != INFLIGHT || s->gen != W.gen) {  /* a dead session's leftovers */
        if (task) scsi_free_scsi_task(task);
        return;
    }
    W.last_progress = now_s();
    if (status == SCSI_STATUS_GOOD) {
        printf("A %llu %llu %d %.6f\n", (unsigned long long)s->block, (unsigned long long)s->counter, s->fua,
               wall_s());
        W.acked++;
        W.busy[s->block] = 0;
        s->state = FREE;
    } else {
        printf("X %llu %llu\n", (unsigned long long)s->block, (unsigned long long)s->counter);
        if (status == SCSI_STATUS_CHECK_CONDITION && task)
            printf("E write %llu: check condition %s (0x%x) ascq 0x%04x\n", (unsigned long long)s->block,
                   scsi_sense_key_str(task->sense.key), task->sense.key, task->sense.ascq);
        else
            printf("E write %llu: status 0x%x %s\n", (unsigned long long)s->block, status,
                   iscsi_get_error(iscsi));
        W.failed++;
        s->state = RETRY;  /* the same block again, with a new counter */
        W.retry_after = now_s() + 0.05;
        if (status == SCSI_STATUS_CANCELLED || status == SCSI_STATUS_ERROR || status == SCSI_STATUS_TIMEOUT)
            W.lost = 1;
    }
    fflush(stdout);
    if (task) scsi_free_scsi_task(task);
}

static void sync_cb(struct iscsi_context *iscsi, int status, void *command_data, void *private_data) {
    (void)iscsi;
    uintptr_t gen_acked = (uintptr_t)private_data;  /* acked count at issue */
    struct scsi_task *task = command_data;
    if (W.sync_inflight && status == SCSI_STATUS_GOOD) {
        printf("F %llu\n", (unsigned long long)gen_acked);
        fflush(stdout);
    } else if (W.sync_inflight) {
        if (status == SCSI_STATUS_CHECK_CONDITION && task)
            printf("E synchronize cache: check condition %s (0x%x) ascq 0x%04x\n",
                   scsi_sense_key_str(task->sense.key), task->sense.key, task->sense.ascq);
        else
            printf("E synchronize cache: status 0x%x\n", status);
        fflush(stdout);
    }
    W.sync_inflight = 0;
    W.last_progress = now_s();
    if (task) scsi_free_scsi_task(task);
}

static void issue(struct slot *s) {
    s->counter = ++W.counter;
    s->fua = W.o.fua;
    s->gen = W.gen;
    encode_block(s->buf, s->block, s->counter, W.o.run_id);
    s->state = INFLIGHT;
    uint32_t per = BLOCK / W.block_length;
    if (iscsi_write16_task(W.iscsi, W.lun, s->block * per, s->buf, BLOCK, (int)W.block_length, 0, 0, s->fua, 0, 0,
                           write_cb, s) == NULL) {
        /* not sent at all: nothing of it can be on the block */
        s->state = RETRY;
        s->counter = 0;
        W.lost = 1;
    }
}

static int inflight_count(void) {
    int n = 0;
    for (int i = 0; i < W.o.depth; i++) n += W.slots[i].state == INFLIGHT;
    return n;
}

static int want_more(void) {
    if (stop_requested) return 0;
    return W.o.count == 0 || W.acked + (uint64_t)inflight_count() < W.o.count;
}

static void fill(void) {
    for (int i = 0; i < W.o.depth && !W.lost; i++) {
        struct slot *s = &W.slots[i];
        if (s->state == RETRY) {
            if (now_s() < W.retry_after && !stop_requested) continue;
            if (stop_requested) {
                W.busy[s->block] = 0;
                s->state = FREE;
            } else {
                issue(s);
            }
        } else if (s->state == FREE && want_more()) {
            uint64_t b;
            do b = rng() % W.blocks; while (W.busy[b]);
            W.busy[b] = 1;
            s->block = b;
            issue(s);
        }
    }
    if (W.o.sync_every && !W.sync_inflight && !W.lost && !stop_requested &&
        W.acked - W.acked_at_last_sync >= (uint64_t)W.o.sync_every) {
        W.acked_at_last_sync = W.acked;
        W.sync_inflight = 1;
        if (iscsi_synchronizecache10_task(W.iscsi, W.lun, 0, 0, 0, 0, sync_cb, (void *)(uintptr_t)W.acked) == NULL)
            W.lost = 1;
    }
}

/* The session is gone: every write in flight on it is unacknowledged (X), to be issued again. */
static void drop_session(const char *why) {
    printf("E session lost: %s\n", why);
    for (int i = 0; i < W.o.depth; i++) {
        struct slot *s = &W.slots[i];
        if (s->state == INFLIGHT) {
            printf("X %llu %llu\n", (unsigned long long)s->block, (unsigned long long)s->counter);
            W.failed++;
            s->state = RETRY;
        }
    }
    fflush(stdout);
    W.sync_inflight = 0;
    W.gen++;  /* callbacks from the old session are ignored from here on */
    iscsi_destroy_context(W.iscsi);
    W.iscsi = NULL;
    W.lost = 0;
}

static int write_mode(struct opts o) {
    W.o = o;
    rng_state = o.seed ? o.seed : 88172645463325252ULL;
    for (int i = 0; i < o.depth; i++) {
        if (posix_memalign((void **)&W.slots[i].buf, 4096, BLOCK) != 0) die("memory", "");
        W.slots[i].state = FREE;
    }
    W.iscsi = login_retrying(o.url, &W.lun, o.reconnect_timeout);
    if (W.iscsi == NULL) { printf("D 0 0\n"); return 0; }
    uint64_t nbytes;
    read_capacity(W.iscsi, W.lun, &nbytes, &W.block_length);
    W.blocks = nbytes / BLOCK;
    if (o.blocks) {
        if (o.blocks > W.blocks) die("--blocks", "larger than the volume");
        W.blocks = o.blocks;
    }
    if (W.blocks < (uint64_t)o.depth) die("--depth", "more than --blocks");
    W.busy = calloc(W.blocks, 1);
    printf("I %llu %u\n", (unsigned long long)W.blocks, W.block_length);
    fflush(stdout);
    W.last_progress = now_s();
    unsigned reconnects = 0;
    for (;;) {
        if (W.iscsi == NULL) {
            double lost_at = now_s();
            if (stop_requested) break;
            W.iscsi = login_retrying(o.url, &W.lun, o.reconnect_timeout);
            if (W.iscsi == NULL) break;
            printf("R %u %.3f\n", ++reconnects, now_s() - lost_at);
            fflush(stdout);
            W.last_progress = now_s();
        }
        fill();
        if (W.lost) { drop_session(iscsi_get_error(W.iscsi)); continue; }
        int pending = inflight_count() + W.sync_inflight;
        if (pending == 0 && !want_more()) break;
        struct pollfd pfd = {iscsi_get_fd(W.iscsi), (short)iscsi_which_events(W.iscsi), 0};
        int rc = poll(&pfd, 1, 100);
        if (rc < 0 && errno != EINTR) die("poll", strerror(errno));
        if (iscsi_service(W.iscsi, rc > 0 ? pfd.revents : 0) < 0) W.lost = 1;
        if (!W.lost && pending && now_s() - W.last_progress > o.io_timeout) {
            printf("E no answer for %.1f s\n", o.io_timeout);
            W.lost = 1;
        }
        if (W.lost) drop_session(iscsi_get_error(W.iscsi));
        if (stop_requested && inflight_count() + W.sync_inflight == 0) break;
    }
    for (int i = 0; i < o.depth; i++)  /* stopped with writes unanswered */
        if (W.slots[i].state == INFLIGHT)
            printf("X %llu %llu\n", (unsigned long long)W.slots[i].block, (unsigned long long)W.slots[i].counter);
    printf("D %llu %llu\n", (unsigned long long)W.acked, (unsigned long long)W.failed);
    fflush(stdout);
    if (W.iscsi) {
        iscsi_logout_sync(W.iscsi);
        iscsi_destroy_context(W.iscsi);
    }
    return 0;
}

/* -- verify mode --------------------------------------------------------------------------------- */

static int verify_mode(struct opts o) {
    int lun;
    char err[512];
    struct iscsi_context *iscsi = login(o.url, &lun, err, sizeof err);
    if (iscsi == NULL) die("login", err);
    uint64_t nbytes;
    uint32_t block_length;
    read_capacity(iscsi, lun, &nbytes, &block_length);
    uint64_t blocks = o.blocks ? o.blocks : nbytes / BLOCK;
    uint32_t per = BLOCK / block_length;
    const uint64_t chunk = 256;  /* blocks per READ(16): 1 MiB */
    for (uint64_t first = 0; first < blocks; first += chunk) {
        uint64_t n = blocks - first < chunk ? blocks - first : chunk;
        struct scsi_task *task = iscsi_read16_sync(iscsi, lun, first * per, (uint32_t)(n * BLOCK),
                                                   (int)block_length, 0, 0, 0, 0, 0);
        if (task == NULL || task->status != SCSI_STATUS_GOOD || task->datain.size != (int)(n * BLOCK))
            die("READ(16)", iscsi_get_error(iscsi));
        for (uint64_t i = 0; i < n; i++) {
            uint64_t counter, run_id;
            int r = decode_block(task->datain.data + i * BLOCK, first + i, &counter, &run_id);
            if (r > 0)
                printf("V %llu %llu %llu\n", (unsigned long long)(first + i), (unsigned long long)counter,
                       (unsigned long long)run_id);
            else
                printf("V %llu %s\n", (unsigned long long)(first + i), r == 0 ? "zero" : "bad");
        }
        scsi_free_scsi_task(task);
    }
    fflush(stdout);
    iscsi_logout_sync(iscsi);
    iscsi_destroy_context(iscsi);
    return 0;
}

int main(int argc, char **argv) {
    struct opts o = parse(argc, argv);
    struct sigaction sa = {0};
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (strcmp(o.mode, "write") == 0) return write_mode(o);
    if (strcmp(o.mode, "verify") == 0) return verify_mode(o);
    usage();
    return 2;
}
