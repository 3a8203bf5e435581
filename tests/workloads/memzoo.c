/*
 * memzoo: a process tree holding random memory in every kind of mapping CRIU
 * restores, for checkpoint/restore correctness tests and benchmarks.
 *
 *   memzoo DIR TOTAL_MIB [THREADS] [CHILDREN]
 *
 * Sets itself up (setsid, stdio on /dev/null), fills its regions with fresh
 * random data, forks CHILDREN children that share part of its memory
 * copy-on-write, starts THREADS threads, then writes DIR/ready-ROLE for every
 * process and sleeps. On SIGUSR1 (send it to the process group) every process
 * copies /proc/self/smaps to DIR/smaps-ROLE.txt, then checksums its regions
 * into DIR/report-ROLE.json (written to a temporary name, then renamed).
 * ROLE is "parent" or "childN". Roles, not pids, name the files, so a test
 * can compare the same process before a dump and after a restore.
 *
 * Regions are listed with a name, address range, and a 64-bit hash of the
 * whole range plus one per 2 MiB chunk (to show where two runs differ).
 * PROT_NONE ranges are read through /proc/self/mem, which may read them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define MiB (1UL << 20)
#define HPAGE (2 * MiB)
#define CHUNK (2 * MiB)
#define MAX_REGIONS 128

struct region {
	const char *name;
	char *start;
	size_t len;
	int via_mem; /* PROT_NONE: read through /proc/self/mem */
};

static struct region regions[MAX_REGIONS];
static int nr_regions;
static const char *dir;
static char role[32] = "parent";
static long page;
static volatile sig_atomic_t report_wanted;
/* where PROT_NONE data is read to; touched at start so that reports do not change memory use */
static char mem[CHUNK];

static void die(const char *what)
{
	fprintf(stderr, "memzoo %s: %s: %s\n", role, what, strerror(errno));
	exit(1);
}

static void add_region(const char *name, void *start, size_t len, int via_mem)
{
	if (nr_regions == MAX_REGIONS) {
		errno = ENOSPC;
		die("too many regions");
	}
	regions[nr_regions++] = (struct region){ name, start, len, via_mem };
}

/* xorshift64* seeded from the kernel: fast, and different on every run */
static __thread uint64_t rng_state;

static void seed(void)
{
	if (getrandom(&rng_state, sizeof(rng_state), 0) != sizeof(rng_state))
		die("getrandom");
	rng_state |= 1;
}

static uint64_t rnd(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545F4914F6CDD1DULL;
}

static void fill(void *p, size_t len)
{
	uint64_t *w = p;
	size_t i;

	for (i = 0; i < len / 8; i++)
		w[i] = rnd();
}

static void *map(size_t len, int prot, int flags, int fd, off_t off)
{
	void *p = mmap(NULL, len, prot, flags, fd, off);

	if (p == MAP_FAILED)
		die("mmap");
	return p;
}

/* An anonymous private area of len bytes starting at a huge page boundary plus skew. */
static char *map_aligned(size_t len, size_t skew)
{
	char *raw = map(len + 2 * HPAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *p = (char *)(((uintptr_t)raw + HPAGE - 1) & ~(HPAGE - 1)) + skew;

	if (p > raw)
		munmap(raw, p - raw);
	munmap(p + len, raw + len + 2 * HPAGE - (p + len));
	return p;
}

static void madv(void *p, size_t len, int advice)
{
	if (madvise(p, len, advice))
		die("madvise");
}

/* Dense, every page written. */
static char *dense(const char *name, size_t len, size_t skew, int advice)
{
	char *p = map_aligned(len, skew);

	if (advice >= 0)
		madv(p, len, advice);
	fill(p, len);
	add_region(name, p, len, 0);
	return p;
}

/*
 * Holes, zero pages and partly written huge-page blocks: per 2 MiB block,
 * written / every other page written / read only (zero page) / untouched.
 */
static void sparse(size_t len)
{
	char *p = map_aligned(len, 0);
	size_t b, off;
	volatile char sink;

	for (b = 0; b * HPAGE < len; b++) {
		char *blk = p + b * HPAGE;

		switch (b % 4) {
		case 0:
			fill(blk, HPAGE);
			break;
		case 1:
			for (off = 0; off < HPAGE; off += 2 * page)
				fill(blk + off, page);
			break;
		case 2:
			for (off = 0; off < HPAGE; off += page)
				sink = blk[off];
			break;
		}
	}
	(void)sink;
	add_region("anon_sparse", p, len, 0);
}

static int data_file(const char *name, size_t len)
{
	char path[4096];
	char *buf = malloc(MiB);
	size_t done;
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || !buf)
		die("data file");
	for (done = 0; done < len; done += MiB) {
		fill(buf, MiB);
		if (write(fd, buf, MiB) != (ssize_t)MiB)
			die("write data file");
	}
	free(buf);
	return fd;
}

static void setup_files(size_t T)
{
	size_t len = T / 25 & ~(MiB - 1), off;
	int fd = data_file("file-private.dat", len);
	char *p = map(len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	volatile char sink;

	/* copy-on-write every third page, read the rest */
	for (off = 0; off < len; off += page) {
		if ((off / page) % 3 == 0)
			fill(p + off, page);
		else
			sink = p[off];
	}
	(void)sink;
	close(fd);
	add_region("file_private_cow", p, len, 0);

	len = 8 * MiB;
	fd = data_file("file-shared.dat", len);
	p = map(len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	fill(p, len / 2);
	close(fd);
	add_region("file_shared", p, len, 0);
}

static void setup_shared(size_t T)
{
	size_t len = T / 25 & ~(MiB - 1);
	char *p;
	int fd;

	p = map(len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	fill(p, len);
	add_region("shared_anon", p, len, 0);

	fd = memfd_create("memzoo", 0);
	if (fd < 0 || ftruncate(fd, len + 8 * MiB))
		die("memfd");
	p = map(len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	fill(p, len);
	add_region("memfd_shared", p, len, 0);

	/* a private mapping of the same memfd's tail, partly copied on write */
	p = map(8 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, len);
	fill(p, 4 * MiB);
	add_region("memfd_private_cow", p, 8 * MiB, 0);
	close(fd);
}

static void setup_protections(size_t T)
{
	size_t len = (T / 40) & ~(HPAGE - 1);
	char *p;

	if (len < 6 * MiB)
		len = 6 * MiB;
	/* rw | r | rw: one area split in three by mprotect */
	p = dense("mprotect_split", len, 0, -1);
	if (mprotect(p + 2 * MiB, 2 * MiB, PROT_READ))
		die("mprotect");

	p = dense("read_only", 4 * MiB, 0, -1);
	if (mprotect(p, 4 * MiB, PROT_READ))
		die("mprotect");

	/* guard pages: PROT_NONE and never written, at the start and in the middle */
	p = map_aligned(len, 0);
	if (mprotect(p, page, PROT_NONE) || mprotect(p + 3 * MiB, 4 * page, PROT_NONE))
		die("mprotect guard");
	fill(p + page, 3 * MiB - page);
	fill(p + 3 * MiB + 4 * page, len - 3 * MiB - 4 * page);
	add_region("guarded", p, len, 1);

	/* data that became inaccessible: CRIU must still carry it */
	p = dense("prot_none_data", 4 * MiB, 0, -1);
	if (mprotect(p, 4 * MiB, PROT_NONE))
		die("mprotect none");
	regions[nr_regions - 1].via_mem = 1;

	/* advice CRIU records and restores */
	dense("madv_random", 4 * MiB, 0, MADV_RANDOM);
	dense("madv_sequential", 4 * MiB, 0, MADV_SEQUENTIAL);
	dense("madv_dontdump", 4 * MiB, 0, MADV_DONTDUMP);
	dense("madv_dontfork", 4 * MiB, 0, MADV_DONTFORK);
}

static void setup_anon(size_t T)
{
	char *p;
	size_t len;

	dense("anon_dense", (T * 2 / 5) & ~(HPAGE - 1), 0, -1);
	dense("anon_unaligned", ((T / 20) & ~(HPAGE - 1)) + 3 * page, 5 * page, -1);
	sparse((T / 10) & ~(HPAGE - 1));
	dense("anon_thp", (T / 8) & ~(HPAGE - 1), 0, MADV_HUGEPAGE);
	dense("anon_nothp", (T / 25) & ~(HPAGE - 1), 0, MADV_NOHUGEPAGE);

	/*
	 * THP-advised, then every third huge page punched out whole: not dense,
	 * so the restore must fill it as stock does. (Holes inside a block would
	 * let khugepaged collapse it again at any time, so the test could not
	 * tell its work from the restore's; anon_sparse has those, unadvised.)
	 */
	len = (T / 25) & ~(HPAGE - 1);
	p = dense("anon_thp_holes", len, 0, MADV_HUGEPAGE);
	for (size_t off = 0; off < len; off += 3 * HPAGE)
		madv(p + off, HPAGE, MADV_DONTNEED);

	/* two touching areas, only the second advised: they must stay two */
	len = 8 * MiB;
	p = dense("neighbour_plain", 2 * len, 0, -1);
	madv(p + len, len, MADV_HUGEPAGE);
	regions[nr_regions - 1].len = len;
	add_region("neighbour_thp", p + len, len, 0);
}

/* brk heap: many small allocations, one after the other */
static void setup_heap(size_t T)
{
	size_t total = T / 30, done, sz = 64 * 1024 - 64;
	char *first = NULL, *end = NULL;

	for (done = 0; done < total; done += 64 * 1024) {
		char *p = malloc(sz);

		if (!p)
			die("malloc");
		fill(p, sz);
		if (!first)
			first = p;
		if (p + sz > end)
			end = p + sz;
	}
	add_region("heap", first, end - first, 0);
}

static pthread_mutex_t regions_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_barrier_t threads_ready;
static size_t thread_arena;

static void *thread_main(void *a)
{
	static char names[64][2][32];
	char stackbuf[256 * 1024] __attribute__((aligned(64)));
	int idx = (int)(intptr_t)a;
	char *heap = malloc(thread_arena);

	if (!heap)
		die("thread malloc");
	seed();
	fill(stackbuf, sizeof(stackbuf));
	fill(heap, thread_arena);
	snprintf(names[idx][0], 32, "thread%d_stack", idx);
	snprintf(names[idx][1], 32, "thread%d_arena", idx);
	pthread_mutex_lock(&regions_lock);
	add_region(names[idx][0], stackbuf, sizeof(stackbuf), 0);
	add_region(names[idx][1], heap, thread_arena, 0);
	pthread_mutex_unlock(&regions_lock);
	pthread_barrier_wait(&threads_ready);
	for (;;)
		pause();
	return NULL;
}

static void start_threads(int n, size_t T)
{
	pthread_t t;
	int i;

	if (n > 64)
		n = 64;
	thread_arena = (T / 200) & ~(page - 1);
	pthread_barrier_init(&threads_ready, NULL, n + 1);
	for (i = 0; i < n; i++)
		if (pthread_create(&t, NULL, thread_main, (void *)(intptr_t)i))
			die("pthread_create");
	pthread_barrier_wait(&threads_ready);
}

static uint64_t hash_buf(const void *p, size_t len, uint64_t h)
{
	const uint64_t *w = p;
	size_t i;

	for (i = 0; i < len / 8; i++)
		h = (h ^ w[i]) * 0x100000001b3ULL;
	for (i = len & ~7UL; i < len; i++)
		h = (h ^ ((const unsigned char *)p)[i]) * 0x100000001b3ULL;
	return h;
}

static void write_report(void)
{
	char path[4096], tmp[4200], buf[65536];
	FILE *f;
	int in, out, memfd;
	ssize_t n;

	/* smaps first: checksumming shared memory faults it in */
	snprintf(path, sizeof(path), "%s/smaps-%s.txt", dir, role);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	in = open("/proc/self/smaps", O_RDONLY);
	out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (in < 0 || out < 0)
		die("smaps copy");
	while ((n = read(in, buf, sizeof(buf))) > 0)
		if (write(out, buf, n) != n)
			die("smaps write");
	close(in);
	close(out);
	rename(tmp, path);

	memfd = open("/proc/self/mem", O_RDONLY);
	snprintf(path, sizeof(path), "%s/report-%s.json", dir, role);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "w");
	if (!f || memfd < 0)
		die("report");
	fprintf(f, "{\"role\": \"%s\", \"pid\": %d, \"regions\": [", role, getpid());
	for (int r = 0; r < nr_regions; r++) {
		struct region *g = &regions[r];
		uint64_t whole = 0xcbf29ce484222325ULL;

		fprintf(f, "%s\n {\"name\": \"%s\", \"start\": %lu, \"end\": %lu, \"chunks\": [", r ? "," : "", g->name,
			(unsigned long)g->start, (unsigned long)(g->start + g->len));
		for (size_t off = 0; off < g->len; off += CHUNK) {
			size_t len = g->len - off < CHUNK ? g->len - off : CHUNK;
			const char *src = g->start + off;
			uint64_t h;

			if (g->via_mem) {
				if (pread(memfd, mem, len, (off_t)(uintptr_t)src) != (ssize_t)len)
					die("read /proc/self/mem");
				src = mem;
			}
			h = hash_buf(src, len, 0xcbf29ce484222325ULL);
			whole = (whole ^ h) * 0x100000001b3ULL;
			fprintf(f, "%s\"%016llx\"", off ? ", " : "", (unsigned long long)h);
		}
		fprintf(f, "], \"hash\": \"%016llx\"}", (unsigned long long)whole);
	}
	fprintf(f, "\n]}\n");
	fclose(f);
	close(memfd);
	rename(tmp, path);
}

static void on_usr1(int sig)
{
	(void)sig;
	report_wanted = 1;
}

static void mark_ready(void)
{
	char path[4096];
	int fd;

	snprintf(path, sizeof(path), "%s/ready-%s", dir, role);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		die("ready");
	close(fd);
}

static void serve(void)
{
	sigset_t usr1, old;

	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	mark_ready();
	for (;;) {
		sigprocmask(SIG_BLOCK, &usr1, &old);
		while (!report_wanted)
			sigsuspend(&old);
		report_wanted = 0;
		sigprocmask(SIG_SETMASK, &old, NULL);
		write_report();
	}
}

int main(int argc, char **argv)
{
	size_t T;
	int threads, children, i, null;
	char *cow;
	size_t cow_len;

	if (argc < 3) {
		fprintf(stderr, "usage: memzoo DIR TOTAL_MIB [THREADS] [CHILDREN]\n");
		return 2;
	}
	dir = argv[1];
	T = strtoul(argv[2], NULL, 0) * MiB;
	threads = argc > 3 ? atoi(argv[3]) : 8;
	children = argc > 4 ? atoi(argv[4]) : 2;
	page = sysconf(_SC_PAGESIZE);
	seed();
	memset(mem, 1, sizeof(mem));

	setsid();
	null = open("/dev/null", O_RDWR);
	signal(SIGUSR1, on_usr1);

	/*
	 * Memory shared copy-on-write with the children comes first: what the
	 * parent maps after the fork is its own (CRIU restores the two kinds on
	 * different paths). Each child then rewrites its own eighth.
	 */
	cow_len = (T / 16) & ~(HPAGE - 1);
	cow = dense("cow_tree", cow_len, 0, -1);
	fflush(NULL);
	for (i = 0; i < children; i++) {
		pid_t pid = fork();

		if (pid < 0)
			die("fork");
		if (pid == 0) {
			snprintf(role, sizeof(role), "child%d", i);
			seed();
			fill(cow + (i + 1) * (cow_len / 8), cow_len / 8);
			/*
			 * On the brk heap, not a new mapping: CRIU pairs the
			 * parent's and the child's areas for copy-on-write by
			 * walking both lists in step, and a new area right
			 * below cow_tree would make it miss that pair.
			 */
			setup_heap(T * 3 / 5);
			dup2(null, 0);
			dup2(null, 1);
			dup2(null, 2);
			serve();
		}
	}
	fill(cow, cow_len / 8);

	setup_anon(T);
	setup_protections(T);
	setup_files(T);
	setup_shared(T);
	setup_heap(T);

	start_threads(threads, T);
	dup2(null, 0);
	dup2(null, 1);
	dup2(null, 2);
	serve();
	return 0;
}
