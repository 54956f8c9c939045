"""Real HTTP round trips against the local Hub server (tests/hub_server.py): no mocks of HfApi methods."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import load_file, save_file

from hub_server import DUMMY_TOKEN, git_blob_sha1, local_hub  # noqa: F401


def _write_folder(folder, config: dict, weights: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, str(folder / "model.safetensors"))


def test_fixture_points_clients_at_local_hub(local_hub):
    from huggingface_hub import constants

    assert local_hub.url.startswith("http://127.0.0.1:")
    assert constants.ENDPOINT == local_hub.url == os.environ["HF_ENDPOINT"]
    assert constants.HF_HUB_OFFLINE is False
    assert os.environ["HF_TOKEN"] == DUMMY_TOKEN
    assert HfApi().whoami()["name"] == local_hub.user


def test_upload_folder_download_roundtrip(local_hub, tmp_path):
    api = HfApi()
    url = api.create_repo("me/x")
    assert url.repo_id == "me/x"
    src = tmp_path / "src"
    weights = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    _write_folder(src, {"hidden": 4, "name": "x"}, weights)
    (src / "sub").mkdir()
    (src / "sub" / "notes.txt").write_text("nested file")

    info = api.upload_folder(folder_path=src, repo_id="me/x", commit_message="first upload")
    assert info.oid == local_hub.head("me/x")
    assert local_hub.file("me/x", "model.safetensors") == (src / "model.safetensors").read_bytes()
    assert local_hub.history("me/x")[0].title == "first upload"
    expected_files = [".gitattributes", "config.json", "model.safetensors", "sub/notes.txt"]
    assert sorted(api.list_repo_files("me/x")) == expected_files

    cfg = hf_hub_download("me/x", "config.json")
    assert open(cfg, "rb").read() == (src / "config.json").read_bytes()
    w = hf_hub_download("me/x", "model.safetensors")
    assert open(w, "rb").read() == (src / "model.safetensors").read_bytes()
    loaded = load_file(w)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)

    snap = snapshot_download("me/x")
    for rel in ("config.json", "model.safetensors", "sub/notes.txt"):
        assert (src / rel).read_bytes() == open(os.path.join(snap, rel), "rb").read()
    assert os.path.basename(snap) == info.oid  # snapshot folder is named after the commit sha

    # Downloads are plain HTTP (no LFS batch / Xet calls) and the cache is the isolated one.
    assert not local_hub.unhandled
    assert not any("xet" in path or ".git/info/lfs" in path for _, path, _ in local_hub.requests)
    assert snap.startswith(os.environ["HF_HUB_CACHE"])

    # Repo info, tree with metadata, paths-info
    model_info = api.model_info("me/x", files_metadata=True)
    assert model_info.sha == info.oid
    sizes = {s.rfilename: s.size for s in model_info.siblings}
    assert sizes["model.safetensors"] == (src / "model.safetensors").stat().st_size
    entries = {e.path: e for e in api.list_repo_tree("me/x", recursive=True, expand=True)}
    assert entries["config.json"].blob_id == git_blob_sha1((src / "config.json").read_bytes())
    assert entries["sub/notes.txt"].last_commit.oid == info.oid
    assert [p.path for p in api.get_paths_info("me/x", ["config.json", "sub", "missing"])] == ["config.json", "sub"]


def test_missing_file_and_repo_errors(local_hub):
    api = HfApi()
    api.create_repo("me/errs")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("me/errs", "nope.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("me/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("me/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("me/does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("me/errs", ".gitattributes", revision="no-such-branch")
    assert api.repo_exists("me/errs") and not api.repo_exists("me/does-not-exist")
    assert api.file_exists("me/errs", ".gitattributes") and not api.file_exists("me/errs", "nope.json")


def test_second_commit_updates_revision(local_hub, tmp_path):
    api = HfApi()
    api.create_repo("me/versions")
    first = api.upload_file(path_or_fileobj=b'{"v": 1}', path_in_repo="config.json", repo_id="me/versions")
    path_v1 = hf_hub_download("me/versions", "config.json")
    assert json.load(open(path_v1)) == {"v": 1}

    second = api.upload_file(path_or_fileobj=b'{"v": 2}', path_in_repo="config.json", repo_id="me/versions")
    assert second.oid != first.oid
    assert api.model_info("me/versions").sha == second.oid == local_hub.head("me/versions")
    path_v2 = hf_hub_download("me/versions", "config.json")
    assert json.load(open(path_v2)) == {"v": 2}
    # Old revision still reachable by sha
    assert json.load(open(hf_hub_download("me/versions", "config.json", revision=first.oid))) == {"v": 1}
    assert [c.commit_id for c in api.list_repo_commits("me/versions")][:2] == [second.oid, first.oid]

    # Unchanged upload is a no-op (client compares preupload oids): no new commit
    again = api.upload_file(path_or_fileobj=b'{"v": 2}', path_in_repo="config.json", repo_id="me/versions")
    assert again.oid == second.oid

    # Deletion, branches
    api.create_branch("me/versions", branch="dev")
    api.delete_file("config.json", repo_id="me/versions", revision="dev")
    assert "config.json" not in api.list_repo_files("me/versions", revision="dev")
    assert "config.json" in api.list_repo_files("me/versions")
    assert {b.name for b in api.list_repo_refs("me/versions").branches} == {"main", "dev"}


def test_transformers_push_to_hub_and_from_pretrained(local_hub):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    model.push_to_hub("me/tiny-llama")
    assert {"config.json", "model.safetensors", "README.md"} <= set(local_hub.files("me/tiny-llama"))

    loaded = AutoModelForCausalLM.from_pretrained("me/tiny-llama").eval()
    assert type(loaded) is LlamaForCausalLM
    reference = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert not local_hub.unhandled


def test_model_card_roundtrip(local_hub):
    HfApi().create_repo("me/carded")
    card_data = ModelCardData(license="apache-2.0", library_name="transformers", tags=["unite-hf", "test"])
    card = ModelCard.from_template(card_data, model_id="me/carded", model_description="A carded test model.")
    card.push_to_hub("me/carded")

    loaded = ModelCard.load("me/carded")
    assert loaded.data.license == "apache-2.0"
    assert loaded.data.tags == ["unite-hf", "test"]
    assert "A carded test model." in loaded.text
    info = HfApi().model_info("me/carded")
    assert info.card_data.license == "apache-2.0" and "unite-hf" in info.tags


_CONFIGURATION_FOO = '''
from transformers import PretrainedConfig


class FooConfig(PretrainedConfig):
    model_type = "foo-test"

    def __init__(self, hidden_size=8, vocab_size=16, **kwargs):
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        super().__init__(**kwargs)
'''

_MODELING_FOO = '''
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_foo import FooConfig


class FooModel(PreTrainedModel):
    config_class = FooConfig
    base_model_prefix = "foo"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def forward(self, input_ids):
        return self.proj(self.embed(input_ids))
'''

_LOAD_IN_FRESH_PROCESS = '''
import importlib.util, json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModel

pkg, repo, out = sys.argv[1], sys.argv[2], sys.argv[3]
assert importlib.util.find_spec(pkg) is None, "the temp package must not be importable here"
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
with torch.no_grad():
    y = model(torch.arange(6).reshape(2, 3))
save_file({**{k: v.contiguous() for k, v in model.state_dict().items()}, "__output__": y}, out)
print(json.dumps({"class": type(model).__name__, "module": type(model).__module__,
                  "model_type": model.config.model_type}))
'''


def test_trust_remote_code_roundtrip(local_hub, tmp_path, monkeypatch):
    pkg = f"foo_remote_{uuid.uuid4().hex[:8]}"
    pkg_dir = tmp_path / "pkgroot" / pkg
    pkg_dir.mkdir(parents=True)
    (pkg_dir / "__init__.py").write_text("")
    (pkg_dir / "configuration_foo.py").write_text(_CONFIGURATION_FOO)
    (pkg_dir / "modeling_foo.py").write_text(_MODELING_FOO)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    try:
        configuration = __import__(f"{pkg}.configuration_foo", fromlist=["FooConfig"])
        modeling = __import__(f"{pkg}.modeling_foo", fromlist=["FooModel"])
        configuration.FooConfig.register_for_auto_class()
        modeling.FooModel.register_for_auto_class("AutoModel")
        torch.manual_seed(0)
        model = modeling.FooModel(configuration.FooConfig(hidden_size=8, vocab_size=16)).eval()
        model.push_to_hub("me/foo-remote")
        with torch.no_grad():
            expected = model(torch.arange(6).reshape(2, 3))
        reference = model.state_dict()
    finally:
        for name in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
            del sys.modules[name]

    files = local_hub.files("me/foo-remote")
    assert {"configuration_foo.py", "modeling_foo.py", "config.json", "model.safetensors"} <= set(files)
    auto_map = json.loads(files["config.json"])["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_foo.FooConfig", "AutoModel": "modeling_foo.FooModel"}

    # Fresh interpreter: only the env (HF_ENDPOINT, HF_TOKEN, HF_HOME, ... set by the fixture) points it at the hub.
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    out = workdir / "loaded.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, pkg, "me/foo-remote", str(out)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["class"] == "FooModel" and summary["model_type"] == "foo-test"
    assert summary["module"].startswith("transformers_modules.")
    loaded = load_file(str(out))
    assert torch.equal(loaded.pop("__output__"), expected)
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    # The subprocess really downloaded from this server
    downloaded = [p for m, p, status in local_hub.requests if m == "GET" and status == 200 and "/resolve/" in p]
    assert any(p.endswith("/modeling_foo.py") for p in downloaded)
    assert any(p.endswith("/configuration_foo.py") for p in downloaded)


def test_dataset_repo_roundtrip(local_hub, tmp_path):
    api = HfApi()
    api.create_repo("me/data", repo_type="dataset")
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="train.csv", repo_id="me/data", repo_type="dataset")
    path = hf_hub_download("me/data", "train.csv", repo_type="dataset")
    assert open(path, "rb").read() == b"a,b\n1,2\n"
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("me/data", "train.csv")  # exists as a dataset, not as a model


def test_resolve_protocol_headers_and_range(local_hub):
    """What the download client relies on: HEAD metadata headers, Range requests, error codes."""
    from huggingface_hub.utils import get_session

    content = bytes(range(256)) * 4
    local_hub.create_repo("me/raw")
    oid = local_hub.commit("me/raw", {"dir/blob.bin": content})
    session = get_session()
    url = f"{local_hub.url}/me/raw/resolve/main/dir/blob.bin"
    head = session.head(url, headers={"Accept-Encoding": "identity"})
    assert head.status_code == 200
    assert head.headers["X-Repo-Commit"] == oid
    assert head.headers["ETag"] == f'"{git_blob_sha1(content)}"'
    assert int(head.headers["Content-Length"]) == len(content)
    assert not any(k.lower().startswith("x-xet") for k in head.headers)
    part = session.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == content[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(content)}"
    tail = session.get(url, headers={"Range": "bytes=1000-"})
    assert tail.status_code == 206 and tail.content == content[1000:]
    missing = session.head(f"{local_hub.url}/me/raw/resolve/main/missing.bin")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
    assert missing.headers["X-Repo-Commit"] == oid
    no_repo = session.get(f"{local_hub.url}/me/nope/resolve/main/x.bin")
    assert no_repo.status_code == 404 and no_repo.headers["X-Error-Code"] == "RepoNotFound"


def test_private_repo_and_pull_request(local_hub):
    api = HfApi()
    api.create_repo("me/secret", private=True)
    assert api.model_info("me/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("me/secret", token=False)  # anonymous reads of private repos look like missing repos

    api.create_repo("me/pr")
    pr = api.upload_file(path_or_fileobj=b"proposed", path_in_repo="a.txt", repo_id="me/pr", create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert "a.txt" not in api.list_repo_files("me/pr")
    assert open(hf_hub_download("me/pr", "a.txt", revision=pr.pr_revision), "rb").read() == b"proposed"


def test_hub_can_be_used_without_fixture(monkeypatch):
    from huggingface_hub import constants

    from hub_server import LocalHub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline mode would block any request
    with LocalHub() as hub:
        hub.create_repo("me/direct")
        oid = hub.commit("me/direct", {"a.txt": "hello"})
        api = HfApi(endpoint=hub.url, token=DUMMY_TOKEN)
        assert api.model_info("me/direct").sha == oid
        assert "a.txt" in api.list_repo_files("me/direct")
