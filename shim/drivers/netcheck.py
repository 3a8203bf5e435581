"""Network preconditions of a restore: the addresses the snapshot's listening sockets are bound
to must exist in the target network namespace, or CRIU cannot re-bind them.

Capture records the LISTEN sockets of the container's network namespace (from /proc/PID/net/tcp
and tcp6). Restore into a namespace joined by path (a pod's) checks it with pyroute2 before any
process comes back. Wildcard binds (0.0.0.0, ::) need nothing; loopback binds need `lo` up.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable

from thaw.oci.snapshot import Listen

_LISTEN = "0A"


def _parse_addr(hexaddr: str, family: int) -> str:
    raw = bytes.fromhex(hexaddr)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(hexaddr, 16)))
    # tcp6: four little-endian 32-bit words
    words = struct.unpack("<4I", raw)
    return socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *words))


def listening_sockets(pid: int) -> list[Listen]:
    """TCP listening sockets in pid's network namespace, sorted, unique."""
    out = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) < 4 or fields[3] != _LISTEN:
                        continue
                    addr_hex, port_hex = fields[1].split(":")
                    out.add((_parse_addr(addr_hex, family), int(port_hex, 16)))
        except OSError:
            continue
    return [Listen(a, p) for a, p in sorted(out)]


def _interface_addresses(netns_path: str) -> tuple[set[str], bool]:
    from pyroute2 import NetNS  # noqa: PLC0415 - ~40 ms to import; only for a snapshot with listening sockets in a pod's netns
    with NetNS(netns_path) as ns:
        addrs = {a.get_attr("IFA_ADDRESS") for a in ns.get_addr()}
        lo_up = any(link.get_attr("IFLA_IFNAME") == "lo" and link["flags"] & 1 for link in ns.get_links())
    return {str(ipaddress.ip_address(a)) for a in addrs if a}, lo_up


def problems(netns_path: str, listen_addrs: Iterable[str]) -> list[str]:
    """Why sockets listening on `listen_addrs` could not be restored in netns_path (empty: fine)."""
    needed = set()
    need_lo = False
    for addr in listen_addrs:
        ip = ipaddress.ip_address(addr)
        if ip.is_unspecified:
            continue
        if ip.is_loopback:
            need_lo = True
            continue
        needed.add(str(ip))
    if not needed and not need_lo:
        return []
    try:
        have, lo_up = _interface_addresses(netns_path)
    except Exception as exc:  # noqa: BLE001 - any failure to look is a reason not to restore
        return [f"cannot inspect network namespace {netns_path}: {exc}"]
    out = [f"address {a} (a listening socket of the snapshot) is not configured in {netns_path}"
           for a in sorted(needed - have)]
    if need_lo and not lo_up:
        out.append(f"loopback is down in {netns_path} but the snapshot listens on it")
    return out
