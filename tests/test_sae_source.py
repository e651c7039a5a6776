"""`--sae` as a directory or a hub repo id (server/steerserve/sae_source.py), and Qwen-Scope files read
exactly as SAELens reads them.

Hub repos live in a Hugging Face cache built in a temp dir the way huggingface_hub lays it out
(tests/sae_files.write_hub_cache): the release's file listing, only the steered layers
downloaded. huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE / HF_ENDPOINT once, at import,
so the fixtures set its constants as well as the environment. The two errors only the Hub
itself can give (no such repo, no such revision) come from a local HTTP server answering as the
Hub does: 404 with an `X-Error-Code` header.
"""

from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

from steerserve_sae.sae import sae_math
from steerserve_sae.sae.loading import load_sae_layer
from steerserve.sae_source import SAESource, SAESourceError, resolve_sae_source
from tests.sae_files import write_hub_cache, write_qwen_scope, write_saelens

REPO = "Qwen/SAE-Res-Tiny-W1K-L0_8"
D_MODEL = 16
RELEASE = [f"layer{n}.sae.pt" for n in range(6)] + ["README.md", "LICENSE", "app.py", ".gitattributes"]


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty offline Hugging Face cache, for this process and its children."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(constants, name, value)
    return cache


def cache_repo(
    hub: Path, tmp_path: Path, layers=(1, 3), *, repo=REPO, d_sae=1024, listed=RELEASE
) -> Path:
    """`repo` as left by downloading `layers` and README.md (no config.json, as released)."""
    src = tmp_path / "files"
    write_qwen_scope(src, layers=layers, d_model=D_MODEL, d_sae=d_sae, with_config=False)
    (src / "README.md").write_text("# Qwen-Scope\n")
    files = {f"layer{n}.sae.pt": src / f"layer{n}.sae.pt" for n in layers} | {"README.md": src / "README.md"}
    return write_hub_cache(hub, repo, files, listed=listed)


def error(spec: str, layers=(1,)) -> str:
    with pytest.raises(SAESourceError) as e:
        resolve_sae_source(spec, layers)
    return str(e.value)


# --------------------------------------------------------------------------- resolution


def test_hub_id_resolves_to_the_cached_snapshot(hub, tmp_path):
    snapshot = cache_repo(hub, tmp_path)
    commit = snapshot.name
    expected = SAESource(str(snapshot), "SAE-Res-Tiny-W1K-L0_8", REPO, commit)
    for spec in (REPO, f"{REPO}@main", f"{REPO}@{commit}"):
        assert resolve_sae_source(spec, [3, 1, 3]) == expected
    assert expected.hub_url == f"hf://{REPO}@{commit}"
    sae = load_sae_layer(snapshot, 3, d_model=D_MODEL, dtype=torch.float32, device="cpu", name=expected.name)
    assert (sae.k, sae.d_sae) == (8, 1024)


def test_an_existing_path_is_a_directory_even_when_shaped_like_a_repo_id(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(REPO).mkdir(parents=True)
    assert resolve_sae_source(REPO, [1]) == SAESource(str(tmp_path / REPO), "SAE-Res-Tiny-W1K-L0_8")
    assert resolve_sae_source(REPO, [1]).hub_url is None
    # A snapshot directory given as a path reads the width and k from its repo's name.
    snapshot = cache_repo(hub, tmp_path)
    assert resolve_sae_source(str(snapshot), [1]).name == "SAE-Res-Tiny-W1K-L0_8"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "nope: no such directory, and not a Hugging Face repo id (owner/name[@revision])"),
        ("a/b/c", "a/b/c: no such directory, and not a Hugging Face repo id (owner/name[@revision])"),
        ("Qwen/x@a@b", "Qwen/x@a@b: no such directory, and not a Hugging Face repo id (owner/name[@revision])"),
        ("Qwen/x--y", "Qwen/x--y: no such directory, and not a valid hub repo id "
                      "(Cannot have -- or .. in repo_id: 'Qwen/x--y'.)"),
    ],
)
def test_neither_a_directory_nor_a_repo_id(hub, spec, message):
    assert error(spec) == message


def test_a_file_is_not_an_sae_directory(tmp_path):
    (tmp_path / "layer1.sae.pt").write_bytes(b"")
    assert error(str(tmp_path / "layer1.sae.pt")) == (
        f"{tmp_path / 'layer1.sae.pt'} is a file; --sae takes an SAE directory or a hub repo id"
    )


# --------------------------------------------------------------------------- offline errors


def test_repo_not_in_the_cache_while_offline(hub):
    assert error("Qwen/SAE-Res-Other-W1K-L0_8", (8, 16)) == (
        f"Qwen/SAE-Res-Other-W1K-L0_8: the repo (and no local directory Qwen/SAE-Res-Other-W1K-L0_8 exists) "
        f"is not in the Hugging Face cache ({hub}) and HF_HUB_OFFLINE is set: unset it, or fetch the files "
        "with `hf download Qwen/SAE-Res-Other-W1K-L0_8 layer8.sae.pt layer16.sae.pt` into the same HF_HUB_CACHE"
    )


def test_revision_not_in_the_cache_while_offline(hub, tmp_path):
    cache_repo(hub, tmp_path)
    assert error(f"{REPO}@v2") == (
        f"{REPO}@v2: the revision 'v2' is not in the Hugging Face cache ({hub}) and HF_HUB_OFFLINE is set: "
        f"unset it, or fetch the files with `hf download {REPO} layer1.sae.pt --revision v2` into the same "
        "HF_HUB_CACHE"
    )


def test_layer_in_the_repo_but_not_downloaded_while_offline(hub, tmp_path):
    snapshot = cache_repo(hub, tmp_path)
    message = error(REPO, (1, 4))
    assert message.startswith(f"{REPO}: The cached snapshot for '{REPO}' (revision 'main', commit {snapshot.name}) "
                              "is incomplete: 1 file(s) are missing (layer4.sae.pt).")
    assert message.endswith(f"Or fetch the files with `hf download {REPO} layer1.sae.pt layer4.sae.pt`.")


def test_layer_the_repo_does_not_have(hub, tmp_path):
    snapshot = cache_repo(hub, tmp_path)
    assert error(REPO, (1, 9)) == (
        f"{REPO}@{snapshot.name} has no layer9.sae.pt (listing cached while HF_HUB_OFFLINE is set); "
        "its layers: 0-5; choose --sae-layers among them"
    )


def test_layer_missing_from_a_cache_without_the_repo_listing(hub, tmp_path):
    snapshot = cache_repo(hub, tmp_path, listed=None)  # as older huggingface_hub versions leave it
    assert error(REPO, (1, 4)) == (
        f"{REPO}@{snapshot.name}: layer4.sae.pt not in the cached snapshot {snapshot}; HF_HUB_OFFLINE is set: "
        f"unset it, or fetch them with `hf download {REPO} layer1.sae.pt layer4.sae.pt`"
    )


def test_saelens_hub_repo_is_refused_with_what_to_do(hub, tmp_path):
    write_saelens(tmp_path / "saelens", layers=(2,))
    repo = "someone/saelens-saes"
    snapshot = write_hub_cache(
        hub, repo, {"blocks.2.hook_resid_post/cfg.json": tmp_path / "saelens/blocks.2.hook_resid_post/cfg.json"},
        listed=["blocks.2.hook_resid_post/cfg.json", "blocks.2.hook_resid_post/sae_weights.safetensors"],
    )
    assert error(repo, (2,)) == (
        f"{repo}@{snapshot.name} has no layer{{n}}.sae.pt at its top level: hub ids support Qwen-Scope repos "
        f"only; for a SAELens or sparsify repo run `hf download {repo} --local-dir DIR` and pass --sae DIR"
    )


# --------------------------------------------------------------------------- online errors


class _HubErrors(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub answers for a missing repo or revision."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        code = "RevisionNotFound" if "/revision/v9" in self.path else "RepoNotFound"
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def online(hub, monkeypatch):
    """Online mode against a local endpoint that knows no repo."""
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubErrors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()


def test_repo_the_hub_does_not_know(online):
    assert error("Qwen/SAE-Res-Missing-W1K-L0_8") == (
        "Qwen/SAE-Res-Missing-W1K-L0_8: no such hub repo, or it is private or gated and this token has no "
        "access (set HF_TOKEN or run `hf auth login`) (and no local directory Qwen/SAE-Res-Missing-W1K-L0_8 exists)"
    )


def test_revision_the_hub_does_not_know(online):
    assert error(f"{REPO}@v9") == (
        f"{REPO}@v9: the repo has no revision 'v9'; give one of its branches, tags or commits"
    )


def test_hub_unreachable_and_not_cached(hub, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    message = error(REPO)
    assert message.startswith(f"{REPO}: the repo (and no local directory {REPO} exists) is not in the Hugging "
                              f"Face cache ({hub}) and the Hub cannot be reached (")
    assert message.endswith("); check the network or the proxy")


# --------------------------------------------------------------------------- SAELens parity


def rounding_bound(x: torch.Tensor, W_enc: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far an encoder pre-activation computed at `dtype` from x and W_enc already in `dtype`
    may be from its exact value (`exact`, in float64), per row and feature: the products summed
    in float32 (d_model * 2^-24 of sum_i |x_i W_if|) and the result rounded to `dtype` (its unit
    roundoff, eps / 2, of |exact|)."""
    return (x.abs() @ W_enc.abs()) * x.shape[1] * 2.0**-24 + exact.abs() * torch.finfo(dtype).eps / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encodings_match_saelens_qwen_scope_loader(hub, tmp_path, dtype):
    """The same released files through SAELens' own `qwen_scope` loader (sae-lens on PyPI,
    sae_lens/loading/pretrained_sae_loaders.py, reading k and width from the repo name and
    d_in from its table of base models, hence the 2B's 2048 here) and through ours, encoded at
    float32 and at the dtype the server encodes at (the model's: bfloat16). The reference is
    SAELens' weights and the input rounded to that dtype, evaluated exactly (float64): what a
    correct encoder at that dtype computes up to the rounding of its sum and result. A row's
    TopK set may then differ only by swapping features whose exact pre-activations are within
    that bound of each other, and every value is within it. (Against the float32 input instead,
    rounding the input and weights to bfloat16 changes the TopK set on about a quarter of the
    rows too: the 50th and 51st of 1024 pre-activations are often closer than 8 bits resolve.)"""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import qwen_scope_sae_huggingface_loader

    repo = "Qwen/SAE-Res-Qwen3.5-2B-Base-W1K-L0_50"
    src = tmp_path / "files"
    write_qwen_scope(src, layers=(3,), d_model=2048, d_sae=1024, seed=7, with_config=False)
    write_hub_cache(hub, repo, {"layer3.sae.pt": src / "layer3.sae.pt"}, listed=RELEASE)

    theirs = SAE.from_pretrained(repo, "layer3.sae.pt", converter=qwen_scope_sae_huggingface_loader)
    source = resolve_sae_source(repo, [3])
    ours = load_sae_layer(source.path, 3, d_model=2048, dtype=dtype, device="cpu", name=source.name)
    assert (theirs.cfg.d_sae, theirs.cfg.k, theirs.cfg.apply_b_dec_to_input) == (ours.d_sae, ours.k, False) == (
        1024, 50, False)
    assert torch.equal(theirs.W_dec.to(dtype), ours.W_dec) and torch.equal(theirs.W_enc.T.to(dtype), ours.W_enc)

    x = torch.randn(512, 2048, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs.encode(x)
    rounded_x, W_enc, b_enc = (t.to(dtype).double() for t in (x, theirs.W_enc, theirs.b_enc))
    exact = rounded_x @ W_enc + b_enc
    bound = rounding_bound(rounded_x, W_enc, exact, dtype)
    got = sae_math.encode(ours, x.to(dtype)).double()
    assert ((got != 0).sum(dim=1) == 50).all()
    chosen, reference = got != 0, exact >= exact.topk(50, dim=1).values[:, -1:]
    if dtype == torch.float32:  # SAELens' own encoding, at float32, picks the same sets
        assert torch.equal(reference, expected != 0)
    assert ((got - exact).abs() <= bound)[chosen].all()
    differing = 0
    for row in range(x.shape[0]):
        added, dropped = (chosen[row] & ~reference[row]).nonzero(), (reference[row] & ~chosen[row]).nonzero()
        if len(added):
            differing += 1
            lowest_dropped = (exact[row, dropped] - bound[row, dropped]).min()
            highest_added = (exact[row, added] + bound[row, added]).max()
            assert (exact[row, added] + bound[row, added] >= lowest_dropped).all(), row
            assert (exact[row, dropped] - bound[row, dropped] <= highest_added).all(), row
    # At float32 no two pre-activations at the TopK boundary are that close; bfloat16 results keep
    # 8 bits, so there the 50th and 51st are often equal once rounded (about a quarter of the rows).
    assert differing == 0 if dtype == torch.float32 else differing < x.shape[0] // 2
    print(f"{dtype}: TopK set differs from the exact one on {differing} of {x.shape[0]} rows, within rounding")
