"""Download, checksum and extraction, against an HTTP server on 127.0.0.1 serving archives we build."""
import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest

from conftest import write_task
from utils import download
from utils.download import locate_task, safe_extract
from utils.errors import DataError

TASK = "Task04_Hippocampus"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def archive(tmp_path) -> Path:
    """A real MSD-layout .tar of a tiny synthetic task."""
    source = write_task(tmp_path / "source", n_cases=3)
    path = tmp_path / "served" / f"{TASK}.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        tar.add(source, arcname=TASK)
    return path


class Server:
    """Serves files from a folder; counts requests; can cut a response short."""

    def __init__(self, folder: Path):
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                server.requests += 1
                if server.truncate:
                    body = (folder / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.requests, self.truncate = 0, False
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(archive):
    s = Server(archive.parent)
    yield s
    s.close()


def test_download_checks_md5_and_extracts(tmp_path, archive, server):
    target = tmp_path / "data"
    task = locate_task(target, TASK, None, mirror_url=f"{server.url}/{TASK}.tar", md5=md5(archive))
    assert task == target / TASK
    assert (task / "dataset.json").is_file() and len(list((task / "imagesTr").iterdir())) == 3
    assert not list(target.glob("*.part")) and not list(target.glob(".extract-*"))
    # A second call finds the valid copy and downloads nothing.
    assert locate_task(target, TASK, None, mirror_url=f"{server.url}/{TASK}.tar", md5=md5(archive)) == task
    assert server.requests == 1


def test_archive_is_reused_when_its_md5_matches(tmp_path, archive, server):
    target = tmp_path / "data"
    target.mkdir()
    (target / f"{TASK}.tar").write_bytes(archive.read_bytes())
    task = locate_task(target, TASK, None, mirror_url=f"{server.url}/{TASK}.tar", md5=md5(archive))
    assert (task / "dataset.json").is_file() and server.requests == 0


def test_wrong_checksum_is_refused_and_nothing_is_kept(tmp_path, server):
    target = tmp_path / "data"
    with pytest.raises(DataError, match="md5 does not match"):
        locate_task(target, TASK, None, mirror_url=f"{server.url}/{TASK}.tar", md5="0" * 32)
    assert list(target.iterdir()) == []


def test_interrupted_download_is_never_taken_for_the_archive(tmp_path, archive, server):
    target = tmp_path / "data"
    server.truncate = True
    with pytest.raises(DataError, match="connection closed"):
        locate_task(target, TASK, None, mirror_url=f"{server.url}/{TASK}.tar", md5=md5(archive))
    assert list(target.iterdir()) == []
    # A leftover partial file from a killed run is ignored: the next run starts over.
    (target / f"{TASK}.tar.part").write_bytes(b"half")
    server.truncate = False
    task = locate_task(target, TASK, None, mirror_url=f"{server.url}/{TASK}.tar", md5=md5(archive))
    assert (task / "dataset.json").is_file()


def test_google_drive_failure_falls_back_to_the_mirror(tmp_path, archive, server, monkeypatch):
    tried = []

    def failing_drive(google_id, dest):
        tried.append(google_id)
        raise OSError("no route to Google Drive")

    monkeypatch.setattr(download, "download_google_drive", failing_drive)
    task = locate_task(tmp_path / "data", TASK, "some-id", mirror_url=f"{server.url}/{TASK}.tar",
                       md5=md5(archive))
    assert tried == ["some-id"] and (task / "dataset.json").is_file()


def test_offline_error_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "download_google_drive",
                        lambda *a: (_ for _ in ()).throw(OSError("Name or service not known")))
    closed_port = "http://127.0.0.1:9/Task04_Hippocampus.tar"
    with pytest.raises(DataError) as error:
        locate_task(tmp_path / "data", TASK, "some-id", mirror_url=closed_port)
    message = str(error.value)
    assert "Could not download" in message and "-data_dir /path/to/Task04_Hippocampus.tar" in message


def test_data_dir_may_be_the_tar_itself(archive):
    task = locate_task(archive, TASK, None)
    assert task == archive.parent / TASK and (task / "dataset.json").is_file()


def test_data_dir_may_be_the_task_folder(task_dir):
    assert locate_task(task_dir, TASK, None) == task_dir


def test_truncated_archive_is_reported(tmp_path, archive):
    broken = tmp_path / "broken" / f"{TASK}.tar"
    broken.parent.mkdir()
    broken.write_bytes(archive.read_bytes()[:5000])
    with pytest.raises(DataError, match="corrupt or truncated"):
        locate_task(broken, TASK, None)
    assert not (broken.parent / TASK).exists()


def test_a_file_that_is_not_an_archive(tmp_path):
    not_tar = tmp_path / "notes.txt"
    not_tar.write_text("hello")
    with pytest.raises(DataError, match="not a tar archive"):
        locate_task(not_tar, TASK, None)


def evil_tar(path: Path, name: str, link: bool = False) -> Path:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        if link:
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return path


@pytest.mark.parametrize("name, link", [("../escaped.txt", False), ("{absolute}", False),
                                        ("Task04_Hippocampus/link", True)])
def test_entries_outside_the_target_are_refused(tmp_path, name, link):
    escaped = tmp_path / "escaped.txt"              # where "../escaped.txt" or the absolute path lands
    archive = evil_tar(tmp_path / "evil.tar", name.format(absolute=escaped), link)
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(DataError, match="outside|link"):
        safe_extract(archive, target)
    assert list(target.iterdir()) == [] and not (tmp_path / "escaped.txt").exists()


def test_extraction_works_on_a_python_without_tarfiles_data_filter(tmp_path, archive, monkeypatch):
    # Pythons before 3.10.12 / 3.11.4 have no filter="data"; the entry checks are done either way.
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    monkeypatch.setattr(tarfile.TarFile, "extractall", no_filter_argument(tarfile.TarFile.extractall))
    task = locate_task(archive, TASK, None)
    assert (task / "dataset.json").is_file()
    evil = evil_tar(tmp_path / "evil.tar", "../escaped.txt")
    with pytest.raises(DataError, match="outside"):
        safe_extract(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def no_filter_argument(extractall):
    def older_extractall(self, path=".", members=None, *, numeric_owner=False, **kwargs):
        assert "filter" not in kwargs, "this Python's tarfile has no filter argument"
        return extractall(self, path, members, numeric_owner=numeric_owner)
    return older_extractall
