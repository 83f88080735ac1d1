"""The workspace: a git repository both hosts clone.

Layout (see DESIGN.md): duet.yaml, datasets/, configs/, runs/, sessions/, .gitattributes.
Commits are structured: the subject names the kind, the name and the hash, e.g.
``dataset: persona 1a2b3c4d5e6f (54 train, 6 test)``.

Invariants: nothing is committed or pushed that memory_sync.secret_scan finds a secret in (a
refusal leaves the index and the history as they were); only paths inside the workspace are
staged; adopting an existing folder commits duet's own files, never the folder's.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

GITATTRIBUTES = "sessions/*/events.jsonl merge=duet-events\nsessions/*/handoff.md merge=duet-derived\n"
GITIGNORE = ".duet/\nuploads/\n*.safetensors\n*.bin\n*.pt\n*.gguf\ncheckpoints/\n"
OWN_DIRS = ("datasets", "configs", "runs", "sessions")
_CLEAN_BLOBS: set[str] = set()  # blobs this process scanned and found clean (a push need not read them again)


class WorkspaceError(RuntimeError):
    """A conflict or a refused operation on the workspace (CLI exit 2)."""


class NotAWorkspace(WorkspaceError):
    """The folder is not a duet workspace (CLI exit 1: the input names the wrong folder)."""


class Workspace:
    """A duet workspace on disk, with its git repository."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    @property
    def state_dir(self) -> Path:
        """Machine-local state (pids, ports, store data): never committed."""
        return self.root / ".duet"

    def exists(self) -> bool:
        return (self.root / ".git").exists() and (self.root / "duet.yaml").is_file()

    def open(self) -> "Workspace":
        """This workspace as it is: NotAWorkspace (nothing created) unless it exists already."""
        if not self.exists():
            raise NotAWorkspace(f"{self.root} is not a duet workspace (no .git and duet.yaml there); "
                                "`duet session start`, `duet data curate` or `duet up` creates one")
        self.ensure_merge_driver()
        return self

    def init(self) -> "Workspace":
        """Create the workspace (or adopt an existing folder) and register duet's merge drivers.

        An existing folder keeps its files: only duet's own files are created and committed
        (duet.yaml, .gitattributes, .gitignore, the folders' .gitkeep); a .gitignore or
        .gitattributes already there gets duet's lines appended. If anything fails, what init
        created is removed again, so a refused init leaves the folder as it was."""
        import shutil

        import git

        if (self.root / ".git").exists():
            self.ensure_merge_driver()
            self.state_dir.mkdir(exist_ok=True)
            return self
        if self.root.exists() and not self.root.is_dir():
            raise NotAWorkspace(f"{self.root} is a file, not a folder")
        created: list[Path] = []
        appended: dict[Path, bytes] = {}
        if not self.root.exists():
            self.root.mkdir(parents=True)
            created.append(self.root)
        try:
            repo = git.Repo.init(self.root, initial_branch="main")
            created.append(self.root / ".git")
            with repo.config_writer() as cw:
                if not _has_git_identity(repo):
                    cw.set_value("user", "name", "duet")
                    cw.set_value("user", "email", "duet@localhost")
            for name, lines in ((".gitattributes", GITATTRIBUTES), (".gitignore", GITIGNORE)):
                path = self.root / name
                if path.is_symlink() or (path.exists() and not path.is_file()):
                    raise WorkspaceError(f"{path}: not a regular file; refusing to adopt {self.root}")
                if path.exists():
                    old = path.read_bytes()
                    have = old.decode("utf-8", "replace").splitlines()
                    missing = [x for x in lines.splitlines() if x not in have]
                    if missing:
                        appended[path] = old
                        sep = b"" if not old or old.endswith(b"\n") else b"\n"
                        path.write_bytes(old + sep + "".join(x + "\n" for x in missing).encode())
                else:
                    path.write_text(lines)
                    created.append(path)
            meta = self.root / "duet.yaml"
            if not meta.exists():
                meta.write_text(yaml.safe_dump({"schema_version": 1, "name": self.root.name, "stores": "embedded"},
                                               sort_keys=False))
                created.append(meta)
            own = [".gitattributes", ".gitignore", "duet.yaml"]
            for d in OWN_DIRS:
                if not (self.root / d).exists():
                    (self.root / d).mkdir()
                    created.append(self.root / d)
                keep = self.root / d / ".gitkeep"
                if not keep.exists():
                    keep.touch()
                    created.append(keep)
                own.append(f"{d}/.gitkeep")
            self.commit(own, "workspace: init")
            self.ensure_merge_driver()
        except BaseException:
            for path, old in appended.items():
                path.write_bytes(old)
            for path in reversed(created):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            raise
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

    def inside(self, path: str | os.PathLike) -> Path:
        """``path`` (relative to the workspace, or absolute) resolved; WorkspaceError unless it lies
        inside the workspace (a symlink that leads out counts as outside)."""
        p = Path(path)
        p = p if p.is_absolute() else self.root / p
        real = p.resolve()
        if real != self.root and self.root not in real.parents:
            raise WorkspaceError(f"{path}: resolves to {real}, outside the workspace {self.root}; refusing it")
        return p

    def commit(self, paths: list[str | os.PathLike], message: str) -> str | None:
        """``_commit`` under the workspace's commit lock: the architect's job and its recorder (two
        threads, or two processes on one host) commit into one workspace without racing on git's index."""
        import fcntl

        with open(self.root / ".git" / "duet-commit.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._commit(paths, message)

    def _commit(self, paths: list[str | os.PathLike], message: str) -> str | None:
        """Stage ``paths`` and commit; returns the commit SHA, or None when nothing changed.

        Every staged blob (what git would store, in any encoding, binary or compressed) is scanned
        for secrets first; a hit raises SecretFound naming file:line and kind, and the index is put
        back as it was, so the history and the index are unchanged. A staged symlink that leads out
        of the workspace is refused the same way (WorkspaceError)."""
        from memory_sync.secret_scan import SecretFound, scanner

        repo = self.repo
        rel = [os.path.relpath(self.inside(p), self.root) for p in paths]
        index = self.root / ".git" / "index"
        saved = index.read_bytes() if index.exists() else None
        try:
            repo.git.add("--", *rel)
            findings = []
            sc = scanner(self.root)
            clean = []
            for mode, sha, name in self._staged():
                if mode == "120000":
                    self.inside(name)  # a link to outside the workspace: refused
                    continue
                if mode == "160000":
                    continue
                found = sc.scan_bytes(repo.odb.stream(bytes.fromhex(sha)).read(), name)
                findings += found
                if not found:
                    clean.append(sha)
            if findings:
                raise SecretFound(findings, action=f"refusing to commit ({message.splitlines()[0][:60]})")
        except BaseException:
            if saved is None:
                index.unlink(missing_ok=True)
            else:
                index.write_bytes(saved)
            raise
        _CLEAN_BLOBS.update(clean)
        if not repo.is_dirty(index=True, working_tree=False, untracked_files=False) and repo.head.is_valid():
            return None
        repo.git.commit("-m", message, "--no-verify")
        return repo.head.commit.hexsha

    def _staged(self) -> list[tuple[str, str, str]]:
        """(mode, blob sha, path) of every entry of the index that differs from HEAD."""
        repo = self.repo
        if not repo.head.is_valid():
            out = []
            for line in repo.git.ls_files("-s", "-z").split("\0"):
                if line:
                    meta, name = line.split("\t", 1)
                    mode, sha, _ = meta.split()
                    out.append((mode, sha, name))
            return out
        raw = repo.git.diff("--cached", "--raw", "-z", "--no-abbrev", "--no-renames", "--diff-filter=ACMRT", "HEAD")
        parts = raw.split("\0")
        out = []
        for i in range(0, len(parts) - 1, 2):
            fields = parts[i].lstrip(":").split()
            if len(fields) >= 4:
                out.append((fields[1], fields[3], parts[i + 1]))
        return out

    def outgoing_findings(self, remote: str = "origin") -> list:
        """Secrets in anything a push to ``remote`` would send (commits not on its branches yet, made
        by duet or by hand): every file's content and path, every commit's message (and author
        lines), and the message of every annotated tag that ``--follow-tags`` would push."""
        from memory_sync.secret_scan import scanner

        repo = self.repo
        if not repo.head.is_valid():
            return []
        listing = repo.git.rev_list("--objects", "HEAD", "--not", f"--remotes={remote}")
        objects: dict[str, str] = {}
        paths = set()
        for ln in listing.splitlines():
            sha, _, name = ln.partition(" ")
            if name:
                paths.add(name)
            if sha not in _CLEAN_BLOBS:
                objects.setdefault(sha, name)
        tags = repo.git.for_each_ref("refs/tags", "--format=%(objectname) %(objecttype) %(refname:short)")
        for ln in tags.splitlines():
            sha, kind, name = (ln.split(" ", 2) + ["", ""])[:3]
            if kind == "tag" and sha not in _CLEAN_BLOBS:
                objects.setdefault(sha, f"tag {name}")
        sc = scanner(self.root)
        found = sc.scan_text("\n".join(sorted(paths)), "the paths of the files pushed", None) if paths else []
        for sha, name in objects.items():
            kind = repo.odb.info(bytes.fromhex(sha)).type
            if kind not in (b"blob", b"commit", b"tag"):
                continue
            data = repo.odb.stream(bytes.fromhex(sha)).read()
            if kind == b"blob":
                hits = sc.scan_bytes(data, name)
            else:
                what = f"commit {sha[:10]} (its message)" if kind == b"commit" else f"{name} (its message)"
                hits = sc.scan_text(data.decode("utf-8", "replace"), what, None)
            found += hits
            if not hits:
                _CLEAN_BLOBS.add(sha)
        return found

    def check_outgoing(self, remote: str = "origin") -> None:
        from memory_sync.secret_scan import SecretFound

        found = self.outgoing_findings(remote)
        if found:
            raise SecretFound(found, action=f"refusing to push to {remote} (a commit not pushed yet holds it: "
                                            "amend or rewrite that commit, or allow a false positive)")

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
        self.check_outgoing(remote)
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

