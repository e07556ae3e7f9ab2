from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from mrissl.cli import main
from mrissl.masking import RandomTokenMask, parse_mask_spec

SMALL = ["--crop", "16", "--patch-size", "4", "--num-draws", "4", "--quiet"]


def _write_cases(root, n=3, shape=(20, 18, 16), modalities=("t1n", "t2f"), seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        case = root / f"BraTS-{i:04d}"
        case.mkdir()
        for m in modalities:
            data = rng.random(shape, dtype=np.float32) * 100
            nib.save(nib.Nifti1Image(data, np.eye(4)), case / f"BraTS-{i:04d}-{m}.nii.gz")
    return root


def _run_json(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("random:1.5", "--mask 'random:1.5': the ratio must be a finite number >= 0 and < 1"),
        ("cubes:0.5", "--mask 'cubes:0.5': unknown kind 'cubes'"),
        ("modal:0", "--mask 'modal:0': expected a positive whole number, got '0'"),
    ],
)
def test_bad_mask_specs_are_one_line_user_errors(spec, message, capsys):
    line = _error_line(capsys, ["collapse-check", "--mask", spec, "--quiet"])
    assert message in line
    assert line.endswith("(see mrissl collapse-check --help)")


def test_collapse_check_on_a_folder_reports_every_mask_and_modality(tmp_path, capsys):
    _write_cases(tmp_path)
    report = _run_json(
        capsys,
        [
            "collapse-check",
            str(tmp_path),
            "--modalities",
            "t1",
            "flair",
            "--json",
            "--mask",
            "random:0.5",
            "--mask",
            "hmp",
            *SMALL,
        ],
    )
    assert report["shape"] == [2, 16, 16, 16]
    assert report["modalities"] == ["t1", "flair"]
    assert [r["mask"] for r in report["results"]] == ["random:0.5", "hmp"]
    for r in report["results"]:
        assert set(r["per_modality"]) == {"t1", "flair"}
        assert r["floor"] > 0
        assert r["std_error"] >= 0
        # percentile-scaled uniform noise has a per-voxel variance near 1/12 across cases
        assert 0.02 < r["floor"] < 0.15
        assert r["verdict"] == "ok"


def test_verdict_follows_the_reference_loss(tmp_path, capsys):
    _write_cases(tmp_path)
    argv = [
        "collapse-check",
        str(tmp_path),
        "--modalities",
        "t1n",
        "t2f",
        "--json",
        "--mask",
        "random:0.5",
        *SMALL,
    ]
    assert _run_json(capsys, [*argv, "--reference-loss", "10"])["results"][0]["verdict"] == (
        "COLLAPSE RISK"
    )
    assert _run_json(capsys, [*argv, "--reference-loss", "1e-6"])["results"][0]["verdict"] == "ok"


def test_collapse_check_table_is_printed_by_default(tmp_path, capsys):
    _write_cases(tmp_path)
    code = main(
        [
            "collapse-check",
            str(tmp_path),
            "--modalities",
            "t1",
            "flair",
            "--mask",
            "block:0.5:4",
            *SMALL,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "Var(x_m)" in out
    assert "block:0.5:4" in out
    assert "reference converged loss" in out


def test_demo_runs_on_the_phantom(capsys):
    report = _run_json(
        capsys,
        [
            "collapse-check",
            "--demo",
            "--json",
            "--phantom-cases",
            "3",
            "--crop",
            "32",
            "--patch-size",
            "8",
            "--num-draws",
            "3",
            "--mask",
            "random:0.75",
            "--quiet",
        ],
    )
    assert "phantom" in report["source"]
    assert report["shape"] == [4, 32, 32, 32]
    assert 0 < report["results"][0]["floor"] < 1


def _error_line(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_missing_folder_is_exit_code_2(tmp_path, capsys):
    line = _error_line(capsys, ["collapse-check", str(tmp_path / "nope"), "--quiet"])
    assert "does not exist" in line


def test_no_cases_is_exit_code_2(tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("no images here")
    line = _error_line(capsys, ["collapse-check", str(tmp_path), "--quiet"])
    assert "no cases with any of the modalities" in line


def test_unreadable_file_is_named(tmp_path, capsys):
    _write_cases(tmp_path, n=2)
    bad = tmp_path / "BraTS-0001" / "BraTS-0001-t1n.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    line = _error_line(
        capsys, ["collapse-check", str(tmp_path), "--modalities", "t1", "flair", *SMALL]
    )
    assert "BraTS-0001" in line


def test_unknown_modality_is_exit_code_2(capsys):
    line = _error_line(capsys, ["collapse-check", "--demo", "--modalities", "t7", "--quiet"])
    assert "--modalities" in line


def test_rank_of_features_with_equal_singular_values(tmp_path, capsys):
    q, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))
    z = q[:, :5] @ torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))[0][:5] * 3.0
    torch.save(z, tmp_path / "z.pt")
    report = _run_json(capsys, ["rank", str(tmp_path / "z.pt"), "--json", "--no-center"])
    assert report["effective_rank"] == pytest.approx(5.0, abs=1e-9)
    assert report["samples"] == 200
    assert report["dim"] == 32


def test_rank_reads_numpy_and_dicts(tmp_path, capsys):
    z = np.random.default_rng(0).standard_normal((64, 8))
    np.save(tmp_path / "z.npy", z)
    np.savez(tmp_path / "z.npz", feats=z, other=z[:, :2])
    torch.save({"feats": torch.from_numpy(z)}, tmp_path / "d.pt")
    a = _run_json(capsys, ["rank", str(tmp_path / "z.npy"), "--json"])["effective_rank"]
    b = _run_json(capsys, ["rank", str(tmp_path / "z.npz"), "--key", "feats", "--json"])
    c = _run_json(capsys, ["rank", str(tmp_path / "d.pt"), "--json"])
    assert a == pytest.approx(b["effective_rank"]) == pytest.approx(c["effective_rank"])
    assert "--key" in _error_line(capsys, ["rank", str(tmp_path / "z.npz")])


class _Payload:
    pass


def test_rank_never_unpickles_arbitrary_objects(tmp_path, capsys):
    torch.save(_Payload(), tmp_path / "evil.pt")
    line = _error_line(capsys, ["rank", str(tmp_path / "evil.pt")])
    assert "evil.pt" in line
    assert "pickles Python objects" in line


def test_rank_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    torch.save(torch.randn(50, 6), tmp_path / "z.pt")
    assert main(["rank", str(tmp_path / "z.pt"), "--plot", str(tmp_path / "s.png")]) == 0
    capsys.readouterr()
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_python_dash_m_runs_the_command():
    out = subprocess.run(
        [sys.executable, "-m", "mrissl", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("mrissl ")


def test_templates_export_writes_one_nifti_per_modality(tmp_path, capsys):
    from mrissl.templates import ModalityTemplates

    model = torch.nn.Module()
    model.templates = ModalityTemplates(["t1", "flair"], shape=(6, 5, 4), init=0.25)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    code = main(
        [
            "templates",
            "export",
            str(tmp_path / "ckpt.pt"),
            str(tmp_path / "out"),
            "--spacing",
            "2",
            "2",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "2 templates" in out
    t1 = nib.load(tmp_path / "out" / "t1.nii.gz")
    assert t1.shape == (6, 5, 4)
    np.testing.assert_allclose(t1.get_fdata(), 0.25)
    np.testing.assert_allclose(np.diag(t1.affine), [2.0, 2.0, 3.0, 1.0])
    assert (tmp_path / "out" / "flair.nii.gz").exists()


def test_templates_export_errors_are_one_line(tmp_path, capsys):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    line = _error_line(capsys, ["templates", "export", str(tmp_path / "other.pt"), str(tmp_path)])
    assert "templates" in line
    line = _error_line(capsys, ["templates", "export", str(tmp_path / "none.pt"), str(tmp_path)])
    assert "does not exist" in line


# --------------------------------------------------------------------------- imperfect data

IMPERFECT = ["--modalities", "t1", "flair", "--mask", "random:0.5", "--mask", "modal", *SMALL]


def _imperfect_folder(root):
    """Three complete cases, one lacking FLAIR, one off-grid, one corrupt file, one 4D file."""
    _write_cases(root, n=3)
    rng = np.random.default_rng(1)
    shape = (20, 18, 16)

    def save(case, modality, data, affine=None):
        (root / case).mkdir(exist_ok=True)
        path = root / case / f"{case}-{modality}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
        return path

    save("BraTS-0003", "t1n", rng.random(shape, dtype=np.float32) * 100)  # no t2f
    save("BraTS-0004", "t1n", rng.random(shape, dtype=np.float32) * 100)
    save("BraTS-0004", "t2f", rng.random(shape, dtype=np.float32) * 100, np.diag([2.0, 1, 1, 1]))
    save("BraTS-0005", "t2f", rng.random(shape, dtype=np.float32) * 100)
    (root / "BraTS-0005" / "BraTS-0005-t1n.nii.gz").write_bytes(b"\x1f\x8b truncated")
    save("BraTS-0006", "t1n", rng.random((*shape, 3), dtype=np.float32) * 100)
    save("BraTS-0006", "t2f", rng.random(shape, dtype=np.float32) * 100)
    return root


def _direct_floors(root, usable, masks):
    """The floors computed directly: load_case + preprocessing, then collapsed_loss_floor."""
    from mrissl.data import preprocessing
    from mrissl.diagnostics import collapsed_loss_floor

    pipeline = preprocessing(load=True, crop="center", roi_size=16)
    items = []
    for index, name in usable:
        paths = {}
        for label, m in (("t1", "t1n"), ("flair", "t2f")):
            path = root / name / f"{name}-{m}.nii.gz"
            if path.exists():
                paths[label] = path
        image = pipeline({"image": paths})["image"].as_tensor()
        full = torch.zeros(2, 16, 16, 16)
        available = torch.tensor([m in paths for m in ("t1", "flair")])
        full[available] = image
        items.append({"image": full, "available": available, "index": index})
    return [
        collapsed_loss_floor(
            items, parse_mask_spec(spec, 4).generator, patch_size=4, num_draws=4, seed=0,
            batch_size=1,
        ).floor
        for spec in masks
    ]  # fmt: skip


def test_imperfect_folder_skips_bad_cases_and_uses_incomplete_ones(tmp_path, capsys):
    root = _imperfect_folder(tmp_path)
    code = main(["collapse-check", str(root), "--json", "--workers", "0", *IMPERFECT])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["cases"] == 4
    assert report["per_modality_cases"] == {"t1": 4, "flair": 3}
    skipped = {s["case"]: s["reason"] for s in report["skipped"]}
    assert sorted(skipped) == ["BraTS-0004", "BraTS-0005", "BraTS-0006"]
    assert "BraTS-0004-t2f.nii.gz" in skipped["BraTS-0004"]
    assert "affine" in skipped["BraTS-0004"]
    assert "BraTS-0005-t1n.nii.gz" in skipped["BraTS-0005"]
    assert "BraTS-0006-t1n.nii.gz" in skipped["BraTS-0006"]
    assert "applying transform" not in err
    lines = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(lines) == 3  # one line per bad case
    usable = [(0, "BraTS-0000"), (1, "BraTS-0001"), (2, "BraTS-0002"), (3, "BraTS-0003")]
    expected = _direct_floors(root, usable, ["random:0.5", "modal"])
    got = [r["floor"] for r in report["results"]]
    # the command sums several cases at once in float32: equal to float32 rounding
    assert got == pytest.approx(expected, rel=1e-6)


def test_strict_stops_at_the_first_bad_case(tmp_path, capsys):
    root = _imperfect_folder(tmp_path)
    line = _error_line(
        capsys, ["collapse-check", str(root), "--strict", "--workers", "0", *IMPERFECT]
    )
    assert "BraTS-0004" in line
    assert "--strict" in line


def test_results_do_not_depend_on_the_number_of_workers(tmp_path, capsys):
    root = _imperfect_folder(tmp_path)
    reports = [
        _run_json(capsys, ["collapse-check", str(root), "--json", "--workers", w, *IMPERFECT])
        for w in ("0", "2")
    ]
    assert [r["floor"] for r in reports[0]["results"]] == [
        r["floor"] for r in reports[1]["results"]
    ]
    assert reports[0]["skipped"] == reports[1]["skipped"]


def test_table_explains_the_verdict_and_the_constant(tmp_path, capsys):
    _write_cases(tmp_path)
    code = main(["collapse-check", str(tmp_path), "--workers", "0", *IMPERFECT])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "3 cases used (cases per modality: t1 3, flair 3)" in out
    assert "s per case" in out
    assert "--constant modality" in out
    assert "collapse-check/" in out  # the guide


def test_help_mentions_workers_strict_and_torchrun(capsys):
    assert main(["collapse-check", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for word in ("--workers", "--strict", "torchrun", "random crops"):
        assert word in out


# --------------------------------------------------------------------------- torchrun

WORLD = 2


def _rank_worker(me: int, port: int, library_port: int, root: str, queue) -> None:
    import contextlib
    import io
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(me), WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(me),
    )  # fmt: skip
    torch.set_num_threads(1)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["collapse-check", root, "--json", "--workers", "0", *IMPERFECT])
        # the library call in a second process group, on a port of its own: on the command's
        # port a fast rank could meet the other rank's store of the first group, still open
        os.environ["MASTER_PORT"] = str(library_port)
        floor = _library_floor(gather=True)
        queue.put((me, code, out.getvalue(), err.getvalue(), floor))
    except Exception as exc:  # reported to the test
        queue.put((me, -1, "", repr(exc), None))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _library_floor(gather: bool) -> float:
    """collapsed_loss_floor on a Dataset, split among the processes when gathered."""
    import torch.distributed as dist

    from mrissl.diagnostics import collapsed_loss_floor

    if gather and not dist.is_initialized():
        dist.init_process_group("gloo")
    volumes = torch.rand(7, 2, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    dataset = [
        {"image": v, "available": torch.tensor([True, i != 3])} for i, v in enumerate(volumes)
    ]
    return collapsed_loss_floor(
        dataset, RandomTokenMask(0.5), patch_size=4, num_draws=6, seed=1, batch_size=2,
        gather_distributed=gather,
    ).floor  # fmt: skip


def test_two_gloo_processes_give_the_report_of_one(tmp_path, capsys):
    import queue as queue_module
    import socket

    import torch.multiprocessing as mp

    root = _imperfect_folder(tmp_path)
    single = _run_json(
        capsys, ["collapse-check", str(root), "--json", "--workers", "0", *IMPERFECT]
    )
    ctx = mp.get_context("spawn")
    # a free port can be taken by another process between choosing and binding it: a rank then
    # fails to start (or waits for its peer), so the attempt is repeated on new ports
    for _attempt in range(3):
        with socket.socket() as s, socket.socket() as s2:
            s.bind(("127.0.0.1", 0))
            s2.bind(("127.0.0.1", 0))
            ports = (s.getsockname()[1], s2.getsockname()[1])
        queue = ctx.Queue()
        procs = [
            ctx.Process(target=_rank_worker, args=(r, *ports, str(root), queue))
            for r in range(WORLD)
        ]
        for p in procs:
            p.start()
        results = {}
        try:
            for _ in range(WORLD):
                me, code, out, err, floor = queue.get(timeout=120)
                results[me] = (code, out, err, floor)
        except queue_module.Empty:
            results = {}
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.terminate()
        if len(results) == WORLD and not any("address already in use" in r[2].lower()
                                             for r in results.values()):  # fmt: skip
            break
    assert results[0][0] == 0, results[0][2]
    assert results[1][0] == 0, results[1][2]
    assert results[1][1] == ""  # only rank 0 prints
    report = json.loads(results[0][1])
    assert report["processes"] == 2
    assert report["cases"] == single["cases"]
    assert report["per_modality_cases"] == single["per_modality_cases"]
    assert report["skipped"] == single["skipped"]
    for ours, theirs in zip(report["results"], single["results"], strict=True):
        assert ours["floor"] == pytest.approx(theirs["floor"], rel=1e-6)
        assert ours["std_error"] == pytest.approx(theirs["std_error"], rel=1e-4, abs=1e-9)
    # the library call: each process reads every other volume, all-reduce merges the sums
    one = _library_floor(gather=False)
    assert results[0][3] == pytest.approx(one, rel=1e-6)
    assert results[1][3] == pytest.approx(one, rel=1e-6)
