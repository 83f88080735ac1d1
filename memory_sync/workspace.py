"""The workspace: a git repository both hosts clone.

Layout (see DESIGN.md): duet.yaml, datasets/, configs/, runs/, sessions/, .gitattributes.
Commits are structured: the subject names the kind, the name and the hash, e.g.
``dataset: persona 1a2b3c4d5e6f (54 train, 6 test)``. duet refuses to commit a file that looks
like a secret and names the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

GITATTRIBUTES = "sessions/*/events.jsonl merge=duet-events\nsessions/*/handoff.md merge=duet-derived\n"
GITIGNORE = ".duet/\nuploads/\n*.safetensors\n*.bin\n*.pt\n*.gguf\ncheckpoints/\n"
SECRET_PATTERNS = [
    (re.compile(r"(postgres(ql)?|mongodb(\+srv)?|mysql|redis)://[^:/\s]+:[^@/\s]+@"), "a database URL with a password"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\b(ghp|gho|ghs|github_pat)_[A-Za-z0-9_]{20,}"), "a GitHub token"),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}"), "a Hugging Face token"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "an AWS access key"),
    (re.compile(r"(?i)\b(api[_-]?key|secret|password|auth[_-]?token)\b\s*[:=]\s*['\"]?[A-Za-z0-9/+_\-]{16,}"), "a key or password"),
]


class WorkspaceError(RuntimeError):
    pass


def find_secret(text: str) -> str | None:
    for pat, what in SECRET_PATTERNS:
        if pat.search(text):
            return what
    return None


class Workspace:
    """A duet workspace on disk, with its git repository."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    @property
    def state_dir(self) -> Path:
        """Machine-local state (pids, ports, store data): never committed."""
        return self.root / ".duet"

    def init(self) -> "Workspace":
        import git

        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / ".git").exists():
            repo = git.Repo.init(self.root, initial_branch="main")
            with repo.config_writer() as cw:
                if not _has_git_identity(repo):
                    cw.set_value("user", "name", "duet")
                    cw.set_value("user", "email", "duet@localhost")
            (self.root / ".gitattributes").write_text(GITATTRIBUTES)
            (self.root / ".gitignore").write_text(GITIGNORE)
            (self.root / "duet.yaml").write_text(yaml.safe_dump(
                {"schema_version": 1, "name": self.root.name, "stores": "embedded"}, sort_keys=False))
            for d in ("datasets", "configs", "runs", "sessions"):
                (self.root / d).mkdir(exist_ok=True)
                (self.root / d / ".gitkeep").touch()
            self.commit(["."], "workspace: init")
        self.ensure_merge_driver()
        self.state_dir.mkdir(exist_ok=True)
        return self

    def ensure_merge_driver(self) -> None:
        """Register duet's events.jsonl merge driver in this clone's git config (config is not
        cloned, so every host registers it; .gitattributes routes the files to it)."""
        import shlex
        import sys

        cmd = f"{shlex.quote(sys.executable)} -m memory_sync.merge_driver %O %A %B"
        with self.repo.config_writer() as cw:
            cw.set_value('merge "duet-events"', "name", "duet: union of session events by id")
            cw.set_value('merge "duet-events"', "driver", cmd)
            # derived files are rebuilt from the merged events right after a merge: keep ours meanwhile
            cw.set_value('merge "duet-derived"', "name", "duet: derived file, rebuilt after the merge")
            cw.set_value('merge "duet-derived"', "driver", "true")

    def ensure_attributes(self) -> bool:
        """Add any of duet's .gitattributes lines a workspace made by an older duet lacks."""
        path = self.root / ".gitattributes"
        have = path.read_text().splitlines() if path.exists() else []
        missing = [x for x in GITATTRIBUTES.splitlines() if x not in have]
        if missing:
            path.write_text("".join(x + "\n" for x in have + missing))
        return bool(missing)

    @classmethod
    def clone(cls, remote: str | os.PathLike, path: str | os.PathLike) -> "Workspace":
        """This workspace on another host: a clone of ``remote`` with duet's merge drivers registered."""
        import git

        git.Repo.clone_from(str(remote), str(path))
        return cls(path).init()

    def bare_copy(self, path: str | os.PathLike) -> Path:
        """A bare repository made from this workspace (a remote both hosts can push to)."""
        import git

        git.Repo.clone_from(str(self.root), str(path), bare=True)
        return Path(path)

    @property
    def repo(self):
        import git

        return git.Repo(self.root)

    def commit(self, paths: list[str | os.PathLike], message: str) -> str | None:
        """Stage ``paths`` and commit; returns the commit SHA, or None when nothing changed.

        Refuses (WorkspaceError, nothing staged) when a staged text file looks like a secret.
        """
        repo = self.repo
        rel = [os.path.relpath(Path(p).resolve() if Path(p).is_absolute() else self.root / p, self.root)
               for p in paths]
        for path in _expand(self.root, rel):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            what = find_secret(text)
            if what:
                raise WorkspaceError(f"{path.relative_to(self.root)} looks like it holds {what}; "
                                     "refusing to commit it (keep secrets in environment variables)")
        repo.git.add("--", *rel)
        if not repo.is_dirty(index=True, working_tree=False, untracked_files=False) and repo.head.is_valid():
            return None
        repo.git.commit("-m", message, "--no-verify")
        return repo.head.commit.hexsha

    def has_remote(self, name: str = "origin") -> bool:
        return any(r.name == name for r in self.repo.remotes)

    def publish(self, remote: str = "origin", retries: int = 3) -> dict:
        """Push the current branch (and tags); on a rejected push, pull (merge) and retry.

        A merge conflict outside duet's own merge driver is reported (WorkspaceError naming the
        files) after ``git merge --abort``: nothing is resolved by discarding either side.
        """
        import git

        if not self.has_remote(remote):
            return {"pushed": False, "reason": f"no remote {remote!r}"}
        repo = self.repo
        branch = repo.active_branch.name
        pulls = 0
        for attempt in range(retries + 1):
            try:
                repo.git.push(remote, f"HEAD:refs/heads/{branch}", "--follow-tags", "--porcelain")
                return {"pushed": True, "pulls": pulls, "attempts": attempt + 1}
            except git.GitCommandError as exc:
                text = f"{exc.stdout}\n{exc.stderr}"
                if "rejected" not in text and "fetch first" not in text and "non-fast-forward" not in text:
                    raise WorkspaceError(f"git push to {remote} failed: {exc.stderr.strip()}") from exc
            self.pull(remote, branch)
            pulls += 1
        raise WorkspaceError(f"git push to {remote} was still rejected after {retries} pulls")

    def pull(self, remote: str = "origin", branch: str | None = None) -> None:
        import git

        repo = self.repo
        branch = branch or repo.active_branch.name
        try:
            repo.git.pull("--no-rebase", "--no-edit", remote, branch)
        except git.GitCommandError as exc:
            conflicted = sorted(repo.index.unmerged_blobs())
            if conflicted:
                repo.git.merge("--abort")
                raise WorkspaceError(
                    f"pulling {remote}/{branch} conflicts in {', '.join(conflicted)}; nothing was discarded "
                    "(your commits are intact): resolve with git, then run the command again") from exc
            raise WorkspaceError(f"git pull from {remote} failed: {exc.stderr.strip()}") from exc

    def tag(self, name: str, message: str) -> None:
        self.repo.create_tag(name, message=message)

    def log_subjects(self) -> list[str]:
        return [c.summary for c in self.repo.iter_commits("HEAD")][::-1]


def _has_git_identity(repo) -> bool:
    try:
        return bool(repo.git.config("user.email"))
    except Exception:
        return False


def _expand(root: Path, rel: list[str]):
    for r in rel:
        p = root / r
        if p.is_file():
            yield p
        elif p.is_dir():
            for q in p.rglob("*"):
                if q.is_file() and ".git" not in q.parts and ".duet" not in q.parts:
                    yield q
