"""`thaw`: the operator's CLI. Thin: each command wires config, store and one library call."""

from __future__ import annotations

import json
import sys

import click

from thaw.oci.annotations import AnnotationError, SnapshotRef

from .config import Config, ConfigError, load


def _cfg(ctx: click.Context) -> Config:
    return ctx.obj["config"]


def _ref(text: str) -> SnapshotRef:
    try:
        return SnapshotRef.parse(text)
    except AnnotationError as exc:
        raise click.BadParameter(str(exc)) from exc


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="THAW_CONFIG", default=None,
              help="Config file (default /etc/thaw/config.yaml).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """thaw: snapshot and restore containers (CRIU + CUDA) below containerd."""
    try:
        ctx.obj = {"config": load(config_path)}
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command()
@click.argument("container_id")
@click.option("--name", "name", required=True, help="Snapshot NAME[:TAG] to publish.")
@click.option("--root", default=None, help="runc root of the container (default: runc's).")
@click.option("--exit", "exit_", is_flag=True, help="Stop the container after the checkpoint.")
@click.option("--quiesce", default=None, help="URL to POST (inside the container) before capture.")
@click.option("--resume", default=None, help="URL to POST (inside the container) after capture.")
@click.option("--no-gpu", is_flag=True, help="Do not checkpoint GPU state even if present.")
@click.pass_context
def capture(ctx, container_id, name, root, exit_, quiesce, resume, no_gpu):
    """Checkpoint a running container into snapshot NAME."""
    from .capture import CaptureError, capture as do_capture
    from .runc import RuncError
    ref = _ref(name)
    try:
        snap = do_capture(_cfg(ctx), container_id, ref, root=root, leave_running=not exit_,
                          quiesce=quiesce, resume=resume, gpu=False if no_gpu else None,
                          log=lambda m: click.echo(m, err=True))
    except (CaptureError, RuncError, OSError, RuntimeError) as exc:
        raise click.ClickException(f"capture of {container_id} failed: {exc}") from exc
    cfgd = snap.config
    click.echo(f"captured {container_id} as {snap.ref} ({_human(snap.size)}, "
               f"{cfgd['phases'].get('total', 0):.2f}s) {snap.manifest.digest}")


@cli.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ls(ctx, as_json):
    """List snapshots in the store."""
    from .store import Store
    snaps = Store(_cfg(ctx).store_dir).list()
    if as_json:
        click.echo(json.dumps([{"ref": s.ref, "digest": s.manifest.digest, "size": s.size,
                                "created": s.config.get("created"),
                                "namespace": s.fingerprint.get("container", {}).get("namespace")}
                               for s in snaps], indent=1))
        return
    click.echo(f"{'NAME':<40} {'SIZE':>10}  {'CREATED':<20}  DIGEST")
    for s in snaps:
        click.echo(f"{s.ref:<40} {_human(s.size):>10}  {s.config.get('created', ''):<20}  {s.manifest.digest[:19]}")


@cli.command()
@click.argument("name")
@click.pass_context
def inspect(ctx, name):
    """Show a snapshot's manifest digest and config as JSON."""
    from .store import Store, StoreError
    try:
        snap = Store(_cfg(ctx).store_dir).resolve(_ref(name))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps({"ref": snap.ref, "manifest": snap.manifest.digest, "size": snap.size,
                           "layers": [d.to_json() for d in snap.layers], "config": snap.config}, indent=1))


@cli.command()
@click.argument("name")
@click.pass_context
def rm(ctx, name):
    """Remove a snapshot (and blobs no other snapshot uses)."""
    from .store import Store, StoreError
    try:
        Store(_cfg(ctx).store_dir).remove(_ref(name))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"removed {_ref(name)}")


@cli.command()
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_context
def export(ctx, name, file):
    """Write a snapshot as an OCI archive FILE."""
    from .store import Store, StoreError
    try:
        snap = Store(_cfg(ctx).store_dir).export(_ref(name), file)
    except (StoreError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"exported {snap.ref} to {file} ({_human(snap.size)})")


@cli.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.pass_context
def import_(ctx, file):
    """Import snapshots from an OCI archive FILE (digests verified before they become visible)."""
    from .store import Store, StoreError
    try:
        snaps = Store(_cfg(ctx).store_dir).import_archive(file)
    except (StoreError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    for s in snaps:
        click.echo(f"imported {s.ref} {s.manifest.digest}")


@cli.command()
@click.option("--quiet", is_flag=True, help="Print only problems.")
@click.option("--skip-containerd", is_flag=True, help="Do not check containerd's thaw handler.")
@click.pass_context
def doctor(ctx, quiet, skip_containerd):
    """Check this node: CRIU, runc, kernel, store and state permissions, containerd's thaw
    handler. Non-zero on problems."""
    from .doctor import run_checks
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
