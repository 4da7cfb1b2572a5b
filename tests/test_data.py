import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from conftest import write_task
from utils.data.cache import load_cases
from utils.data_class import split_cases, train_loader
from utils.data.preprocessing import load_pair, prediction_window, shape_for
from utils.data.layouts import read_task
from utils.errors import DataError


def test_read_task_uses_dataset_json(task_dir):
    info = read_task(task_dir)
    assert info.label_names == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert (info.in_channels, info.num_classes, len(info.pairs)) == (1, 3, 8)
    assert info.foreground_names == ["Anterior", "Posterior"]
    # Files not listed in dataset.json (like the archive's ._ files) are ignored.
    (task_dir / "imagesTr" / "._hippocampus_000.nii.gz").write_bytes(b"resource fork")
    assert len(read_task(task_dir).pairs) == 8


def test_missing_dataset_json(tmp_path):
    with pytest.raises(DataError, match="dataset.json does not exist"):
        read_task(tmp_path)


def test_malformed_dataset_json(task_dir):
    (task_dir / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="malformed"):
        read_task(task_dir)
    (task_dir / "dataset.json").write_text(json.dumps({"labels": {"0": "bg"}}))
    with pytest.raises(DataError, match="malformed.*modality"):
        read_task(task_dir)


def test_listed_file_missing_is_named(task_dir):
    (task_dir / "labelsTr" / "hippocampus_003.nii.gz").unlink()
    with pytest.raises(DataError, match="labelsTr/hippocampus_003.nii.gz is listed in .* but does not exist"):
        read_task(task_dir)


def test_preprocessing_shape_normalisation_and_labels(task_dir):
    info = read_task(task_dir)
    cases, preprocessing = load_cases(info, divisor=4, progress=False)
    assert preprocessing.target_shape == (12, 16, 12)      # max shape (<=12, <=14, <=11) rounded up to 4
    assert len(cases.images) == len(cases.labels) == 8
    assert all(image.shape == (1, 12, 16, 12) and image.dtype == torch.float32 for image in cases.images)
    assert all(label.shape == (1, 12, 16, 12) and label.dtype == torch.uint8 for label in cases.labels)
    for i, (image_path, label_path) in enumerate(info.pairs):
        native = nib.load(label_path).get_fdata()
        # Padding adds background only: every labelled voxel survives, and uncrop restores the grid.
        assert (cases.labels[i] == 1).sum() == (native == 1).sum() > 0
        assert torch.equal(cases.uncrop[i](cases.labels[i]), cases.native_labels[i])
        assert cases.native_labels[i].shape[1:] == native.shape
        # uint8 (0-255) and float (thousands) files alike end up with mean 0 and std 1.
        image = cases.uncrop[i](cases.images[i])
        assert abs(image.mean()) < 1e-4 and abs(image.std() - 1) < 0.01


def test_shape_for_rounds_up_to_the_divisor():
    assert shape_for([(43, 59, 47), (31, 40, 24)], 8) == (48, 64, 48)
    assert shape_for([(16, 16, 16)], 8) == (16, 16, 16)


def test_odd_sizes_are_padded_not_a_crash(tmp_path):
    task = write_task(tmp_path, n_cases=3)
    cases, preprocessing = load_cases(read_task(task), divisor=8, progress=False)
    assert all(side % 8 == 0 for side in preprocessing.target_shape)


def rewrite(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), path)


def test_image_and_label_of_different_shapes(task_dir):
    info = read_task(task_dir)
    image, label = info.pairs[2]
    rewrite(label, np.zeros((5, 5, 5), np.uint8))
    with pytest.raises(DataError, match="hippocampus_002.nii.gz has shape .* but its label"):
        load_cases(info, 4, progress=False)


def test_image_and_label_of_different_affines(task_dir):
    info = read_task(task_dir)
    image, label = info.pairs[1]
    rewrite(label, nib.load(label).get_fdata().astype(np.uint8), np.diag([2.0, 1, 1, 1]))
    with pytest.raises(DataError, match="different affines"):
        load_cases(info, 4, progress=False)


def test_undeclared_label_values_are_named(task_dir):
    info = read_task(task_dir)
    image, label = info.pairs[4]
    data = nib.load(label).get_fdata().astype(np.uint8)
    data[0, 0, 0] = 7
    rewrite(label, data)
    with pytest.raises(DataError, match=r"hippocampus_004.nii.gz holds label values \[7\]"):
        load_cases(info, 4, progress=False)


def test_corrupt_nifti_is_named(task_dir):
    info = read_task(task_dir)
    image, _ = info.pairs[5]
    image.write_bytes(image.read_bytes()[:100])
    with pytest.raises(DataError, match="hippocampus_005.nii.gz.*corrupt or truncated"):
        load_pair(*info.pairs[5], {0, 1, 2})


def test_split_is_seeded_disjoint_and_sized():
    ids = [f"case_{i}" for i in range(10)]
    split = split_cases(ids, 0.8, seed=1)
    assert split == split_cases(ids, 0.8, seed=1) and split != split_cases(ids, 0.8, seed=2)
    assert (len(split["train"]), len(split["val"])) == (8, 2)
    assert sorted(split["train"] + split["val"]) == sorted(ids)


def test_split_needs_a_validation_case():
    with pytest.raises(DataError, match="gives 3 training and 0 validation cases"):
        split_cases(["a", "b", "c"], 0.9, seed=0)


def test_split_refuses_more_validation_than_training_cases():
    with pytest.raises(DataError, match="gives 3 training and 7 validation cases"):
        split_cases([str(i) for i in range(10)], 0.3, seed=0)


@pytest.mark.parametrize("Nit, batch_size", [(3, 2), (5, 4)])
def test_loader_gives_exactly_Nit_batches(task_dir, Nit, batch_size):
    cases, _ = load_cases(read_task(task_dir), divisor=4, progress=False)
    loader = train_loader(cases, batch_size, Nit, augment=True, num_workers=0, seed=0)
    batches = list(loader)
    assert len(loader) == len(batches) == Nit
    assert all(images.shape == (batch_size, 1, 12, 16, 12) for images, _ in batches)
    assert all(labels.shape == (batch_size, 1, 12, 16, 12) for _, labels in batches)
    # Augmentation moves voxels but never invents label values.
    assert set(torch.cat([labels.flatten() for _, labels in batches]).unique().tolist()) <= {0, 1, 2}


def test_loader_without_Nit_is_one_pass(task_dir):
    cases, _ = load_cases(read_task(task_dir), divisor=4, progress=False)
    loader = train_loader(cases, 3, None, augment=False, num_workers=0, seed=0)
    images = torch.cat([batch[0] for batch in loader])
    assert len(loader) == 3 and len(images) == 8
    # Without augmentation each case appears exactly once.
    assert len({round(im.abs().sum().item(), 3) for im in images}) == 8


@pytest.mark.parametrize("native, target, divisor", [((35, 50, 36), (48, 64, 48), 8), ((43, 59, 47), (48, 64, 48), 8),
                                                      ((9, 11, 8), (12, 16, 12), 2), ((31, 40, 24), (48, 64, 48), 16)])
def test_prediction_window_holds_the_case_in_the_fewest_multiples_of_the_divisor(native, target, divisor):
    window = prediction_window(native, target, divisor)
    sizes = [w.stop - w.start for w in window]
    assert sizes == [min(t, -(-n // divisor) * divisor) for n, t in zip(native, target)]
    assert all(0 <= w.start and w.stop <= t for w, t in zip(window, target))
    # TorchIO's own inverse of the padding maps the window onto every voxel of the case's grid.
    case = tio.Subject(image=tio.ScalarImage(tensor=torch.zeros(1, *native)))
    padded = tio.CropOrPad(target)(case)
    inside = torch.zeros(1, *target)
    inside[(slice(None), *window)] = 1
    padded.image.set_data(inside)
    assert padded.apply_inverse_transform(warn=False).image.data.min() == 1


def test_cases_carry_their_prediction_windows_through_subsets(task_dir):
    cases, _ = load_cases(read_task(task_dir), divisor=4, progress=False)
    assert len(cases.windows) == len(cases)
    for window, label in zip(cases.windows, cases.native_labels):
        assert [(w.stop - w.start) % 4 for w in window] == [0, 0, 0]
        assert all(w.stop - w.start >= side for w, side in zip(window, label.shape[1:]))
    some = cases.subset(cases.ids[3:1:-1])
    assert some.windows == [cases.windows[3], cases.windows[2]]


def test_prediction_window_of_a_cropped_case_is_the_whole_side():
    # A case larger than the target (data newer than a checkpoint's preprocessing) was cropped.
    assert prediction_window((50, 40, 30), (48, 64, 48), 8) == (slice(0, 48), slice(12, 52), slice(8, 40))
