"""The lens over a saved capture reads only the final layer from the hub, by HTTP range requests.

A local HTTP server stands in for huggingface.co: it serves the flux-tiny files under the hub's URL scheme
(`/{repo}/resolve/{revision}/{file}`), redirects to a "CDN" path as the hub does for large files, honours
`Range`, answers `HEAD` with the metadata `hf_hub_download` reads, answers like the hub when a repo is gated
or a file is missing, and counts every byte it sends.
"""

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from safetensors.torch import load_file, save_file

import capture_sample
from flux.configs import CONFIGS, TINY_PARAMS
from flux.decode import load_final_layer, load_model_final_layer
from flux.errors import UserError
from flux.loading import HUB, fetch_hub_tensors, read_tensors
from flux.tiny import ensure_tiny_repo

ROOT = Path(__file__).resolve().parents[1]
TINY = CONFIGS["flux-tiny"]
TOKEN = "hf_test_token"


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, Path] = {}  # "repo/file" -> local file
        self.gated: set[str] = set()  # repos that need TOKEN
        self.ignore_ranges = False
        self.sent = 0
        self.ranges: list[str | None] = []
        self.reads: list[tuple[str, str | None]] = []  # ("repo/file", Range header) of each GET

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """The same server under another host name, as the hub's CDN is another host."""
        return f"http://localhost:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _error(self, status: int, code: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _resolve(self) -> bool:
        """Answer a `/resolve/` URL (an error, or a redirect with the file's metadata); False for others."""
        hub = self.server
        resolve = re.fullmatch(r"/(.+?/.+?)/resolve/main/(.+)", urlsplit(self.path).path)
        if not resolve:
            return False
        repo, name = resolve.groups()
        if repo in hub.gated and self.headers.get("authorization") != f"Bearer {TOKEN}":
            self._error(401, "GatedRepo")
        elif f"{repo}/{name}" not in hub.files:
            self._error(404, "EntryNotFound")
        else:
            file = hub.files[f"{repo}/{name}"]
            self.send_response(302)  # the hub sends large files' bytes from a CDN
            self.send_header("Location", f"{hub.cdn_url}/cdn/{repo}/{name}")
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("X-Linked-Etag", f'"{file.stat().st_size:x}{file.stat().st_mtime_ns:x}"')
            self.send_header("X-Linked-Size", str(file.stat().st_size))
            self.send_header("Content-Length", "0")
            self.end_headers()
        return True

    def do_HEAD(self):
        if self._resolve():
            return
        file = self.server.files.get(urlsplit(self.path).path.removeprefix("/cdn/"))
        if file is None:
            return self._error(404, "EntryNotFound")
        self.send_response(200)
        self.send_header("Content-Length", str(file.stat().st_size))
        self.end_headers()

    def do_GET(self):
        hub = self.server
        if self._resolve():
            return
        path = urlsplit(self.path).path
        if path.removeprefix("/cdn/") not in hub.files:  # e.g. the client's own /api/ calls
            return self._error(404, "EntryNotFound")
        data = hub.files[path.removeprefix("/cdn/")].read_bytes()
        wanted = self.headers.get("range")
        hub.ranges.append(wanted)
        hub.reads.append((path.removeprefix("/cdn/"), wanted))
        if hub.ignore_ranges:  # "the whole 24 GB file", of which only the start ever comes
            self.send_response(200)
            self.send_header("Content-Length", str(24 * 10**9))
            self.end_headers()
            self.wfile.write(data[:65536])
            return
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", wanted or "")
        if match:
            start, end = int(match[1]), min(int(match[2]), len(data) - 1)
            body, status = data[start : end + 1], 206
        else:
            body, status = data, 200
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        hub.sent += len(body)  # counted before sending: the client may be done before this thread resumes
        self.wfile.write(body)


@pytest.fixture
def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    return ensure_tiny_repo(tmp_path_factory.mktemp("tiny") / "repo")


def _point_hub_at(monkeypatch, endpoint: str) -> None:
    """What HF_ENDPOINT does for a fresh process: hub URLs start with `endpoint` (huggingface_hub < 1.0 also
    keeps a copy of the URL template in file_download)."""
    import huggingface_hub.file_download as file_download
    from huggingface_hub import constants

    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    if hasattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE"):
        monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)


@pytest.fixture
def in_process_hub(hub, monkeypatch):
    """This process's huggingface_hub pointed at the fake hub, with no token and online."""
    from huggingface_hub import constants

    _point_hub_at(monkeypatch, hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) once, when it is imported: a machine
    # that sets it for the whole test run would keep this process offline.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(Path(os.devnull)))  # no token saved by `huggingface-cli login`
    return hub


def _final_layer_bytes(path: Path) -> int:
    """What a reader that fetches only `final_layer.*` must transfer: length, header, and those tensors."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    spans = [v["data_offsets"] for k, v in header.items() if k.startswith("final_layer.")]
    return 8 + header_len + sum(end - begin for begin, end in spans)


def test_decode_later_fetches_only_the_final_layer_and_equals_a_local_decode(
    hub, tiny_repo, tmp_path, monkeypatch
):
    flow, ae = tiny_repo / TINY.repo_flow, tiny_repo / TINY.repo_ae
    hub.files[f"{TINY.repo_id}/{TINY.repo_flow}"] = flow
    hub.files[f"{TINY.repo_id}/{TINY.repo_ae}"] = ae
    monkeypatch.setenv("FLUX_TINY_DIR", str(tiny_repo))
    args = [
        "--model",
        "flux-tiny",
        "--prompt",
        "a red cube",
        "--width",
        "64",
        "--height",
        "48",
        "--progress",
        "False",
    ]
    assert (
        capture_sample.run(
            [*args, "--output_dir", str(tmp_path / "run"), "--should_decode_intermediates", "False"]
        )
        == 0
    )
    (pt,) = (tmp_path / "run" / "intermediates").glob("capture_*.pt")

    def decode_in_a_fresh_process(out: Path, *extra: str, **env_vars: str) -> str:
        env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-cache"), **env_vars}
        for var in ("FLUX_MODEL", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME"):
            env.pop(var, None)
        command = [sys.executable, "capture_sample.py", "decode", str(pt), "--output_dir", str(out), *extra]
        done = subprocess.run(
            [*command, "--progress", "False"], env=env, cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stderr

    local, remote = tmp_path / "local", tmp_path / "remote"
    decode_in_a_fresh_process(local)  # flux-tiny's local weights directory
    assert hub.sent == 0
    # --weights_dir hub beats FLUX_AE: the AE is downloaded whole, the flow checkpoint only by ranges.
    log = decode_in_a_fresh_process(
        remote, "--weights_dir", HUB, HF_ENDPOINT=hub.url, FLUX_AE=str(tmp_path / "not-used.safetensors")
    )
    assert "by range requests" in log
    assert hub.sent == _final_layer_bytes(flow) + ae.stat().st_size
    assert _final_layer_bytes(flow) < flow.stat().st_size / 4
    flow_reads = [wanted for name, wanted in hub.reads if name.endswith(TINY.repo_flow)]
    assert flow_reads and all(r is not None and r.startswith("bytes=") for r in flow_reads)
    downloaded = (tmp_path / "empty-cache").rglob("*.safetensors")
    assert sorted(p.name for p in downloaded) == [TINY.repo_ae]  # the flow checkpoint never whole
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in remote.iterdir()) and "grid_single.jpg" in names
    for name in names:
        assert (remote / name).read_bytes() == (local / name).read_bytes(), name


def test_fetched_tensors_equal_the_file_and_keep_their_dtype(in_process_hub, tmp_path):
    path = tmp_path / "flow.safetensors"
    tensors = {
        "model.diffusion_model.final_layer.linear.weight": torch.randn(5, 3, dtype=torch.bfloat16),
        "model.diffusion_model.final_layer.linear.bias": torch.randn(5, dtype=torch.float16),
        "model.diffusion_model.final_layer.empty": torch.zeros(0, 3),
        "model.diffusion_model.img_in.weight": torch.randn(64, 64),
    }
    save_file(tensors, str(path))
    in_process_hub.files["org/model/flow.safetensors"] = path
    fetched = fetch_hub_tensors("org/model", "flow.safetensors", "final_layer.")
    assert fetched.keys() == {"final_layer.linear.weight", "final_layer.linear.bias", "final_layer.empty"}
    for name, tensor in fetched.items():
        original = tensors["model.diffusion_model." + name]
        assert tensor.dtype == original.dtype and torch.equal(tensor, original), name
    assert fetched.keys() == read_tensors(path, "final_layer.").keys()  # the ComfyUI prefix goes either way


def test_gated_repos_need_the_token(in_process_hub, tiny_repo, monkeypatch):
    repo = "org/gated"
    in_process_hub.files[f"{repo}/flow.safetensors"] = tiny_repo / TINY.repo_flow
    in_process_hub.gated.add(repo)
    with pytest.raises(UserError, match=r"gated repository.*HF_TOKEN"):
        fetch_hub_tensors(repo, "flow.safetensors", "final_layer.", gated=True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fetched = fetch_hub_tensors(repo, "flow.safetensors", "final_layer.", gated=True)
    layer = load_final_layer(tiny_repo / TINY.repo_flow, TINY_PARAMS, "cpu", torch.float32)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(fetched[f"final_layer.{name}"].float(), tensor), name


def test_missing_file_ignored_ranges_unreachable_and_offline_say_what_to_do(
    in_process_hub, tiny_repo, tmp_path, monkeypatch
):
    with pytest.raises(UserError, match=r"has no file 'nope\.safetensors'"):
        fetch_hub_tensors("org/model", "nope.safetensors", "final_layer.")
    in_process_hub.files["org/model/flow.safetensors"] = tiny_repo / TINY.repo_flow
    in_process_hub.ignore_ranges = True
    with pytest.raises(UserError, match=r"did not answer a range request as asked \(HTTP 200"):
        fetch_hub_tensors("org/model", "flow.safetensors", "final_layer.")  # refused before reading 24 GB
    in_process_hub.ignore_ranges = False
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((20).to_bytes(8, "little") + b'{"final_layer.x": 1}')
    in_process_hub.files["org/model/broken.safetensors"] = broken
    with pytest.raises(UserError, match="malformed safetensors header"):
        fetch_hub_tensors("org/model", "broken.safetensors", "final_layer.")
    # Offsets that do not fit the shape: 2 x 3 float32 is 24 bytes, not 8.
    header = json.dumps({"final_layer.x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 8]}}).encode()
    broken.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(UserError, match=r"malformed safetensors header.*do not fit shape \[2, 3\]"):
        fetch_hub_tensors("org/model", "broken.safetensors", "final_layer.")
    sent = in_process_hub.sent
    for value in ("1", "true", "YES", "on"):  # what huggingface_hub itself reads as set
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
            fetch_hub_tensors("org/model", "flow.safetensors", "final_layer.")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")  # the hub's fallback, when HF_HUB_OFFLINE is unset
    with pytest.raises(UserError, match="TRANSFORMERS_OFFLINE is set"):
        fetch_hub_tensors("org/model", "flow.safetensors", "final_layer.")
    assert in_process_hub.sent == sent  # nothing was asked of the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # and HF_HUB_OFFLINE, set, is the hub's answer: online
    assert set(fetch_hub_tensors("org/model", "flow.safetensors", "final_layer.")) > set()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    closed = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # bind a port, then free it: nothing listens
    port = closed.server_address[1]
    closed.server_close()
    _point_hub_at(monkeypatch, f"http://127.0.0.1:{port}")
    with pytest.raises(UserError, match="Could not reach the hub"):
        fetch_hub_tensors("org/model", "flow.safetensors", "final_layer.")


def test_a_cached_checkpoint_is_read_locally_without_the_network(
    in_process_hub, tiny_repo, tmp_path, monkeypatch
):
    commit = "0" * 40
    repo = tmp_path / "hf-cache" / f"models--{TINY.repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    flow = tiny_repo / TINY.repo_flow
    layer = load_final_layer(flow, TINY_PARAMS, "cpu", torch.float32)
    only_final = {f"final_layer.{k}": v.contiguous() for k, v in layer.state_dict().items()}
    save_file(only_final, str(repo / "snapshots" / commit / TINY.repo_flow))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("FLUX_MODEL", raising=False)
    cached = load_model_final_layer(TINY, HUB, "cpu", torch.float32)
    assert in_process_hub.sent == 0 and not in_process_hub.ranges
    for name, tensor in layer.state_dict().items():
        assert torch.equal(cached.state_dict()[name], tensor), name
    assert load_file(str(flow)).keys() > only_final.keys()  # the full file was never needed


def test_a_file_the_cache_knows_is_missing_is_fetched_by_range_requests(
    in_process_hub, tiny_repo, tmp_path, monkeypatch
):
    """huggingface_hub remembers files a repo lacked (`.no_exist/`); its cache lookup then answers with a
    marker that is neither a path nor None. The lens must go to the hub for the final layer, not read it."""
    from huggingface_hub import constants

    commit = "0" * 40
    repo = tmp_path / "hf-cache" / f"models--{TINY.repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / ".no_exist" / commit).mkdir(parents=True)
    (repo / ".no_exist" / commit / TINY.repo_flow).touch()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("FLUX_MODEL", raising=False)
    flow = tiny_repo / TINY.repo_flow
    in_process_hub.files[f"{TINY.repo_id}/{TINY.repo_flow}"] = flow
    fetched = load_model_final_layer(TINY, HUB, "cpu", torch.float32)
    assert in_process_hub.sent == _final_layer_bytes(flow)
    local = load_final_layer(flow, TINY_PARAMS, "cpu", torch.float32)
    for name, tensor in local.state_dict().items():
        assert torch.equal(fetched.state_dict()[name], tensor), name
