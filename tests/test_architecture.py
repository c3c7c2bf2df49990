"""Rules of the code base that keep it legible: module sizes, imports without side effects, one
place that names what a run folder holds, one dataset interface."""

import subprocess
import sys
from pathlib import Path

import pytest

from dcq.train.rundir import LOCK_NAME, RunFiles, checkpoint_step

SRC = Path(__file__).resolve().parents[1] / "src" / "dcq"
MAX_LINES = 450


def test_no_source_file_is_over_the_size_limit():
    sizes = {p.relative_to(SRC).as_posix(): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert sizes and {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("module", ["dcq", "dcq.cli", "dcq.data"])
def test_light_imports_do_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_still_load_on_first_use():
    import dcq

    assert dcq.ClassQueue.__module__ == "dcq.heads.queue" and dcq.PartialFC.__name__ == "PartialFC"
    assert dcq.data.FaceRecordIO.__name__ == "FaceRecordIO"


def test_a_run_folder_holds_only_what_run_files_names(tiny_dataset, tmp_path):
    from test_train import tiny_config

    from dcq.train.loop import train

    out = tmp_path / "run"
    train(tiny_config(tiny_dataset, out, max_steps=4, checkpoint_every=2, eval_bins=[str(tiny_dataset / "val.bin")]))
    names = {p.name for p in out.iterdir()}
    named = set(RunFiles.FILES) | set(RunFiles.FOLDERS) | {LOCK_NAME}
    assert {n for n in names if checkpoint_step(n) is None} <= named
    assert {RunFiles.FINAL, RunFiles.BEST, RunFiles.STEPS, RunFiles.LOG, RunFiles.CONFIG, RunFiles.TENSORBOARD} <= names
    assert sorted(n for n in names if checkpoint_step(n) is not None) == [RunFiles(out).checkpoint(s).name
                                                                          for s in (2, 4)]


def test_both_dataset_kinds_implement_the_one_interface(tiny_dataset, tmp_path):
    from PIL import Image

    from dcq.data import FaceSource, open_dataset

    for i, name in enumerate(["ann", "bob"]):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (8, 8), (40 * i, 20 * j, 0)).save(tmp_path / "folder" / name / f"{j}.png")
    for ds in (open_dataset(tiny_dataset), open_dataset(tmp_path / "folder")):
        assert isinstance(ds, FaceSource)
        assert len(ds.groups.labels) == len(ds) and ds.label(len(ds) - 1) == ds.num_identities - 1
        assert ds[0][1] == ds.label(0) and ds.image(0).dtype.name == "uint8"
    assert open_dataset(tmp_path / "folder").identity_names == ["ann", "bob"]
