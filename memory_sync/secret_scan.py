"""Secrets never leave the machine: every file a duet command commits and every text it appends to a
session (or mirrors to the stores) is scanned first.

Two scanners, both run on everything:
- duet's own rules (RULES): URLs of any scheme with a password (``postgresql+psycopg://u:pw@h``,
  ``mongodb+srv://``, ``https://u:pw@``), private keys, Hugging Face / GitHub / GitLab / Slack /
  OpenAI / Anthropic / Google tokens, AWS access key ids, Ray tokens (``RAY_AUTH_TOKEN=...`` and the
  literal token of this machine's token files), and key/value assignments whose key names a secret
  (``aws_secret_access_key = ...``, ``"password": "..."``, ``HF_TOKEN=...``);
- Yelp's detect-secrets plugins (when installed), without its entropy-only detectors (they flag
  every sha256 duet writes) and without the public-IP detector.

Files are scanned whatever their encoding: UTF-8 (with or without BOM), UTF-16/32 (BOM or NUL
pattern), anything else as latin-1 (the patterns are ASCII, so an ASCII-compatible decoding keeps
them), binary files too (their ASCII and UTF-16 runs), and gzip/zip members. Long lines are scanned
in overlapping windows, so a 30 MB line costs no more than 30 MB of short ones.

A false positive is allowed by its fingerprint (sha256 of the matched value, 16 hex digits; the
refusal prints it and never the value): add it under ``allowed_secrets:`` in the workspace's
``duet.yaml`` (committed, so both hosts share it), or to ``DUET_ALLOWED_SECRETS`` (comma-separated)
for one command.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

WINDOW = 1 << 16          # characters scanned at once by duet's rules
OVERLAP = 1024            # carried into the next window (longer than any secret we match)
DS_CHUNK = 2048           # characters per detect-secrets call
MAX_UNPACKED = 512 << 20  # a compressed member larger than this is refused unscanned

_PLACEHOLDER = re.compile(
    r"^(\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|<[^>]*>|\{\{.*\}\}|%\(.*\)s|\*+|x{3,}|X{3,}|\.{3,}|"
    r"(?i:changeme|password|secret|redacted|none|null|true|false|undefined|your[_-].*|example.*|dummy.*))$")

_DB_SCHEMES = ("postgres", "postgresql", "mysql", "mariadb", "mongodb", "redis", "rediss", "amqp", "amqps",
               "mssql", "oracle", "clickhouse", "cockroachdb", "sqlserver", "neo4j", "couchdb", "cassandra")

# (pattern, kind, group holding the secret value)
RULES: list[tuple[re.Pattern, str, int]] = [
    (re.compile(r"(?i)(?<![A-Za-z0-9+.\-])([a-z][a-z0-9+.\-]{1,40}):(?:\\?/){2}([^\s/:@'\"<>\\]{1,256}):"
                r"([^\s/@'\"<>\\]{1,256})@"), "url", 3),
    (re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"), "a private key", 0),
    (re.compile(r"PuTTY-User-Key-File-\d+:"), "a private key (PuTTY)", 0),
    (re.compile(r"(?<![A-Za-z0-9])(hf_[A-Za-z0-9]{30,})"), "a Hugging Face token", 1),
    (re.compile(r"(?<![A-Za-z0-9])(api_org_[A-Za-z0-9]{30,})"), "a Hugging Face organization token", 1),
    (re.compile(r"(?<![A-Za-z0-9])((?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})"),
     "a GitHub token", 1),
    (re.compile(r"(?<![A-Za-z0-9])(glpat-[A-Za-z0-9_\-]{20,})"), "a GitLab token", 1),
    (re.compile(r"(?<![A-Za-z0-9])(xox[abposr]-[A-Za-z0-9\-]{10,})"), "a Slack token", 1),
    (re.compile(r"(?<![A-Za-z0-9])(sk-ant-[A-Za-z0-9_\-]{20,})"), "an Anthropic API key", 1),
    (re.compile(r"(?<![A-Za-z0-9_\-])(sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{32,})"), "an OpenAI API key", 1),
    (re.compile(r"(?<![A-Za-z0-9])(AIza[0-9A-Za-z_\-]{35})"), "a Google API key", 1),
    (re.compile(r"(?<![A-Za-z0-9])((?:sk|rk)_live_[0-9a-zA-Z]{20,})"), "a Stripe key", 1),
    (re.compile(r"(?<![A-Z0-9])((?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16})(?![A-Z0-9])"),
     "an AWS access key id", 1),
    (re.compile(r"(?i)RAY_AUTH_TOKEN\s*[=:]\s*[\"']?([A-Za-z0-9_\-+/=]{8,})"), "a Ray token", 1),
    (re.compile(r"(?i)(?<![A-Za-z0-9])ray[_\- ]?(?:auth[_\- ]?)?token\W{1,6}([0-9a-f]{32,})"), "a Ray token", 1),
    (re.compile(r"(?i)\bmachine\s+\S+\s+login\s+\S+\s+password\s+(\S{4,})"), "a .netrc password", 1),
    (re.compile(r"https://hooks\.slack\.com/services/(T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]{8,})"),
     "a Slack webhook URL", 1),
    (re.compile(r"https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/(\d+/[A-Za-z0-9_\-]{20,})"),
     "a Discord webhook URL", 1),
    (re.compile(r"(?i)authorization\W{1,6}(?:bearer|basic|token)\s+([A-Za-z0-9._~+/\-]{16,}=*)"),
     "an authorization header", 1),
    # a key naming a secret, then its value; the rest of the key's name is read backwards from the match
    (re.compile(r"(?i)(passw(?:or)?d|passphrase|pwd|secret|token|credentials?|key|pass)\\?[\"']?\s*(?:=>|:=|[:=])\s*"
                r"\\?[\"']?([^\s\"'\\,;}\]\[)(<>`]{8,512})"),
     "keyword", 2),
]

# detect-secrets plugins for what duet's rules do not cover (entropy-only and public-IP detectors are
# left out: they flag every sha256 and address duet writes); the keyword-led ones run only next to a
# keyword, the rest on whole windows
_DS_NEAR_KEYWORD = {"CloudantDetector", "IbmCloudIamDetector", "IbmCosHmacDetector", "SoftlayerDetector"}
_DS_WHOLE = {  # plugin -> a substring every hit contains (None: always run)
    "ArtifactoryDetector": None, "AzureStorageKeyDetector": "AccountKey=", "DiscordBotTokenDetector": None,
    "JwtTokenDetector": "eyJ", "MailchimpDetector": "-us", "NpmDetector": "_authToken", "PypiTokenDetector": "pypi-",
    "SendGridDetector": "SG.", "SquareOAuthDetector": "sq0csp-", "TelegramBotTokenDetector": None,
    "TwilioKeyDetector": None}
_DS_TRIGGER = re.compile(r"(?i)key|pw|pass|token|secret")

class SecretFound(Exception):
    """One or more secrets found; ``findings`` names each (where, kind, fingerprint), never the value."""

    def __init__(self, findings: list["Finding"], action: str = "refusing"):
        self.findings = findings
        lines = [f"  {f}" for f in findings[:20]]
        more = f"\n  ... and {len(findings) - 20} more" if len(findings) > 20 else ""
        super().__init__(
            f"{action}: {len(findings)} secret(s) found; nothing was written, committed or mirrored\n"
            + "\n".join(lines) + more
            + "\n(keep secrets in environment variables; a false positive is allowed by adding its fingerprint "
              "under 'allowed_secrets:' in duet.yaml)")


class ScannerError(Exception):
    """The secret scanner cannot scan (detect-secrets failed to load, or one of its plugins failed on
    a text): nothing is written, committed or pushed unscanned (exit 2)."""


@dataclass(frozen=True)
class Finding:
    where: str
    kind: str
    fingerprint: str

    def __str__(self) -> str:
        return f"{self.where}: {self.kind} (fingerprint {self.fingerprint})"

    def to_dict(self) -> dict:
        return {"where": self.where, "kind": self.kind, "fingerprint": self.fingerprint}


def fingerprint(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]


_KEY_NAME = re.compile(
    r"(?i)(?:^|[_.\-])?(?:passw(?:or)?d|passphrase|pwd|secret|token|credentials?"
    r"|secret[_.\-]?(?:access[_.\-]?)?key|(?:api|access|private|auth|client|signing|encryption|master|account|"
    r"service|db|database)[_.\-]?key|(?:db|database|key|user|admin|root|smtp|ftp|mail)[_.\-]?pass)$")


def _key_before(text: str, start: int, end: int) -> str | None:
    """The whole identifier ending at ``end`` (its keyword at ``start``) if it names a secret, else None."""
    i = start
    while i > 0 and start - i < 64 and (text[i - 1].isalnum() or text[i - 1] in "_.-"):
        i -= 1
    key = text[i:end]
    return key if _KEY_NAME.search(key) else None


def _keyword_ok(value: str) -> bool:
    """A key=value hit is a secret unless the value is a placeholder, a number, a reference or a path."""
    if _PLACEHOLDER.match(value) or re.fullmatch(r"[\d.\-+eE_:]+", value):
        return False
    return not value.startswith(("$", "/", "~/", "./", "../", "http://", "https://", "env:", "os.environ", "{", "%"))


def _literal_tokens() -> list[tuple[str, str]]:
    """Values that are secrets by where they came from: this machine's Ray token files."""
    out = []
    paths = [os.environ.get(v) for v in ("RAY_AUTH_TOKEN_PATH", "DUET_TOKEN_FILE")]
    base = os.environ.get("DUET_CONFIG_DIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config"), "duet")
    paths.append(os.path.join(base, "ray_token"))
    for p in dict.fromkeys(x for x in paths if x):
        try:
            tok = Path(p).read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            continue
        if len(tok) >= 16:
            out.append((tok, "this machine's Ray token"))
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        out.append((os.environ["RAY_AUTH_TOKEN"].strip(), "this machine's Ray token"))
    return out


def allowed_fingerprints(workspace: str | os.PathLike | None = None) -> set[str]:
    out = {x.strip() for x in os.environ.get("DUET_ALLOWED_SECRETS", "").split(",") if x.strip()}
    if workspace is not None:
        p = Path(workspace) / "duet.yaml"
        try:
            import yaml

            doc = yaml.safe_load(p.read_text(encoding="utf-8")) if p.is_file() else None
        except Exception:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("allowed_secrets"), list):
            out |= {str(x).strip() for x in doc["allowed_secrets"]}
    return out


class Scanner:
    """Scans texts and files; ``allowed`` holds fingerprints of accepted false positives."""

    def __init__(self, allowed: set[str] | None = None):
        self.allowed = set(allowed or ())
        self.literals = _literal_tokens()
        self._ds = _detect_secrets_plugins()  # ScannerError when it cannot load: nothing goes unscanned

    # -- texts ------------------------------------------------------------------------------------

    def scan_text(self, text: str, where: str, first_line: int | None = 1) -> list[Finding]:
        """Findings in ``text``; ``where`` is a file name (lines are appended) or a field name."""
        found: dict[tuple, Finding] = {}
        n = len(text)
        start = 0
        while start < n or start == 0:
            end = min(n, start + WINDOW)
            lo = max(0, start - OVERLAP)
            block = text[lo:end]
            for pos, kind, value in self._scan_block(block):
                line = (text.count("\n", 0, lo + pos) + first_line) if first_line is not None else None
                self._add(found, where, line, kind, value)
            if end >= n:
                break
            start = end
        return list(found.values())

    def _add(self, found: dict, where: str, line: int | None, kind: str, value: str) -> None:
        fp = fingerprint(value)
        if fp in self.allowed:
            return
        loc = f"{where}:{line}" if line is not None else where
        found.setdefault((loc, kind, fp), Finding(loc, kind, fp))

    def _scan_block(self, block: str):
        for pat, kind, group in RULES:
            for m in pat.finditer(block):
                value = m.group(group)
                if kind == "url":
                    if _PLACEHOLDER.match(value):
                        continue
                    scheme = m.group(1).lower().split("+")[0]
                    kind_ = ("a database URL with a password" if scheme in _DB_SCHEMES
                             else f"a {scheme}:// URL with a password")
                    yield m.start(), kind_, value
                elif kind == "keyword":
                    key = _key_before(block, m.start(), m.end(1))
                    if key and _keyword_ok(value):
                        yield m.start(), f"a value assigned to {key!r}", value
                else:
                    yield m.start(), kind, value
        for lit, kind in self.literals:
            i = block.find(lit)
            while i >= 0:
                yield i, kind, lit
                i = block.find(lit, i + 1)
        if self._ds is not None:
            yield from self._ds(block)

    def scan_value(self, value: object, field: str) -> list[Finding]:
        """Every string inside a JSON-like value (keys too), named by its field path."""
        out: list[Finding] = []

        def walk(v, path):
            if isinstance(v, str):
                out.extend(self.scan_text(v, path, first_line=None))
            elif isinstance(v, dict):
                for k, x in v.items():
                    if isinstance(k, str):
                        out.extend(self.scan_text(k, f"{path} (a key)", first_line=None))
                    walk(x, f"{path}.{k}")
            elif isinstance(v, (list, tuple)):
                for i, x in enumerate(v):
                    walk(x, f"{path}[{i}]")

        walk(value, field)
        return out

    # -- bytes and files -----------------------------------------------------------------------------

    def scan_bytes(self, data: bytes, name: str, depth: int = 0) -> list[Finding]:
        out: list[Finding] = []
        if depth < 3 and data[:2] == b"\x1f\x8b":
            try:
                with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
                    inner = gz.read(MAX_UNPACKED + 1)
                if len(inner) > MAX_UNPACKED:
                    return [Finding(name, "a compressed file too large to scan", fingerprint(name))]
                out += self.scan_bytes(inner, f"{name} (gunzipped)", depth + 1)
            except (OSError, EOFError, zipfile.BadZipFile):
                pass
        if depth < 3 and data[:4] == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as zf:
                    for info in zf.infolist():
                        if info.file_size > MAX_UNPACKED:
                            out.append(Finding(f"{name}!{info.filename}", "a compressed file too large to scan",
                                               fingerprint(info.filename)))
                            continue
                        out += self.scan_bytes(zf.read(info), f"{name}!{info.filename}", depth + 1)
            except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError):
                pass
        for text in decodings(data):
            out += self.scan_text(text, name)
        return list({(f.where, f.kind, f.fingerprint): f for f in out}.values())

    def scan_file(self, path: str | os.PathLike, name: str | None = None) -> list[Finding]:
        p = Path(path)
        return self.scan_bytes(p.read_bytes(), name or str(p))


def decodings(data: bytes) -> list[str]:
    """The texts a byte string may hold, for scanning: every decoding that could carry ASCII secrets."""
    if data.startswith(b"\xef\xbb\xbf"):
        return [data[3:].decode("utf-8", errors="replace")]
    for bom, enc in ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
                     (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if data.startswith(bom):
            return [data[len(bom):].decode(enc, errors="replace"), data.decode("latin-1")]
    try:
        return [data.decode("utf-8")]
    except UnicodeDecodeError:
        pass
    out = [data.decode("latin-1")]
    if b"\x00" in data:  # UTF-16 without a BOM, or a binary file with UTF-16 strings in it
        for enc, off in (("utf-16-le", 0), ("utf-16-be", 0), ("utf-16-le", 1), ("utf-16-be", 1)):
            out.append(data[off:].decode(enc, errors="replace"))
    return out


@functools.lru_cache(maxsize=1)
def _detect_secrets_plugins():
    """A block scanner over detect-secrets' plugins (stateless: built once), or None when the
    library is missing."""
    try:
        from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
        from detect_secrets.filters import heuristic
    except Exception as exc:  # missing or broken: refuse, never scan with half the rules
        raise ScannerError(f"the secret scanner detect-secrets could not be loaded ({type(exc).__name__}: {exc}); "
                           "nothing was scanned, so nothing is written, committed or pushed (reinstall duet: "
                           "make setup)") from None
    whole, near = [], []
    for cls in get_mapping_from_secret_type_to_class().values():
        if cls.__name__ in _DS_WHOLE:
            whole.append((cls(), _DS_WHOLE[cls.__name__]))
        elif cls.__name__ in _DS_NEAR_KEYWORD:
            near.append(cls())

    def ignored(secret: str) -> bool:
        return (heuristic.is_templated_secret(secret) or heuristic.is_prefixed_with_dollar_sign(secret)
                or heuristic.is_sequential_string(secret) or heuristic.is_potential_uuid(secret))

    def run(plugins, piece: str, lo: int):
        for plugin in plugins:
            try:
                hits = plugin.analyze_line(filename="scan.txt", line=piece, line_number=0)
            except Exception as exc:  # a plugin that fails would let a secret through unscanned: refuse
                raise ScannerError(f"the secret scanner's plugin {type(plugin).__name__} failed "
                                   f"({type(exc).__name__}: {str(exc)[:200]}); nothing was scanned, so nothing is "
                                   "written, committed or pushed") from None
            for s in hits or ():
                value = s.secret_value or ""
                if value and not ignored(value):
                    yield lo + max(0, piece.find(value)), f"{s.type.lower()} (detect-secrets)", value

    def scan(block: str):
        yield from run([p for p, trigger in whole if trigger is None or trigger in block], block, 0)
        spans: list[list[int]] = []
        for m in _DS_TRIGGER.finditer(block):
            lo, hi = max(0, m.start() - 160), m.end() + 200
            if spans and lo <= spans[-1][1]:
                spans[-1][1] = hi
            else:
                spans.append([lo, hi])
        for lo, hi in spans:
            yield from run(near, block[lo:hi], lo)

    return scan


def scanner(workspace: str | os.PathLike | None = None) -> Scanner:
    """A scanner with the workspace's allowed fingerprints (and this machine's token literals)."""
    return Scanner(allowed_fingerprints(workspace))


def check_value(value: object, field: str, workspace: str | os.PathLike | None = None) -> None:
    """Raise SecretFound when any string in ``value`` holds a secret."""
    found = scanner(workspace).scan_value(value, field)
    if found:
        raise SecretFound(found)


def redact(value: object, workspace: str | os.PathLike | None = None):
    """``value`` with every string that holds a secret replaced by a marker naming its kind (for texts
    duet writes by itself, e.g. a run's error message, where refusing would lose the event)."""
    sc = scanner(workspace)

    def walk(v):
        if isinstance(v, str):
            hits = sc.scan_text(v, "text", first_line=None)
            return v if not hits else f"[redacted by duet: {', '.join(sorted({h.kind for h in hits}))}]"
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return walk(value)
