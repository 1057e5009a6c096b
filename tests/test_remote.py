"""Images opened by URL: an OME-Zarr served over HTTP from 127.0.0.1 measures like the local copy."""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest

import measure
from ngff.write import write_image
from schemas.errors import InvalidImageError
from tests.conftest import intensities, nuclei_like, read_table


class _Quiet(http.server.SimpleHTTPRequestHandler):
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


def test_refused_connection_is_one_clear_error():
    with pytest.raises(InvalidImageError, match="cannot read .*Cannot connect to host 127.0.0.1:9"):
        measure.open_image("http://127.0.0.1:9/x.zarr")
