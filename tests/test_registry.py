"""The registry transport against a real registry (Debian's docker-registry, CNCF distribution
2.8) on loopback with TLS from a test CA and htpasswd or bearer-token auth. Faults that a real
registry does not make by itself come from a small proxy (tests/registry_fixture/proxy.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from registry_fixture.proxy import RegistryProxy  # noqa: E402
from registry_fixture.server import PASSWORD, USER, new_repo  # noqa: E402

pytest_plugins = ["registry_fixture.fixtures"]
pytestmark = pytest.mark.registry

from thaw.shim.registry.blobs import BlobRange  # noqa: E402
from thaw.shim.registry.client import EMPTY_DATA, EMPTY_DIGEST, EMPTY_MEDIA_TYPE, OCI_MANIFEST  # noqa: E402
from thaw.shim.registry.errors import (  # noqa: E402
    AuthError,
    Cancelled,
    DigestMismatchError,
    LocalFileError,
    NetworkError,
    NotFoundError,
    RegistryConfigError,
)
from thaw.shim.registry.progress import JsonLinesProgress, TerminalProgress  # noqa: E402
from thaw.shim.registry.transfer import Journal, pull_blobs, push_blobs  # noqa: E402

MiB = 1 << 20
ARTIFACT_TYPE = "application/vnd.thaw.snapshot.v1"
CONFIG_TYPE = "application/vnd.thaw.snapshot.config.v1+json"
LAYER_TYPE = "application/vnd.thaw.test.pages.v1"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_random(path: str, size: int) -> bytes:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def split(path: str, data: bytes, sizes: list[int], base: int = 0) -> list[BlobRange]:
    """Blobs that are consecutive byte ranges of one file."""
    out, off = [], base
    for n in sizes:
        out.append(BlobRange(sha256(data[off:off + n]), path, off, n))
        off += n
    return out


def pushed(site, tmp_path, sizes: list[int]) -> tuple[str, bytes, list[BlobRange]]:
    """A new repository holding blobs that are consecutive ranges of one file of random bytes."""
    repo, src = new_repo(), str(tmp_path / "src")
    data = write_random(src, sum(sizes))
    blobs = split(src, data, sizes)
    with site.client() as c:
        push_blobs(c, repo, blobs)
    return repo, data, blobs


def moved(blobs: list[BlobRange], path: str) -> list[BlobRange]:
    return [BlobRange(b.digest, path, b.offset, b.size) for b in blobs]


def manifest(config: bytes, blobs: list[BlobRange], artifact_type: str = ARTIFACT_TYPE,
             config_type: str = CONFIG_TYPE) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": config_type, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": b.digest, "size": b.size} for b in blobs],
        "annotations": {"org.opencontainers.image.created": "2026-01-02T03:04:05Z",
                        "org.opencontainers.image.source": "thaw test"},
    }, separators=(",", ":")).encode()


class Events:
    """A listener that keeps every event it sees."""

    def __init__(self):
        self.events: list[tuple[str, str | None, str | None]] = []

    def __call__(self, event, progress, blob):
        self.events.append((event, blob.digest if blob else None, blob.outcome if blob else None))

    def finished(self) -> list[str]:
        return [d for e, d, _ in self.events if e == "blob" and d is not None]


# --- format: what docker-registry 2.8 stores ---------------------------------------------------

def test_registry_stores_artifact_manifest_with_custom_config_and_empty_config(tls_registry, tmp_path):
    repo = new_repo()
    with tls_registry.client() as c:
        c.ping()
        data = write_random(str(tmp_path / "f"), 3 * MiB)
        blobs = split(str(tmp_path / "f"), data, [MiB, 2 * MiB])
        push_blobs(c, repo, blobs)
        config = b'{"fingerprint":{}}'
        c.push_bytes(repo, config)
        body = manifest(config, blobs)
        digest = c.put_manifest(repo, "v1", body)
        got = c.get_manifest(repo, "v1")
        assert got.data == body and got.digest == digest == sha256(body)
        assert got.media_type == OCI_MANIFEST
        assert got.json()["artifactType"] == ARTIFACT_TYPE and got.json()["config"]["mediaType"] == CONFIG_TYPE
        assert c.get_manifest(repo, digest).data == body  # by digest too
        # The OCI 1.1 "empty" config for an artifact that needs none.
        assert c.push_bytes(repo, EMPTY_DATA) == EMPTY_DIGEST
        empty = manifest(EMPTY_DATA, blobs[:1], "application/vnd.thaw.test.v1", EMPTY_MEDIA_TYPE)
        c.put_manifest(repo, "empty", empty)
        assert c.get_manifest(repo, "empty").data == empty
        assert sorted(c.list_tags(repo)) == ["empty", "v1"]
        assert c.fetch_bytes(repo, sha256(config)) == config
        # A manifest naming a blob the repository lacks is refused (distribution checks references).
        with pytest.raises(NotFoundError) as err:
            c.put_manifest(repo, "dangling", manifest(b'{"other":1}', blobs))
        assert "MANIFEST_BLOB_UNKNOWN" in str(err.value)


# --- push and pull ------------------------------------------------------------------------------

def test_push_pull_round_trip_of_byte_ranges(tls_registry, tmp_path):
    repo = new_repo()
    src = str(tmp_path / "pages.img")
    data = write_random(src, 12 * MiB + 777)
    # One multi-MiB file pushed as several blobs that are ranges of it, plus two small files.
    big = split(src, data, [5 * MiB, 4 * MiB, 3 * MiB + 777])
    small = []
    for name, size in (("a.json", 300), ("b.tar", 70_000)):
        d = write_random(str(tmp_path / name), size)
        small.append(BlobRange(sha256(d), str(tmp_path / name), 0, size))
    blobs = big + small
    out = io.StringIO()
    events = Events()

    def both(*a) -> None:
        events(*a)
        JsonLinesProgress(out)(*a)
    with tls_registry.client() as c:
        prog = push_blobs(c, repo, blobs, parallel=3, listener=both)
        assert {b.outcome for b in prog.blobs.values()} == {"uploaded"}
        assert sorted(events.finished()) == sorted(b.digest for b in blobs)
        lines = [json.loads(x) for x in out.getvalue().splitlines()]
        assert lines[0]["event"] == "start" and lines[0]["bytes"] == sum(b.size for b in blobs)
        assert lines[-1]["event"] == "end" and lines[-1]["ok"] is True

        dst = str(tmp_path / "pulled.img")
        term = io.StringIO()
        targets = moved(big, dst) + [BlobRange(b.digest, str(tmp_path / ("pulled-" + os.path.basename(b.path))), 0,
                                               b.size) for b in small]
        prog = pull_blobs(c, repo, targets, parallel=3, listener=TerminalProgress(term))
        assert {b.outcome for b in prog.blobs.values()} == {"downloaded"}
    with open(dst, "rb") as f:
        assert f.read() == data
    for b, t in zip(small, targets[len(big):]):
        with open(b.path, "rb") as f1, open(t.path, "rb") as f2:
            assert f1.read() == f2.read()
    assert "pull" in term.getvalue() and "done" in term.getvalue().splitlines()[-1]


def test_head_skips_blobs_the_registry_has(tls_registry, tmp_path):
    repo = new_repo()
    src = str(tmp_path / "f")
    data = write_random(src, 3 * MiB)
    blobs = split(src, data, [MiB, MiB, MiB])
    with tls_registry.client() as c:
        push_blobs(c, repo, blobs[:2])
        uploads_before = len(tls_registry.log_lines(f"POST /v2/{repo}/blobs/uploads/"))
        prog = push_blobs(c, repo, blobs)
        uploads_after = len(tls_registry.log_lines(f"POST /v2/{repo}/blobs/uploads/"))
    outcomes = {b.digest: b.outcome for b in prog.blobs.values()}
    assert outcomes == {blobs[0].digest: "present", blobs[1].digest: "present", blobs[2].digest: "uploaded"}
    assert uploads_after - uploads_before == 1  # only the new blob opened an upload


def test_cross_repository_mount_and_fallback_to_upload(tls_registry, tmp_path):
    base, other, lacking = new_repo(), new_repo(), new_repo()
    src = str(tmp_path / "f")
    data = write_random(src, 2 * MiB)
    blobs = split(src, data, [MiB, MiB])
    with tls_registry.client() as c:
        push_blobs(c, base, blobs[:1])
        prog = push_blobs(c, other, blobs, mount_from=(base,))
        assert prog.blobs[blobs[0].digest].outcome == "mounted"
        assert prog.blobs[blobs[1].digest].outcome == "uploaded"  # not in base: the mount's upload was used
        assert c.blob_size(other, blobs[0].digest) == MiB
        # A source repository that lacks the blob: the registry opens an upload instead; the
        # next source is tried, and the last refused mount's session carries the upload.
        assert c.push_blob(lacking, blobs[0], mount_from=(new_repo(), base)) == "mounted"
        assert c.push_blob(lacking, blobs[1], mount_from=(new_repo(), base)) == "uploaded"
    assert tls_registry.log_lines(f"POST /v2/{other}/blobs/uploads/?from={base}") or \
        tls_registry.log_lines(f"POST /v2/{other}/blobs/uploads/?mount=")


def test_chunked_upload(tls_registry, tmp_path):
    repo = new_repo()
    src = str(tmp_path / "f")
    data = write_random(src, 5 * MiB + 123)
    blob = split(src, data, [len(data)])[0]
    with tls_registry.client(chunk_size=MiB) as c:
        assert push_blobs(c, repo, [blob]).blobs[blob.digest].outcome == "uploaded"
        patches = tls_registry.log_lines(f"PATCH /v2/{repo}/blobs/uploads/")
        assert len(patches) == 6
        out = str(tmp_path / "out")
        pull_blobs(c, repo, [BlobRange(blob.digest, out, 0, blob.size)])
    with open(out, "rb") as f:
        assert f.read() == data


def test_push_from_a_range_that_is_not_the_digest_is_refused(tls_registry, tmp_path):
    src = str(tmp_path / "f")
    data = write_random(src, MiB)
    wrong = BlobRange(sha256(b"something else"), src, 0, len(data))
    with tls_registry.client() as c, pytest.raises(DigestMismatchError) as err:
        c.push_blob(new_repo(), wrong)
    assert wrong.digest in str(err.value) and tls_registry.host in str(err.value)


# --- resume ---------------------------------------------------------------------------------------

_CHILD = r"""
import json, sys, time
from thaw.shim.registry.blobs import BlobRange
from thaw.shim.registry.client import RegistryClient
from thaw.shim.registry.transport import Settings
import thaw.shim.registry.transfer as transfer
from thaw.shim.registry.transfer import pull_blobs
transfer.PROGRESS_INTERVAL_S = 0  # an event per chunk: pause exactly where asked
args = json.loads(sys.argv[1])
blob = BlobRange(**args["blob"])
def listener(event, progress, b):
    if event == "bytes" and b.done >= args["pause_at"]:
        print("PAUSED", b.done, flush=True)
        time.sleep(120)  # the test kills us here, mid-blob
client = RegistryClient(args["host"], Settings(**args["settings"]), checkpoint_every=args["checkpoint_every"])
pull_blobs(client, args["repo"], [blob], journal=args["journal"], listener=listener)
print("FINISHED", flush=True)
"""


def test_pull_killed_with_sigkill_resumes_from_its_journal(tls_registry, tmp_path):
    repo, data, (blob,) = pushed(tls_registry, tmp_path, [48 * MiB])
    dst, journal = str(tmp_path / "dst"), str(tmp_path / "pull.journal")
    target = BlobRange(blob.digest, dst, 4096, blob.size)  # a range that does not start the file
    settings = {"auth_config": tls_registry.auth_config, "ca_bundle": tls_registry.ca.ca}
    args = {"blob": {"digest": target.digest, "path": dst, "offset": 4096, "size": target.size},
            "pause_at": 20 * MiB, "checkpoint_every": 4 * MiB, "host": tls_registry.host, "repo": repo,
            "journal": journal, "settings": settings}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stderr is not None
    try:
        ready, _, _ = select.select([child.stdout], [], [], 60)
        line = child.stdout.readline() if ready else ""
        assert line.startswith("PAUSED"), f"child did not pause: {line!r} {child.stderr.read() if not ready else ''}"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    have, prefix = Journal(journal).get(target)
    assert 16 * MiB <= have < blob.size and prefix == sha256(data[:have])

    events = Events()
    with tls_registry.client() as c:
        prog = pull_blobs(c, repo, [target], journal=journal, listener=events)
    bp = next(iter(prog.blobs.values()))
    assert bp.outcome == "downloaded" and bp.reused == have
    with open(dst, "rb") as f:
        f.seek(4096)
        assert f.read() == data
    # The second pull asked only for the rest: a 206 answer in the registry's access log.
    assert tls_registry.log_lines(f"GET /v2/{repo}/blobs/{blob.digest} HTTP/1.1\" 206 {blob.size - have}")
    # Run again: the journal says complete; the range is re-verified without a download.
    with tls_registry.client() as c:
        again = pull_blobs(c, repo, [target], journal=journal)
    assert next(iter(again.blobs.values())).outcome == "verified"


def test_registry_stopped_mid_pull_is_a_network_error_and_a_later_pull_resumes(fresh_registry, tmp_path, monkeypatch):
    import thaw.shim.registry.transfer as transfer
    monkeypatch.setattr(transfer, "PROGRESS_INTERVAL_S", 0)  # an event per chunk: stop it early, surely
    repo, data, (blob,) = pushed(fresh_registry, tmp_path, [64 * MiB])
    target = BlobRange(blob.digest, str(tmp_path / "dst"), 0, blob.size)
    journal = str(tmp_path / "journal")
    events = Events()
    killed = threading.Event()

    def listener(event, progress, b):
        events(event, progress, b)
        if event == "bytes" and b.done >= 8 * MiB and not killed.is_set():
            killed.set()
            fresh_registry.server.stop(signal.SIGKILL)

    with fresh_registry.client(checkpoint_every=2 * MiB) as c, pytest.raises(NetworkError) as err:
        pull_blobs(c, repo, [target], journal=journal, listener=listener)
    msg = str(err.value)
    assert killed.is_set()
    assert fresh_registry.host in msg and repo in msg and blob.digest in msg
    assert events.finished() == []  # nothing reported complete
    have, _ = Journal(journal).get(target)
    assert 0 < have < blob.size

    fresh_registry.server.start()
    with fresh_registry.client() as c:
        prog = pull_blobs(c, repo, [target], journal=journal)
    assert next(iter(prog.blobs.values())).reused == have
    with open(target.path, "rb") as f:
        assert f.read() == data


# --- faults ---------------------------------------------------------------------------------------

def test_wrong_or_missing_credentials_are_auth_errors(tls_registry, tmp_path):
    bad = tls_registry.server.auth_config(str(tmp_path / "bad.json"), USER, "not-the-password")
    with tls_registry.client(auth_config=bad) as c, pytest.raises(AuthError) as err:
        c.ping()
    assert tls_registry.host in str(err.value) and "bad.json" in str(err.value)
    src = str(tmp_path / "f")
    data = write_random(src, 1000)
    with tls_registry.client(auth_config=bad) as c, pytest.raises(AuthError) as err:
        push_blobs(c, "thaw/denied", split(src, data, [1000]))
    assert "thaw/denied" in str(err.value)
    with tls_registry.client(auth_config=str(tmp_path / "missing.json")) as c, pytest.raises(AuthError) as err:
        c.blob_size("thaw/x", sha256(b"x"))
    assert "requires a login" in str(err.value)


def test_corrupted_blob_is_a_digest_error_and_nothing_is_complete(tls_registry, tmp_path):
    repo, data, blobs = pushed(tls_registry, tmp_path, [3 * MiB, 3 * MiB])
    # Byte 1 MiB + 5 of every blob body is flipped on its way through the proxy.
    with RegistryProxy(tls_registry.server.url, ca=tls_registry.ca.ca, corrupt_at=MiB + 5) as proxy:
        from thaw.shim.registry.client import RegistryClient
        journal = str(tmp_path / "journal")
        events = Events()
        targets = moved(blobs, str(tmp_path / "dst"))
        creds = tls_registry.server.auth_config(str(tmp_path / "proxy.json"), USER, PASSWORD, host=proxy.host)
        client = RegistryClient(proxy.host, tls_registry.settings(creds, insecure_hosts=(proxy.host,)))
        with client, pytest.raises(DigestMismatchError) as err:
            pull_blobs(client, repo, targets, journal=journal, listener=events, parallel=1)
        assert proxy.blob_gets >= 1
    assert repo in str(err.value) and (blobs[0].digest in str(err.value) or blobs[1].digest in str(err.value))
    assert events.finished() == []
    assert all(Journal(journal).get(t) == (0, None) for t in targets)  # no resume point for bad bytes
    with tls_registry.client() as c:  # straight from the registry: succeeds, from scratch
        prog = pull_blobs(c, repo, targets, journal=journal)
    assert all(b.reused == 0 for b in prog.blobs.values())
    with open(str(tmp_path / "dst"), "rb") as f:
        assert f.read() == data


@pytest.mark.root
def test_disk_full_during_pull_is_a_local_file_error(tls_registry, tmp_path):
    repo, data, blobs = pushed(tls_registry, tmp_path, [2 * MiB, 6 * MiB])
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        events = Events()
        with tls_registry.client() as c, pytest.raises(LocalFileError) as err:
            pull_blobs(c, repo, moved(blobs, str(mnt / "dst")), listener=events, parallel=1)
        assert "No space left on device" in str(err.value) and blobs[1].digest in str(err.value)
        assert blobs[1].digest not in events.finished()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
    with tls_registry.client() as c:  # with room, the same pull succeeds
        pull_blobs(c, repo, moved(blobs, str(tmp_path / "dst")))
    with open(str(tmp_path / "dst"), "rb") as f:
        assert f.read() == data


def test_first_hard_error_cancels_the_other_transfers(tls_registry, tmp_path):
    repo = new_repo()
    src = str(tmp_path / "src")
    data = write_random(src, 64 * MiB)
    good = split(src, data, [32 * MiB, 32 * MiB])
    # A range past the end of its file: reading it fails at once.
    broken = BlobRange(sha256(b"never"), src, 64 * MiB - 10, 1000)
    events = Events()
    with tls_registry.client(chunk_size=MiB) as c, pytest.raises(LocalFileError) as err:
        push_blobs(c, repo, [broken, *good], parallel=3, listener=events)
    assert "ends before" in str(err.value)
    assert len(events.finished()) < 2  # the big uploads were stopped, not finished
    cancel = threading.Event()
    cancel.set()
    with tls_registry.client() as c, pytest.raises(Cancelled):
        pull_blobs(c, repo, moved(good, str(tmp_path / "dst")), cancel=cancel)


def test_tls_needs_the_ca_and_plain_http_needs_listing_except_on_loopback(tls_registry, tmp_path):
    with tls_registry.client(ca_bundle=None) as c, pytest.raises(NetworkError) as err:
        c.ping()
    assert "certificate" in str(err.value).lower()
    plain = RegistryProxy(tls_registry.server.url, ca=tls_registry.ca.ca).start()
    try:
        from thaw.shim.registry.client import RegistryClient
        from thaw.shim.registry.transport import Transport, is_loopback
        # A registry on this host (127.0.0.0/8, localhost) speaking plain HTTP: docker's rule,
        # HTTPS first, then HTTP, with no insecure-registries entry.
        for host in (plain.host, plain.storage_host):
            creds = tls_registry.server.auth_config(str(tmp_path / f"{host}.json"), USER, PASSWORD, host=host)
            with RegistryClient(host, tls_registry.settings(creds)) as c:
                c.ping()
        # Any other host must be listed: thaw never falls back to plain HTTP for it.
        assert [is_loopback(h) for h in ("127.0.0.1:5000", "127.8.0.1", "localhost:5000", "[::1]:5000", "LOCALHOST")] \
            == [True] * 5
        assert not any(is_loopback(h) for h in ("10.0.0.1:5000", "localhost.example.com", "registry.local:5000",
                                                 "[fe80::1]:5000", "127.0.0.1.nip.io"))
        remote = Transport("registry.example:5000")
        assert remote.scheme == "https"
        with pytest.raises(RegistryConfigError):
            remote._check_url("http://registry.example:5000/v2/", ("", ""))
        assert Transport("registry.example:5000", tls_registry.settings(None, insecure_hosts=("registry.example:5000",))
                         ).scheme == "http"
    finally:
        plain.stop()


def test_redirect_to_blob_storage_drops_authorization(tls_registry, tmp_path):
    repo, data, (blob,) = pushed(tls_registry, tmp_path, [2 * MiB])
    from thaw.shim.registry.auth import Credentials
    from thaw.shim.registry.client import RegistryClient
    basic = Credentials(USER, PASSWORD).basic()
    with RegistryProxy(tls_registry.server.url, ca=tls_registry.ca.ca, redirect=True, upstream_auth=basic) as proxy:
        creds = tls_registry.server.auth_config(str(tmp_path / "proxy.json"), USER, PASSWORD, host=proxy.host)
        target = BlobRange(blob.digest, str(tmp_path / "dst"), 0, blob.size)
        # The storage side is another origin; plain HTTP to it must be allowed explicitly.
        with RegistryClient(proxy.host, tls_registry.settings(creds, insecure_hosts=(proxy.host,))) as c, \
                pytest.raises(RegistryConfigError) as err:
            c.download_blob(repo, target)
        assert proxy.storage_host in str(err.value)
        insecure = (proxy.host, proxy.storage_host)
        with RegistryClient(proxy.host, tls_registry.settings(creds, insecure_hosts=insecure)) as c:
            c.download_blob(repo, target)
        # The registry side got the credentials, the storage side (another origin) none.
        assert proxy.redirected_auth_headers and all(h == basic for h in proxy.redirected_auth_headers)
        assert proxy.storage_auth_headers and all(h is None for h in proxy.storage_auth_headers)
    with open(target.path, "rb") as f:
        assert f.read() == data


# --- bearer tokens ---------------------------------------------------------------------------------

def test_bearer_token_flow_with_credentials_and_anonymous(token_registry, tmp_path):
    token = token_registry.token
    src = str(tmp_path / "src")
    data = write_random(src, 4 * MiB)
    blobs = split(src, data, [MiB] * 4)
    repo = new_repo()
    start = len(token.requests)
    with token_registry.client() as c:
        c.ping()
        push_blobs(c, repo, blobs, parallel=2)
        push_blobs(c, "thaw/public", blobs[:1])
        prog = push_blobs(c, new_repo(), blobs[:2], mount_from=(repo,))
        assert {b.outcome for b in prog.blobs.values()} == {"mounted"}
        pull_blobs(c, repo, moved(blobs, str(tmp_path / "dst")), parallel=2)
    asked = token.requests[start:]
    assert all(r["user"] == USER for r in asked)
    # Tokens are cached per scope: a handful of token requests for dozens of registry requests.
    assert len(asked) <= 12, asked
    with open(str(tmp_path / "dst"), "rb") as f:
        assert f.read() == data

    with token_registry.client(auth_config=None) as anon:  # anonymous tokens: pull of a public repository
        anon.download_blob("thaw/public", BlobRange(blobs[0].digest, str(tmp_path / "anon"), 0, MiB))
        with pytest.raises(AuthError):
            anon.download_blob(repo, BlobRange(blobs[1].digest, str(tmp_path / "anon2"), 0, MiB))
        with pytest.raises(AuthError):
            anon.push_blob("thaw/public", blobs[1])
    bad = token_registry.server.auth_config(str(tmp_path / "bad.json"), USER, "wrong")
    with token_registry.client(auth_config=bad) as c, pytest.raises(AuthError) as err:
        c.blob_size(repo, blobs[0].digest)
    assert "token service" in str(err.value) and "refused" in str(err.value)


# --- a second, independent OCI client ---------------------------------------------------------------

def test_skopeo_reads_what_we_pushed(tls_registry, tmp_path):
    if not shutil.which("skopeo"):
        pytest.fail("skopeo missing (install/node.sh --dev installs it)") if os.environ.get(
            "THAW_TEST_STRICT") == "1" else pytest.skip("needs skopeo")
    repo = new_repo()
    src = str(tmp_path / "pages")
    data = write_random(src, 3 * MiB + 5)
    blobs = split(src, data, [2 * MiB, MiB + 5])
    config = json.dumps({"formatVersion": 2}).encode()
    body = manifest(config, blobs)
    with tls_registry.client() as c:
        push_blobs(c, repo, blobs)
        c.push_bytes(repo, config)
        digest = c.put_manifest(repo, "v1", body)
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(tls_registry.ca.ca, certs / "ca.crt")
    common = ["--authfile", tls_registry.auth_config]
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--cert-dir", str(certs), *common,
                          f"docker://{tls_registry.host}/{repo}:v1"], capture_output=True, timeout=60)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == body
    layout = tmp_path / "layout"
    cp = subprocess.run(["skopeo", "copy", "--src-cert-dir", str(certs), "--src-authfile", tls_registry.auth_config,
                         f"docker://{tls_registry.host}/{repo}:v1", f"oci:{layout}:v1"], capture_output=True,
                        timeout=120)
    assert cp.returncode == 0, cp.stderr
    index = json.loads((layout / "index.json").read_text())
    (desc,) = index["manifests"]
    assert desc["digest"] == digest and desc["mediaType"] == OCI_MANIFEST
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == "v1"

    def blob(d: str) -> bytes:
        got = (layout / "blobs" / "sha256" / d.split(":", 1)[1]).read_bytes()
        assert sha256(got) == d
        return got
    man = json.loads(blob(digest))
    # image-spec 1.1 manifest of an artifact: schemaVersion 2, mediaType, artifactType, config, layers.
    assert man["schemaVersion"] == 2 and man["mediaType"] == OCI_MANIFEST and man["artifactType"] == ARTIFACT_TYPE
    assert man["config"] == {"mediaType": CONFIG_TYPE, "digest": sha256(config), "size": len(config)}
    assert blob(man["config"]["digest"]) == config
    assert [layer["digest"] for layer in man["layers"]] == [b.digest for b in blobs]
    assert b"".join(blob(layer["digest"]) for layer in man["layers"]) == data
    assert all(layer["size"] == b.size for layer, b in zip(man["layers"], blobs))
    assert time.strptime(man["annotations"]["org.opencontainers.image.created"], "%Y-%m-%dT%H:%M:%SZ")

