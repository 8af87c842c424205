"""An emulated slow inter-node link: two network namespaces ("nodes") joined by a veth pair
whose both ends are rate-limited with `tc tbf`; ranks of one node talk over that namespace's
loopback (fast), ranks of different nodes over the veth (slow). Needs root, `ip` and `tc`."""
from __future__ import annotations

import contextlib
import shutil
import subprocess


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def available() -> str | None:
    """None when the link can be built here, else why not."""
    import os

    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    return f"missing {', '.join(missing)}" if missing else None


@contextlib.contextmanager
def two_nodes(mbit: float, prefix: str = "pgo"):
    """Yields ([namespace of node 0, of node 1], [address of node 0, of node 1], [interface names])."""
    names, ifs, addrs = [f"{prefix}n0", f"{prefix}n1"], [f"{prefix}v0", f"{prefix}v1"], ["10.77.0.1", "10.77.0.2"]
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    try:
        for ns in names:
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "link", "add", ifs[0], "netns", names[0], "type", "veth", "peer", "name", ifs[1], "netns", names[1])
        burst = max(int(mbit * 1e6 / 8 / 250), 16 * 1024)  # bytes: ~4 ms of traffic, at least 16 KiB
        for ns, dev, addr in zip(names, ifs, addrs):
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
                "burst", str(burst), "latency", "50ms")
        yield names, addrs, ifs
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
