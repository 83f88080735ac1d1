"""Where a duet server listens: a bind address read strictly (a Ray node, the dashboard), and
every interface only when asked for by name (``--allow-all-interfaces``)."""

from __future__ import annotations


def parse_bind(bind: str) -> str:
    """A bind address read strictly: an IPv4 address in dotted-quad form, an IPv6 address, or
    ``localhost``; returned in its normal form ("0:0::0" -> "::"). The forms the C resolver also
    takes ("0", "0x0", "127.1", "0177.0.0.1", names) are refused: each hides what it binds."""
    import ipaddress

    text = str(bind).strip()
    if text == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise ValueError(f"--bind {str(bind)[:80]!r}: not an IP address; give one like 127.0.0.1, a LAN/VPN "
                         "address such as 100.64.0.2, or ::1") from None
    mapped = getattr(addr, "ipv4_mapped", None)
    if mapped is not None:
        addr = mapped
    if addr.is_multicast or (addr.version == 4 and addr == ipaddress.IPv4Address("255.255.255.255")):
        raise ValueError(f"--bind {text!r}: a multicast/broadcast address, not one a server can listen on")
    return "::" if addr.is_unspecified and addr.version == 6 else str(addr)


def is_wildcard(bind: str) -> bool:
    return bind in ("0.0.0.0", "::")


def check_bind(bind: str, allow_all: bool) -> str:
    """``bind`` in normal form (``parse_bind``); ValueError for a wildcard (every interface) without
    --allow-all-interfaces."""
    norm = parse_bind(bind)
    if is_wildcard(norm) and not allow_all:
        raise ValueError(f"refusing to bind {bind!r} (every interface): give the LAN/VPN address (e.g. a Tailscale "
                         "IP), or pass --allow-all-interfaces if you really mean every interface")
    return norm
