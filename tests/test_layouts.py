"""-data_dir layouts: an MSD folder, a CSV list, a plain imagesTr/labelsTr folder, and their errors."""
import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

import main as entry
from conftest import TINY
from utils.data.cache import load_cases
from utils.data_class import split_cases
from utils.errors import DataError
from utils.data.layouts import read_data

TASK = "Task04_Hippocampus"
DEFAULT_NAMES = {0: "background", 1: "class_1", 2: "class_2"}


def read(path, label_names=None):
    return read_data(path, TASK, google_id=None, label_names=label_names)


def write_csv(path, rows, header=("image", "label")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def case_rows(names, prefix="", splits=None):
    """CSV rows of the synthetic task's cases `names` (e.g. 'hippocampus_000'), paths under `prefix`."""
    rows = [[f"{prefix}imagesTr/{name}.nii.gz", f"{prefix}labelsTr/{name}.nii.gz"] for name in names]
    return rows if splits is None else [row + [split] for row, split in zip(rows, splits)]


def names(n):
    return [f"hippocampus_{i:03d}" for i in range(n)]


def test_csv_list_with_paths_relative_to_its_folder(task_dir):
    # The CSV sits in another folder than the scans; its paths start from its own folder.
    listed = write_csv(task_dir.parent / "lists" / "cases.csv",
                       case_rows(names(8), prefix=f"../{TASK}/"))
    info = read(listed)
    assert info.case_ids == names(8) and info.split == {}
    assert info.pairs[0] == (listed.parent / f"../{TASK}/imagesTr/hippocampus_000.nii.gz",
                             listed.parent / f"../{TASK}/labelsTr/hippocampus_000.nii.gz")
    assert (info.in_channels, info.label_names, info.foreground_names) == (1, DEFAULT_NAMES, ["class_1", "class_2"])
    cases, _ = load_cases(info, divisor=4, progress=False)
    assert cases.ids == names(8) and [image.shape[0] for image in cases.images] == [1] * 8


def test_csv_list_with_absolute_paths_and_any_file_names(task_dir, tmp_path):
    scans = tmp_path / "elsewhere"
    scans.mkdir()
    rows = []
    for i, name in enumerate(names(3)):
        image, label = scans / f"patient {i}.nii.gz", scans / f"seg-{i}-final.nii"
        shutil.copy(task_dir / "imagesTr" / f"{name}.nii.gz", image)
        nib.save(nib.load(task_dir / "labelsTr" / f"{name}.nii.gz"), label)
        rows.append([str(image), str(label)])
    info = read(write_csv(tmp_path / "other" / "list.csv", rows, header=(" Image", "LABEL ")))
    assert info.case_ids == ["patient 0", "patient 1", "patient 2"]
    assert info.pairs[2] == (scans / "patient 2.nii.gz", scans / "seg-2-final.nii")
    cases, _ = load_cases(info, divisor=4, progress=False)
    assert len(cases) == 3


def test_csv_split_column_is_honoured_and_unmarked_rows_split_by_the_ratio(task_dir):
    splits = ["val", "train", "", "VAL", "train", "", "", "train"]
    info = read(write_csv(task_dir / "cases.csv", case_rows(names(8), splits=splits),
                          header=("image", "label", "split")))
    assert info.split == {"hippocampus_000": "val", "hippocampus_001": "train", "hippocampus_003": "val",
                          "hippocampus_004": "train", "hippocampus_007": "train"}
    split = split_cases(info.case_ids, 0.7, 3, info.split)
    assert {"hippocampus_000", "hippocampus_003"} <= set(split["val"])
    assert {"hippocampus_001", "hippocampus_004", "hippocampus_007"} <= set(split["train"])
    assert sorted(split["train"] + split["val"]) == names(8)
    # The three unmarked rows: round(3 * 0.7) = 2 for training, 1 for validation, seeded.
    unmarked = {"hippocampus_002", "hippocampus_005", "hippocampus_006"}
    assert (len(unmarked & set(split["train"])), len(unmarked & set(split["val"]))) == (2, 1)
    assert split == split_cases(info.case_ids, 0.7, 3, info.split)
    assert any(split_cases(info.case_ids, 0.7, seed, info.split) != split for seed in range(4, 10))


def test_a_split_column_that_leaves_no_validation_case(task_dir):
    info = read(write_csv(task_dir / "cases.csv", case_rows(names(3), splits=["train"] * 3),
                          header=("image", "label", "split")))
    with pytest.raises(DataError, match="marks 3 cases train and 0 val.*no validation case"):
        split_cases(info.case_ids, 0.8, 0, info.split)


def test_plain_folder_pairs_images_and_labels_by_name(task_dir):
    (task_dir / "dataset.json").unlink()
    (task_dir / "imagesTr" / "._hippocampus_000.nii.gz").write_bytes(b"resource fork")   # ignored
    (task_dir / "imagesTs").mkdir()
    shutil.copy(task_dir / "imagesTr" / "hippocampus_001.nii.gz", task_dir / "imagesTs" / "new.nii.gz")
    info = read(task_dir)         # offline: a plain folder is never taken for a download target
    assert info.case_ids == names(8) and info.label_names == DEFAULT_NAMES
    assert all(image.parent.name == "imagesTr" and label.parent.name == "labelsTr" and image.name == label.name
               for image, label in info.pairs)
    assert info.test_images == [task_dir / "imagesTs" / "new.nii.gz"]


def test_label_names_option_names_the_classes(task_dir):
    given = ["background", "anterior", "posterior"]
    listed = write_csv(task_dir / "cases.csv", case_rows(names(4)))
    assert read(listed, given).label_names == {0: "background", 1: "anterior", 2: "posterior"}
    assert read(listed, given).foreground_names == ["anterior", "posterior"]
    assert read(task_dir, given).label_names == dict(enumerate(given))           # over dataset.json's
    assert read(task_dir).label_names == {0: "background", 1: "Anterior", 2: "Posterior"}


def test_a_4d_image_has_as_many_channels_as_its_fourth_axis(tmp_path):
    image, label = tmp_path / "a.nii.gz", tmp_path / "a_label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6, 2), np.float32), np.eye(4)), image)
    nib.save(nib.Nifti1Image(np.eye(6, dtype=np.uint8)[:, :, None].repeat(6, 2), np.eye(4)), label)
    assert read(write_csv(tmp_path / "list.csv", [[image.name, label.name]])).in_channels == 2


# ---------------------------------------------------------------- bad lists, each named


def test_csv_without_a_label_column(task_dir):
    listed = write_csv(task_dir / "cases.csv", case_rows(names(2)), header=("image", "mask"))
    with pytest.raises(DataError, match=r"cases.csv has no 'label' column \(its header is image,mask\)"):
        read(listed)


def test_csv_row_with_a_missing_file_names_the_row(task_dir):
    rows = case_rows(names(3))
    rows[1][1] = "labelsTr/nope.nii.gz"
    with pytest.raises(DataError, match=r"label .*labelsTr/nope.nii.gz of row 3 of .*cases.csv does not exist"):
        read(write_csv(task_dir / "cases.csv", rows))


def test_csv_row_without_a_label_names_the_row(task_dir):
    rows = case_rows(names(3))
    rows[2][1] = ""
    with pytest.raises(DataError, match=r"Row 4 of .*cases.csv has no label"):
        read(write_csv(task_dir / "cases.csv", rows))


def test_csv_split_other_than_train_or_val(task_dir):
    rows = case_rows(names(3), splits=["train", "test", ""])
    with pytest.raises(DataError, match=r"Row 3 of .*cases.csv has split 'test'; use train, val"):
        read(write_csv(task_dir / "cases.csv", rows, header=("image", "label", "split")))


def test_empty_csv_list(task_dir):
    with pytest.raises(DataError, match=r"cases.csv lists no cases"):
        read(write_csv(task_dir / "cases.csv", []))


def test_missing_csv_list_is_not_a_download_target(tmp_path):
    with pytest.raises(DataError, match=r"-data_dir .*nowhere.csv does not exist"):
        read(tmp_path / "nowhere.csv")
    assert not (tmp_path / "nowhere.csv").exists()


def test_csv_rows_with_the_same_case_id(task_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(task_dir / "imagesTr" / "hippocampus_001.nii.gz", copy / "hippocampus_001.nii")
    rows = case_rows(names(3))
    rows.append([str(copy / "hippocampus_001.nii"), rows[1][1]])
    with pytest.raises(DataError, match=r"images of row 3 and row 5 of .*cases.csv have the same case id "
                                        r"'hippocampus_001'"):
        read(write_csv(task_dir / "cases.csv", rows))


def test_plain_folder_image_without_a_label(task_dir):
    (task_dir / "dataset.json").unlink()
    (task_dir / "labelsTr" / "hippocampus_003.nii.gz").unlink()
    with pytest.raises(DataError, match=r"imagesTr/hippocampus_003.nii.gz has no file of the same name in labelsTr/"):
        read(task_dir)


def test_plain_folder_label_without_an_image(task_dir):
    (task_dir / "dataset.json").unlink()
    (task_dir / "imagesTr" / "hippocampus_005.nii.gz").unlink()
    (task_dir / "imagesTr" / "hippocampus_006.nii.gz").unlink()
    with pytest.raises(DataError, match=r"labelsTr/hippocampus_005.nii.gz has no file of the same name in "
                                        r"imagesTr/ \(2 files of labelsTr/ have none: hippocampus_005.nii.gz, "
                                        r"hippocampus_006"):
        read(task_dir)


def test_plain_folder_with_images_only(task_dir):
    (task_dir / "dataset.json").unlink()
    shutil.rmtree(task_dir / "labelsTr")
    with pytest.raises(DataError, match=r"has imagesTr/ but no labelsTr/"):
        read(task_dir)


def test_plain_folder_without_scans(tmp_path):
    for name in ("imagesTr", "labelsTr"):
        (tmp_path / name).mkdir()
    with pytest.raises(DataError, match=r"imagesTr holds no NIfTI files"):
        read(tmp_path)


def test_plain_folder_cases_with_the_same_id(task_dir):
    (task_dir / "dataset.json").unlink()
    for folder in ("imagesTr", "labelsTr"):
        image = nib.load(task_dir / folder / "hippocampus_002.nii.gz")
        nib.save(image, task_dir / folder / "hippocampus_002.nii")
    with pytest.raises(DataError, match=r"hippocampus_002.nii and hippocampus_002.nii.gz .* same case id"):
        read(task_dir)


def test_label_values_beyond_the_given_names_are_named(task_dir):
    info = read(write_csv(task_dir / "cases.csv", case_rows(names(3))), ["background", "hippocampus"])
    with pytest.raises(DataError, match=r"hippocampus_000.nii.gz holds label values \[2\] that are not declared"):
        load_cases(info, divisor=4, progress=False)


def test_label_values_that_are_not_consecutive_need_names(task_dir):
    label = task_dir / "labelsTr" / "hippocampus_001.nii.gz"
    data = np.asarray(nib.load(label).dataobj).copy()
    data[data == 2] = 5
    nib.save(nib.Nifti1Image(data, np.eye(4)), label)
    with pytest.raises(DataError, match=r"cases.csv hold the values \[0, 1, 2, 5\]; without -label_names"):
        read(write_csv(task_dir / "cases.csv", case_rows(names(3))))


# ---------------------------------------------------------------- end to end


def test_training_from_a_csv_list_then_evaluating_its_checkpoint(task_dir, tmp_path):
    splits = ["val", "val", "train", "", "", "", "", ""]
    listed = write_csv(tmp_path / "lists" / "cases.csv", case_rows(names(8), prefix=f"../data/{TASK}/",
                                                                    splits=splits),
                       header=("image", "label", "split"))
    run = tmp_path / "run"
    assert entry.main(["-data_dir", str(listed), "-best_models_dir", str(run), *TINY,
                       "-label_names", "background", "anterior", "posterior"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["label_names"] == {"0": "background", "1": "anterior", "2": "posterior"}
    assert {"hippocampus_000", "hippocampus_001"} <= set(saved["split"]["val"])
    assert "hippocampus_002" in saved["split"]["train"] and len(saved["split"]["val"]) == 3
    # -evaluate reads the data again from the run's -data_dir and -label_names.
    assert entry.main(["-evaluate", "True", "-train_from_checkpoint", str(run / "best.pt"), "-device", "cpu"]) == 0
    rows = list(csv.DictReader(open(run / "evaluation_val.csv")))
    assert sorted({row["case"] for row in rows}) == saved["split"]["val"]
    assert any("anterior" in column for column in rows[0])
    # A resumed run reads the list again (with its -label_names) and keeps its saved split.
    assert entry.main(["-best_models_dir", str(run), "-resume", "True", "-epochs", "3"]) == 0
    resumed = json.loads((run / "config.json").read_text())
    assert resumed["split"] == saved["split"] and resumed["label_names"] == saved["label_names"]
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 3
