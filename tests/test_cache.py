"""The on-disk cache of preprocessed cases (utils/data/cache.py): reused, rebuilt when a file or option
changes, never read half-written, and mapped so that RAM stays bounded; foreground-centred crops."""
from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
import torch

import utils.data.cache as cache_module
from conftest import ROOT, synthetic_case, write_task
from utils.data.cache import Cases, load_cases
from utils.data_class import PatchDataset, train_loader
from utils.data.layouts import read_data, read_task
from utils.data.sampling import patch_window


def complete_caches(root):
    return sorted(p for p in root.iterdir() if (p / "index.json").is_file())


def test_a_second_load_maps_the_cache_without_reading_a_scan(task_dir, tmp_path, monkeypatch):
    info = read_task(task_dir)
    first, made = load_cases(info, 4, progress=False, cache_dir=tmp_path / "cache")
    assert len(complete_caches(tmp_path / "cache")) == 1

    def no_reading(*args):
        raise AssertionError("read a scan although the cache holds every case")
    monkeypatch.setattr(cache_module, "load_pair", no_reading)
    second, again = load_cases(info, 4, progress=False, cache_dir=tmp_path / "cache")
    assert again == made and second.ids == first.ids and second.fingerprint == first.fingerprint
    for name in ("images", "labels", "native_labels"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(first, name), getattr(second, name)))
    # -evaluate passes the checkpoint's preprocessing: the run's cache serves it.
    third, _ = load_cases(info, 4, progress=False, preprocessing=made, cache_dir=tmp_path / "cache")
    assert third.folder == first.folder


def test_a_changed_file_or_option_builds_a_new_cache(task_dir, tmp_path):
    info = read_task(task_dir)
    root = tmp_path / "cache"
    before, _ = load_cases(info, 4, progress=False, cache_dir=root)
    label_path = info.pairs[2][1]
    label = nib.load(label_path)
    changed = np.asarray(label.dataobj).copy()
    changed[changed == 2] = 1                               # the posterior part relabelled anterior
    nib.save(nib.Nifti1Image(changed, label.affine), label_path)
    after, _ = load_cases(info, 4, progress=False, cache_dir=root)
    assert after.folder != before.folder and len(complete_caches(root)) == 2
    assert (after.native_labels[2] == 2).sum() == 0 < (before.native_labels[2] == 2).sum()
    other_divisor, _ = load_cases(info, 8, progress=False, cache_dir=root)
    assert other_divisor.folder not in (before.folder, after.folder)


BUILD_AND_DIE = """
import os, signal, sys
sys.path.insert(0, {root!r})
import numpy as np
import utils.data.cache as cache
from utils.data.layouts import read_data, read_task
real_save, count = np.save, [0]
def save_then_die(path, array):
    real_save(path, array)
    count[0] += 1
    if count[0] == 6:                       # a few cases written, the rest not
        os.kill(os.getpid(), signal.SIGKILL)
cache.np.save = save_then_die
cache.load_cases(read_task({task!r}), 4, progress=False, cache_dir={cache!r})
"""


@pytest.mark.slow
def test_a_cache_killed_half_way_is_never_read_and_is_rebuilt(task_dir, tmp_path):
    root = tmp_path / "cache"
    script = BUILD_AND_DIE.format(root=str(ROOT), task=str(task_dir), cache=str(root))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = list(root.iterdir())
    assert len(leftovers) == 1 and cache_module.PARTIAL in leftovers[0].name and not complete_caches(root)
    cases, _ = load_cases(read_task(task_dir), 4, progress=False, cache_dir=root)
    assert [p.name for p in root.iterdir()] == [cases.folder.name]    # the dead build's folder removed
    fresh, _ = load_cases(read_task(task_dir), 4, progress=False, cache_dir=tmp_path / "fresh")
    assert all(torch.equal(a, b) for a, b in zip(cases.images, fresh.images))


def test_an_unwritable_cache_folder_is_a_clear_error(task_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(cache_module.DataError, match="Cannot write the preprocessed cases into .* -cache_dir"):
        load_cases(read_task(task_dir), 4, progress=False, cache_dir=blocker / "cache")


EPOCH_OVER_THE_CACHE = """
import sys
sys.path.insert(0, {root!r})
import torch
from utils.data.cache import load_cases
from utils.data_class import train_loader
from utils.data.layouts import read_data
def anon_rss_mb():
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("RssAnon:"))
cases, _ = load_cases(read_data({task!r}, "", None), 4, progress=False, cache_dir={cache!r})
import ctypes
ctypes.CDLL("libc.so.6").malloc_trim(0)      # hand freed memory back, so that growth is what is held
start = peak = anon_rss_mb()
if {kept}:                                                    # the control: the same data held in memory
    held = [image.clone() for image in cases.images]
    peak = anon_rss_mb()
else:
    loader = train_loader(cases, 2, len(cases), True, 0, seed=0, patch_size=(32, 32, 32), foreground_crops=0.33)
    for _ in range(2):                                        # two epochs: every case, twice
        for images, labels in loader:
            peak = max(peak, anon_rss_mb())
    for index in range(len(cases)):                           # and every whole volume, as validation reads them
        assert cases.images[index].float().std() > 0
        peak = max(peak, anon_rss_mb())
print(peak - start)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and glibc")
def test_training_from_the_cache_keeps_memory_bounded_by_the_batch_not_the_data(tmp_path):
    """A data set of 24 cases of 64^3 float32 (24 MB of images in the cache) against a budget of
    8 MB of private memory: an epoch over every case, and reading every whole volume, stay within
    it; holding the images in memory (the control) does not."""
    rng = np.random.default_rng(0)
    task = tmp_path / "large"                                  # a plain imagesTr/labelsTr folder
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    for i in range(24):
        image, label = synthetic_case(rng, (64, 64, 64), as_uint8=True)
        nib.save(nib.Nifti1Image(image, np.eye(4)), task / "imagesTr" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), task / "labelsTr" / f"case_{i:03d}.nii.gz")
    root = tmp_path / "cache"
    cases, _ = load_cases(read_data(task, "", None), 4, progress=False, cache_dir=root)
    data_mb = sum(image.numel() * 4 for image in cases.images) / 2 ** 20
    assert data_mb == 24
    budget_mb = 8
    grown = {}
    for kept in (False, True):
        script = EPOCH_OVER_THE_CACHE.format(root=str(ROOT), task=str(task), cache=str(root), kept=kept)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              cwd=ROOT)
        assert done.returncode == 0, done.stderr
        grown[kept] = float(done.stdout.split()[-1])
    print(f"private memory grown: {grown[False]:.1f} MB over two epochs, {grown[True]:.1f} MB holding the data")
    assert grown[False] < budget_mb < data_mb - 1 < grown[True], grown


def large_case_with_a_small_structure(shape=(64, 64, 64)):
    label = np.zeros((1, *shape), np.uint8)
    label[0, 50:54, 8:12, 30:34] = 1                              # 4^3 voxels, off-centre
    return torch.from_numpy(label)


def foreground_share(foreground_crops: float, draws: int = 1500) -> float:
    label = large_case_with_a_small_structure()
    cases = Cases(["a"], [label.float()], [label], [label], [None], [None], [(1.0, 1.0, 1.0)], [None],
                  [cache_module.foreground_locations(label.numpy())])
    dataset = PatchDataset(cases, (16, 16, 16), foreground_crops)
    torch.manual_seed(0)
    return sum(bool(dataset[0][1].any()) for _ in range(draws)) / draws


def test_a_share_of_crops_is_centred_on_foreground():
    """Measured: the share of 16^3 crops of a 64^3 volume that hold a 4^3 structure near its edge,
    without centring (a few %) and with a third of the crops centred on foreground."""
    none, third = foreground_share(0.0), foreground_share(0.33)
    print(f"crops with foreground: {none:.3f} without centring, {third:.3f} with -foreground_crops 0.33")
    assert none < 0.1
    assert third == pytest.approx(0.33 + 0.67 * none, abs=0.05)
    assert foreground_share(1.0, draws=200) == 1.0


def test_foreground_crops_stay_inside_the_volume_and_cover_it():
    label = large_case_with_a_small_structure((20, 64, 10))
    locations = cache_module.foreground_locations(label.numpy())
    torch.manual_seed(0)
    corners = Counter()
    for _ in range(400):
        window = patch_window((20, 64, 10), (16, 16, 16), locations, 0.5)
        assert all(0 <= w.start and w.stop <= side for w, side in zip(window, (20, 64, 10)))
        assert [w.stop - w.start for w in window] == [16, 16, 10]            # capped where the volume is thinner
        corners[window[0].start] += 1
    assert sorted(corners) == [0, 1, 2, 3, 4]                                # random crops reach every position


def test_foreground_locations_keep_every_class_and_at_most_the_limit(monkeypatch):
    monkeypatch.setattr(cache_module, "FOREGROUND_LOCATIONS", 10)
    label = np.zeros((1, 8, 8, 8), np.uint8)
    label[0, :4] = 1
    label[0, 6, 6, 6] = 2
    rows = cache_module.foreground_locations(label)
    assert Counter(rows[:, 0].tolist()) == {1: 10, 2: 1}
    assert all(label[0, x, y, z] == c for c, x, y, z in rows)


def test_loader_batches_are_crops_of_the_patch_size(tmp_path):
    task = write_task(tmp_path / "data")
    cases, _ = load_cases(read_task(task), 4, progress=False)
    loader = train_loader(cases, 2, 3, True, 0, seed=0, patch_size=(8, 8, 8), foreground_crops=0.33)
    assert all(images.shape == (2, 1, 8, 8, 8) and labels.shape == (2, 1, 8, 8, 8) for images, labels in loader)
