"""`thaw`: the operator's CLI. Thin: each command wires config, store and one library call; any
ThawError (or OSError) becomes one line on stderr and exit status 1."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import click

from thaw.oci import ThawError
from thaw.oci.annotations import LOCAL_NAMESPACE, SnapshotRef, valid_namespace

from ..lifecycle import distribution, prefetch
from ..lifecycle.capture import capture as do_capture
from ..lifecycle.capture import report
from ..lifecycle.importer import import_archive, open_store
from ..node import events as ev
from ..node.config import Config, load
from ..node.provenance import check_restorable, generate
from ..node.store import Store
from ..registry.progress import JsonLinesProgress, TerminalProgress
from ..registry.progress import human_bytes as _human
from ..safetext import printable
from .doctor import fix as fix_node
from .doctor import run_checks

_P = ParamSpec("_P")
_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])


def _cfg(ctx: click.Context) -> Config:
    config: Config = ctx.obj["config"]
    return config


def _ref(text: str) -> SnapshotRef:
    try:
        return SnapshotRef.parse(text)
    except ThawError as exc:
        raise click.BadParameter(str(exc)) from exc


def _one_line_errors(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Every error thaw knows how to describe is one line for the operator, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except (ThawError, OSError) as exc:
            raise click.ClickException(printable(exc, None, lines=True)) from exc
    return wrapper


def _store(ctx: click.Context) -> Store:
    """The node's store; a format 1 store (thaw 0.1) is converted by the first command that opens it."""
    store = Store.for_config(_cfg(ctx))
    if not store.is_format_1():
        return store
    return open_store(store)


def _namespace_option(fn: _F) -> _F:
    return click.option("--namespace", "-n", "namespace", default=LOCAL_NAMESPACE, show_default=True,
                        callback=_check_namespace,
                        help="The namespace the snapshot belongs to (a Kubernetes namespace, or "
                             f"{LOCAL_NAMESPACE} for containers outside Kubernetes).")(fn)


def _check_namespace(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not valid_namespace(value):
        raise click.BadParameter(f"{value!r} is not a namespace name")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="THAW_CONFIG", default=None,
              help="Config file (default /etc/thaw/config.yaml).")
@click.pass_context
@_one_line_errors
def cli(ctx: click.Context, config_path: str | None) -> None:
    """thaw: snapshot and restore containers (CRIU + CUDA) below containerd."""
    ctx.obj = {"config": load(config_path)}


@cli.command()
@click.argument("container_id")
@click.option("--name", "name", required=True, help="Snapshot NAME[:TAG] to publish.")
@click.option("--root", default=None, help="runc root of the container (default: runc's).")
@click.option("--exit", "exit_", is_flag=True, help="Stop the container after the checkpoint.")
@click.option("--quiesce", default=None, help="URL to POST (inside the container) before capture "
              "(default: the steps its annotations name, thaw.dev/engine or thaw.dev/quiesce).")
@click.option("--resume", default=None, help="URL to POST (inside the container) after capture "
              "(default: the steps its annotations name).")
@click.option("--no-gpu", is_flag=True, help="Do not checkpoint GPU state even if present.")
@click.pass_context
@_one_line_errors
def capture(ctx: click.Context, container_id: str, name: str, root: str | None, exit_: bool, quiesce: str | None,
            resume: str | None, no_gpu: bool) -> None:
    """Checkpoint a running container into snapshot NAME of the container's namespace (its pod's
    Kubernetes namespace, or _local)."""
    cfg, ref = _cfg(ctx), _ref(name)
    try:
        snap = do_capture(cfg, container_id, ref, root=root, leave_running=not exit_,
                          quiesce=quiesce, resume=resume, gpu=False if no_gpu else None,
                          log=lambda m: click.echo(m, err=True))
    except (ThawError, OSError) as exc:
        report(cfg, "cli", container_id, ref, None, exc)
        raise click.ClickException(f"capture of {container_id} failed: {exc}") from exc
    report(cfg, "cli", container_id, ref, snap)
    click.echo(f"captured {container_id} as {snap.ref} in {snap.namespace} ({_human(snap.size)}, "
               f"{snap.config.phases.get('total', 0):.2f}s) {snap.manifest.digest}")


@cli.command("ls")
@click.option("--namespace", "-n", "namespace", default=None, callback=_check_namespace,
              help="Only this namespace's snapshots (default: all).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_one_line_errors
def ls(ctx: click.Context, namespace: str | None, as_json: bool) -> None:
    """List snapshots in the store: size on disk (a blob shared by several counts for each), last
    use (restore, else publish), where each came from."""
    store = _store(ctx)
    rows: list[dict[str, Any]] = []
    snaps = store.snapshots(namespace)
    for s in snaps:
        prov = store.provenance(s)
        try:
            check_restorable(_cfg(ctx), prov, s.ref)
            refused = ""
        except ThawError as exc:
            refused = str(exc)
        rows.append({"namespace": s.namespace, "ref": s.ref, "digest": s.manifest.digest, "size": s.size,
                     "created": s.config.created, "origin": store.origin(s), "pushed": store.pushed(s),
                     "size_bytes": store.size(s), "last_used": store.last_used(s), "provenance": prov.to_json(),
                     "restorable": not refused, "refused": refused, "charged_to": store.charged_to(s)})
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'NAMESPACE':<20} {'NAME':<32} {'SIZE':>10}  {'CREATED':<20}  {'LAST USE':<10}  {'DIGEST':<19}  "
               f"{'PROVENANCE':<26}  ORIGIN")
    for r in rows:
        click.echo(f"{r['namespace']:<20} {r['ref']:<32} {_human(r['size_bytes']):>10}  {r['created']:<20}  "
                   f"{_ago(r['last_used']):<10}  {r['digest'][:19]}  {_provenance(r):<26}  "
                   f"{_origin(r['origin'], r['pushed'])}")


def _provenance(row: dict[str, Any]) -> str:
    """captured / signed KEYID / unsigned, and "refused" where this node's trust config would not
    restore it (`thaw inspect` says why)."""
    prov = row["provenance"]
    text: str = prov["kind"] + (f" {prov['key'][7:19]}" if prov.get("key") else "")
    return text + ("" if row["restorable"] else " (refused)")


def _ago(when: float | None) -> str:
    if when is None:
        return "never"
    seconds = max(0, int(time.time() - when))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds // n}{unit} ago"
    return f"{seconds}s ago"


def _origin(origin: str, pushed: str) -> str:
    text = {"captured": "captured here", "imported": "imported", "migrated": "migrated from thaw 0.1"}.get(
        origin, f"pulled from {origin[len('pulled:'):]}" if origin.startswith("pulled:") else origin or "?")
    return text + (f" · pushed to {pushed}" if pushed else "")


@cli.command()
@click.option("--max-bytes", type=click.IntRange(min=0), default=None,
              help="Evict down to this many bytes (default: store.max_bytes of the config; 0: evict nothing).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_one_line_errors
def gc(ctx: click.Context, max_bytes: int | None, as_json: bool) -> None:
    """Delete store files no snapshot uses, then evict least recently used snapshots (never one in
    use; captured-here and never pushed ones only with store.evict_unpushed) down to max_bytes."""
    store, limits = _store(ctx).init(), _cfg(ctx).store
    limit = limits.max_bytes if max_bytes is None else max_bytes
    unreferenced = store.gc()
    evicted = store.evict(limit, limits.evict_unpushed)
    out: dict[str, Any] = {"unreferenced_bytes": unreferenced, "evicted": [vars(e) for e in evicted],
                           "max_bytes": limit, "freed_bytes": unreferenced + sum(e.bytes_freed for e in evicted),
                           "store_bytes": store.total_bytes()}
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    for e in evicted:
        click.echo(f"evicted {e.ref} ({e.namespace}): {_human(e.bytes_freed)}")
    over = f", over max_bytes {_human(limit)}: see `thaw events`" if 0 < limit < out["store_bytes"] else ""
    click.echo(f"freed {_human(out['freed_bytes'])} ({_human(unreferenced)} unreferenced, {len(evicted)} "
               f"snapshot(s) evicted); the store holds {_human(out['store_bytes'])}{over}")


@cli.command()
@click.argument("name")
@_namespace_option
@click.pass_context
@_one_line_errors
def inspect(ctx: click.Context, name: str, namespace: str) -> None:
    """Show a snapshot's manifest digest, provenance (and whether this node's trust config lets
    it be restored), signatures and config as JSON."""
    store = _store(ctx)
    snap = store.resolve(_ref(name), namespace)
    prov = store.provenance(snap)
    try:
        check_restorable(_cfg(ctx), prov, snap.ref)
        refused = ""
    except ThawError as exc:
        refused = str(exc)
    click.echo(json.dumps({"ref": snap.ref, "namespace": snap.namespace, "manifest": snap.manifest.digest,
                           "size": snap.size, "origin": store.origin(snap), "provenance": prov.to_json(),
                           "restorable": not refused, "refused": refused, "charged_to": store.charged_to(snap),
                           "signatures": [s.to_json() for s in store.signatures(snap)],
                           "layers": [d.to_json() for d in snap.layers],
                           "config": snap.config.to_json()}, indent=1))


@cli.command()
@click.argument("name")
@_namespace_option
@click.pass_context
@_one_line_errors
def rm(ctx: click.Context, name: str, namespace: str) -> None:
    """Remove a snapshot (and blobs no other snapshot uses)."""
    _store(ctx).remove(_ref(name), namespace)
    click.echo(f"removed {_ref(name)} from {namespace}")


@cli.command()
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@_namespace_option
@click.pass_context
@_one_line_errors
def export(ctx: click.Context, name: str, file: str, namespace: str) -> None:
    """Write a snapshot as an OCI archive FILE (every blob verified by digest as it is written)."""
    snap = _store(ctx).export(_ref(name), namespace, file)
    click.echo(f"exported {snap.ref} to {file} ({_human(snap.size)})")


@cli.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--namespace", "-n", "namespace", required=True, callback=_check_namespace,
              help=f"The namespace that will own what the archive holds (e.g. {LOCAL_NAMESPACE}); the "
                   "archive does not choose.")
@click.pass_context
@_one_line_errors
def import_(ctx: click.Context, file: str, namespace: str) -> None:
    """Import snapshots from an OCI archive FILE into namespace -n (the archive does not choose):
    each must carry a signature by a key trust.keys trusts (or trust.unsigned name "import");
    digests verified before anything becomes visible."""
    store = _store(ctx)
    for s in import_archive(store, file, _cfg(ctx), namespace):
        captured_in = f" (captured in {s.config.namespace})" if s.config.namespace != s.namespace else ""
        click.echo(f"imported {s.ref} into {s.namespace}{captured_in}: {store.provenance(s).describe()} "
                   f"{s.manifest.digest}")


def _progress(as_json: bool) -> JsonLinesProgress | TerminalProgress | None:
    """Progress on a terminal; JSON lines (one per blob, and a summary) with --json; else nothing."""
    if as_json:
        return JsonLinesProgress(sys.stdout)
    return TerminalProgress(sys.stderr) if sys.stderr.isatty() else None


@cli.command()
@click.argument("name")
@click.argument("reference", required=False)
@_namespace_option
@click.option("--json", "as_json", is_flag=True, help="JSON lines: one per blob, then the result.")
@click.option("--sign", is_flag=True, help="Also store a cosign signature made with trust.signing_key.")
@click.pass_context
@_one_line_errors
def push(ctx: click.Context, name: str, reference: str | None, namespace: str, as_json: bool, sign: bool) -> None:
    """Push snapshot NAME to the registry REFERENCE (REGISTRY/REPO:TAG; default: NAME itself, when
    it is one). Blobs the registry already has are skipped. --sign: sign it for that repository
    (cosign's key-based form, verifiable with `cosign verify --key`)."""
    ref = _ref(name)
    result = distribution.push(_cfg(ctx), _store(ctx), ref, namespace, distribution.target_of(ref, reference),
                               _progress(as_json), sign=sign)
    click.echo(json.dumps(result) if as_json else
               f"pushed {result['snapshot']} ({result['namespace']}) to {result['reference']}@{result['digest']} "
               f"({_human(result['bytes'])}, {result['skipped']} of {result['blobs']} blobs already there)"
               + (", signed" if result["signed"] else ""))


@cli.command()
@click.argument("reference")
@click.option("--name", "name", default=None, help="Local name (default: REFERENCE itself).")
@click.option("--namespace", "-n", "namespace", default=None, callback=_check_namespace,
              help="The namespace that will own it (default: the one registry.pull lets pull from there).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines: one per blob, then the result.")
@click.pass_context
@_one_line_errors
def pull(ctx: click.Context, reference: str, name: str | None, namespace: str | None, as_json: bool) -> None:
    """Pull the snapshot REFERENCE (REGISTRY/REPO:TAG or @sha256:...) into the store, owned by
    namespace -n (default: the one namespace registry.pull lets pull from there; never what the
    snapshot says). Its signature is verified against trust.keys before anything is fetched,
    every blob before the snapshot becomes visible; an interrupted pull resumes where it stopped."""
    source = _ref(reference).remote
    if source is None:
        raise click.BadParameter(f"{reference!r} is not a registry reference (REGISTRY/REPO:TAG)")
    store = _store(ctx)
    snap = distribution.pull(_cfg(ctx), store, source, _ref(name) if name else None,
                             listener=_progress(as_json), owner=namespace)
    result = {"snapshot": snap.ref, "namespace": snap.namespace, "digest": snap.manifest.digest,
              "bytes": snap.size, "reference": str(source), "provenance": store.provenance(snap).to_json()}
    click.echo(json.dumps(result) if as_json else
               f"pulled {source} as {snap.ref} into {snap.namespace} ({_human(snap.size)}) {snap.manifest.digest}")


@cli.command()
@click.argument("name")
@_namespace_option
@click.pass_context
@_one_line_errors
def warm(ctx: click.Context, name: str, namespace: str) -> None:
    """Read snapshot NAME into the page cache ahead of the pods that will restore it (what a pod's
    sandbox create starts by itself)."""
    ref = _ref(name)
    show = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show:
            click.echo(f"\r{done >> 20} / {total >> 20} MiB", nl=False, err=True)
    result = prefetch.warm(_cfg(ctx), ref, namespace, progress)
    if show:
        click.echo("", err=True)
    rate = result["bytes"] / result["seconds"] / 2**30 if result["seconds"] else 0
    click.echo(f"{ref} ({namespace}): {result['outcome']}, {_human(result['bytes'])} in {result['seconds']:.2f}s"
               + (f" ({rate:.2f} GiB/s)" if rate else ""))
    if result["outcome"] not in ("warm", "busy"):
        sys.exit(1)


@cli.group()
def key() -> None:
    """Signing keys: `thaw push --sign` signs with trust.signing_key; nodes trust public keys in
    trust.keys (README: "Provenance")."""


@key.command("generate")
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--name", default="thaw", show_default=True, help="Files NAME.key (private) and NAME.pub.")
@_one_line_errors
def key_generate(directory: str, name: str) -> None:
    """Write a new ECDSA P-256 key pair: DIRECTORY/NAME.key (PKCS#8 PEM, 0600: for
    trust.signing_key, where signing happens) and DIRECTORY/NAME.pub (for trust.keys, and for
    `cosign verify --key`)."""
    private, public, kid = generate(directory, name)
    click.echo(f"wrote {private} and {public}; key id {kid}")


@cli.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they happen.")
@click.option("--container", "container", default=None, help="Only this container's events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
@_one_line_errors
def events(ctx: click.Context, follow: bool, container: str | None, as_json: bool) -> None:
    """Show what thaw did on this node: restores, cold starts (with the reason), refusals,
    captures, hook errors, container ends."""
    state_dir = _cfg(ctx).state_dir

    def show(e: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(e))           # JSON escapes every control character
        else:
            # One event, one line: whatever a field holds (text a registry sent, a line written
            # by hand), no control character reaches the terminal and no field runs on.
            field = {k: printable(e.get(k) or "", 64) for k in ("time", "level", "kind")}
            click.echo(f"{field['time'][:23]}  {field['level']:<7} {field['kind']:<14} "
                       f"{printable(e.get('container') or '-', 24):<24}  {printable(e.get('msg', ''))}")
    for e in ev.read(state_dir, container):
        show(e)
    if follow:
        try:
            for e in ev.follow(state_dir, container):
                show(e)
        except KeyboardInterrupt:
            pass


@cli.command()
@click.option("--quiet", is_flag=True, help="Print only problems.")
@click.option("--skip-containerd", is_flag=True, help="Do not check containerd's thaw handler.")
@click.option("--fix", is_flag=True, help="First clean up what dead thaw processes left (restores, "
                                         "records, staging areas, unused store files).")
@click.pass_context
def doctor(ctx: click.Context, quiet: bool, skip_containerd: bool, fix: bool) -> None:
    """Check this node: CRIU, runc, kernel, store and state permissions, containerd's thaw
    handler. Non-zero on problems."""
    _store(ctx)                          # converts a store thaw 0.1 left (node.sh runs doctor)
    if fix:
        for line in fix_node(_cfg(ctx)):
            click.echo(f"[ fix] {line}")
    problems = 0
    for ok, what, detail in run_checks(_cfg(ctx), containerd=not skip_containerd):
        if not ok:
            problems += 1
        if not ok or not quiet:
            click.echo(f"[{'ok' if ok else 'FAIL':>4}] {what}: {detail}")
    if problems:
        click.echo(f"{problems} problem(s) found", err=True)
        sys.exit(1)


def main() -> None:
    cli(prog_name="thaw")


if __name__ == "__main__":
    main()
