import pytest

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
])
def test_commit_refuses_secrets_and_names_the_file(tmp_path, content, what):
    ws = Workspace(tmp_path / "w").init()
    f = ws.root / "configs" / "leaky.yaml"
    f.write_text(content)
    with pytest.raises(WorkspaceError, match=rf"configs/leaky.yaml looks like it holds .*{what}"):
        ws.commit([f], "config: leaky")
    assert ws.log_subjects() == ["workspace: init"]
    assert "leaky" not in ws.repo.git.diff("--cached", "--name-only")


def test_commit_without_changes_returns_none(tmp_path):
    ws = Workspace(tmp_path / "w").init()
    f = ws.root / "configs" / "a.yaml"
    f.write_text("name: a\n")
    assert ws.commit([f], "config: a")
    assert ws.commit([f], "config: a again") is None
