"""The model's registry entry (dvc.yaml `artifacts:`), fetched from another place by path and by name.

`dvc artifacts get` without DVC Studio finds a version through git tags only: an annotated tag
NAME@vX.Y.Z (what `gto register` makes; a lightweight tag is ignored) on the git server, with the model in
the DVC remote that the tagged commit names as its default. `dvc get` needs the remote, not the tag.
"""
import yaml

from conftest import ROOT, Repo

NAME = "pneumonia-resnet50"


def test_dvc_yaml_declares_the_model_as_a_registry_artifact():
    artifact = yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"][NAME]
    assert artifact["path"] == "models/model.keras" and artifact["type"] == "model"
    assert artifact["desc"] and "pneumonia" in artifact["labels"]


def test_a_registered_version_is_fetched_by_name_from_the_git_server_and_remote(trained_repo, tmp_path):
    project = trained_repo
    project.dvc("remote", "add", "-d", "store", str(tmp_path / "dvc-remote"))
    project.git("commit", "-qam", "DVC remote")
    project.dvc("push")
    server = tmp_path / "server.git"  # where the project's git history is shared: a bare clone
    project.git("clone", "-q", "--bare", str(project.path), str(server))
    user = Repo(tmp_path / "user")  # somewhere else: not a clone, no cache
    user.path.mkdir()
    model = (project.path / "models/model.keras").read_bytes()

    user.dvc("get", str(server), "models/model.keras", "-o", "by_path.keras")
    assert (user.path / "by_path.keras").read_bytes() == model

    # Not registered yet: a lightweight tag of the right name is not a GTO registration.
    project.git("tag", f"{NAME}@v1.0.0")
    project.git("push", "-q", str(server), "--tags")
    proc = user.dvc("artifacts", "get", str(server), NAME, check=False)
    assert proc.returncode == 1 and f"Unable to find artifact '{NAME}'" in proc.stderr, proc.stderr

    project.git("tag", "-d", f"{NAME}@v1.0.0")
    project.run("gto", "register", NAME, "--version", "v1.0.0")  # an annotated tag: git tag -a does the same
    assert project.git("cat-file", "-t", f"{NAME}@v1.0.0").stdout.strip() == "tag"
    project.git("push", "-q", "-f", str(server), "--tags")
    out = user.dvc("artifacts", "get", str(server), NAME).stdout
    assert out.strip() == "Downloaded 1 file(s) to 'model.keras'", out
    assert (user.path / "model.keras").read_bytes() == model

    # A pinned version, and the calibration and threshold that go with it (git-tracked) from the same tag.
    user.dvc("artifacts", "get", str(server), NAME, "--rev", "v1.0.0", "-o", "v1.keras")
    assert (user.path / "v1.keras").read_bytes() == model
    user.dvc("get", str(server), "metrics/metrics.json", "--rev", f"{NAME}@v1.0.0", "-o", "v1-metrics.json")
    assert (user.path / "v1-metrics.json").read_bytes() == (project.path / "metrics/metrics.json").read_bytes()
