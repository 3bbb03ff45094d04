"""Sharing through real DVC remotes: a SeaweedFS S3 server on loopback (and a local folder),
a bare git origin, and fresh clones with empty caches, as a teammate would have.

The project is the reproduced tiny pipeline; the server starts on free ports per test.
"""

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import AVX2_CAP, repro, run
from tools.s3server import BUCKET, S3Server

PREFIX = "qlora"  # configure_dvc's path in the bucket


@pytest.fixture
def s3(tmp_path):
    with S3Server(tmp_path / "s3") as server:
        yield server


def s3fs_of(server):
    import s3fs

    return s3fs.S3FileSystem(key=server.key, secret=server.secret, client_kwargs={"endpoint_url": server.endpoint})


def publish(project, origin):
    """A bare git origin holding the project's commits, as a team's git server would."""
    run(["git", "init", "-q", "--bare", str(origin)], project.parent)
    run(["git", "remote", "add", "origin", str(origin)], project)
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], project)
    run(["git", "symbolic-ref", "HEAD", "refs/heads/main"], origin)


def commit(project, message):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", message], project)
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], project)


def clone(origin, dest, server=None):
    """A teammate's fresh clone, empty cache; the S3 keys go into their .dvc/config.local."""
    run(["git", "clone", "-q", str(origin), str(dest)], dest.parent)
    if server:
        for key, value in (("access_key_id", server.key), ("secret_access_key", server.secret)):
            run(["dvc", "remote", "modify", "--local", "storage", key, value], dest)
    assert not (dest / ".dvc/cache").exists()
    return dest


def file_md5(project, out, name):
    """The md5 DVC recorded for file `name` inside the directory output `out` (from its .dir object)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    dir_md5 = next(o["md5"] for s in lock.values() for o in s.get("outs", []) if o["path"] == out)
    listing = json.loads((project / ".dvc/cache/files/md5" / dir_md5[:2] / dir_md5[2:]).read_text())
    return next(e["md5"] for e in listing if e["relpath"] == name)


def md5(data):
    return hashlib.md5(data).hexdigest()


def corrupt_objects(fs, root):
    """Objects under a DVC remote root whose content does not hash to their name."""
    bad = []
    for path in fs.find(f"{root}/files/md5"):
        name = "".join(path.split("/")[-2:]).removesuffix(".dir")
        if md5(fs.cat(path)) != name:
            bad.append(path)
    return bad


def test_push_then_a_fresh_clone_pulls_and_reproduces_nothing(tiny_project, s3, tmp_path):
    p = tiny_project
    publish(p, tmp_path / "origin.git")
    s3.configure_dvc(p)
    commit(p, "S3 remote")
    assert s3.secret not in (p / ".dvc/config").read_text() and s3.secret in (p / ".dvc/config.local").read_text()
    assert ".dvc/config.local" not in run(["git", "ls-files", ".dvc"], p).stdout, "credentials are never committed"

    pushed = run(["dvc", "push"], p).stdout
    assert "files pushed" in pushed
    assert "in sync" in run(["dvc", "status", "--cloud"], p).stdout
    fs = s3fs_of(s3)
    objects = set(fs.find(f"{BUCKET}/{PREFIX}/files/md5"))
    lock = yaml.safe_load((p / "dvc.lock").read_text())["stages"]
    outs = {o["path"]: o["md5"] for stage in lock.values() for o in stage.get("outs", []) if "md5" in o}
    shared = ["data/prepared", "data/tokenized", "models/base", "models/tokenizer", "models/quantized",
              "models/adapter", "models/export"]
    for out in shared:  # metrics are small and travel in git (cache: false)
        h = outs[out]
        assert f"{BUCKET}/{PREFIX}/files/md5/{h[:2]}/{h[2:]}" in objects, f"{out} is on the remote"
    for out, name in (("models/quantized", "model.safetensors"), ("models/adapter", "adapter_model.safetensors")):
        h = file_md5(p, out, name)
        assert f"{BUCKET}/{PREFIX}/files/md5/{h[:2]}/{h[2:]}" in objects, f"{out}/{name} is on the remote"
    assert corrupt_objects(fs, f"{BUCKET}/{PREFIX}") == []

    # The teammate's machine has no native bf16 (the kernels capped at AVX2): compute_dtype auto is
    # resolved where the model is loaded, so nothing reruns for it, and their own experiment trains in float32.
    c = clone(tmp_path / "origin.git", tmp_path / "teammate", s3)
    run(["dvc", "pull"], c, env=AVX2_CAP)
    assert "up to date" in run(["dvc", "status"], c, env=AVX2_CAP).stdout
    assert repro(c, env=AVX2_CAP) == set(), "the pulled outputs are exactly what the pipeline would produce"
    assert (c / "metrics/evaluate.json").read_text() == (p / "metrics/evaluate.json").read_text()
    run(["dvc", "exp", "run", "-S", "lora.r=4"], c, env=AVX2_CAP)
    for record in ("train", "evaluate", "export"):
        assert json.loads((c / f"metrics/{record}.json").read_text())["compute_dtype"] == "float32", record
    # The workspace links into the cache (cache.type): a model is on disk once.
    weights = c / "models/quantized/model.safetensors"
    h = file_md5(c, "models/quantized", "model.safetensors")
    assert os.path.samefile(weights, c / ".dvc/cache/files/md5" / h[:2] / h[2:])


def test_experiment_push_pull_and_apply(tiny_project, s3, tmp_path, monkeypatch):
    p = tiny_project
    publish(p, tmp_path / "origin.git")
    s3.configure_dvc(p)
    commit(p, "S3 remote")
    run(["dvc", "exp", "run", "-n", "wide", "-S", "lora.r=16"], p)
    adapter = (p / "models/adapter/adapter_model.safetensors").read_bytes()
    accuracy = json.loads((p / "metrics/evaluate.json").read_text())["test_accuracy"]
    run(["dvc", "exp", "push", "origin", "wide"], p)  # git refs to origin, outputs to the DVC remote

    c = clone(tmp_path / "origin.git", tmp_path / "teammate", s3)
    run(["dvc", "exp", "pull", "origin", "wide"], c)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], c).stdout)
    wide = next(e["revs"][0]["data"] for b in shown for e in b.get("experiments") or [] if e["name"] == "wide")
    assert wide["params"]["params.yaml"]["data"]["lora"]["r"] == 16
    assert wide["metrics"]["metrics/scores.json"]["data"]["accuracy"] == accuracy
    # DVC's own table of the run beside the commit, as a 200-column terminal shows it: every column whole
    # (DVC folds what does not fit into one … column), the lever and one dependency hash among them.
    monkeypatch.setenv("COLUMNS", "200")
    table = run(["dvc", "exp", "show", "--only-changed", "--no-pager"], c).stdout
    header = table.splitlines()[1].split()
    assert "…" not in table and {"lora.r", "models/adapter"} <= set(header) and len(header) <= 20, table
    run(["dvc", "exp", "apply", "wide"], c)
    assert json.loads((c / "models/adapter/adapter_config.json").read_text())["r"] == 16
    assert (c / "models/adapter/adapter_model.safetensors").read_bytes() == adapter


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_a_tampered_remote_object_fails_pull_and_reaches_no_workspace(tiny_project, tmp_path, kind):
    p = tiny_project
    publish(p, tmp_path / "origin.git")
    h = file_md5(p, "models/adapter", "adapter_model.safetensors")
    key = f"files/md5/{h[:2]}/{h[2:]}"
    with S3Server(tmp_path / "s3") as server:
        if kind == "s3":
            server.configure_dvc(p)
        else:
            folder = tmp_path / "remote"
            run(["dvc", "remote", "add", "-d", "storage", str(folder)], p)
            run(["dvc", "remote", "modify", "storage", "verify", "true"], p)
        commit(p, f"{kind} remote")
        run(["dvc", "push"], p)

        # Same size, different bytes: only the content hash can tell.
        if kind == "s3":
            fs, path = s3fs_of(server), f"{BUCKET}/{PREFIX}/{key}"
            original = fs.cat(path)
            fs.pipe(path, b"\0" * 64 + original[64:])
        else:
            path = folder / key
            original = path.read_bytes()
            path.chmod(0o644)
            path.write_bytes(b"\0" * 64 + original[64:])

        c = clone(tmp_path / "origin.git", tmp_path / "teammate", server if kind == "s3" else None)
        pull = run(["dvc", "pull", "-v"], c, check=False)
    assert pull.returncode != 0
    assert "models/adapter" in pull.stderr and "corrupted cache file" in pull.stderr + pull.stdout, pull.stderr[-2000:]
    assert not (c / "models/adapter/adapter_model.safetensors").exists(), "no corrupt file in the workspace"
    for obj in (c / ".dvc/cache/files/md5").rglob("*"):
        if obj.is_file():
            assert md5(obj.read_bytes()) == obj.parent.name + obj.name.removesuffix(".dir"), "nor in the cache"
    assert "models/adapter" in run(["dvc", "status"], c).stdout, "dvc status names what is missing"
    # Everything else arrived intact.
    assert (c / "models/quantized/model.safetensors").exists()


def test_server_stopped_mid_push_fails_then_a_second_push_completes(tiny_project, s3, tmp_path):
    p = tiny_project
    s3.configure_dvc(p)
    # A large file, so the push is still uploading when the server goes down.
    (p / "data/large.bin").write_bytes(os.urandom(256 * 2**20))
    run(["dvc", "add", "data/large.bin"], p)
    data = s3.folder / "data"

    def stored():
        return sum(f.stat().st_size for f in data.rglob("*") if f.is_file())

    before = stored()
    push = subprocess.Popen([sys.executable, "-m", "dvc", "push"], cwd=p, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while push.poll() is None and stored() < before + 32 * 2**20:
        time.sleep(0.05)
    assert push.poll() is None, "the push finished before the server could be stopped"
    s3.stop(hard=True)  # SIGKILL: no clean shutdown
    output = push.communicate(timeout=300)[0]
    assert push.returncode != 0
    assert "failed to push data to the cloud" in output and "Could not connect" in output, output[-2000:]

    s3.start()
    fs = s3fs_of(s3)
    root = f"{BUCKET}/{PREFIX}"
    large = md5((p / "data/large.bin").read_bytes())
    assert f"{root}/files/md5/{large[:2]}/{large[2:]}" not in fs.find(root), "no half-written object"
    assert corrupt_objects(fs, root) == []

    assert "pushed" in run(["dvc", "push"], p).stdout
    assert "in sync" in run(["dvc", "status", "--cloud"], p).stdout
    fs.invalidate_cache()  # s3fs keeps the listing it read before this push; objects since are not in it
    assert f"{root}/files/md5/{large[:2]}/{large[2:]}" in fs.find(root)
    assert corrupt_objects(fs, root) == []


def test_stopping_the_server_leaves_no_process(tmp_path):
    server = S3Server(tmp_path / "s3").start()
    pid = server.process.pid
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
