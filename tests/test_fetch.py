"""``python -m reckoning_ray.data fetch``: downloads from a local HTTP server (resume with Range,
checksums, layout checks, atomic unpacking), --archive offline, CLUTRR-SG zips, and the authors'
W&B sets offline and from a copy. Nothing here touches the internet."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import PROOFWRITER_DEV
from reckoning_ray.core.data.authors import read_authors
from reckoning_ray.core.data.errors import DataFormatError
from reckoning_ray.core.data.fetch import PROOFWRITER_ROOT, partial_path
from reckoning_ray.core.data.proofwriter import read_proofwriter
from reckoning_ray.data import main

DEPTHS = (0, 1, 2, 3, 5)
SPLITS = ("train", "dev", "test")
WANTED = sorted(f"depth-{d}/meta-{s}.jsonl" for d in DEPTHS for s in SPLITS)


def sample_lines(n: int = 3) -> list[str]:
    with open(PROOFWRITER_DEV, encoding="utf-8") as f:
        return [next(f) for _ in range(n)]


def release_zip(depths=DEPTHS) -> bytes:
    """A tiny zip with the ProofWriter release's layout: the wanted OWA files, and others beside them."""
    lines = sample_lines()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for d in depths:
            for i, s in enumerate(SPLITS):
                zf.writestr(f"{PROOFWRITER_ROOT}/OWA/depth-{d}/meta-{s}.jsonl", lines[i])
        zf.writestr(f"{PROOFWRITER_ROOT}/OWA/NatLang/meta-dev.jsonl", lines[0])
        zf.writestr(f"{PROOFWRITER_ROOT}/OWA/depth-3ext/meta-dev.jsonl", lines[0])
        zf.writestr(f"{PROOFWRITER_ROOT}/CWA/depth-3/meta-dev.jsonl", lines[0])
        zf.writestr(f"{PROOFWRITER_ROOT}/README.md", "ProofWriter\n")
    return buf.getvalue()


class Server:
    """A local HTTP server of one payload, with byte ranges; ``cut_next`` sends half the body of
    the next answer and closes the connection."""

    def __init__(self, payload: bytes):
        self.payload, self.cut_next, self.ranges = payload, False, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                data, rng = server.payload, self.headers.get("Range")
                server.ranges.append(rng)
                start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
                if start >= len(data) and rng:
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_next:
                    server.cut_next = False
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/proofwriter-dataset-V2020.12.3.zip"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served():
    payload = release_zip()
    server = Server(payload)
    yield server, hashlib.sha256(payload).hexdigest()
    server.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files_under(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def fetch_pw(url: str, dest, *extra: str) -> int:
    return main(["fetch", "proofwriter", "--url", url, "--to", str(dest), "--no-progress", *extra])


def test_a_good_archive_unpacks_exactly_the_owa_depth_files(served, tmp_path, capsys):
    server, sha = served
    dest = tmp_path / "proofwriter"
    assert fetch_pw(server.url, dest, "--sha256", sha) == 0
    assert files_under(dest) == WANTED
    assert (dest / "depth-3" / "meta-dev.jsonl").read_text() == sample_lines()[1]
    assert sorted(tmp_path.iterdir()) == [dest]  # no partial file, no temporary directory left
    out = capsys.readouterr().out
    assert f"data.path={dest / 'depth-3'}" in out and "python -m reckoning_ray.train paper" in out
    splits = read_proofwriter(dest / "depth-3")  # what the ProofWriter reader takes
    assert all(splits[s] for s in ("train", "validation", "test"))
    # a second run finds the set complete and downloads nothing
    assert fetch_pw(server.url, dest, "--sha256", sha) == 0
    assert len(server.ranges) == 1 and "already holds" in capsys.readouterr().out


def test_a_cut_download_resumes_with_a_range_request(served, tmp_path, capsys):
    server, sha = served
    dest = tmp_path / "pw"
    server.cut_next = True
    assert fetch_pw(server.url, dest, "--sha256", sha) == 2
    err = capsys.readouterr().err
    partial = partial_path(dest, "proofwriter-dataset-V2020.12.3.zip")
    half = len(server.payload) // 2
    assert "cut" in err and str(partial) in err
    assert partial.stat().st_size == half and not dest.exists()
    assert fetch_pw(server.url, dest, "--sha256", sha) == 0
    assert server.ranges == [None, f"bytes={half}-"]
    assert files_under(dest) == WANTED and not partial.exists()


def test_a_wrong_checksum_exits_2_and_installs_nothing(served, tmp_path, capsys):
    server, sha = served
    dest = tmp_path / "pw"
    assert fetch_pw(server.url, dest, "--sha256", "0" * 64) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and sha in err and "nothing was installed" in err
    assert list(tmp_path.iterdir()) == []  # no DIR, no partial file, no temporary directory


def test_no_server_exits_2_within_seconds_naming_the_url_and_archive(tmp_path, capsys):
    url = f"http://127.0.0.1:{closed_port()}/proofwriter-dataset-V2020.12.3.zip"
    start = time.monotonic()
    assert fetch_pw(url, tmp_path / "pw") == 2
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert url in err and "--archive" in err
    assert list(tmp_path.iterdir()) == []


def test_archive_works_offline_and_its_layout_is_checked(tmp_path, capsys):
    payload = release_zip()
    archive = tmp_path / "copy.zip"
    archive.write_bytes(payload)
    offline = f"http://127.0.0.1:{closed_port()}/x.zip"
    dest = tmp_path / "pw"
    sha = hashlib.sha256(payload).hexdigest()
    assert fetch_pw(offline, dest, "--archive", str(archive), "--sha256", sha) == 0
    assert files_under(dest) == WANTED
    # a zip without depth-5 is not the release: exit 2, nothing unpacked
    partial = tmp_path / "partial.zip"
    partial.write_bytes(release_zip(depths=(0, 1, 2, 3)))
    sha = hashlib.sha256(partial.read_bytes()).hexdigest()
    assert fetch_pw(offline, tmp_path / "pw2", "--archive", str(partial), "--sha256", sha) == 2
    err = capsys.readouterr().err
    assert "depth-5/meta-train.jsonl" in err and not (tmp_path / "pw2").exists()
    # the release's own checksum is checked by default
    assert fetch_pw(offline, tmp_path / "pw3", "--archive", str(archive)) == 2
    assert "expected bbc56949" in capsys.readouterr().err


def clutrr_zip(names: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in names:
            zf.writestr(name, "<STORY> facts <QUERY> question <PROOF> ... <ANSWER> aunt\n")
    return buf.getvalue()


def test_clutrr_sg_unpacks_the_fact_files_from_any_depth(tmp_path, capsys):
    wanted = ["data/forward/train/short_proof_1.2_train_facts_anon.txt.4000",
              "data/backward/train/short_proof_1.2_train_facts_anon.txt.4000",
              "data/forward/test/10/long_proof_1.10_test_facts_ANON.txt",
              "no_proof_1.3_valid_facts_anon.txt.4000"]
    archive = tmp_path / "clutrr.zip"
    archive.write_bytes(clutrr_zip(wanted + ["data/forward/codes.4000", "data/forward/test/2/queries_1.2_test_facts_ANON.txt"]))
    dest = tmp_path / "clutrr-sg"
    assert main(["fetch", "clutrr-sg", "--archive", str(archive), "--to", str(dest)]) == 0
    assert files_under(dest) == sorted(wanted)
    assert f"data.path={dest}" in capsys.readouterr().out
    # no file of the pattern: exit 2 naming what the zip holds
    other = tmp_path / "other.zip"
    other.write_bytes(clutrr_zip(["clutrr/1.2_test.csv"]))
    assert main(["fetch", "clutrr-sg", "--archive", str(other), "--to", str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err
    assert "clutrr/1.2_test.csv" in err and "_facts_anon.txt" in err and not (tmp_path / "c2").exists()


def test_authors_offline_exits_2_fast_and_a_copy_can_be_passed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    dest = tmp_path / "owa_proof_2_hop_dall"
    start = time.monotonic()
    assert main(["fetch", "authors", "owa_proof_2_hop_dall", "--to", str(dest), "--timeout", "3"]) == 2
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert "epfl_nlp_phd/data-collection/owa_proof_2_hop_dall:latest" in err and "--archive" in err
    assert not dest.exists()
    # a copy made by `wandb artifact get` elsewhere, in the authors' format
    copy = tmp_path / "download"
    copy.mkdir()
    line = {"guid": "g1", "questions": ["Bob is big."], "answers": ["true"],
            "facts": ["Bob is red.", "Red things are big."], "distractors": ["Anne is kind."]}
    for split in ("train", "dev", "test"):
        (copy / f"{split}.jsonl").write_text(json.dumps(line) + "\n")
    assert main(["fetch", "authors", "owa_proof_2_hop_dall", "--archive", str(copy), "--to", str(dest)]) == 0
    assert files_under(dest) == ["dev.jsonl", "test.jsonl", "train.jsonl"]
    record = read_authors(dest)["validation"][0]
    assert record["id"] == "g1-Q1" and record["answer"] == "yes" and record["hops"] == 2
    assert record["question"] == "Bob is big" and record["distractors"] == ["Anne is kind."]
    assert record["knowledge"] == ["Bob is red.", "Red things are big.", "Anne is kind."]
    (dest / "test.jsonl").write_text(json.dumps({**line, "answers": ["maybe"]}) + "\n")
    with pytest.raises(DataFormatError, match=r"test.jsonl, line 1: expected answers true, false or unknown"):
        read_authors(dest)
