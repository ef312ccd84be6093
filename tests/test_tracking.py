"""DVC reruns exactly what changed: edited code, a local data file replaced at the same path, and no re-download."""
import functools
import hashlib
import http.server
import json
import re
import threading

import pytest

import synthetic
from conftest import ROOT
from pneumonia import codedeps, data, params as params_lib

STAGES = ("download", "resize", "train_head", "fine_tune", "evaluate", "error_analysis")


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def _stale(repo) -> set[str]:
    """Stages `dvc status` reports, leaving out download's standing 'always changed' entry."""
    status = json.loads(repo.dvc("status", "--json").stdout)
    return {stage for stage, changes in status.items() if changes != ["always changed"]}


def test_editing_a_module_marks_exactly_the_stages_that_import_it(trained_repo):
    """Through DVC itself, one module for each set of stages that import the same modules (tests/test_dvc_yaml.py
    checks every module's place in dvc.yaml's deps against the import closure, without DVC)."""
    repo = trained_repo
    assert _stale(repo) == set()
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "pneumonia").glob("*.py"))
    assert {"pneumonia/params.py", "pneumonia/metrics.py"} <= set(modules)
    by_stages = {}
    for module in modules:  # the first module of each set; params.py and metrics.py are added by name below
        by_stages.setdefault(frozenset(s for s in STAGES if module in codedeps.stage_code(s)), module)
    chosen = {"pneumonia/params.py", "pneumonia/metrics.py", *by_stages.values()}
    assert len(by_stages) >= 4  # the stage sets differ: download imports no Keras, error_analysis imports most
    for module in sorted(chosen):
        path = repo.path / module
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        expected = {stage for stage in STAGES if module in codedeps.stage_code(stage)}
        assert _stale(repo) == expected, module
        path.write_bytes(original)
    # Spelled out for the two modules named in the issue: params.py runs in every stage; metrics.py only in
    # the two stages that compute or read metrics, so nothing is retrained for it.
    assert {s for s in STAGES if "pneumonia/params.py" in codedeps.stage_code(s)} == set(STAGES)
    assert {s for s in STAGES if "pneumonia/metrics.py" in codedeps.stage_code(s)} == {"evaluate", "error_analysis"}


def test_a_local_data_file_is_tracked_by_content(trained_repo):
    repo = trained_repo
    source = params_lib.load(repo.path / "params.yaml").data.source
    raw = repo.path / "data/raw/pneumoniamnist.npz"
    raw_mtime = raw.stat().st_mtime_ns

    # The same content (rewritten, so a newer mtime): download runs, rewrites nothing, and nothing else runs.
    with open(source, "rb") as f:
        content = f.read()
    with open(source, "wb") as f:
        f.write(content)
    out = repo.dvc("repro").stdout
    assert _ran(out) == {"download"} and "unchanged" in out
    assert raw.stat().st_mtime_ns == raw_mtime

    # New content at the same path: data/raw is rewritten, so resize and everything after it are stale.
    try:
        synthetic.write(source, seed=1, sizes=synthetic.PIPELINE_SIZES)
        out = repo.dvc("repro", "download").stdout
        assert _ran(out) == {"download"}
        assert raw.read_bytes() != content and data.md5sum(raw) == data.md5sum(source)
        # resize reads data/raw, evaluate its provenance.json (the model card names the data's MD5); DVC reruns
        # every stage after them.
        assert _stale(repo) == {"resize", "evaluate"}
        assert "resize" in _ran(repo.dvc("repro", "resize").stdout)
        assert _stale(repo) == {"train_head", "fine_tune", "evaluate", "error_analysis"}  # they read data/resized
    finally:
        with open(source, "wb") as f:
            f.write(content)  # the session's shared synthetic file, as other tests expect it


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests = 0

    def do_GET(self):
        type(self).requests += 1
        super().do_GET()

    def log_message(self, *args):
        pass


def test_medmnist_source_downloads_once_then_uses_the_cache(tmp_path, monkeypatch, synthetic_npz, capsys):
    """The real download path (keras.utils.get_file, MD5-checked) against a local server standing in for Zenodo."""
    from stages import download

    served = tmp_path / "www"
    served.mkdir()
    (served / "pneumoniamnist.npz").write_bytes(synthetic_npz.read_bytes())
    handler = functools.partial(_CountingHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    info = data.dataset_info()
    local = data.DatasetInfo(f"http://127.0.0.1:{server.server_port}/pneumoniamnist.npz",
                             hashlib.md5(synthetic_npz.read_bytes()).hexdigest(), info.n_samples, info.labels, info.license)
    monkeypatch.setattr(data, "dataset_info", lambda size=28: local)
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    params = params_lib.for_stage(params_lib.Params(), "download")
    assert params.data.source == "medmnist"
    try:
        download.main(params)
        assert _CountingHandler.requests == 1 and (tmp_path / "cache/pneumoniamnist.npz").is_file()
        raw = tmp_path / "data/raw/pneumoniamnist.npz"
        mtime = raw.stat().st_mtime_ns
        capsys.readouterr()
        download.main(params)  # the next dvc repro: nothing fetched, nothing rewritten
        assert "unchanged" in capsys.readouterr().out
        assert _CountingHandler.requests == 1 and raw.stat().st_mtime_ns == mtime
        raw.unlink()
        download.main(params)  # data/raw lost: restored from the cache, still no request
        assert _CountingHandler.requests == 1 and raw.read_bytes() == synthetic_npz.read_bytes()
    finally:
        server.shutdown()


def test_offline_download_is_one_line_with_nothing_misleading_before(tmp_path, monkeypatch, synthetic_npz, capsys):
    """A download cut short leaves nothing in the cache, so offline the next run says only the project's line,
    not Keras's "A local file was found, but it seems to be incomplete or outdated ... we will re-download"."""
    from pneumonia.errors import PipelineError
    from stages import download

    served = tmp_path / "www"
    served.mkdir()
    (served / "pneumoniamnist.npz").write_bytes(synthetic_npz.read_bytes()[:5000])  # what a cut transfer leaves
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_CountingHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    info = data.dataset_info()
    url = f"http://127.0.0.1:{server.server_port}/pneumoniamnist.npz"
    local = data.DatasetInfo(url, hashlib.md5(synthetic_npz.read_bytes()).hexdigest(), info.n_samples, info.labels,
                             info.license)
    monkeypatch.setattr(data, "dataset_info", lambda size=28: local)
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    params = params_lib.for_stage(params_lib.Params(), "download")
    try:
        with pytest.raises(PipelineError, match="hash does not match"):
            download.main(params)  # Keras's MD5 check fails; it keeps the file, the project deletes it
    finally:
        server.shutdown()
        server.server_close()
    assert list((tmp_path / "cache").iterdir()) == []
    (tmp_path / "cache/pneumoniamnist.npz").write_bytes(b"partial")  # as an older version could leave it
    capsys.readouterr()
    with pytest.raises(PipelineError) as offline:
        download.main(params)  # nothing listens on the port any more: offline
    out = capsys.readouterr()
    assert str(offline.value).startswith(f"download: could not fetch {url} (") and "set data.source" in str(offline.value)
    assert "incomplete or outdated" not in out.out + out.err and "re-download" not in out.out + out.err
    assert out.err == "" and out.out.splitlines() == ["download: source medmnist, 28x28 px", f"Downloading data from {url}"]
