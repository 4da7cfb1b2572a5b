"""Images of several channels (4D NIfTI, channels last, as in the Decathlon's prostate and brain
tumour tasks): they train, evaluate and predict, with `in_channels` from the data."""
import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

import main as entry
from conftest import TINY, two_channel_case, write_two_channel_task
from utils.data.augmentation import BatchAugmentation
from utils.training.checkpoint import load_checkpoint
from utils.data.cache import load_cases
from utils.data.preprocessing import ChannelZNormalization
from utils.data.layouts import read_task
from utils.outputs.plots import mid_slices, plot_augmentations, plot_predictions, write_progress_gif

# The diagonal flips two axes, so prediction must reorient back to the file's own axis order.
ODD_AFFINE = np.array([[-1.2, 0, 0, 10], [0, 0.9, 0, -5], [0, 0, -1.1, 3], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-channel task and a run trained on it long enough to learn (a few seconds)."""
    root = tmp_path_factory.mktemp("channels")
    task, run = write_two_channel_task(root / "data"), root / "run"
    code = entry.main(["-data_dir", str(task), "-best_models_dir", str(run), *TINY,
                       "-epochs", "12", "-Nit", "4", "-lr", "0.05"])
    return task, run, code


def test_a_two_channel_task_trains_and_learns(trained):
    task, run, code = trained
    assert code == 0
    assert read_task(task).in_channels == 2
    assert load_checkpoint(run / "best.pt")["model_config"]["in_channels"] == 2
    assert json.loads((run / "config.json").read_text())["model_config"]["in_channels"] == 2
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert max(float(row["dice_mean"]) for row in rows) > 0.5
    for picture in ("predictions.png", "progress.gif", "curves.png"):
        assert (run / picture).stat().st_size > 0, picture


def test_evaluate_measures_a_two_channel_checkpoint(trained, capsys):
    _, run, _ = trained
    assert entry.main(["-evaluate", "True", "-train_from_checkpoint", str(run / "best.pt"), "-device", "cpu"]) == 0
    rows = list(csv.DictReader(open(run / "evaluation_val.csv")))
    assert len(rows) == 2 * 2                            # 2 validation cases, raw and post-processed
    assert max(float(row["dice_Anterior"]) for row in rows) > 0.5


def test_predict_writes_a_3d_label_map_on_the_grid_of_a_4d_scan(trained, tmp_path):
    _, run, _ = trained
    image, label = two_channel_case(np.random.default_rng(7), (11, 13, 10))
    nib.save(nib.Nifti1Image(image, ODD_AFFINE), tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    assert entry.main(["-predict", str(tmp_path / "scan.nii.gz"), "-train_from_checkpoint",
                       str(run / "best.pt"), "-predictions_dir", str(out), "-device", "cpu"]) == 0
    written = nib.load(out / "scan.nii.gz")
    prediction = np.asarray(written.dataobj)
    assert prediction.shape == (11, 13, 10) and prediction.dtype == np.uint8
    assert np.allclose(written.affine, ODD_AFFINE)
    assert set(np.unique(prediction)) <= {0, 1, 2}
    # On the scan's own axes: the prediction overlaps the structure where it is.
    foreground = prediction > 0
    assert (foreground & (label > 0)).sum() > 0.5 * (label > 0).sum()


def test_predict_skips_a_file_of_another_channel_count_with_a_sentence(trained, tmp_path, capsys):
    _, run, _ = trained
    image, _ = two_channel_case(np.random.default_rng(8), (11, 13, 10))
    nib.save(nib.Nifti1Image(image[..., 0], np.eye(4)), tmp_path / "t2_only.nii.gz")
    nib.save(nib.Nifti1Image(np.repeat(image, 2, axis=-1)[..., :3], np.eye(4)), tmp_path / "three.nii.gz")
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "good.nii.gz")
    out = tmp_path / "out"
    assert entry.main(["-predict", str(tmp_path), "-train_from_checkpoint", str(run / "best.pt"),
                       "-predictions_dir", str(out), "-device", "cpu"]) == 1
    printed = capsys.readouterr().out
    assert "t2_only.nii.gz: is 3D with shape (11, 13, 10); the model needs a 4D volume with 2 channels" in printed
    assert "three.nii.gz: is 4D with shape (11, 13, 10, 3); the model needs a 4D volume with 2 channels" in printed
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz"]


def replace_image(task, case: str, data: np.ndarray):
    path = task / "imagesTr" / case
    nib.save(nib.Nifti1Image(data, nib.load(path).affine), path)
    return path


@pytest.mark.parametrize("channels", [1, 3])
def test_a_case_of_another_channel_count_stops_with_the_file_named(tmp_path, capsys, channels):
    task = write_two_channel_task(tmp_path / "data")
    image = nib.load(task / "imagesTr" / "case_005.nii.gz").get_fdata(dtype=np.float32)
    odd = image[..., 0] if channels == 1 else np.concatenate([image, image[..., :1]], axis=-1)
    path = replace_image(task, "case_005.nii.gz", odd)
    code = entry.main(["-data_dir", str(task), "-best_models_dir", str(tmp_path / "run"), *TINY])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 1 and len(errors) == 1
    counts = "1 channel (3D)" if channels == 1 else "3 channels (4D, channels last)"
    assert (f"error: {path} has {counts} but {task / 'imagesTr' / 'case_000.nii.gz'} has 2 channels "
            f"(4D, channels last)") in errors[0]
    assert not (tmp_path / "run" / "last.pt").exists()


def test_images_that_disagree_with_dataset_json_stop_with_both_counts(tmp_path, capsys):
    task = write_two_channel_task(tmp_path / "data")
    meta = json.loads((task / "dataset.json").read_text())
    (task / "dataset.json").write_text(json.dumps({**meta, "modality": {"0": "T2"}}))
    code = entry.main(["-data_dir", str(task), "-best_models_dir", str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err
    assert code == 1
    assert (f"{task / 'imagesTr' / 'case_000.nii.gz'} has 2 channels (4D, channels last) but "
            f"{task / 'dataset.json'} declares 1 modalities") in err


def test_each_channel_is_z_scored_on_its_own(two_channel_task):
    cases, _ = load_cases(read_task(two_channel_task), divisor=4, progress=False)
    assert all(image.shape[0] == 2 for image in cases.images)
    for index in range(len(cases)):
        native = cases.uncrop[index](cases.images[index])        # the case's own voxels, no padding
        assert native.shape[0] == 2
        for channel in native:
            assert abs(channel.mean().item()) < 1e-4 and abs(channel.std().item() - 1) < 1e-4
    # TorchIO's own ZNormalization pools the channels: the T2 channel (about 2000) ends up far
    # above mean 0 and the ADC channel (about 1500) far below it.
    image, _ = two_channel_case(np.random.default_rng(0), (10, 12, 9))
    pooled = tio.ZNormalization()(tio.ScalarImage(tensor=torch.from_numpy(np.moveaxis(image, 3, 0)))).data
    assert pooled[0].mean() > 0.5 and pooled[1].mean() < -0.5


def test_one_channel_is_normalised_exactly_as_by_torchio():
    data = torch.rand(1, 9, 10, 11) * 1000
    ours = ChannelZNormalization()(tio.ScalarImage(tensor=data)).data
    torchio = tio.ZNormalization()(tio.ScalarImage(tensor=data)).data
    assert torch.equal(ours, torchio)


def two_channel_batch(n=4, shape=(12, 16, 12)):
    """Two channels that encode the label differently: 1, 11, 21 and 0, 40, 20 for labels 0, 1, 2.
    (Background near 0, as after z-scoring, since rotations fill the corners with 0.)"""
    labels = torch.zeros(n, 1, *shape, dtype=torch.uint8)
    labels[:, :, 3:7, 4:9, 3:6] = 1
    labels[:, :, 7:9, 4:9, 3:6] = 2
    return torch.cat([labels.float() * 10 + 1, SECOND_CHANNEL[labels.long()]], dim=1), labels


SECOND_CHANNEL = torch.tensor([0.0, 40.0, 20.0])


def quiet(**changes) -> BatchAugmentation:
    return BatchAugmentation(**{"flip_probability": 0, "affine_probability": 0, "brightness_probability": 0,
                                "noise_probability": 0, **changes})


def test_a_flip_moves_both_channels_with_the_label():
    images, labels = two_channel_batch()
    out_images, out_labels = quiet(flip_probability=1)(list(zip(images, labels)))
    assert out_images.shape == (4, 2, 12, 16, 12)
    assert torch.equal(out_images, images.flip(2)) and torch.equal(out_labels, labels.flip(2))


def test_rotations_keep_both_channels_on_the_label():
    torch.manual_seed(0)
    images, labels = two_channel_batch(n=16)
    out_images, out_labels = BatchAugmentation(affine_probability=1, brightness_probability=0,
                                               noise_probability=0).augment(images, labels)
    assert out_images.shape == (16, 2, 12, 16, 12) and out_labels.shape == (16, 1, 12, 16, 12)
    first = ((out_images[:, :1] - 1) / 10).round().clamp(0, 2).to(torch.uint8)
    second = torch.tensor([0, 2, 1], dtype=torch.uint8)[(out_images[:, 1:] / 20).round().clamp(0, 2).long()]
    assert (first == out_labels).float().mean() > 0.95 and (second == out_labels).float().mean() > 0.95


def test_brightness_scales_the_channels_of_a_sample_alike():
    torch.manual_seed(0)
    images, labels = two_channel_batch(n=8)
    out_images, _ = quiet(brightness_probability=1).augment(images, labels)
    nonzero = images[:, 1:] != 0
    factors = (out_images / images.clamp(min=1e-6))[:, :, nonzero[0, 0]]   # (B, 2, voxels)
    per_sample = factors.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample))
    assert len(per_sample[:, 0].unique()) > 1                      # but differ between samples


def test_pictures_show_the_first_channel_of_a_two_channel_image(tmp_path):
    images, labels = two_channel_batch(n=2)
    for first, whole in zip(mid_slices(images[0, :1]), mid_slices(images[0])):
        assert np.array_equal(first, whole)
    plot_predictions(images, labels, labels, ["a", "b"], tmp_path / "predictions.png")
    write_progress_gif(images[0], [labels[0], labels[0]], tmp_path / "progress.gif", "a")
    plot_augmentations(images[0], labels[0], BatchAugmentation(), count=2)
    assert (tmp_path / "predictions.png").stat().st_size > 0 and (tmp_path / "progress.gif").stat().st_size > 0
