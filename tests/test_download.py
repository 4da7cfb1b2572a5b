"""Download, checksum and extraction, against an HTTP server on 127.0.0.1 serving archives we build."""
import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import main as entry
from conftest import TINY, write_task
from utils.data import download
from utils.data.download import locate_task, safe_extract
from utils.errors import DataError
from utils.data.layouts import read_task

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


# Other Decathlon tasks (-task). No other task's data is here, so these archives are synthetic, in the
# MSD layout, with their own names, shapes, spacings, channels and labels.
PROSTATE, SPLEEN = "Task05_Prostate", "Task09_Spleen"
OTHER_TASKS = {
    # name: (modalities, labels, voxel spacing in mm, shape range)
    PROSTATE: ({"0": "T2", "1": "ADC"}, {"0": "background", "1": "PZ", "2": "TZ"}, (0.6, 0.6, 3.6),
               ([14, 14, 6], [18, 18, 9])),
    SPLEEN: ({"0": "CT"}, {"0": "background", "1": "spleen"}, (0.8, 0.8, 5.0), ([14, 16, 6], [18, 20, 9])),
}


def write_msd_task(root: Path, name: str, n_cases: int = 6, seed: int = 0) -> Path:
    """An MSD-layout task like `name` in OTHER_TASKS: 4D images (X, Y, Z, C) when it has several
    modalities, as in the Decathlon's own files."""
    modalities, labels, spacing, (low, high) = OTHER_TASKS[name]
    rng = np.random.default_rng(seed)
    task = root / name
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    affine = np.diag([*spacing, 1.0])
    training = []
    for i in range(n_cases):
        shape = tuple(int(s) for s in rng.integers(low, high))
        label = np.zeros(shape, np.uint8)
        cx, cy, cz = (s // 2 for s in shape)
        label[cx - 3:cx + 3, cy - 3:cy + 3, cz - 1:cz + 2] = 1
        if len(labels) > 2:
            label[cx - 3:cx + 3, cy:cy + 3, cz - 1:cz + 2] = 2
        channels = [(100 + 60 * label + 20 * c + rng.normal(0, 10, shape)).astype(np.float32)
                    for c in range(len(modalities))]
        image = np.stack(channels, axis=-1) if len(channels) > 1 else channels[0]
        case = f"{name.split('_')[1].lower()}_{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), task / "imagesTr" / case)
        nib.save(nib.Nifti1Image(label, affine), task / "labelsTr" / case)
        training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"})
    meta = {"name": name.split("_")[1], "modality": modalities, "labels": labels,
            "numTraining": n_cases, "numTest": 0, "training": training, "test": []}
    (task / "dataset.json").write_text(json.dumps(meta, indent=2))
    return task


def tar_folder(folder: Path, path: Path, arcname: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        tar.add(folder, arcname=arcname)
    return path


@pytest.fixture
def other_tasks(tmp_path):
    """A server of the synthetic Task05_Prostate.tar and Task09_Spleen.tar; their md5 by task name."""
    served = tmp_path / "served_other"
    sums = {name: md5(tar_folder(write_msd_task(tmp_path / "source_other", name),
                                 served / f"{name}.tar", arcname=name)) for name in OTHER_TASKS}
    server = Server(served)
    yield server, sums
    server.close()


@pytest.fixture
def monai_tables(other_tasks, monkeypatch):
    """MONAI's mirror and md5 tables, pointing at the local server for the synthetic tasks; Google
    Drive must not be asked for them."""
    server, sums = other_tasks
    for name in OTHER_TASKS:
        monkeypatch.setitem(download.MIRROR_URLS, name, f"{server.url}/{name}.tar")
        monkeypatch.setitem(download.ARCHIVE_MD5, name, sums[name])
    asked = []
    monkeypatch.setattr(download, "download_google_drive", lambda google_id, dest: asked.append(google_id))
    return server, asked


@pytest.mark.parametrize("name, channels, labels", [(PROSTATE, 2, 3), (SPLEEN, 1, 2)])
def test_other_tasks_download_check_md5_and_extract(tmp_path, other_tasks, name, channels, labels):
    server, sums = other_tasks
    target = tmp_path / "data"
    task = locate_task(target, name, None, mirror_url=f"{server.url}/{name}.tar", md5=sums[name])
    assert task == target / name and (target / f"{name}.tar").is_file()
    info = read_task(task)
    assert (info.in_channels, info.num_classes, len(info.pairs)) == (channels, labels, 6)
    image = nib.load(info.pairs[0][0])
    assert image.ndim == (4 if channels > 1 else 3) and image.shape[3:] == ((channels,) if channels > 1 else ())
    assert np.allclose(image.header.get_zooms()[:3], OTHER_TASKS[name][2])
    with pytest.raises(DataError, match="md5 does not match"):
        locate_task(tmp_path / "other", name, None, mirror_url=f"{server.url}/{name}.tar", md5="0" * 32)


def test_other_tasks_come_from_monais_mirror_without_task04s_google_id(tmp_path, monai_tables):
    server, asked = monai_tables
    task04_default = download.GOOGLE_DRIVE_IDS[TASK]        # -google_id's default
    task = locate_task(tmp_path / "data", SPLEEN, task04_default)
    assert (task / "dataset.json").is_file() and asked == [] and server.requests == 1


def test_a_google_id_given_for_another_task_is_tried_first(tmp_path, monai_tables):
    server, asked = monai_tables
    task = locate_task(tmp_path / "data", SPLEEN, "my-own-spleen-copy")
    assert asked == ["my-own-spleen-copy"]               # it wrote nothing: the mirror's copy is used
    assert (task / "dataset.json").is_file() and server.requests == 1


def test_task04_tries_its_known_google_id_when_none_is_given(tmp_path, archive, server, monkeypatch):
    asked = []
    monkeypatch.setattr(download, "download_google_drive", lambda google_id, dest: asked.append(google_id))
    locate_task(tmp_path / "data", TASK, None, mirror_url=f"{server.url}/{TASK}.tar", md5=md5(archive))
    assert asked == [download.GOOGLE_DRIVE_IDS[TASK]]


@pytest.mark.parametrize("name, hint", [("Task99_Foo", None), ("Task4_Hippocampus", "did you mean Task04_Hippocampus")])
def test_an_unknown_task_lists_the_known_ones(tmp_path, monkeypatch, name, hint):
    monkeypatch.setattr(download, "download_google_drive", lambda *a: pytest.fail("nothing may be downloaded"))
    with pytest.raises(DataError) as error:
        locate_task(tmp_path / "data", name, download.GOOGLE_DRIVE_IDS[TASK])
    message = str(error.value)
    assert f"-task {name} is not a Medical Segmentation Decathlon task" in message
    assert all(known in message for known in ("Task01_BrainTumour", "Task04_Hippocampus", "Task10_Colon"))
    assert (hint in message) if hint else ("did you mean" not in message)
    assert not (tmp_path / "data").exists()


def test_an_unknown_task_from_the_command_line(tmp_path, capsys):
    code = entry.main(["-task", "Task99_Foo", "-data_dir", str(tmp_path / "data"), "-best_models_dir",
                       str(tmp_path / "run"), *TINY])
    assert code == 1 and "the tasks that can be downloaded are Task01_BrainTumour" in capsys.readouterr().err


def test_an_unknown_task_name_is_fine_when_data_dir_holds_its_data(tmp_path):
    task = write_task(tmp_path / "data", n_cases=2, name="Task99_Foo")
    assert locate_task(tmp_path / "data", "Task99_Foo", None) == task
    assert locate_task(task, "Task99_Foo", None) == task
    tar = tar_folder(task, tmp_path / "elsewhere" / "Task99_Foo.tar", arcname="Task99_Foo")
    assert locate_task(tar, "Task99_Foo", None) == tmp_path / "elsewhere" / "Task99_Foo"
    assert locate_task(tmp_path / "elsewhere", "Task99_Foo", None) == tmp_path / "elsewhere" / "Task99_Foo"


def test_extraction_finds_the_task_folder_whatever_its_name(tmp_path):
    source = write_msd_task(tmp_path / "source", SPLEEN, n_cases=2)
    tar = tar_folder(source, tmp_path / "data" / f"{SPLEEN}.tar", arcname="Spleen_release_2")
    task = locate_task(tar, SPLEEN, None)
    assert task == tmp_path / "data" / "Spleen_release_2" and (task / "dataset.json").is_file()
    (task / "marker").write_text("extracted once")
    assert locate_task(tar, SPLEEN, None) == task and (task / "marker").is_file()     # reused
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("name", [SPLEEN, PROSTATE])
def test_training_on_another_task_downloaded_from_the_mirror(tmp_path, monai_tables, name):
    """-task end to end: download into an empty -data_dir, md5, extraction, training: Task09_Spleen
    on anisotropic voxels (0.8 x 0.8 x 5 mm) with one foreground class, Task05_Prostate on 2 channels."""
    server, asked = monai_tables
    modalities, labels, _, _ = OTHER_TASKS[name]
    run = tmp_path / "run"
    assert entry.main(["-task", name, "-data_dir", str(tmp_path / "data"), "-best_models_dir", str(run),
                       *TINY, "-patch_size", "8", "8", "4"]) == 0
    assert server.requests == 1 and asked == []
    assert (tmp_path / "data" / name / "dataset.json").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["task"] == name and config["label_names"] == labels
    assert config["model_config"]["in_channels"] == len(modalities)
    assert (run / "best.pt").is_file()
