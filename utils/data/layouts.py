"""The data layouts that -data_dir accepts, each turned into the same `TaskInfo`.

- an MSD task folder (dataset.json, imagesTr/, labelsTr/), its .tar, or a folder to download
  it into (utils/data/download.py finds, downloads and extracts it);
- a CSV list with the columns `image,label` and an optional `split` (`train` or `val`), its paths
  relative to the CSV's folder or absolute;
- a plain folder with imagesTr/ and labelsTr/ whose files pair up by name, without dataset.json.

Class names come from -label_names, else from dataset.json, else they are `background, class_1,
class_2, ...` for the label values found in the label files. Everything after this module (reading,
checking, preprocessing, splitting) works on a `TaskInfo` and never asks where the files came from.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from utils.data.download import is_task_folder, locate_task
from utils.errors import DataError
from utils.data.scans import ScanError, read_scan

SPLITS = ("train", "val")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclasses.dataclass
class TaskInfo:
    """The labelled cases of a data set, whatever its layout."""
    task_dir: Path                       # the task folder, the plain folder, or the CSV list
    label_names: dict[int, str]          # {0: "background", 1: "Anterior", 2: "Posterior"}
    in_channels: int                     # number of modalities
    pairs: list[tuple[Path, Path]]       # (image, label) of every labelled case
    test_images: list[Path]              # unlabelled images (imagesTs), may be empty
    split: dict[str, str] = dataclasses.field(default_factory=dict)   # case id -> "train"/"val" (CSV)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def foreground_names(self) -> list[str]:
        return [name for value, name in sorted(self.label_names.items()) if value != 0]

    @property
    def case_ids(self) -> list[str]:
        return [case_id(image) for image, _ in self.pairs]


def case_id(path: Path) -> str:
    """'imagesTr/hippocampus_001.nii.gz' -> 'hippocampus_001'."""
    return path.name.split(".")[0]


def read_data(data_dir: str | os.PathLike, task: str, google_id: str | None,
              label_names: Sequence[str] | None = None) -> TaskInfo:
    """The cases of -data_dir, in whichever accepted layout it is (see the module's docstring)."""
    path = Path(data_dir)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise DataError(f"-data_dir {path} does not exist. Pass an existing CSV list of image,label "
                            f"paths, a folder, or an MSD task's .tar.")
        return read_csv_list(path, label_names)
    if path.is_dir() and not is_task_folder(path):
        has = [name for name in ("imagesTr", "labelsTr") if (path / name).is_dir()]
        if len(has) == 2:
            return read_plain_folder(path, label_names)
        if has:
            missing = ({"imagesTr", "labelsTr"} - set(has)).pop()
            raise DataError(f"-data_dir {path} has {has[0]}/ but no {missing}/ (and no dataset.json). A "
                            f"folder of your own data needs both, with the same file names in each.")
    return read_task(locate_task(path, task, google_id), label_names)


def read_task(task_dir: str | Path, label_names: Sequence[str] | None = None) -> TaskInfo:
    """Read an MSD task folder's dataset.json and check that every file it lists exists.
    `label_names`, when given, replace the names dataset.json declares."""
    task_dir = Path(task_dir)
    meta_path = task_dir / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
        declared = {int(value): str(name) for value, name in meta["labels"].items()}
        in_channels = len(meta["modality"])
        pairs = [(task_dir / item["image"], task_dir / item["label"]) for item in meta["training"]]
        test_images = [task_dir / item for item in meta.get("test", [])]
    except FileNotFoundError:
        raise DataError(f"{meta_path} does not exist. -data_dir must point to an MSD task folder "
                        f"(the one holding dataset.json, imagesTr/ and labelsTr/) or its .tar.") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{meta_path} is malformed ({type(error).__name__}: {error}). It must be JSON "
                        f"with 'labels', 'modality' and 'training' entries as in the MSD archives; "
                        f"restore it from the original archive.") from None
    if sorted(declared) != list(range(len(declared))) or len(declared) < 2:
        raise DataError(f"{meta_path} declares labels {sorted(declared)}; they must be 0, 1, ... "
                        f"with 0 for background and at least one foreground class.")
    if not pairs:
        raise DataError(f"{meta_path} lists no training cases.")
    for image, label in pairs:
        for path in (image, label):
            if not path.is_file():
                raise DataError(f"{path} is listed in {meta_path} but does not exist. Restore it from "
                                f"the archive, or remove its entry from dataset.json.")
    names = dict(enumerate(label_names)) if label_names else declared
    return TaskInfo(task_dir, names, in_channels, pairs, [p for p in test_images if p.is_file()])


def read_csv_list(csv_path: Path, label_names: Sequence[str] | None = None) -> TaskInfo:
    """Read a CSV list of cases: columns `image` and `label`, and optionally `split`.

    Rows are numbered as a spreadsheet numbers them (the header is row 1), so that an error's row
    number is the one the user sees. Rows with an empty `split` are split by -train_val_ratio.
    """
    try:
        # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark.
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [(name or "").strip().lower() for name in reader.fieldnames or []]
            # Cells beyond the header's columns (key None) are ignored.
            rows = [(reader.line_num,
                     {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None})
                    for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"Cannot read the CSV list {csv_path} ({error}).") from None
    missing = [name for name in ("image", "label") if name not in columns]
    if missing:
        raise DataError(f"The CSV list {csv_path} has no '{missing[0]}' column (its header is "
                        f"{','.join(columns) or 'empty'}). Its first row must name the columns: "
                        f"image,label and optionally split.")
    if not rows:
        raise DataError(f"The CSV list {csv_path} lists no cases: it has a header but no rows.")
    pairs, marked = [], {}
    for row_number, row in rows:
        paths = []
        for column in ("image", "label"):
            if not row[column]:
                raise DataError(f"Row {row_number} of {csv_path} has no {column}.")
            path = Path(row[column]).expanduser()
            path = path if path.is_absolute() else csv_path.parent / path
            if not path.is_file():
                raise DataError(f"The {column} {path} of row {row_number} of {csv_path} does not exist. "
                                f"Relative paths are taken from the CSV's folder, {csv_path.parent}.")
            paths.append(path)
        split = row.get("split", "").lower()
        if split and split not in SPLITS:
            raise DataError(f"Row {row_number} of {csv_path} has split '{row['split']}'; use train, val, "
                            f"or leave it empty to let -train_val_ratio decide.")
        pairs.append((paths[0], paths[1]))
        if split:
            marked[case_id(paths[0])] = split
    check_unique_ids(pairs, [f"row {number}" for number, _ in rows], csv_path)
    return TaskInfo(csv_path, class_names(pairs, label_names, csv_path), channels_of(pairs[0][0]),
                    pairs, [], marked)


def read_plain_folder(folder: Path, label_names: Sequence[str] | None = None) -> TaskInfo:
    """Read a folder with imagesTr/ and labelsTr/ (and maybe imagesTs/) whose files pair up by name."""
    files = {name: nifti_files(folder / name) for name in ("imagesTr", "labelsTr")}
    for have, lack in (("imagesTr", "labelsTr"), ("labelsTr", "imagesTr")):
        alone = sorted(set(files[have]) - set(files[lack]))
        if alone:
            others = (f" ({len(alone)} files of {have}/ have none: {', '.join(alone[:3])}"
                      f"{'...' if len(alone) > 3 else ''})" if len(alone) > 1 else "")
            raise DataError(f"{folder / have / alone[0]} has no file of the same name in {lack}/{others}. "
                            f"Each image in imagesTr/ needs its label under the same name in labelsTr/.")
    images, labels = files["imagesTr"], files["labelsTr"]
    if not images:
        raise DataError(f"{folder / 'imagesTr'} holds no NIfTI files (.nii or .nii.gz).")
    pairs = [(images[name], labels[name]) for name in sorted(images)]
    check_unique_ids(pairs, [image.name for image, _ in pairs], folder)
    test_images = sorted(nifti_files(folder / "imagesTs").values())
    return TaskInfo(folder, class_names(pairs, label_names, folder), channels_of(pairs[0][0]), pairs,
                    test_images)


def nifti_files(folder: Path) -> dict[str, Path]:
    """{file name: path} of the NIfTI files in `folder`, leaving out hidden files (such as the ._
    files macOS leaves in archives)."""
    if not folder.is_dir():
        return {}
    return {p.name: p for p in folder.iterdir()
            if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES) and not p.name.startswith(".")}


def check_unique_ids(pairs: list[tuple[Path, Path]], places: list[str], source: Path) -> None:
    """Refuse two cases with one id: the split, checkpoints and evaluation CSVs name cases by id."""
    seen: dict[str, tuple[str, Path]] = {}
    for (image, _), place in zip(pairs, places):
        case = case_id(image)
        if case in seen:
            raise DataError(f"The images of {seen[case][0]} and {place} of {source} have the same case id "
                            f"'{case}' ({seen[case][1]} and {image}): a case is named after its image file "
                            f"without extensions, so image file names must differ. Rename one of them.")
        seen[case] = (place, image)


def channels_of(image: Path) -> int:
    """Number of channels of an image, from its header: 1 for a 3D file, shape[3] for a 4D one."""
    try:
        shape = nib.load(image).shape
    except Exception as error:  # nibabel raises several types for files that are not NIfTI
        raise DataError(f"Cannot read the header of {image} ({error}); it must be a NIfTI file "
                        f"(.nii or .nii.gz).") from None
    if len(shape) not in (3, 4):
        raise DataError(f"{image} has shape {shape}; an image must be 3D, or 4D with channels last.")
    return 1 if len(shape) == 3 else shape[3]


def class_names(pairs: list[tuple[Path, Path]], label_names: Sequence[str] | None,
                source: Path) -> dict[int, str]:
    """{label value: name}: `label_names` (-label_names) in order, or else background, class_1,
    class_2, ... for the values found in the label files, which must then be 0, 1, ..., K-1."""
    if label_names:
        return dict(enumerate(label_names))
    found: set[int | float] = set()
    for _, label in pairs:
        try:
            found |= set(np.unique(read_scan(label, "label").data.numpy()).tolist())
        except ScanError as error:
            raise DataError(f"Cannot read {error.path}: it {error.reason}. Restore the file, or remove "
                            f"its case from {source}.") from None
    values = sorted(found)
    if values != list(range(len(values))) or len(values) < 2:
        raise DataError(f"The label files of {source} hold the values {values[:10]}"
                        f"{'...' if len(values) > 10 else ''}; without -label_names they must be 0, 1, "
                        f"..., K-1 with 0 for background and at least one other class. Relabel them, or "
                        f"name every class with -label_names (background first), when a class is "
                        f"missing from all the files.")
    return {0: "background", **{int(value): f"class_{int(value)}" for value in values[1:]}}


def read_unlabelled(where: str, info: TaskInfo) -> TaskInfo:
    """-unlabelled_dir: the unlabelled scans of a folder of NIfTI files, or with "auto" the task's
    own (dataset.json's "test" list, imagesTs/), as a TaskInfo of (image, None) pairs with the
    labelled data's classes and channels."""
    if where == "auto":
        images = list(info.test_images)
        if not images:
            raise DataError(f"-unlabelled_dir auto: {info.task_dir} lists no unlabelled scans (dataset.json's "
                            f"'test', imagesTs/). Give a folder of NIfTI scans instead.")
        source = info.task_dir
    else:
        source = Path(where)
        if not source.is_dir():
            raise DataError(f"-unlabelled_dir {where} is not a folder. Give a folder of NIfTI scans, or auto.")
        images = sorted(nifti_files(source).values())
        if not images:
            raise DataError(f"-unlabelled_dir {where} holds no NIfTI scan (.nii or .nii.gz).")
    return TaskInfo(source, info.label_names, info.in_channels, [(image, None) for image in images], [])
