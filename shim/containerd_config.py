"""containerd and the `thaw` runtime handler: find containerd's config, check the handler, write it.

The handler is a runtime entry of containerd's CRI plugin:

    runtime_type = "io.containerd.runc.v2"
    options.BinaryName = "/usr/local/bin/thaw-runtime"
    pod_annotations = container_annotations = ["thaw.dev/*"]

under `plugins."io.containerd.grpc.v1.cri".containerd.runtimes.thaw` in config version 2
(containerd 1.6/1.7) or `plugins."io.containerd.cri.v1.runtime".containerd.runtimes.thaw` in
version 3 (containerd 2.x). It lives in a drop-in file (`/etc/containerd/conf.d/99-thaw.toml`)
that the main config pulls in through `imports`.

How containerd merges imported files decides what the drop-in must hold:
- containerd >= 2.0 merges plugin sections key by key: the drop-in holds the thaw table only.
- containerd 1.x replaces a plugin's whole section with the one from the file loaded last
  (containerd issues 5837 and 7982; the fix, PR 9982, is 2.0 only). A drop-in holding only the
  thaw table would drop every CRI setting of config.toml (cni bin_dir, sandbox_image,
  SystemdCgroup...) and, since it defines `runtimes`, the default `runc` runtime too. So on 1.x
  the drop-in carries a copy of the effective CRI section (what config.toml and its other
  imports set) plus the thaw table, and the default runtimes when config.toml defines none.
  This is what NVIDIA's container toolkit does too (its PR 1311). The cost: later edits to
  the CRI section of config.toml are shadowed until install/containerd.sh runs again;
  `thaw doctor` reports such a stale drop-in.
In both cases the thaw table starts from the default runtime's entry (runc), so settings such as
`SystemdCgroup` match the rest of the node.

`thaw doctor` calls `doctor_checks()`. install/containerd.sh runs this file as a script
(`python3 -I shim/containerd_config.py install ...`), so it uses the standard library only and
no relative imports.
"""

from __future__ import annotations

import os

HANDLER = "thaw"
RUNTIME_TYPE = "io.containerd.runc.v2"
DEFAULT_BINARY = "/usr/local/bin/thaw-runtime"
ANNOTATIONS = ["thaw.dev/*"]
# The annotation keys the allow-lists must pass (thaw.oci.annotations; a test keeps them equal).
THAW_ANNOTATION_KEYS = ("thaw.dev/snapshot", "thaw.dev/capture", "thaw.dev/ready",
                        "thaw.dev/quiesce", "thaw.dev/resume", "thaw.dev/required")
DEFAULT_CONFIG = "/etc/containerd/config.toml"
DEFAULT_CONF_D = "/etc/containerd/conf.d"
DROP_IN_NAME = "99-thaw.toml"
DEFAULT_SOCKET = "/run/containerd/containerd.sock"
CRI_V2 = "io.containerd.grpc.v1.cri"       # config version 2: the CRI plugin holds the runtimes
CRI_V3 = "io.containerd.cri.v1.runtime"    # config version 3 (containerd 2.x)
FIX = "install/node.sh --containerd"
SEARCH_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

Check = tuple[bool, str, str]


class ContainerdConfigError(Exception):
    """containerd's configuration cannot be read or changed safely."""


# ------------------------------------------------------------------------------------ discovery

def find_containerd() -> str | None:
    import shutil
    path = os.pathsep.join([os.environ.get("PATH", ""), *SEARCH_PATH])
    return shutil.which("containerd", path=path)


def parse_version(text: str) -> tuple[int, int, int] | None:
    """The version in `containerd --version` output:
    `containerd github.com/containerd/containerd v1.7.13 64b8a81...`,
    `containerd github.com/containerd/containerd/v2 v2.1.0 ...`,
    `containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3` (Debian)."""
    import re
    for word in text.split()[1:]:
        if "/" in word:
            continue
        m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", word)
        if m:
            return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    return None


def containerd_version(binary: str) -> tuple[int, int, int] | None:
    import subprocess
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_version(out)


def _running_config_paths() -> list[str]:
    """--config of containerd processes started by init (systemd units), from /proc."""
    found = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            if stat[stat.index("(") + 1:stat.rindex(")")] != "containerd":
                continue
            if stat.rsplit(")", 1)[1].split()[1] != "1":
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, ValueError, IndexError):
            continue
        for i, a in enumerate(args):
            if a in ("--config", "-c") and i + 1 < len(args):
                found.append(args[i + 1])
            elif a.startswith("--config="):
                found.append(a.split("=", 1)[1])
    return found


def find_config() -> str:
    """containerd's main config: $CONTAINERD_CONFIG, else the --config of a running containerd
    service, else /etc/containerd/config.toml."""
    env = os.environ.get("CONTAINERD_CONFIG")
    if env:
        return env
    running = _running_config_paths()
    return running[0] if running else DEFAULT_CONFIG


# ------------------------------------------------------------------------------------- loading

def load_toml(path: str) -> dict:
    import tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ContainerdConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ContainerdConfigError(f"{path}: {exc.strerror}") from None


def resolve_imports(parent: str, imports) -> list[str]:
    """containerd's resolveImports: relative entries are relative to the importing file's
    directory; entries with `*` are globs (matches sorted, as Go's filepath.Glob gives them)."""
    import glob
    out = []
    for entry in imports or []:
        path = os.path.normpath(str(entry))
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(parent), path)
        if "*" in path:
            out.extend(sorted(glob.glob(path, include_hidden=True)))
        else:
            out.append(path)
    return out


def load_files(main: str, exclude: tuple[str, ...] = (), main_cfg: dict | None = None) -> list[tuple[str, dict]]:
    """The files containerd loads for `--config main`, in its order (breadth first), each parsed.
    A missing main config reads as empty (containerd then runs on its defaults). Files in
    `exclude` are skipped as if they did not match; `main_cfg` stands for the main config's
    content when given."""
    skip = {os.path.realpath(p) for p in exclude}
    loaded: set[str] = set()
    files = []
    pending = [main]
    first = True
    while pending:
        path, pending = pending[0], pending[1:]
        if path in loaded:
            continue
        if os.path.realpath(path) in skip:
            loaded.add(path)
            continue
        if first and main_cfg is not None:
            cfg = main_cfg
        elif first and not os.path.exists(path):
            cfg = {}
        else:
            cfg = load_toml(path)
        first = False
        files.append((path, cfg))
        loaded.add(path)
        pending.extend(resolve_imports(path, cfg.get("imports")))
    return files


def _deep_merge(into: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = _copy(v)
    return into


def _copy(v):
    import copy
    return copy.deepcopy(v)


def _migrate_v2(cfg: dict) -> dict:
    """The part of containerd 2.x's v2 -> v3 migration that concerns runtimes."""
    plugins = cfg.get("plugins") or {}
    cri = plugins.get(CRI_V2)
    if not isinstance(cri, dict) or "containerd" not in cri:
        return cfg
    cfg = _copy(cfg)
    cri = cfg["plugins"][CRI_V2]
    _deep_merge(cfg["plugins"].setdefault(CRI_V3, {}), {"containerd": cri.pop("containerd")})
    return cfg


def effective(files: list[tuple[str, dict]], major: int) -> tuple[dict, dict[str, str]]:
    """The merged config as containerd `major` builds it, and for each plugin the last file that
    set it. 1.x: each plugin's section is replaced by the last file's; 2.x: merged key by key
    (version 2 files migrated to version 3 first)."""
    out: dict = {}
    owner: dict[str, str] = {}
    for path, cfg in files:
        if major >= 2 and cfg.get("version", 2) == 2:
            cfg = _migrate_v2(cfg)
        for k, v in cfg.items():
            if k == "plugins" and isinstance(v, dict):
                plugins = out.setdefault("plugins", {})
                for pid, section in v.items():
                    owner[pid] = path
                    if major >= 2 and isinstance(section, dict) and isinstance(plugins.get(pid), dict):
                        _deep_merge(plugins[pid], section)
                    else:
                        plugins[pid] = _copy(section)
            elif isinstance(v, dict) and isinstance(out.get(k), dict):
                _deep_merge(out[k], v)
            else:
                out[k] = _copy(v)
    return out, owner


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def cri_plugin(layout: int) -> str:
    return CRI_V2 if layout == 2 else CRI_V3


def runtimes_of(cfg: dict, layout: int) -> dict:
    r = _get(cfg, "plugins", cri_plugin(layout), "containerd", "runtimes")
    return r if isinstance(r, dict) else {}


def default_runtime_name(cfg: dict, layout: int) -> str:
    name = _get(cfg, "plugins", cri_plugin(layout), "containerd", "default_runtime_name")
    return name if isinstance(name, str) and name else "runc"


def cri_disabled(cfg: dict) -> bool:
    disabled = cfg.get("disabled_plugins") or []
    return any(d in ("cri", CRI_V2, CRI_V3) for d in disabled)


def socket_path(cfg: dict) -> str:
    return (_get(cfg, "plugins", "io.containerd.server.v1.grpc", "address")
            or _get(cfg, "grpc", "address") or DEFAULT_SOCKET)


def is_running(cfg: dict) -> bool:
    import stat
    try:
        return stat.S_ISSOCK(os.stat(socket_path(cfg)).st_mode)
    except OSError:
        return False


# ------------------------------------------------------------------------------------- matching

def go_glob_match(pattern: str, name: str) -> bool:
    """Go's filepath.Match, which containerd uses for the annotation allow-lists: `*` and `?`
    do not match `/`, so `*` alone does not pass `thaw.dev/snapshot`."""
    import re
    rx, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            rx += "[^/]*"
        elif c == "?":
            rx += "[^/]"
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            rx += re.escape(pattern[i])
        elif c == "[":
            j = pattern.find("]", i + 2)
            if j < 0:
                return False  # filepath.ErrBadPattern
            body = pattern[i + 1:j]
            if body.startswith("^"):
                body = "^" + body[1:].replace("\\", "\\\\")
            else:
                body = body.replace("\\", "\\\\").replace("^", "\\^")
            rx += f"(?!/)[{body}]"
            i = j
        else:
            rx += re.escape(c)
        i += 1
    return re.fullmatch(rx, name) is not None


def uncovered(patterns, keys=THAW_ANNOTATION_KEYS) -> list[str]:
    patterns = [p for p in (patterns or []) if isinstance(p, str)]
    return [k for k in keys if not any(go_glob_match(p, k) for p in patterns)]


# ------------------------------------------------------------------------------------- writing

def _toml_key(k: str) -> str:
    import json
    import re
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _toml_value(v) -> str:
    import datetime
    import json
    import math
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise ContainerdConfigError(f"cannot write {type(v).__name__} value {v!r} as TOML")


def dump_toml(data: dict) -> str:
    """TOML for plain data: each table's scalars and arrays, then its sub-tables as
    [a."b.c".d] headers, indented by depth as `containerd config dump` does."""
    lines: list[str] = []

    def table(path: list[str], d: dict) -> None:
        scalars = [(k, v) for k, v in d.items() if not isinstance(v, dict)]
        tables = [(k, v) for k, v in d.items() if isinstance(v, dict)]
        indent = "  " * max(len(path) - 1, 0)
        if path and (scalars or not tables):
            if lines:
                lines.append("")
            lines.append(f"{indent}[{'.'.join(_toml_key(p) for p in path)}]")
        for k, v in scalars:
            lines.append(f"{indent + '  ' if path else ''}{_toml_key(k)} = {_toml_value(v)}")
        for k, v in tables:
            table(path + [k], v)

    table([], data)
    return "\n".join(lines) + "\n"


def layout_for(version: tuple[int, int, int] | None, main_cfg: dict) -> int:
    """The config version of the drop-in: 2 for containerd 1.x; for 2.x the main config's
    version when it is 2 (containerd refuses an import with a higher version than the main
    config), else 3."""
    major = version[0] if version else None
    main_version = main_cfg.get("version") if main_cfg else None
    if main_cfg and main_version is None:
        raise ContainerdConfigError(
            "the main config has no `version` line, so containerd reads it as version 1, which "
            "has no imports thaw can use: convert it to version 2 (containerd 1.x) or 3 (2.x) first")
    if major is None:
        raise ContainerdConfigError("cannot tell the containerd version (containerd --version)")
    if major < 2:
        if main_version not in (None, 2):
            raise ContainerdConfigError(f"containerd {major}.x needs config version 2, the main config has {main_version}")
        return 2
    if main_version not in (None, 2, 3):
        raise ContainerdConfigError(f"unsupported config version {main_version} for containerd {major}.x")
    return 3 if main_version is None else main_version


def default_config(binary: str | None) -> dict:
    """`containerd config default`, parsed; {} when it cannot be had."""
    import subprocess
    import tomllib
    if not binary:
        return {}
    try:
        out = subprocess.run([binary, "config", "default"], capture_output=True, text=True, timeout=30).stdout
        return tomllib.loads(out)
    except (OSError, subprocess.SubprocessError, tomllib.TOMLDecodeError):
        return {}


def thaw_runtime(base: dict | None, binary: str) -> dict:
    """The thaw entry: the default runtime's entry (SystemdCgroup, Root... carry over) with
    thaw's runtime_type, BinaryName and annotation allow-lists."""
    entry = _copy(base) if isinstance(base, dict) and base.get("runtime_type", RUNTIME_TYPE) == RUNTIME_TYPE else {}
    entry.pop("runtime_path", None)  # a shim binary override of the base runtime: never inherit
    entry["runtime_type"] = RUNTIME_TYPE
    for key in ("pod_annotations", "container_annotations"):
        have = [a for a in entry.get(key) or [] if isinstance(a, str)]
        entry[key] = have + [a for a in ANNOTATIONS if a not in have]
    options = entry.get("options") if isinstance(entry.get("options"), dict) else {}
    options["BinaryName"] = binary
    entry["options"] = options
    return entry


def build_drop_in(source: list[tuple[str, dict]], layout: int, major: int, binary: str,
                  defaults: dict) -> dict:
    """The drop-in's content, from the files containerd loads without the drop-in (`source`)."""
    plugin = cri_plugin(layout)
    eff, _ = effective(source, major)
    default_rts = runtimes_of(defaults, layout)
    if major >= 2:
        eff_rts = _deep_merge(_copy(default_rts), runtimes_of(eff, layout))
        base = eff_rts.get(default_runtime_name(eff, layout)) or eff_rts.get("runc")
        runtimes = {HANDLER: thaw_runtime(base, binary)}
        return {"version": layout, "plugins": {plugin: {"containerd": {"runtimes": runtimes}}}}
    cri = _copy(_get(eff, "plugins", plugin) or {})
    if not isinstance(cri, dict):
        cri = {}
    ctrd = cri.setdefault("containerd", {})
    if not isinstance(ctrd.get("runtimes"), dict):
        # config.toml defines no runtimes, so containerd uses its default ones (runc): defining
        # thaw's would drop them. Write them out as `containerd config default` has them.
        ctrd["runtimes"] = _copy(default_rts) or {"runc": {"runtime_type": RUNTIME_TYPE}}
    runtimes = ctrd["runtimes"]
    runtimes.pop(HANDLER, None)
    runtimes[HANDLER] = thaw_runtime(runtimes.get(default_runtime_name(eff, layout)) or runtimes.get("runc"), binary)
    return {"version": layout, "plugins": {plugin: cri}}


def drop_in_text(data: dict, layout: int, main: str) -> str:
    if layout == 2:
        note = (f"# containerd 1.x replaces a plugin's whole section with the last imported one, so this\n"
                f"# file carries a copy of the CRI plugin section of {main} (and its other imports)\n"
                f"# plus the thaw runtime. After editing that section, run install/containerd.sh again.\n")
    else:
        note = "# containerd 2.x merges imported files key by key: this file only adds the thaw runtime.\n"
    return ("# Written by thaw's install/containerd.sh: registers the runtime handler \"thaw\".\n"
            + note + "# Delete this file and restart containerd to unregister thaw.\n\n" + dump_toml(data))


# --- editing the main config's top-level `imports` -------------------------------------------

def _skip_string(text: str, i: int) -> int:
    """i at a quote; returns the index just past the string."""
    q = text[i]
    if text.startswith(q * 3, i):
        end = i + 3
        while True:
            j = text.find(q * 3, end)
            if j < 0:
                raise ContainerdConfigError("unterminated multi-line string")
            if q == '"':
                k, n = j - 1, 0
                while k >= i + 3 and text[k] == "\\":
                    n, k = n + 1, k - 1
                if n % 2:
                    end = j + 1
                    continue
            j += 3
            while j < len(text) and text[j] == q:  # up to two quotes may close the content
                j += 1
            return j
    j = i + 1
    while j < len(text):
        c = text[j]
        if q == '"' and c == "\\":
            j += 2
            continue
        if c == q:
            return j + 1
        if c == "\n":
            break
        j += 1
    raise ContainerdConfigError("unterminated string")


def _skip_value(text: str, i: int) -> tuple[int, int]:
    """i at the start of a value; returns (end of the value, index of the last character of its
    last significant token inside a top-level array, or -1)."""
    c = text[i]
    if c in "\"'":
        return _skip_string(text, i), -1
    if c in "[{":
        depth, j, last = 0, i, i
        while j < len(text):
            c = text[j]
            if c in "\"'":
                j = _skip_string(text, j)
                last = j - 1
                continue
            if c == "#":
                nl = text.find("\n", j)
                j = len(text) if nl < 0 else nl
                continue
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
                if depth == 0:
                    return j + 1, last
            if not c.isspace():
                last = j
            j += 1
        raise ContainerdConfigError("unterminated array or inline table")
    j = i
    while j < len(text) and text[j] not in "\n#":
        j += 1
    return j, -1


def top_level_keys(text: str) -> tuple[list[tuple[str, int, int, int, int]], int]:
    """Key/value statements before the first table header: (key, start of line, start of value,
    end of value, last token in an array value); and where the first header starts."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n\ufeff":
            i += 1
            continue
        if c == "#":
            nl = text.find("\n", i)
            i = n if nl < 0 else nl
            continue
        if c == "[":
            return out, text.rfind("\n", 0, i) + 1
        line_start = text.rfind("\n", 0, i) + 1
        parts, j = [], i
        while j < n and text[j] != "=":
            if text[j] in "\"'":
                end = _skip_string(text, j)
                parts.append(text[j + 1:end - 1])
                j = end
            elif text[j] == "\n":
                raise ContainerdConfigError("key without a value")
            else:
                parts.append(text[j])
                j += 1
        key = "".join(p for p in parts).strip()
        j += 1
        while j < n and text[j] in " \t":
            j += 1
        if j >= n:
            raise ContainerdConfigError("key without a value")
        vend, last = _skip_value(text, j)
        out.append((key, line_start, j, vend, last))
        i = vend
    return out, n


def add_import(text: str, entry: str) -> str:
    """`text` with `entry` appended to its top-level imports array, or with a new
    `imports = [entry]` line after the `version` line (or first). Every other byte is kept;
    the result is checked by parsing both."""
    import json
    import tomllib
    old = tomllib.loads(text)
    nl = "\r\n" if "\r\n" in text else "\n"
    keys, header = top_level_keys(text)
    found = [k for k in keys if k[0] == "imports"]
    quoted = json.dumps(entry)
    if "imports" in old:
        if not found or not isinstance(old["imports"], list) or found[0][4] < 0:
            raise ContainerdConfigError("cannot edit its `imports` automatically")
        last = found[0][4]
        sep = "" if text[last] == "[" else (" " if text[last] == "," else ", ")
        new = text[:last + 1] + sep + quoted + text[last + 1:]
    else:
        line = f"imports = [{quoted}]"
        version = [k for k in keys if k[0] == "version"]
        if version:
            end = version[0][3]
            eol = text.find("\n", end)
            at = len(text) if eol < 0 else eol + 1
            prefix = "" if text[:at].endswith("\n") or at == 0 else nl
            new = text[:at] + prefix + line + nl + text[at:]
        elif not text.strip():
            new = text + line + nl
        else:
            new = line + nl + text
    want = dict(old)
    want["imports"] = list(old.get("imports") or []) + [entry]
    try:
        got = tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        raise ContainerdConfigError(f"adding the imports entry would break the file ({exc})") from None
    if got != want:
        raise ContainerdConfigError("adding the imports entry would change other keys")
    return new


def covered(main: str, imports, path: str) -> bool:
    target = os.path.realpath(path)
    return any(os.path.realpath(p) == target for p in resolve_imports(main, imports)) or any(
        _glob_covers(main, e, path) for e in imports or [])


def _glob_covers(main: str, entry, path: str) -> bool:
    """An imports glob that would match `path` once it exists."""
    import fnmatch
    e = os.path.normpath(str(entry))
    if not os.path.isabs(e):
        e = os.path.join(os.path.dirname(main), e)
    if "*" not in e:
        return False
    d, pat = os.path.split(e)
    pd, name = os.path.split(os.path.abspath(path))
    return "*" not in d and os.path.realpath(d) == os.path.realpath(pd) and fnmatch.fnmatchcase(name, pat)


def _write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    import tempfile
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".thaw-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def install(main: str, conf_d: str, containerd_bin: str | None, binary: str = DEFAULT_BINARY,
            say=print) -> bool:
    """Register the thaw handler: write the drop-in, make the main config import it.
    Returns whether a file changed. Raises ContainerdConfigError when it cannot be done safely;
    then nothing is left changed."""
    import tomllib
    version = containerd_version(containerd_bin) if containerd_bin else None
    if version is None:
        raise ContainerdConfigError(f"cannot run `{containerd_bin or 'containerd'} --version`")
    major = version[0]
    drop_in = os.path.join(conf_d, DROP_IN_NAME)
    main_exists = os.path.exists(main)
    main_text = _read(main) if main_exists else None
    try:
        main_cfg = tomllib.loads(main_text or "")
    except tomllib.TOMLDecodeError as exc:
        raise ContainerdConfigError(f"{main}: not valid TOML: {exc}") from None
    layout = layout_for(version, main_cfg)
    say(f"containerd {'.'.join(map(str, version))}: config version {layout}, "
        f"runtimes under plugins.\"{cri_plugin(layout)}\"")
    if not os.access(binary, os.X_OK):
        say(f"warning: {binary} is not an executable file yet (install/node.sh installs it)")

    # Everything is computed and checked before anything is written. The main config imports
    # the drop-in directory (a glob: deleting the drop-in can never stop containerd from starting).
    entry = os.path.join(conf_d, "*.toml")
    new_main = None
    imports = main_cfg.get("imports") or []
    if main_cfg and covered(main, imports, drop_in):
        main_note = f"{main} already imports {drop_in}"
    elif not main_cfg:
        # absent, empty or comments only: containerd runs on its defaults; say so explicitly
        head = (main_text or "") + ("\n" if main_text and not main_text.endswith("\n") else "")
        if not main_text:
            head = ("# containerd config written by thaw's install/containerd.sh: containerd's defaults\n"
                    "# plus the files imported below.\n")
        new_main = head + f"version = {layout}\nimports = [{_toml_value(entry)}]\n"
        main_note = f"{'created' if not main_exists else 'filled empty'} {main} (version = {layout}, imports {entry})"
    else:
        try:
            new_main = add_import(main_text, entry)
        except ContainerdConfigError as exc:
            raise ContainerdConfigError(f"{main}: {exc}; add {entry!r} to its top-level imports by hand") from None
        main_note = f"added {entry} to the top-level imports of {main} (nothing else changed)"

    # The drop-in is built from everything else containerd will load, the new imports included.
    before = {p for p, _ in load_files(main, exclude=(drop_in,))}
    source = load_files(main, exclude=(drop_in,),
                        main_cfg=tomllib.loads(new_main) if new_main is not None else main_cfg)
    for path, _ in source:
        if path not in before:
            say(f"note: containerd will now also load {path} (it matches {entry})")
    eff, _ = effective(source, major)
    if cri_disabled(eff):
        say(f"warning: the CRI plugin is disabled (disabled_plugins in {main}): Kubernetes cannot use "
            f"this containerd; the handler is registered anyway")
    data = build_drop_in(source, layout, major, binary, default_config(containerd_bin))
    text = drop_in_text(data, layout, main)
    if tomllib.loads(text) != data:
        raise ContainerdConfigError("internal error: the drop-in does not read back as written")
    old_drop_in = _read(drop_in) if os.path.exists(drop_in) else None

    changed = False
    try:
        if old_drop_in == text:
            say(f"drop-in: {drop_in} is up to date")
        else:
            os.makedirs(conf_d, mode=0o755, exist_ok=True)
            _write_atomic(drop_in, text)
            changed = True
            say(f"drop-in: {'updated' if old_drop_in is not None else 'wrote'} {drop_in} "
                f"(handler {HANDLER}: {RUNTIME_TYPE}, BinaryName={binary}, annotations {ANNOTATIONS})")
        if new_main is not None:
            if main_exists:
                _backup(main, main_text, say)
                # through a symlinked config.toml to the file it points at
                _write_atomic(os.path.realpath(main), new_main, mode=os.stat(main).st_mode & 0o7777)
            else:
                os.makedirs(os.path.dirname(os.path.abspath(main)), mode=0o755, exist_ok=True)
                _write_atomic(main, new_main)
            changed = True
        say(f"main config: {main_note}")
        # What containerd loads now must have the handler, whatever the other imports do...
        problems = [d for ok, _, d in registration_checks(main, major) if not ok]
        if problems:
            raise ContainerdConfigError("after writing, the handler is still not right: " + "; ".join(problems))
        # ...and containerd itself must accept it.
        _containerd_accepts(containerd_bin, main, binary, layout)
    except BaseException:
        if changed:
            say("rolling back: restoring the previous files")
            if old_drop_in is None:
                _unlink(drop_in)
            else:
                _write_atomic(drop_in, old_drop_in)
            if new_main is not None:
                if main_exists:
                    _write_atomic(os.path.realpath(main), main_text, mode=os.stat(main).st_mode & 0o7777)
                else:
                    _unlink(main)
        raise
    return changed


def _read(path: str) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _containerd_accepts(containerd_bin: str, main: str, binary: str, layout: int) -> None:
    """`containerd --config MAIN config dump` must succeed and, when it prints a config, show
    the handler (the dump is containerd's own merge of the main config and its imports)."""
    import subprocess
    import tomllib
    try:
        proc = subprocess.run([containerd_bin, "--config", main, "config", "dump"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ContainerdConfigError(f"containerd config dump: {exc}") from None
    if proc.returncode != 0:
        raise ContainerdConfigError(f"containerd rejects the config: {(proc.stderr or proc.stdout).strip()[-800:]}")
    try:
        dumped = tomllib.loads(proc.stdout)
    except tomllib.TOMLDecodeError:
        return
    if not dumped.get("plugins"):
        return
    entry = runtimes_of(dumped, 2).get(HANDLER) or runtimes_of(dumped, 3).get(HANDLER)
    if not isinstance(entry, dict) or _get(entry, "options", "BinaryName") != binary:
        raise ContainerdConfigError("`containerd config dump` does not show the thaw handler")


def _backup(main: str, text: str, say) -> None:
    import datetime
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = f"{main}.thaw-backup-{stamp}"
    n = 1
    while os.path.exists(path):
        n += 1
        path = f"{main}.thaw-backup-{stamp}.{n}"
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.chmod(path, os.stat(main).st_mode & 0o7777)
    say(f"main config: backed up {main} to {path}")


# -------------------------------------------------------------------------------------- checks

def registration_checks(main: str, major: int,
                        files: list[tuple[str, dict]] | None = None) -> list[Check]:
    """Is the thaw handler registered, and right, in what containerd loads for `main`?"""
    if files is None:
        files = load_files(main)
    eff, owner = effective(files, major)
    layout = 2 if major < 2 else 3   # effective() migrates 2.x configs to version 3 layout
    plugin = cri_plugin(layout)
    rts = runtimes_of(eff, layout)
    entry = rts.get(HANDLER)
    what = f"containerd handler {HANDLER}"
    out: list[Check] = []
    if not isinstance(entry, dict):
        detail = f"not registered in {main}"
        if major < 2 and owner.get(plugin) and owner[plugin] != main:
            detail += f" (the CRI section containerd uses comes from {owner[plugin]})"
        return [(False, what, f"{detail}: run {FIX}")]
    rt = entry.get("runtime_type")
    out.append((rt == RUNTIME_TYPE, f"{what} runtime_type", f"{rt!r}" + ("" if rt == RUNTIME_TYPE else f", want {RUNTIME_TYPE!r}")))
    bn = _get(entry, "options", "BinaryName")
    if not isinstance(bn, str) or not bn:
        out.append((False, f"{what} BinaryName", f"not set: run {FIX}"))
    else:
        ok = os.path.isfile(bn) and os.access(bn, os.X_OK)
        out.append((ok, f"{what} BinaryName", bn if ok else f"{bn} is not an executable file: run {FIX}"))
    for key in ("pod_annotations", "container_annotations"):
        missing = uncovered(entry.get(key))
        out.append((not missing, f"{what} {key}",
                    f"{entry.get(key) or []}" + (f" do not pass {', '.join(missing)}: run {FIX}" if missing else "")))
    default = default_runtime_name(eff, layout)
    if major < 2 and default not in rts:
        out.append((False, "containerd default runtime",
                    f"{default!r} is not among the runtimes of {owner.get(plugin, main)}: every pod without "
                    f"a RuntimeClass would fail; run {FIX}"))
    return out


def stale_check(files: list[tuple[str, dict]], drop_in: str) -> Check | None:
    """containerd 1.x: does the drop-in still carry the CRI section the other files set?"""
    real = os.path.realpath(drop_in)
    ours = [cfg for p, cfg in files if os.path.realpath(p) == real]
    if not ours:
        return None
    source = [(p, cfg) for p, cfg in files if os.path.realpath(p) != real]
    src, _ = effective(source, 1)
    src_cri = _copy(_get(src, "plugins", CRI_V2) or {})
    mine = _copy(_get(ours[0], "plugins", CRI_V2) or {})
    src_rts = _get(src_cri, "containerd", "runtimes") or {}
    my_rts = _get(mine, "containerd", "runtimes") or {}
    for d in (src_cri, mine):
        if isinstance(d.get("containerd"), dict):
            d["containerd"].pop("runtimes", None)
            if not d["containerd"]:
                del d["containerd"]
    drift = [k for k in src_rts if k != HANDLER and src_rts[k] != my_rts.get(k)]
    same = src_cri == mine and not drift
    return (same, "containerd drop-in in sync",
            f"{drop_in} carries the CRI section of the main config" if same else
            f"the CRI section of the main config changed after {drop_in} was written (containerd 1.x uses "
            f"the drop-in's copy): run install/containerd.sh again")


def doctor_checks(config: str | None = None, containerd_bin: str | None = None,
                  conf_d: str | None = None) -> "list[Check]":
    """What `thaw doctor` reports about containerd. Never raises."""
    try:
        return list(_doctor_checks(config, containerd_bin, conf_d))
    except Exception as exc:  # doctor must report, not crash
        return [(False, "containerd", f"checking the configuration failed: {exc}")]


def _doctor_checks(config, containerd_bin, conf_d):
    binary = containerd_bin or find_containerd()
    if not binary:
        yield True, "containerd", "not installed"
        return
    main = config or find_config()
    conf_d = conf_d or os.environ.get("CONTAINERD_CONF_D") or DEFAULT_CONF_D
    version = containerd_version(binary)
    try:
        files = load_files(main)
    except ContainerdConfigError as exc:
        yield False, "containerd config", str(exc)
        return
    major = version[0] if version else (3 if files[0][1].get("version") == 3 else 1)
    eff, _ = effective(files, major)
    running = is_running(eff)
    vtext = ".".join(map(str, version)) if version else "unknown version"
    state = "running" if running else "not running"
    yield True, "containerd", f"{binary} {vtext} ({state}), config {main}" + (
        "" if os.path.exists(main) else " (absent: defaults)")
    if cri_disabled(eff):
        yield True, "containerd CRI", "plugin disabled (disabled_plugins): not used by Kubernetes"
        return
    checks = registration_checks(main, major, files=files)
    if not running and len(checks) == 1 and not checks[0][0]:
        # installed (e.g. for tests) but not serving: nothing uses it, so no problem yet
        yield True, checks[0][1], f"not registered (containerd is not running; to register: {FIX})"
        return
    yield from checks
    if major < 2:
        stale = stale_check(files, os.path.join(conf_d, DROP_IN_NAME))
        if stale:
            yield stale


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="containerd_config.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("install", "check"):
        s = sub.add_parser(name)
        s.add_argument("--config", default=None, help="containerd's main config (default: found)")
        s.add_argument("--conf-d", default=None, help=f"drop-in directory (default {DEFAULT_CONF_D})")
        s.add_argument("--containerd", default=None, help="containerd binary (default: on PATH)")
        s.add_argument("--binary", default=DEFAULT_BINARY, help="thaw-runtime path for BinaryName")
    a = p.parse_args(argv)
    containerd_bin = a.containerd or find_containerd()
    main_cfg = a.config or find_config()
    conf_d = a.conf_d or DEFAULT_CONF_D
    if a.cmd == "check":
        bad = 0
        for ok, what, detail in doctor_checks(main_cfg, containerd_bin, conf_d):
            bad += not ok
            print(f"[{'ok' if ok else 'FAIL':>4}] {what}: {detail}")
        return 1 if bad else 0
    if not containerd_bin:
        print("containerd is not installed", file=sys.stderr)
        return 2
    try:
        changed = install(main_cfg, conf_d, containerd_bin, a.binary,
                          say=lambda m: print(f"[thaw containerd] {m}", flush=True))
    except ContainerdConfigError as exc:
        print(f"[thaw containerd] ERROR: {exc}", file=sys.stderr)
        return 2
    return 100 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
