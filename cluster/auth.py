"""Ray token authentication (Ray >= 2.52, ``RAY_AUTH_MODE=token``).

The token is generated once and kept in ``<config dir>/ray_token`` with mode 0600, in a config dir
with mode 0700; it is never written into a workspace (and the secret scanner refuses any file or
text that holds it). The config dir is ``$DUET_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/duet``,
else ``~/.config/duet``.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def config_dir() -> Path:
    if os.environ.get("DUET_CONFIG_DIR"):
        return Path(os.environ["DUET_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "duet"


def ensure_token(path: Path | None = None) -> tuple[Path, bool]:
    """Return (token file, created). Creates a 256-bit token with mode 0600 when missing."""
    path = path or token_path()
    if path.parent == config_dir():  # duet's own folder: owner only (a copied token may live anywhere)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if stat.S_IMODE(path.parent.stat().st_mode) & 0o077:
            os.chmod(path.parent, 0o700)
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return path, True


def auth_env(path: Path | None = None) -> dict[str, str]:
    """Environment variables that make a Ray process (node or driver) use the token."""
    p, _ = ensure_token(path)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(p)}


def apply_auth_env(path: Path | None = None) -> None:
    """Set the auth variables in this process (before ``import ray`` connects)."""
    os.environ.update(auth_env(path))
    os.environ.pop("RAY_AUTH_TOKEN", None)


def use_token_file(path: Path) -> None:
    """Use a token copied from the head (checked: exists, non-empty, not world-readable)."""
    path = Path(path)
    if not path.is_file() or not path.read_text().strip():
        raise FileNotFoundError(f"{path}: no token there (copy ray_token from the head's config dir)")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o600)
    os.environ["DUET_TOKEN_FILE"] = str(path)


def token_path() -> Path:
    """``$DUET_TOKEN_FILE`` (set by ``use_token_file``), else ``<config dir>/ray_token``."""
    if os.environ.get("DUET_TOKEN_FILE"):
        return Path(os.environ["DUET_TOKEN_FILE"])
    return config_dir() / "ray_token"
