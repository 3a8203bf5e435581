import pytest

from thaw.oci import runc_args
from thaw.oci.runc_args import ArgvError, parse

SHIM_CREATE = ["thaw-runtime", "--root", "/run/containerd/runc/k8s.io", "--log", "/b/log.json",
               "--log-format", "json", "--systemd-cgroup", "create", "--bundle", "/b",
               "--pid-file", "/b/init.pid", "--console-socket", "/tmp/s.sock", "--no-pivot", "abc123"]


def test_shim_create_line():
    call = parse(SHIM_CREATE)
    assert call.command == "create"
    assert call.container_id == "abc123"
    assert call.root == "/run/containerd/runc/k8s.io"
    assert call.log_path == "/b/log.json" and call.log_format == "json"
    assert call.global_flags["systemd-cgroup"] is True
    assert call.flags == {"bundle": "/b", "pid-file": "/b/init.pid", "console-socket": "/tmp/s.sock",
                          "no-pivot": True}
    assert call.argv == SHIM_CREATE


@pytest.mark.parametrize("argv", [
    ["r", "-root", "/x", "-log=/l", "create", "-b", "/b", "-pid-file=/p", "id1"],
    ["r", "--root=/x", "--log", "/l", "create", "--bundle=/b", "--pid-file", "/p", "id1"],
    ["r", "--root", "/x", "--log=/l", "create", "--bundle", "/b", "-pid-file", "/p", "--", "id1"],
])
def test_single_and_double_dash_forms_are_equivalent(argv):
    call = parse(argv)
    assert call.root == "/x" and call.log_path == "/l"
    assert call.flags["bundle"] == "/b" and call.flags["pid-file"] == "/p"
    assert call.container_id == "id1"


def test_bool_flag_with_value():
    call = parse(["r", "--systemd-cgroup=false", "delete", "--force=true", "x"])
    assert call.global_flags["systemd-cgroup"] is False
    assert call.flags["force"] is True and call.container_id == "x"


def test_uninterpreted_commands_keep_their_args():
    call = parse(["r", "--root", "/x", "exec", "--process", "/p.json", "--detach", "id"])
    assert call.command == "exec" and call.args == ["--process", "/p.json", "--detach", "id"]
    assert parse(["r", "features"]).command == "features"
    assert parse(["r", "-v"]).command is None


@pytest.mark.parametrize("argv", [
    ["r", "--bogus", "create", "x"],
    ["r", "create", "--bundle"],
    ["r", "create", "--no-such-create-flag", "x"],
    ["r", "--systemd-cgroup=maybe", "start", "x"],
    ["r", "---root", "/x", "start", "x"],
])
def test_unparseable_lines_raise(argv):
    with pytest.raises(ArgvError):
        parse(argv)


def test_flags_stop_at_first_positional():
    call = parse(["r", "delete", "x", "--force"])
    assert call.args == ["x", "--force"] and "force" not in call.flags


def test_render_round_trip():
    call = parse(SHIM_CREATE)
    assert call.command is not None
    again = parse(["r", *runc_args.render(call.global_flags, call.command, call.flags, call.args)])
    assert (again.global_flags, again.flags, again.args) == (call.global_flags, call.flags, call.args)
