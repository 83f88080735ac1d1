import pytest

from memory_sync.secret_scan import SecretFound
from memory_sync.workspace import Workspace, WorkspaceError


def test_workspace_init_is_a_git_repo_with_duet_layout(tmp_path):
    ws = Workspace(tmp_path / "w").init()
    assert (ws.root / ".gitattributes").read_text().startswith("sessions/*/events.jsonl merge=duet-events")
    assert ws.log_subjects() == ["workspace: init"]
    Workspace(tmp_path / "w").init()  # idempotent
    assert ws.log_subjects() == ["workspace: init"]


@pytest.mark.parametrize("content,what", [
    ("url: postgresql://duet:hunter2secret@db.example:5432/duet\n", "database URL"),
    ("token = ghp_" + "a" * 36 + "\n", "GitHub token"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\n", "private key"),
    ("name: x\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n", "aws_secret_access_key"),
    ("db: postgresql+psycopg://user:pw@host/db\n", "database URL"),
])
def test_commit_refuses_secrets_and_names_the_file(tmp_path, content, what):
    ws = Workspace(tmp_path / "w").init()
    f = ws.root / "configs" / "leaky.yaml"
    f.write_text(content)
    with pytest.raises(SecretFound, match=rf"configs/leaky.yaml:\d+: .*{what}"):
        ws.commit([f], "config: leaky")
    assert ws.log_subjects() == ["workspace: init"]
    assert "leaky" not in ws.repo.git.diff("--cached", "--name-only")


def test_commit_without_changes_returns_none(tmp_path):
    ws = Workspace(tmp_path / "w").init()
    f = ws.root / "configs" / "a.yaml"
    f.write_text("name: a\n")
    assert ws.commit([f], "config: a")
    assert ws.commit([f], "config: a again") is None


def _clone(bare, path):
    import git

    repo = git.Repo.clone_from(str(bare), str(path))
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "t")
        cw.set_value("user", "email", "t@t")
    return Workspace(path)


def test_rejected_push_is_retried_after_a_pull(tmp_path):
    import git

    origin = Workspace(tmp_path / "origin").init()
    bare = tmp_path / "remote.git"
    git.Repo.clone_from(str(origin.root), str(bare), bare=True)
    a, b = _clone(bare, tmp_path / "a"), _clone(bare, tmp_path / "b")
    (a.root / "configs" / "a.yaml").write_text("a: 1\n")
    a.commit(["configs/a.yaml"], "config: a")
    assert a.publish()["pushed"]
    (b.root / "configs" / "b.yaml").write_text("b: 1\n")
    b.commit(["configs/b.yaml"], "config: b")
    res = b.publish()
    assert res["pushed"] and res["pulls"] == 1
    a.pull()
    assert (a.root / "configs" / "b.yaml").exists() and (b.root / "configs" / "a.yaml").exists()


def test_conflicts_are_reported_never_resolved_by_discarding(tmp_path):
    import git

    origin = Workspace(tmp_path / "origin").init()
    bare = tmp_path / "remote.git"
    git.Repo.clone_from(str(origin.root), str(bare), bare=True)
    a, b = _clone(bare, tmp_path / "a"), _clone(bare, tmp_path / "b")
    for ws, val in ((a, "lr: 1e-4\n"), (b, "lr: 3e-4\n")):
        (ws.root / "configs" / "x.yaml").write_text(val)
        ws.commit(["configs/x.yaml"], "config: x")
    a.publish()
    with pytest.raises(WorkspaceError, match=r"conflicts in configs/x.yaml; nothing was discarded"):
        b.publish()
    assert (b.root / "configs" / "x.yaml").read_text() == "lr: 3e-4\n"  # b's version intact, merge aborted
    assert not b.repo.is_dirty()
    assert b.log_subjects()[-1] == "config: x"


def test_concurrent_session_appends_merge_without_conflict(tmp_path):
    """Two hosts append to the same session offline; either pull order gives the same union by id."""
    import git

    from memory_sync.log import open_session, start_session

    origin = Workspace(tmp_path / "origin").init()
    s = start_session(origin.root, "shared")
    s.append("note", {"text": "before the split"})
    origin.commit(["sessions"], "session: start")
    bare = tmp_path / "remote.git"
    git.Repo.clone_from(str(origin.root), str(bare), bare=True)
    a, b = _clone(bare, tmp_path / "a").init(), _clone(bare, tmp_path / "b").init()
    for ws, host in ((a, "laptop"), (b, "gpu-box")):
        sess = open_session(ws.root, s.id)
        for i in range(3):
            sess.append("turn", {"role": "user", "text": f"{host} {i}"})
        ws.commit(["sessions"], f"session: {host} turns")
    assert a.publish()["pushed"]
    res = b.publish()  # rejected, pulls (merge driver runs), pushes
    assert res["pushed"] and res["pulls"] == 1
    a.pull()
    fa = (a.root / "sessions" / s.id / "events.jsonl").read_text()
    fb = (b.root / "sessions" / s.id / "events.jsonl").read_text()
    assert fa == fb
    texts = [__import__("json").loads(x)["payload"]["text"] for x in fa.splitlines()]
    assert len(texts) == 7 and len(set(texts)) == 7
    ids = [__import__("json").loads(x)["id"] for x in fa.splitlines()]
    assert ids == sorted(ids)


def test_merge_driver_refuses_a_malformed_event_line(tmp_path):
    from memory_sync import merge_driver
    from memory_sync.log import make_event

    good = __import__("json").dumps(make_event("note", {"t": 1}), sort_keys=True)
    (tmp_path / "o").write_text(good + "\n")
    (tmp_path / "a").write_text(good + "\n{not json\n")
    (tmp_path / "b").write_text(good + "\n")
    before = (tmp_path / "a").read_text()
    assert merge_driver.main([str(tmp_path / "o"), str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert (tmp_path / "a").read_text() == before  # nothing rewritten
