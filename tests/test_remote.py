"""Images opened by URL: an OME-Zarr served over HTTP from 127.0.0.1 measures like the local copy."""

from __future__ import annotations

import functools
import re
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from cellar import measure
from cellar.ngff.write import write_image
from cellar.schemas.errors import InvalidImageError
from helpers import intensities, nuclei_like, read_table, run_cli


class _Quiet(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do (HTTP/1.0 closes and stalls aiohttp ~1 s a request)

    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    handler = functools.partial(_Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_http_url_gives_the_same_table_as_the_local_path(served, version):
    root, base = served
    labels = nuclei_like((40, 50), 12, seed=41)
    write_image(root / "img.ome.zarr", intensities((40, 50), 2, seed=42), "cyx", chunks=(1, 16, 16),
                labels={"nuclei": labels}, version=version, scale={"y": 0.5, "x": 0.5})
    measure.measure(f"{base}/img.ome.zarr", "nuclei", root / "remote.cellar", workers=2, region_pixels=0)
    measure.measure(str(root / "img.ome.zarr"), "nuclei", root / "local.cellar", workers=1, region_pixels=0)
    remote_entry, remote = read_table(root / "remote.cellar")
    _, local = read_table(root / "local.cellar")
    assert remote_entry["source"]["url"] == f"{base}/img.ome.zarr"
    assert remote.columns.tolist() == local.columns.tolist()
    for col in local.columns:
        np.testing.assert_allclose(remote[col].to_numpy(np.float64), local[col].to_numpy(np.float64), rtol=1e-12)


def test_http_url_that_is_not_there_is_one_clear_error(served):
    _, base = served
    with pytest.raises(InvalidImageError, match="not a Zarr group"):
        measure.open_image(f"{base}/missing.zarr")


def test_refused_connection_is_one_clear_error(monkeypatch):
    from cellar import ngff

    monkeypatch.setattr(ngff, "RETRY_DELAY_S", 0.01)  # refused connections are retried too (a restarting server)
    with pytest.raises(InvalidImageError, match="cannot read .*Cannot connect to host 127.0.0.1:9"):
        measure.open_image("http://127.0.0.1:9/x.zarr")


class _Flaky(_Quiet):
    """Fails the first request of the chunks in `flaky` with HTTP 503 and their second with a truncated body,
    and every request of the chunks in `always`."""

    seen: dict[str, int] = {}
    always: set[str] = set()
    flaky: set[str] = set()
    lock = threading.Lock()

    def do_GET(self):
        file = Path(self.translate_path(self.path))
        is_chunk = file.is_file() and ("/c/" in self.path or self.path.rsplit("/", 1)[-1].replace(".", "").isdigit())
        with self.lock:
            n = self.seen[self.path] = self.seen.get(self.path, 0) + 1
        if is_chunk and (self.path in self.always or (n == 1 and self.path in self.flaky)):
            self.send_error(503, "busy")
            return
        if is_chunk and n == 2 and self.path in self.flaky:
            body = file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])  # then the connection closes: a truncated body
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def flaky(tmp_path, monkeypatch):
    from cellar import ngff

    monkeypatch.setattr(ngff, "RETRY_DELAY_S", 0.01)
    _Flaky.seen, _Flaky.always, _Flaky.flaky = {}, set(), set()
    handler = functools.partial(_Flaky, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_transient_http_errors_are_retried(flaky):
    root, base = flaky
    labels = nuclei_like((40, 50), 12, seed=43)
    write_image(root / "img.ome.zarr", intensities((40, 50), 1, seed=44), "cyx", chunks=(1, 16, 16),
                labels={"nuclei": labels})
    _Flaky.flaky = {"/img.ome.zarr/0/c/0/1/1", "/img.ome.zarr/labels/nuclei/0/c/1/1", "/img.ome.zarr/0/c/0/0/2"}
    measure.measure(f"{base}/img.ome.zarr", "nuclei", root / "remote.cellar", workers=1, region_pixels=0)
    measure.measure(str(root / "img.ome.zarr"), "nuclei", root / "local.cellar", workers=1, region_pixels=0)
    _, remote = read_table(root / "remote.cellar")
    _, local = read_table(root / "local.cellar")
    assert remote.equals(local)
    assert all(_Flaky.seen[p] >= 3 for p in _Flaky.flaky)  # asked again after a 503 and after a truncated body


def test_a_chunk_that_keeps_failing_is_named(flaky):
    root, base = flaky
    write_image(root / "img.ome.zarr", intensities((40, 50), 1, seed=45), "cyx", chunks=(1, 16, 16),
                labels={"nuclei": nuclei_like((40, 50), 12, seed=46)})
    _Flaky.always = {"/img.ome.zarr/labels/nuclei/0/c/1/2"}
    with pytest.raises(InvalidImageError, match=r"labels/nuclei/0/c/1/2: .*503.*\(failed 5 times\)"):
        measure.measure(f"{base}/img.ome.zarr", "nuclei", root / "s.cellar", workers=1, region_pixels=0)
    assert not (root / "s.cellar").exists()


def test_s3_url_through_a_local_s3_server(tmp_path, monkeypatch):
    """s3:// through s3fs, against moto's S3-compatible server on 127.0.0.1 (the endpoint comes from
    AWS_ENDPOINT_URL, as for any S3-compatible store such as MinIO)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]')")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'cellar[s3]')")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                               AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint).items():
            monkeypatch.setenv(key, value)
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.mkdir("cellar-test")
        local = write_image(tmp_path / "img.ome.zarr", intensities((40, 50), 2, seed=47), "cyx", chunks=(1, 20, 25),
                            labels={"nuclei": nuclei_like((40, 50), 10, seed=48)})
        fs.put(str(local), "cellar-test/img.ome.zarr", recursive=True)
        measure.measure("s3://cellar-test/img.ome.zarr", "nuclei", tmp_path / "s3.cellar", workers=2, region_pixels=0)
        measure.measure(str(local), "nuclei", tmp_path / "local.cellar", workers=1, region_pixels=0)
        entry, remote = read_table(tmp_path / "s3.cellar")
        _, here = read_table(tmp_path / "local.cellar")
        assert entry["source"]["url"] == "s3://cellar-test/img.ome.zarr" and len(remote) == len(here) > 5
        for col in here.columns:
            np.testing.assert_allclose(remote[col].to_numpy(np.float64), here[col].to_numpy(np.float64), rtol=1e-12)
    finally:
        server.stop()


@pytest.mark.parametrize("how", [["--workers", "1"], ["--workers", "2"], ["--workers", "2", "--cluster", "local"]],
                         ids=["in process", "worker processes", "dask"])
def test_remote_measuring_leaves_only_cellars_lines_on_stderr(served, how):
    """Every HTTP session cellar opens (parent, forked workers, dask workers) is closed: aiohttp prints
    "Unclosed client session" for each one left to the garbage collector."""
    root, base = served
    write_image(root / "img.ome.zarr", intensities((64, 80), 2, seed=49), "cyx", chunks=(1, 16, 16),
                labels={"nuclei": nuclei_like((64, 80), 15, seed=50)})
    r = run_cli("measure", f"{base}/img.ome.zarr", "--labels", "nuclei", "--out", str(root / "s.cellar"),
                "--region-pixels", "0", *how)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("measured 15 objects of img/labels/nuclei (20 regions)"), r.stdout
    assert all(re.match(r"measuring img/labels/nuclei: \d+/20 regions", ln) for ln in r.stderr.splitlines()), r.stderr
