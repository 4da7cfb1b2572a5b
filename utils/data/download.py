"""Find the task's data on disk, or download, check and extract it.

The download is idempotent: a copy whose md5 matches is never fetched again. Nothing half-done
is ever taken for finished work: the archive is downloaded to ``<name>.part`` and renamed only
after its md5 matches, and it is extracted into a temporary folder that is renamed into place
only when extraction succeeded.

MONAI's ``download_and_extract`` is not used because it moves a file into place before its
checks can fail cleanly, swallows permission errors, and takes any non-empty folder for a
finished extraction.
"""
from __future__ import annotations

import difflib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from monai.apps import DecathlonDataset
from monai.apps.utils import check_hash
from tqdm import tqdm

from utils.errors import DataError

# MONAI keeps the public mirror address and md5 of every Decathlon task.
MIRROR_URLS: dict[str, str] = DecathlonDataset.resource
ARCHIVE_MD5: dict[str, str] = DecathlonDataset.md5
# Google Drive copies, tried before the mirror. Only Task04's is known; -google_id defaults to it.
GOOGLE_DRIVE_IDS: dict[str, str] = {"Task04_Hippocampus": "1RzPB1_bqzQhlWvU-YGvZzhx2omcDh38C"}
DOWNLOAD_TIMEOUT_S = 30
CHUNK_BYTES = 1 << 20


def offline_help(task: str) -> str:
    return (f"To use a copy you already have, get {task}.tar (from http://medicaldecathlon.com or "
            f"{MIRROR_URLS.get(task, 'the MSD mirror')}) on any machine with internet, then pass "
            f"-data_dir /path/to/{task}.tar, or -data_dir /path/to/{task} for the extracted folder.")


def google_id_for(task: str, google_id: str | None) -> str | None:
    """The Google Drive id to try for `task`: `google_id`, unless it is the known id of another
    task (as -google_id's default, Task04's, is for every other task: its archive would fail their
    md5); None means the task's own known id, if it has one. None: go straight to the mirror."""
    if google_id is None or google_id in GOOGLE_DRIVE_IDS.values():
        return GOOGLE_DRIVE_IDS.get(task)
    return google_id


def unknown_task_help(task: str) -> str:
    close = difflib.get_close_matches(task, MIRROR_URLS, n=1, cutoff=0.8)
    return (f"-task {task} is not a Medical Segmentation Decathlon task"
            + (f" (did you mean {close[0]}?)" if close else "")
            + f"; the tasks that can be downloaded are {', '.join(sorted(MIRROR_URLS))}. For other data, "
            f"point -data_dir at its folder (the one holding dataset.json), its .tar, a folder with "
            f"imagesTr/ and labelsTr/, or a CSV list of image,label paths.")


def download_url(url: str, dest: Path) -> None:
    """Stream `url` to `dest` with a progress bar. Raises OSError/URLError on failure."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.stem}") as bar:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
        if total is not None and bar.n != total:
            raise OSError(f"connection closed after {bar.n} of {total} bytes")


def download_google_drive(google_id: str, dest: Path) -> None:
    import gdown  # imported here: only needed when downloading, and slow to import

    if gdown.download(id=google_id, output=str(dest), quiet=False) is None:
        raise OSError("gdown could not download the file")


def download_archive(task: str, archive: Path, google_id: str | None,
                     mirror_url: str | None = None, md5: str | None = None) -> Path:
    """Make sure `archive` holds the task's .tar with the right md5, downloading it if needed.

    Tries Google Drive first (`google_id`, as `google_id_for` decides), then `mirror_url` (default:
    the task's public MSD mirror, with the md5 MONAI lists for it).
    """
    if mirror_url is None and task not in MIRROR_URLS:
        raise DataError(unknown_task_help(task))
    mirror_url = mirror_url or MIRROR_URLS.get(task)
    md5 = md5 or ARCHIVE_MD5.get(task)
    google_id = google_id_for(task, google_id)
    if archive.is_file() and check_hash(archive, md5, "md5"):
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".part")
    sources = []
    if google_id:
        sources.append((f"Google Drive id {google_id}", lambda: download_google_drive(google_id, partial)))
    if mirror_url:
        sources.append((mirror_url, lambda: download_url(mirror_url, partial)))
    failures = []
    for name, fetch in sources:
        try:
            fetch()
        except Exception as error:  # any failure of one source means: try the next one
            failures.append(f"  - {name}: {type(error).__name__}: {error}")
            continue
        if check_hash(partial, md5, "md5"):
            os.replace(partial, archive)
            return archive
        failures.append(f"  - {name}: the file's md5 does not match the expected {md5}")
    partial.unlink(missing_ok=True)
    raise DataError(f"Could not download {task} into {archive.parent}. Tried:\n" + "\n".join(failures)
                    + "\n" + offline_help(task))


def safe_extract(archive: Path, target_dir: Path) -> None:
    """Extract a tar archive into `target_dir`, refusing entries that would land outside it."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            root = target_dir.resolve()
            for member in members:
                destination = (root / member.name).resolve()
                if root != destination and root not in destination.parents:
                    raise DataError(f"The archive {archive} has an entry '{member.name}' that would be "
                                    f"written outside {target_dir}; it was not extracted. Download the "
                                    f"archive again from a trusted source.")
                if member.issym() or member.islnk() or member.isdev():
                    raise DataError(f"The archive {archive} has a link or device entry '{member.name}'; "
                                    f"a data archive has none, so it was not extracted.")
            # The checks above refuse what the "data" filter refuses; the filter, where this Python
            # has it (3.10.12+, 3.11.4+, 3.12+), also drops unsafe permission bits.
            safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(target_dir, members=members, **safety)
    except (tarfile.TarError, EOFError) as error:
        raise DataError(f"The archive {archive} is corrupt or truncated ({error}). Delete it and run "
                        f"again to download a fresh copy.") from None


def is_task_folder(path: Path) -> bool:
    return (path / "dataset.json").is_file()


def folder_in_archive(archive: Path) -> str | None:
    """Name of the folder holding dataset.json in `archive` (MSD archives hold `TaskNN_Name/`),
    reading the entries' headers only; None if it cannot tell."""
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = Path(member.name).parts
                if (len(parts) == 2 and parts[1] == "dataset.json" and parts[0] not in ("/", ".", "..")
                        and member.isfile()):
                    return parts[0]
    except (tarfile.TarError, EOFError, OSError):
        pass            # extraction reports the damage
    return None


def extract_task(archive: Path, task: str) -> Path:
    """Extract `archive` next to itself and return the task folder, whatever its name; reuse a
    finished extraction."""
    parent = archive.parent
    for name in (task, archive.name.split(".")[0]):
        if is_task_folder(parent / name):
            return parent / name
    inside = folder_in_archive(archive)
    if inside and is_task_folder(parent / inside):
        return parent / inside
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=parent))
    try:
        safe_extract(archive, staging)
        found = [p.parent for p in staging.glob("*/dataset.json")] + [p.parent for p in staging.glob("dataset.json")]
        if not found:
            raise DataError(f"The archive {archive} holds no dataset.json; it is not an MSD task archive.")
        final = parent / (found[0].name if found[0] != staging else archive.name.split(".")[0])
        os.replace(found[0], final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def locate_task(data_dir: str | os.PathLike, task: str, google_id: str | None,
                mirror_url: str | None = None, md5: str | None = None) -> Path:
    """Return the folder holding the task's dataset.json, downloading or extracting as needed.

    `data_dir` may be the extracted task folder, the task's .tar, or a folder that holds (or will
    hold) either of them. CSV lists and plain imagesTr/labelsTr folders never get here:
    utils/data/layouts.py reads them before asking for an MSD task.
    """
    path = Path(data_dir)
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise DataError(f"-data_dir {path} is a file but not a tar archive. Pass the task's .tar, "
                            f"its extracted folder (the one with dataset.json), or a CSV list of "
                            f"image,label paths (a file ending in .csv).")
        return extract_task(path, task)
    if is_task_folder(path):
        return path
    if is_task_folder(path / task):
        return path / task
    archive = path / f"{task}.tar"
    if path.exists() and not path.is_dir():
        raise DataError(f"-data_dir {path} is neither a folder nor a tar archive.")
    if mirror_url is None and task not in MIRROR_URLS and not archive.is_file():
        raise DataError(unknown_task_help(task))       # before a typo's folder is taken for foreign files
    ours = {archive.name, archive.name + ".part"}
    strangers = [p.name for p in path.iterdir() if p.name not in ours] if path.is_dir() else []
    if strangers:
        raise DataError(f"-data_dir {path} is not a task folder (it has no dataset.json) and holds other "
                        f"files ({', '.join(sorted(strangers)[:3])}...), so nothing is downloaded into it. "
                        f"Point -data_dir at the folder holding dataset.json, at the task's .tar, at a "
                        f"folder with imagesTr/ and labelsTr/, at a CSV list of image,label paths, or at "
                        f"a new or empty folder to download into.")
    if archive.is_file() and not (md5 or ARCHIVE_MD5.get(task)):
        return extract_task(archive, task)
    try:
        download_archive(task, archive, google_id, mirror_url, md5)
    except PermissionError as error:
        raise DataError(f"Cannot write into -data_dir {path} ({error}). Choose a folder you can "
                        f"write to.") from None
    return extract_task(archive, task)
