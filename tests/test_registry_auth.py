"""Registry credentials from docker-style config files, credential helpers, challenges, and the
progress listeners' output. No registry needed (test_registry.py has the real-registry tests)."""

from __future__ import annotations

import base64
import io
import json
import os
import stat

import pytest

from thaw.shim.registry.auth import Challenge, Credentials, load_credentials, parse_challenge, repository_scope
from thaw.shim.registry.errors import RegistryConfigError
from thaw.shim.registry.progress import JsonLinesProgress, TerminalProgress, human_bytes, human_duration
from thaw.shim.registry.transfer import BlobProgress, Progress


def write(path, obj) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def found(config_path: str, registry: str) -> Credentials:
    """load_credentials where the test expects credentials."""
    creds = load_credentials(config_path, registry)
    assert creds is not None, f"no credentials for {registry}"
    return creds


def challenge(header: str) -> Challenge:
    parsed = parse_challenge(header)
    assert parsed is not None, header
    return parsed


def test_auths_entries_in_every_form(tmp_path):
    cfg = write(tmp_path / "c.json", {"auths": {
        "https://reg.example.com:5000/v1/": {"auth": b64("alice:pa:ss")},
        "other.example.com": {"username": "bob", "password": "pw"},
        "tok.example.com": {"identitytoken": "refresh-me"},
        "empty.example.com": {},
    }})
    alice = found(cfg, "reg.example.com:5000")
    assert (alice.username, alice.password) == ("alice", "pa:ss") and "c.json" in alice.source
    assert alice.basic() == "Basic " + b64("alice:pa:ss")
    bob = found(cfg, "OTHER.example.com")
    assert (bob.username, bob.password) == ("bob", "pw")
    assert found(cfg, "tok.example.com").identity_token == "refresh-me"
    assert load_credentials(cfg, "empty.example.com") is None
    assert load_credentials(cfg, "unknown.example.com") is None
    assert load_credentials(str(tmp_path / "absent.json"), "reg.example.com:5000") is None
    assert load_credentials(None, "reg.example.com:5000") is None


@pytest.mark.parametrize("content, fragment", [
    ("not json", "cannot read"),
    ("[1]", "is not a JSON object"),
    (json.dumps({"auths": {"r.example.com": {"auth": "!!!"}}}), "not base64"),
    (json.dumps({"auths": {"r.example.com": {"auth": b64("nocolon")}}}), "no ':'"),
])
def test_malformed_config_is_a_config_error(tmp_path, content, fragment):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(RegistryConfigError) as err:
        load_credentials(str(path), "r.example.com")
    assert fragment in str(err.value) and "r.example.com" in str(err.value)


def _helper(bindir, name: str, script: str) -> None:
    path = bindir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_credential_helpers(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # A helper speaking docker's protocol: `get`, the host on stdin, JSON on stdout.
    _helper(bindir, "pass", 'read host; [ "$1" = get ] || exit 3\n'
                            'case "$host" in\n'
                            '  h.example.com) echo "{\\"ServerURL\\":\\"$host\\",\\"Username\\":\\"u\\",\\"Secret\\":\\"s\\"}";;\n'
                            '  t.example.com) echo \'{"Username":"<token>","Secret":"idtok"}\';;\n'
                            '  *) echo "credentials not found in native keychain"; exit 1;;\n'
                            'esac\n')
    _helper(bindir, "broken", "echo boom >&2; exit 2\n")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    cfg = write(tmp_path / "c.json", {"credHelpers": {"h.example.com": "pass", "t.example.com": "pass",
                                                      "x.example.com": "broken", "m.example.com": "missing"},
                                      "credsStore": "pass",
                                      "auths": {"fallback.example.com": {"auth": b64("f:g")}}})
    h = found(cfg, "h.example.com")
    assert (h.username, h.password) == ("u", "s") and "docker-credential-pass" in h.source
    assert found(cfg, "t.example.com").identity_token == "idtok"
    # credsStore has nothing for this host: the auths entry is used.
    f = found(cfg, "fallback.example.com")
    assert (f.username, f.password) == ("f", "g")
    with pytest.raises(RegistryConfigError) as err:
        load_credentials(cfg, "x.example.com")
    assert "boom" in str(err.value) and "exit 2" in str(err.value)
    with pytest.raises(RegistryConfigError) as err:
        load_credentials(cfg, "m.example.com")
    assert "docker-credential-missing is not on PATH" in str(err.value)


def test_challenges():
    c = challenge('Bearer realm="https://auth.example.com/token",service="registry.example.com",'
                        'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"')
    assert c.scheme == "bearer"
    assert c.params["realm"] == "https://auth.example.com/token" and c.params["service"] == "registry.example.com"
    assert c.scopes == ("repository:a/b:pull,push", "repository:c:pull")
    b = challenge('Basic realm="a \\"quoted\\" realm, with comma"')
    assert b.scheme == "basic" and b.params["realm"] == 'a "quoted" realm, with comma'
    assert parse_challenge("") is None
    assert repository_scope("a/b", "pull") == "repository:a/b:pull"


def _progress() -> Progress:
    p = Progress("pull")
    p.clock.started -= 10.0  # ten seconds in
    p.blobs["a"] = BlobProgress("sha256:a", 300 << 20, done=100 << 20)
    p.blobs["b"] = BlobProgress("sha256:b", 100 << 20, done=100 << 20, outcome="downloaded")
    return p


def test_terminal_progress_line_shows_bytes_rate_and_time_left():
    out = io.StringIO()
    view = TerminalProgress(out)
    p = _progress()
    view("bytes", p, p.blobs["a"])
    line = out.getvalue()
    # 200 MiB in 10 s: 20 MiB/s; 200 MiB left: 10 s.
    assert "200.0 MiB / 400.0 MiB" in line and " 50%" in line and "20.0 MiB/s" in line
    assert "0:10 left" in line and "blobs 1/2" in line
    view("end", p, None)
    assert out.getvalue().endswith("\n") and "done" in out.getvalue()


def test_json_lines_progress_is_one_object_per_line():
    out = io.StringIO()
    view = JsonLinesProgress(out)
    p = _progress()
    view("start", p, None)
    view("bytes", p, p.blobs["a"])  # byte-level lines only when an interval is asked for
    view("blob", p, p.blobs["b"])
    view("end", p, None)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["start", "blob", "end"]
    assert lines[1] == {"event": "blob", "digest": "sha256:b", "size": 100 << 20, "outcome": "downloaded",
                        "reused": 0}
    assert lines[2]["ok"] is True and lines[2]["bytes"] == 400 << 20


def test_human_units():
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KiB" and human_bytes(5 << 30) == "5.0 GiB"
    assert human_duration(None) == "--:--" and human_duration(65) == "1:05" and human_duration(3725) == "1:02:05"
