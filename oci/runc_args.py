"""runc's command line as a data model: global flags, subcommand, subcommand flags, positionals.

Parses the way runc's CLI library does (Go's `flag` package rules): `-x` and `--x` are the same
flag, values come as `--x=v` or `--x v`, boolean flags take no separate value (`--x=false` is
allowed), flag parsing stops at `--` or at the first positional argument.

Only the flags thaw needs to understand are modelled. A command line this module cannot parse
raises `ArgvError`; the runtime then hands the untouched argv to the next runtime, which reports
the problem itself. Nothing here knows what runc does with the flags.
"""

from __future__ import annotations

from . import ThawError

# name -> takes a value. Aliases map to the canonical name.
GLOBAL_FLAGS: dict[str, bool] = {
    "debug": False,
    "log": True,
    "log-format": True,
    "root": True,
    "criu": True,
    "systemd-cgroup": False,
    "rootless": True,
    "help": False,
    "version": False,
}
GLOBAL_ALIASES = {"h": "help", "v": "version"}

COMMAND_FLAGS: dict[str, dict[str, bool]] = {
    "create": {
        "bundle": True,
        "console-socket": True,
        "pidfd-socket": True,
        "pid-file": True,
        "no-pivot": False,
        "no-new-keyring": False,
        "preserve-fds": True,
        "help": False,
    },
    "start": {"help": False},
    "delete": {"force": False, "help": False},
}
COMMAND_ALIASES = {"create": {"b": "bundle", "h": "help"}, "delete": {"f": "force", "h": "help"},
                   "start": {"h": "help"}}


class ArgvError(ThawError):
    """The command line is not one thaw can interpret."""


class RuncCall:
    """One parsed runc command line. (A plain class: this module is on the hot path, and
    importing dataclasses costs more than the whole parse.)"""
    __slots__ = ("args", "argv", "command", "flags", "global_flags")

    def __init__(self, argv: list[str]):
        self.argv = argv                                  # the original argv, argv[0] included
        self.global_flags: dict[str, str | bool] = {}
        self.command: str | None = None
        self.flags: dict[str, str | bool] = {}
        self.args: list[str] = []

    @property
    def container_id(self) -> str | None:
        return self.args[0] if self.args else None

    @property
    def root(self) -> str | None:
        value = self.global_flags.get("root")
        return value if isinstance(value, str) else None

    @property
    def log_path(self) -> str | None:
        value = self.global_flags.get("log")
        return value if isinstance(value, str) else None

    @property
    def log_format(self) -> str:
        value = self.global_flags.get("log-format")
        return value if isinstance(value, str) else "text"


def _render(flags: dict[str, str | bool]) -> list[str]:
    out: list[str] = []
    for name, value in flags.items():
        if value is True:
            out.append(f"--{name}")
        elif value is False:
            out.append(f"--{name}=false")
        else:
            out.append(f"--{name}={value}")
    return out


def _parse_bool(name: str, raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "t", "true"):
        return True
    if low in ("0", "f", "false"):
        return False
    raise ArgvError(f"invalid boolean value {raw!r} for flag -{name}")


def _parse_flags(tokens: list[str], i: int, spec: dict[str, bool], aliases: dict[str, str],
                 out: dict[str, str | bool]) -> int:
    """Consume flags from tokens[i:] into out; return the index of the first non-flag token."""
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--":
            return i + 1
        if not tok.startswith("-") or tok == "-":
            return i
        body = tok[2:] if tok.startswith("--") else tok[1:]
        if not body or body.startswith(("-", "=")):
            raise ArgvError(f"bad flag syntax: {tok}")
        name, eq, value = body.partition("=")
        name = aliases.get(name, name)
        if name not in spec:
            raise ArgvError(f"flag provided but not understood by thaw: {tok}")
        if spec[name]:
            if not eq:
                if i + 1 >= len(tokens):
                    raise ArgvError(f"flag needs an argument: {tok}")
                i += 1
                value = tokens[i]
            out[name] = value
        else:
            out[name] = _parse_bool(name, value) if eq else True
        i += 1
    return i


def parse(argv: list[str]) -> RuncCall:
    """Parse a runc command line (argv[0] is the program name)."""
    call = RuncCall(argv=list(argv))
    tokens = argv[1:]
    i = _parse_flags(tokens, 0, GLOBAL_FLAGS, GLOBAL_ALIASES, call.global_flags)
    if i >= len(tokens):
        return call
    call.command = tokens[i]
    spec = COMMAND_FLAGS.get(call.command)
    if spec is None:
        # A command thaw does not interpret: keep the rest verbatim.
        call.args = tokens[i + 1:]
        return call
    j = _parse_flags(tokens, i + 1, spec, COMMAND_ALIASES.get(call.command, {}), call.flags)
    call.args = tokens[j:]
    return call


def render(global_flags: dict[str, str | bool], command: str, flags: dict[str, str | bool],
           args: list[str]) -> list[str]:
    """Build a runc argv tail (without the program name) in canonical form."""
    return [*_render(global_flags), command, *_render(flags), *args]
