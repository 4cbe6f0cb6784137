"""The FAN authors' weights through timm's own ``pretrained=True`` path, and the pretrained configs of every fan* model.

Downloads are tested offline: a local HTTP server on 127.0.0.1 serves checkpoints built from tiny models and saved as
the authors' files are (a timm training checkpoint, official key names), each config's ``url`` is pointed at it with
``pretrained_cfg_overlay``, and torch.hub's cache lives under a temporary ``TORCH_HOME``.
"""

from __future__ import annotations

import argparse
import http.server
import io
import logging
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_KWARGS
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_channel_dim, get_spatial_dim

import ravit
from ravit.checkpoint import CheckpointError
from ravit.errors import InvalidArgumentError, MissingFileError
from ravit.models import _pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

# The authors' release, as linked from the NVlabs/FAN README: tag -> (file, num_classes).
RELEASE = "https://github.com/zhoudaquan/fully_attentional_network_ckpt/releases/download/v1.0.0/"
RELEASED = {
    "fan_tiny_12_p16_224.nv_in1k": ("fan_vit_tiny.pth.tar", 1000),
    "fan_small_12_p16_224.nv_in1k": ("fan_vit_small.pth.tar", 1000),
    "fan_base_18_p16_224.nv_in1k": ("fan_vit_base.pth.tar", 1000),
    "fan_tiny_8_p4_hybrid.nv_in1k": ("fan_hybrid_tiny.pth.tar", 1000),
    "fan_small_12_p4_hybrid.nv_in1k": ("fan_hybrid_small.pth.tar", 1000),
    "fan_base_16_p4_hybrid.nv_in1k": ("fan_hybrid_base.pth.tar", 1000),
    "fan_base_16_p4_hybrid.nv_in22k_ft_in1k": ("fan_hybrid_base_in22k_1k.pth.tar", 1000),
    "fan_base_16_p4_hybrid.nv_in22k_ft_in1k_384": ("fan_hybrid_base_in22k_1k_384.pth.tar", 1000),
    "fan_base_16_p4_hybrid.nv_in22k": ("fan_hybrid_base_in22k.pth.tar", 19167),
    "fan_large_16_p4_hybrid.nv_in22k_ft_in1k": ("fan_hybrid_large_in22k_1k.pth.tar", 1000),
    "fan_large_16_p4_hybrid.nv_in22k_ft_in1k_384": ("fan_hybrid_large_in22k_1k_384.pth.tar", 1000),
    "fan_large_16_p4_hybrid.nv_in22k": ("fan_hybrid_large_in22k.pth.tar", 19167),
}
NEVER_RELEASED = ["fan_large_24_p16_224", "fan_small_12_p16_224_se_attn", "fan_xlarge_16_p4_hybrid",
                  "fan_swin_tiny_patch4_window7_224", "test_fan_vit"]


def _tiny(name: str) -> dict:
    arch = name.split(".", 1)[0]
    return {} if arch.startswith("test_") else TINY_KWARGS[timm.models.model_entrypoint(arch).__module__]


def _names(names: str | tuple[str, ...]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def official_file(model: torch.nn.Module, old_names: bool = True) -> bytes:
    """``model``'s weights saved as the authors' files are: a timm training checkpoint (``state_dict`` beside ``args``
    and a numpy metric). ``old_names``: under the original release's key names, ``pos_embeder.*`` and a fused
    class-attention ``qkv`` (otherwise under those of the released code, NVlabs/FAN ee1b7df, which are ravit's)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if old_names:
        state = {k.replace("pos_embed.", "pos_embeder.", 1): v for k, v in state.items()}
        blocks = {k.rsplit(".attn.q.", 1)[0] for k in state if k.startswith("cls_attn_blocks.") and ".attn.q." in k}
        for block in blocks:
            for kind in ("weight", "bias"):
                state[f"{block}.attn.qkv.{kind}"] = torch.cat([state.pop(f"{block}.attn.{n}.{kind}") for n in "qkv"])
    buffer = io.BytesIO()
    torch.save({"epoch": 299, "state_dict": state, "args": argparse.Namespace(model="fan"),
                "metric": np.float64(79.9)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server: ``files`` maps a path to the bytes it serves (404 otherwise); ``hits`` logs requests."""
    files, hits = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_port}", files=files, hits=hits)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """torch.hub's checkpoint cache under a temporary TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # so that torch.hub.get_dir() follows TORCH_HOME
    return tmp_path / "torch" / "hub" / "checkpoints"


def download(name: str, url: str, seed: int = 2, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)  # another initialisation than the served model's: equal weights prove the load
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(url=url),
                             **{**_tiny(name), **kwargs}).eval()


def _same(a: dict, b: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """Keys of ``a`` whose tensors differ from ``b``'s (``skip``: prefixes left out)."""
    return [k for k in a if not k.startswith(skip) and not torch.equal(a[k], b[k])]


# --- the released configs -------------------------------------------------------------------------------------------
def test_list_pretrained_is_exactly_the_release():
    assert set(timm.list_pretrained("fan*")) == set(RELEASED)
    assert set(ravit.list_models("fan*", pretrained=True)) == set(RELEASED)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config(name):
    file, num_classes = RELEASED[name]
    cfg = timm.get_pretrained_cfg(name)
    assert cfg.url == RELEASE + file
    assert (cfg.architecture, cfg.tag) == tuple(name.split("."))
    assert cfg.license == "nvidia-source-code-license-nc"
    assert cfg.num_classes == num_classes
    assert cfg.input_size == ((3, 384, 384) if name.endswith("_384") else (3, 224, 224))
    assert (cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std) == (
        1.0, "bicubic", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


@pytest.mark.parametrize("name", sorted(set(timm.list_models("fan*")) - {n.split(".")[0] for n in RELEASED}))
def test_unreleased_models_have_no_weights(name):
    cfg = timm.get_pretrained_cfg(name)
    assert not cfg.has_weights and not cfg.license


# --- timm's default-cfg checks (test_model_default_cfgs / _non_std) on tiny builds -----------------------------------
@pytest.mark.parametrize("name", sorted(timm.list_models("fan*", include_tags=True) + timm.list_models("test_fan*")))
def test_default_cfg_fits_the_model(name):
    model = timm.create_model(name, **_tiny(name)).eval()
    cfg, state = model.pretrained_cfg, model.state_dict()
    assert cfg["architecture"] == name.split(".")[0]
    assert model.num_classes == cfg["num_classes"] and model.num_features > 0 and model.head_hidden_size > 0
    assert all(f"{c}.weight" in state for c in _names(cfg["classifier"]))
    assert all(state[f"{c}.weight"].shape[1] == cfg["input_size"][0] for c in _names(cfg["first_conv"]))
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        feats = model.forward_features(x)
        pre_logits = model.forward_head(feats, pre_logits=True)
        assert pre_logits.shape == (1, model.head_hidden_size)
        if cfg["pool_size"] is None:  # class token + patch tokens, (B, N, C): "non-standard" in timm's tests
            assert feats.ndim == 3 and feats.shape[-1] == model.num_features
        else:  # a feature map whose spatial size the config states
            fmt = getattr(model, "output_fmt", "NCHW")
            assert tuple(feats.shape[d] for d in get_spatial_dim(fmt)) == cfg["pool_size"]
            assert feats.shape[get_channel_dim(fmt)] == model.num_features
        model.reset_classifier(0)
        assert model(x).shape == pre_logits.shape
        if cfg["pool_size"] is not None:
            model.reset_classifier(0, "")
            assert model(x).shape == feats.shape
        headless = timm.create_model(name, num_classes=0, **_tiny(name)).eval()
        assert headless(x).shape == (1, model.num_features)


# --- downloads ------------------------------------------------------------------------------------------------------
def test_download_loads_the_served_weights_once(server, cache, caplog):
    """The served training checkpoint under the original key names loads exactly; the file lands in TORCH_HOME's cache,
    a second build reads it from there, and the licence is logged once."""
    name = "fan_tiny_12_p16_224"
    torch.manual_seed(1)
    served = timm.create_model(name, **_tiny(name)).eval()
    server.files["/fan_vit_tiny.pth.tar"] = official_file(served)
    url = server.url + "/fan_vit_tiny.pth.tar"
    _pretrained._announce_licence.cache_clear()
    with caplog.at_level(logging.WARNING, logger=_pretrained.__name__):
        model = download(name, url)
        again = download(name, url, seed=3)
    assert _same(model.state_dict(), served.state_dict()) == []
    assert _same(again.state_dict(), served.state_dict()) == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), served(x), rtol=0, atol=0)
    assert server.hits == ["/fan_vit_tiny.pth.tar"]
    assert [p.name for p in cache.iterdir()] == ["fan_vit_tiny.pth.tar"]
    assert (model.pretrained_cfg["tag"], model.pretrained_cfg["license"]) == ("nv_in1k", _pretrained.LICENSE)
    licence = [r.getMessage() for r in caplog.records if "License-NC" in r.getMessage()]
    assert len(licence) == 1 and "non-commercial" in licence[0]


def test_other_in_chans_and_num_classes_are_adapted(server, cache):
    """in_chans=1 sums the first convolution over its input channels (timm's adapt_input_conv); another num_classes
    gets a new classifier; everything else is the served weights."""
    name = "fan_tiny_8_p4_hybrid"
    torch.manual_seed(1)
    served_model = timm.create_model(name, **_tiny(name))
    served = served_model.state_dict()
    server.files["/fan_hybrid_tiny.pth.tar"] = official_file(served_model, old_names=False)
    model = download(name, server.url + "/fan_hybrid_tiny.pth.tar", in_chans=1, num_classes=5)
    state = model.state_dict()
    stem = "patch_embed.backbone.stem.0.weight"
    torch.testing.assert_close(state[stem], served[stem].sum(dim=1, keepdim=True))
    assert state["head.weight"].shape[0] == 5
    assert _same({k: v for k, v in state.items() if k != stem}, served, skip=("head.",)) == []
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize("name", NEVER_RELEASED)
def test_unreleased_weights_are_a_user_error(name):
    with pytest.raises(InvalidArgumentError, match="has no pretrained weights") as err:
        timm.create_model(name, pretrained=True)
    assert "fan_tiny_12_p16_224.nv_in1k" in str(err.value)
    with pytest.raises(InvalidArgumentError, match="has no pretrained weights"):
        ravit.create_model(name, pretrained=True)


@pytest.mark.parametrize("body, error, match", [
    (None, MissingFileError, "404"),
    (b"<html>Not a checkpoint</html>", CheckpointError, "not a PyTorch checkpoint"),
    ("truncated", CheckpointError, "not a PyTorch checkpoint"),
    ("a list", CheckpointError, "not a state dict"),
])
def test_failed_download_is_clear_and_leaves_no_file(server, cache, body, error, match):
    name = "fan_tiny_12_p16_224"
    if body == "truncated":
        body = official_file(timm.create_model(name, **_tiny(name)))[:-1000]
    elif body == "a list":
        buffer = io.BytesIO()
        torch.save([torch.zeros(2)], buffer)
        body = buffer.getvalue()
    if body is not None:
        server.files["/fan_vit_tiny.pth.tar"] = body
    url = server.url + "/fan_vit_tiny.pth.tar"
    with pytest.raises(error, match=match) as err:
        download(name, url)
    assert url in str(err.value)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_checkpoint_of_another_model_names_its_keys_and_stays_cached(server, cache):
    """A served file that is a good checkpoint of another width: a CheckpointError naming the mis-shaped keys; the
    intact download stays in the cache."""
    name = "fan_tiny_12_p16_224"
    server.files["/fan_vit_tiny.pth.tar"] = official_file(timm.create_model(name, **{**_tiny(name), "embed_dim": 48,
                                                                                    "channel_dims": [48, 48]}))
    with pytest.raises(CheckpointError, match="mis-shaped keys") as err:
        download(name, server.url + "/fan_vit_tiny.pth.tar")
    assert "cls_token: checkpoint (1, 1, 48) vs model (1, 1, 32)" in str(err.value)
    assert [p.name for p in cache.iterdir()] == ["fan_vit_tiny.pth.tar"]
