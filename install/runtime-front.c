/*
 * thaw-runtime's front: the binary containerd's runc shim runs as its runtime (BinaryName).
 *
 * Most runtime calls are passthrough: thaw hands them, argv unchanged, to the next runtime
 * (runc). Doing that from Python costs an interpreter start per call (three per container), so
 * this small program makes the passthrough decision first and, when it is certain, execs the
 * next runtime itself. Whenever it is not certain -- an annotation that may ask for thaw, a
 * container thaw has a record of, a config it cannot read, any error at all -- it execs the
 * Python thaw-runtime (THAW_PYTHON_ENTRY) with argv unchanged, which decides as it always has.
 * So this program can make thaw do less than the Python runtime would only by a bug in the few
 * checks below; it never restores, never writes thaw's state, never parses JSON or YAML.
 *
 * It decides exactly as shim/entry/runtime.py's main() does (keep the two in step):
 *   - argv is parsed as oci/runc_args.py parses it (Go flag rules, the same flag tables);
 *     anything it does not understand goes to Python;
 *   - `create ID`: the bundle's config.json (--bundle, else the working directory) read with
 *     O_NOFOLLOW, a regular file of at most SPEC_MAX bytes; passthrough only when its bytes do
 *     not contain "thaw.dev/snapshot" (runtime.py's _mentions_thaw; a sandbox's prefetch and
 *     auto-capture both need that annotation too);
 *   - `start ID` / `delete ID`: passthrough only when state_dir/containers/ID.json does not
 *     exist (a restored or recorded container) and, for delete, state_dir/prepare/ID.json does
 *     not either (a prefetch to cancel);
 *   - every other call (no id, other subcommands, --version) is passthrough.
 * The config's next_runtime and state_dir come from a file the Python runtime derives from the
 * YAML when it loads it (shim/node/config.py, _sync_front): CACHE_DIR/front.<escaped config path>,
 * valid only while it names the config file's current (mtime_ns, size, inode), root-owned and
 * not writable by others. No such file (a new or edited config, no config file at all): Python.
 *
 * Build: cc -O2 -static -DTHAW_PYTHON_ENTRY='"/abs/thaw-runtime-python"'
 *        [-DTHAW_EXTRA_PATH='"/abs/sbin"'] (install/node.sh, install/bundle.sh)
 * THAW_EXTRA_PATH mirrors the bundle's Python launcher, which appends its sbin to PATH.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef THAW_PYTHON_ENTRY
#error "build with -DTHAW_PYTHON_ENTRY='\"/path/to/thaw-runtime-python\"'"
#endif
#ifndef THAW_EXTRA_PATH
#define THAW_EXTRA_PATH ""
#endif

#define CONFIG_DEFAULT "/etc/thaw/config.yaml"           /* shim/node/config.py DEFAULT_PATH */
#define CACHE_DIR "/run/thaw/config-cache"                /* shim/node/config.py CACHE_DIR */
#define FRONT_MAGIC "thaw-runtime-front 1\n"              /* shim/node/config.py FRONT_MAGIC */
#define FRONT_MAX 8192
#define SPEC_MAX (4 << 20)
#define SNAPSHOT_KEY "thaw.dev/snapshot"
#define PATH_DEFAULT "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  /* config.which */
#define LAUNCHER_PATH_DEFAULT "/usr/sbin:/usr/bin:/sbin:/bin"  /* install/bundle.sh's launcher */

extern char **environ;

/* What the parse keeps: only what the decision and an error report need. */
struct call {
	const char *command;
	const char *bundle;        /* --bundle of create; NULL: the working directory */
	const char *id;            /* the first positional after the subcommand's flags */
	const char *log;           /* runc's --log: where a runtime reports errors */
	const char *log_format;
};

enum slot { SLOT_NONE, SLOT_LOG, SLOT_LOG_FORMAT, SLOT_BUNDLE };

struct flag {
	const char *name;          /* aliases are listed as flags of their own */
	int takes_value;
	enum slot slot;
};

/* oci/runc_args.py GLOBAL_FLAGS, COMMAND_FLAGS and their aliases. */
static const struct flag global_flags[] = {
	{"debug", 0, SLOT_NONE}, {"log", 1, SLOT_LOG}, {"log-format", 1, SLOT_LOG_FORMAT},
	{"root", 1, SLOT_NONE}, {"criu", 1, SLOT_NONE}, {"systemd-cgroup", 0, SLOT_NONE},
	{"rootless", 1, SLOT_NONE}, {"help", 0, SLOT_NONE}, {"version", 0, SLOT_NONE},
	{"h", 0, SLOT_NONE}, {"v", 0, SLOT_NONE}, {NULL, 0, SLOT_NONE},
};
static const struct flag create_flags[] = {
	{"bundle", 1, SLOT_BUNDLE}, {"b", 1, SLOT_BUNDLE}, {"console-socket", 1, SLOT_NONE},
	{"pidfd-socket", 1, SLOT_NONE}, {"pid-file", 1, SLOT_NONE}, {"no-pivot", 0, SLOT_NONE},
	{"no-new-keyring", 0, SLOT_NONE}, {"preserve-fds", 1, SLOT_NONE}, {"help", 0, SLOT_NONE},
	{"h", 0, SLOT_NONE}, {NULL, 0, SLOT_NONE},
};
static const struct flag start_flags[] = {
	{"help", 0, SLOT_NONE}, {"h", 0, SLOT_NONE}, {NULL, 0, SLOT_NONE},
};
static const struct flag delete_flags[] = {
	{"force", 0, SLOT_NONE}, {"f", 0, SLOT_NONE}, {"help", 0, SLOT_NONE}, {"h", 0, SLOT_NONE},
	{NULL, 0, SLOT_NONE},
};

/* Go's strconv.ParseBool as runc_args._parse_bool accepts it (1 t true 0 f false, any case). */
static int is_bool(const char *v)
{
	return !strcmp(v, "1") || !strcmp(v, "0") || !strcasecmp(v, "t") || !strcasecmp(v, "f") ||
	       !strcasecmp(v, "true") || !strcasecmp(v, "false");
}

/* runc_args._parse_flags: the index of the first non-flag token, -1 where Python raises. */
static int parse_flags(int argc, char **argv, int i, const struct flag *spec, struct call *c)
{
	while (i < argc) {
		const char *tok = argv[i], *body, *eq, *value = NULL;
		const struct flag *f;
		size_t len;

		if (!strcmp(tok, "--"))
			return i + 1;
		if (tok[0] != '-' || tok[1] == '\0')
			return i;
		body = tok[1] == '-' ? tok + 2 : tok + 1;
		if (body[0] == '\0' || body[0] == '-' || body[0] == '=')
			return -1;
		eq = strchr(body, '=');
		len = eq ? (size_t)(eq - body) : strlen(body);
		for (f = spec; f->name; f++)
			if (strlen(f->name) == len && !memcmp(f->name, body, len))
				break;
		if (!f->name)
			return -1;
		if (f->takes_value) {
			if (eq) {
				value = eq + 1;
			} else {
				if (i + 1 >= argc)
					return -1;
				value = argv[++i];
			}
		} else if (eq && !is_bool(eq + 1)) {
			return -1;
		}
		if (f->slot == SLOT_LOG)
			c->log = value;
		else if (f->slot == SLOT_LOG_FORMAT)
			c->log_format = value;
		else if (f->slot == SLOT_BUNDLE)
			c->bundle = value;
		i++;
	}
	return i;
}

/* 0: parsed; -1: a command line Python would refuse to parse (it then passes it through). */
static int parse(int argc, char **argv, struct call *c)
{
	const struct flag *spec = NULL;
	int i = parse_flags(argc, argv, 1, global_flags, c);

	if (i < 0)
		return -1;
	if (i >= argc)
		return 0;
	c->command = argv[i];
	if (!strcmp(c->command, "create"))
		spec = create_flags;
	else if (!strcmp(c->command, "start"))
		spec = start_flags;
	else if (!strcmp(c->command, "delete"))
		spec = delete_flags;
	if (spec) {
		i = parse_flags(argc, argv, i + 1, spec, c);
		if (i < 0)
			return -1;
	} else {
		i++;
	}
	c->id = i < argc ? argv[i] : NULL;
	return 0;
}

/*
 * Read a whole regular file that is not a symlink, at most max bytes, NUL-terminated.
 * Returns its length, or -1 for anything else (missing, too large, not regular, read error).
 */
static ssize_t read_file(const char *path, size_t max, char **out, const struct stat *owner_check)
{
	struct stat st;
	size_t n = 0;
	char *buf;
	int fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);

	if (fd < 0)
		return -1;
	if (fstat(fd, &st) || !S_ISREG(st.st_mode) || st.st_size < 0 || (size_t)st.st_size > max ||
	    (owner_check && (st.st_uid != owner_check->st_uid || (st.st_mode & 022)))) {
		close(fd);
		return -1;
	}
	buf = malloc((size_t)st.st_size + 2);
	if (!buf) {
		close(fd);
		return -1;
	}
	for (;;) {       /* to EOF; one byte more than fstat said means it grew: refuse */
		ssize_t r = read(fd, buf + n, (size_t)st.st_size + 1 - n);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 || (r > 0 && n + (size_t)r > (size_t)st.st_size)) {
			free(buf);
			close(fd);
			return -1;
		}
		if (r == 0)
			break;
		n += (size_t)r;
	}
	close(fd);
	buf[n] = '\0';
	*out = buf;
	return (ssize_t)n;
}

/* 1 when the spec cannot ask thaw for anything; 0 when it may, or when in doubt. */
static int spec_is_plain(const char *bundle)
{
	char path[PATH_MAX];
	char *buf;
	ssize_t n;
	int plain;

	if (bundle && !bundle[0])
		return 0;
	if (snprintf(path, sizeof(path), "%s%s%s", bundle ? bundle : "",
		     bundle && bundle[strlen(bundle) - 1] != '/' ? "/" : "", "config.json") >= (int)sizeof(path))
		return 0;
	n = read_file(path, SPEC_MAX, &buf, NULL);
	if (n < 0)
		return 0;
	plain = memmem(buf, (size_t)n, SNAPSHOT_KEY, sizeof(SNAPSHOT_KEY) - 1) == NULL;
	free(buf);
	return plain;
}

/* state_path.valid_id: runc's id alphabet, 1..1024 bytes, no leading dot. */
static int valid_id(const char *id)
{
	size_t n = strlen(id);

	if (n == 0 || n > 1024 || id[0] == '.')
		return 0;
	return strspn(id, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-") == n;
}

/* 1 when STATE_DIR/SUB/ID.json certainly does not exist; 0 when it does, or in doubt. */
static int no_record(const char *state_dir, const char *sub, const char *id)
{
	char path[PATH_MAX];
	struct stat st;

	if (snprintf(path, sizeof(path), "%s/%s/%s.json", state_dir, sub, id) >= (int)sizeof(path))
		return 0;
	return stat(path, &st) != 0 && errno == ENOENT;
}

struct settings {
	char *buf;                 /* the front file; the two values point into it */
	const char *next_runtime;
	const char *state_dir;
};

/* An absolute path os.path.abspath leaves as it is (so the cache names agree). */
static int normalized_abs(const char *p)
{
	size_t n = strlen(p);

	if (p[0] != '/' || strstr(p, "//") || strstr(p, "/./") || strstr(p, "/../"))
		return 0;
	if (n > 1 && p[n - 1] == '/')
		return 0;
	return !(n >= 2 && !strcmp(p + n - 2, "/.")) && !(n >= 3 && !strcmp(p + n - 3, "/.."));
}

/* Expect `<key>=` at *p; return the value (NUL-terminated in place) and move *p past its line. */
static const char *take_line(char **p, const char *key)
{
	size_t k = strlen(key);
	char *v, *nl;

	if (strncmp(*p, key, k) || (*p)[k] != '=')
		return NULL;
	v = *p + k + 1;
	nl = strchr(v, '\n');
	if (!nl)
		return NULL;
	*nl = '\0';
	*p = nl + 1;
	return v;
}

/* 0 with s filled when the front file is there and current for the config file; else -1. */
static int load_settings(struct settings *s)
{
	const char *config = getenv("THAW_CONFIG");
	char name[PATH_MAX], key[96], *p;
	const char *got_key;
	struct stat st, self = {0};
	size_t j = 0;
	ssize_t n;

	if (!config || !config[0])
		config = CONFIG_DEFAULT;
	if (!normalized_abs(config) || stat(config, &st))
		return -1;
	snprintf(key, sizeof(key), "%lld:%lld:%llu",
		 (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec,
		 (long long)st.st_size, (unsigned long long)st.st_ino);
	j = (size_t)snprintf(name, sizeof(name), "%s/front.", CACHE_DIR);
	for (const char *c = config; *c; c++) {       /* config.py's escaping of the cache name */
		const char *rep = *c == '%' ? "%25" : *c == '/' ? "%2F" : NULL;
		size_t add = rep ? 3 : 1;

		if (j + add >= sizeof(name))
			return -1;
		if (rep)
			memcpy(name + j, rep, 3);
		else
			name[j] = *c;
		j += add;
	}
	name[j] = '\0';
	if (strlen(strrchr(name, '/') + 1) > NAME_MAX)
		return -1;
	self.st_uid = geteuid();
	n = read_file(name, FRONT_MAX, &s->buf, &self);
	if (n < 0)
		return -1;
	p = s->buf;
	if ((size_t)n != strlen(s->buf) || strncmp(p, FRONT_MAGIC, strlen(FRONT_MAGIC)))
		goto bad;
	p += strlen(FRONT_MAGIC);
	got_key = take_line(&p, "key");
	s->next_runtime = take_line(&p, "next_runtime");
	s->state_dir = take_line(&p, "state_dir");
	if (!got_key || strcmp(got_key, key) || !s->next_runtime || !s->next_runtime[0] ||
	    !s->state_dir || s->state_dir[0] != '/' || *p)
		goto bad;
	return 0;
bad:
	free(s->buf);
	return -1;
}

/* config.which: the first PATH entry holding an executable non-directory NAME. */
static int which(const char *path_var, const char *name, char *out, size_t size)
{
	const char *d = path_var && path_var[0] ? path_var : PATH_DEFAULT;

	for (;;) {
		const char *end = strchr(d, ':');
		size_t len = end ? (size_t)(end - d) : strlen(d);
		struct stat st;

		if (len > 0 && snprintf(out, size, "%.*s%s%s", (int)len, d, d[len - 1] == '/' ? "" : "/",
					name) < (int)size &&
		    access(out, X_OK) == 0 && !(stat(out, &st) == 0 && S_ISDIR(st.st_mode)))
			return 0;
		if (!end)
			return -1;
		d = end + 1;
	}
}

/* runc_log.format_line's JSON string: what containerd's shim reads back from --log. */
static void json_string(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;

		if (ch == '"' || ch == '\\')
			fprintf(f, "\\%c", ch);
		else if (ch >= 0x20 && ch < 0x7f)
			fputc(ch, f);
		else
			fprintf(f, "\\u%04x", ch);
	}
	fputc('"', f);
}

/* The last resort: the Python runtime cannot be run. Report it as thaw-runtime's _fail does. */
static void report(const struct call *c, const char *msg)
{
	char when[64] = "";
	struct timespec ts;
	struct tm tm;

	clock_gettime(CLOCK_REALTIME, &ts);
	if (gmtime_r(&ts.tv_sec, &tm))
		snprintf(when + strftime(when, 32, "%Y-%m-%dT%H:%M:%S", &tm), 32, ".%06ldZ", ts.tv_nsec / 1000);
	if (c->log && c->log[0]) {
		int fd = open(c->log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
		FILE *f = fd >= 0 ? fdopen(fd, "a") : NULL;

		if (f) {
			if (c->log_format && !strcmp(c->log_format, "json")) {
				fputs("{\"level\": \"error\", \"msg\": ", f);
				json_string(f, msg);
				fprintf(f, ", \"time\": \"%s\"}\n", when);
			} else {
				fprintf(f, "time=\"%s\" level=error msg=", when);
				json_string(f, msg);
				fputc('\n', f);
			}
			fclose(f);
		} else if (fd >= 0) {
			close(fd);
		}
	}
	fprintf(stderr, "thaw-runtime: %s\n", msg);
}

__attribute__((noreturn)) static void python(char **argv, const struct call *c)
{
	char msg[PATH_MAX + 128];

	execv(THAW_PYTHON_ENTRY, argv);
	snprintf(msg, sizeof(msg), "thaw: cannot run %s: %s", THAW_PYTHON_ENTRY, strerror(errno));
	report(c, msg);
	exit(127);
}

/* environ with PATH replaced in place (or added), as the bundle's launcher's os.environ does. */
static char **with_path(const char *path_entry)
{
	size_t n = 0, i;
	char **env;
	int replaced = 0;

	while (environ[n])
		n++;
	env = calloc(n + 2, sizeof(*env));
	if (!env)
		return NULL;
	for (i = 0; i < n; i++) {
		if (!replaced && !strncmp(environ[i], "PATH=", 5)) {
			env[i] = (char *)path_entry;
			replaced = 1;
		} else {
			env[i] = environ[i];
		}
	}
	if (!replaced)
		env[n] = (char *)path_entry;
	return env;
}

int main(int argc, char **argv)
{
	struct call c = {0};
	struct settings s;
	char binary[PATH_MAX], *path_entry = NULL;
	const char *path_var = getenv("PATH"), *arg0;
	char **envp = environ;

	if (argc < 1 || parse(argc, argv, &c) || load_settings(&s))
		python(argv, &c);
	if (c.command && c.id && c.id[0]) {
		if (!strcmp(c.command, "create") && !spec_is_plain(c.bundle))
			python(argv, &c);
		if (!strcmp(c.command, "start") || !strcmp(c.command, "delete")) {
			if (!valid_id(c.id) || !no_record(s.state_dir, "containers", c.id) ||
			    (!strcmp(c.command, "delete") && !no_record(s.state_dir, "prepare", c.id)))
				python(argv, &c);
		}
	}
	if (THAW_EXTRA_PATH[0]) {
		if (asprintf(&path_entry, "PATH=%s:%s", path_var ? path_var : LAUNCHER_PATH_DEFAULT,
			     THAW_EXTRA_PATH) < 0 || !(envp = with_path(path_entry)))
			python(argv, &c);
		path_var = path_entry + 5;
	}
	if (s.next_runtime[0] == '/') {
		if (snprintf(binary, sizeof(binary), "%s", s.next_runtime) >= (int)sizeof(binary))
			python(argv, &c);
	} else if (which(path_var, s.next_runtime, binary, sizeof(binary))) {
		python(argv, &c);                 /* it reports next_runtime not found */
	}
	arg0 = argv[0];
	argv[0] = binary;                         /* runtime.passthrough: [binary, *argv[1:]] */
	execve(binary, argv, envp);
	argv[0] = (char *)arg0;
	python(argv, &c);                         /* as Python's execv would, it fails the call */
	return 127;
}
