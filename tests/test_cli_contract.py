"""The command's contract, as a property: any command line ends in exit 0, or exit 2 with one line.

Command lines are generated from the parser's own arguments (introspected, so a new option is
covered without touching this file): numbers of any sign and size, non-numbers, unknown and
known names, missing, misplaced and unwritable paths, valid files. Whatever arrives, ``main``
returns 0, or 2 with exactly one line on stderr; any other exception is a bug and fails here
with its traceback.

The collapse check is never run at a heavy size: its generated command lines start from a tiny
valid configuration (crop 8, two phantom cases), and the generated sizes are either invalid or
small; valid-but-large sizes are the one region not generated.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mrissl import _cli_args
from mrissl.cli import _parser, main
from mrissl.modalities import MODALITIES

TINY_COLLAPSE_CHECK = [
    "--crop",
    "8",
    "--patch-size",
    "4",
    "--phantom-cases",
    "2",
    "--num-draws",
    "3",
    "--mask",
    "random:0.5",
    "--quiet",
]
# options whose valid values cost time or memory in proportion: generated small when valid
SIZE_OPTIONS = {"--crop": 16, "--patch-size": 16, "--phantom-cases": 4, "--num-draws": 6}
# valid values, drawn for most arguments of a "mostly valid" command line (sizes kept small)
VALID_INTS = {
    "--crop": (4, 16),
    "--patch-size": (1, 8),
    "--phantom-cases": (2, 4),
    "--num-draws": (3, 6),
    "--max-cases": (0, 5),
    "--seed": (0, 2**63 - 1),
    "--top": (0, 40),
}
VALID_MASKS = ["random:0.5", "random-each:0.25", "hmp", "hmp:1,0.5,-", "modal", "modal:2"]
VALID_MASKS += ["position:0.5", "patch:0.5", "block:0.5:4", "block:0.875"]
PHANTOM_NAMES = ["t1", "t1n", "t1ce", "t1c", "t2", "t2w", "pd", "flair", "t2f"]


def _leaf_parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict:
    """Each runnable subcommand (as its words) -> its parser, found by walking the subparsers."""
    leaves = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                deeper = _leaf_parsers(sub, (*prefix, name))
                leaves.update(deeper or {(*prefix, name): sub})
    return leaves


LEAVES = _leaf_parsers(_parser())


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Files of every kind a user may point the command at."""
    from mrissl.templates import ModalityTemplates

    root = tmp_path_factory.mktemp("contract")
    torch.save(torch.randn(20, 4, generator=torch.Generator().manual_seed(0)), root / "z.pt")
    model = torch.nn.Module()
    model.templates = ModalityTemplates(["t1", "flair"], shape=(4, 4, 4), init=0.5)
    torch.save(model.state_dict(), root / "ckpt.pt")
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    (root / "text.txt").write_text("hello\n")
    (root / "empty_dir").mkdir()
    import pickle

    (root / "pickled.pt").write_bytes(pickle.dumps({"x": object()}, protocol=2))
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    for case in ("case-1", "case-2"):  # a tiny dataset with every phantom contrast
        (root / "cases" / case).mkdir(parents=True)
        for name in ("t1n", "t1c", "t2w", "pd", "t2f"):
            image = nib.Nifti1Image(rng.random((10, 10, 10), dtype=np.float32), np.eye(4))
            nib.save(image, root / "cases" / case / f"{case}-{name}.nii.gz")
    return root


def _numbers(option: str) -> st.SearchStrategy[str]:
    small = SIZE_OPTIONS.get(option)
    ints = (
        st.one_of(
            st.integers(max_value=0),
            st.integers(min_value=_cli_args.MAX_SIDE + 1),
            st.integers(1, small),
        )
        if small
        else st.integers()
    )
    return st.one_of(
        ints.map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.text(string.printable, max_size=6),
        st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "", " 3", "1_000"]),
    )


def _names() -> st.SearchStrategy[str]:
    known = st.sampled_from([*MODALITIES, "t1n", "t2w", "t2f", "t1c", "T1CE", "Flair"])
    return st.one_of(known, st.text(string.ascii_letters + "-_ ", min_size=0, max_size=8))


def _mask_specs() -> st.SearchStrategy[str]:
    kinds = st.sampled_from(["random", "random-each", "hmp", "modal", "position", "patch", "block"])
    args = st.one_of(
        st.just(""),
        st.floats(allow_nan=True, allow_infinity=True).map(lambda f: f":{f!r}"),
        st.sampled_from([":0.5", ":1", ":-1", ":0.875:4", ":1,0.5,-", ":-,-,-", ":x", ":9"]),
    )
    return st.one_of(st.tuples(kinds, args).map("".join), st.text(max_size=8))


def _path_choices(kind: str, paths) -> list[str]:
    missing = str(paths / "missing_dir" / "x")
    under_file = str(paths / "text.txt" / "x")
    if kind == "features":
        good = [str(paths / "z.pt")]
    elif kind == "checkpoint":
        good = [str(paths / "ckpt.pt")]
    else:
        good = []
    bad_inputs = [
        missing,
        under_file,
        str(paths / "empty_dir"),
        str(paths / "corrupt.pt"),
        str(paths / "pickled.pt"),
        str(paths / "text.txt"),
        "",
    ]
    return good + bad_inputs


def _valid(action: argparse.Action, option: str, words: tuple[str, ...], paths):
    """A strategy of valid text for one value of ``action`` (None where not known)."""
    if action.type is _cli_args.modality:
        return st.sampled_from(PHANTOM_NAMES)
    if action.type is _cli_args.existing_file:
        return st.just(str(paths / ("z.pt" if words == ("rank",) else "ckpt.pt")))
    if action.type is _cli_args.new_file:
        return st.just(str(paths / "spectrum.png"))
    if action.type is _cli_args.output_folder:
        return st.sampled_from([str(paths / "out"), str(paths / "new" / "deeper")])
    if action.type is _cli_args.positive_float:
        return st.floats(1e-3, 1e3).map(repr)
    if action.choices is not None:
        return st.sampled_from(list(action.choices))
    if option == "--mask":
        return st.sampled_from(VALID_MASKS)
    if option in VALID_INTS:
        return st.integers(*VALID_INTS[option]).map(str)
    if option == "folder":
        return st.just(str(paths / "cases"))
    return None


def _value(
    action: argparse.Action, words: tuple[str, ...], paths, draw, valid: bool = False
) -> list[str]:
    """Text for one argument: ``nargs`` values drawn for its type."""
    option = action.option_strings[0] if action.option_strings else action.dest
    count = action.nargs if isinstance(action.nargs, int) else None
    good = _valid(action, option, words, paths) if valid else None
    if good is not None:
        one = good
    elif action.type is _cli_args.modality:
        one = _names()
    elif action.type is _cli_args.existing_file:
        kind = "features" if words == ("rank",) else "checkpoint"
        one = st.sampled_from(_path_choices(kind, paths))
    elif action.type is _cli_args.new_file:
        one = st.sampled_from(
            [
                str(paths / "missing_dir" / "s.png"),
                str(paths / "text.txt" / "s.png"),
                str(paths / "empty_dir"),
                str(paths / "spectrum.png"),
                "",
            ]
        )
    elif action.type is _cli_args.output_folder:
        one = st.sampled_from(
            [
                str(paths / "out"),
                str(paths / "text.txt"),
                str(paths / "text.txt" / "sub"),
                str(paths / "new" / "deeper"),
                "",
            ]
        )
    elif action.choices is not None:
        one = st.one_of(st.sampled_from(list(action.choices)), st.text(max_size=6))
    elif option == "--mask":
        one = _mask_specs()
    elif option == "folder":
        one = st.sampled_from(
            [
                str(paths / "cases"),
                str(paths / "missing_dir"),
                str(paths / "text.txt"),
                str(paths / "empty_dir"),
            ]
        )
    elif action.type is None:
        one = st.text(string.printable, max_size=8)
    else:  # every other type= is a number
        one = _numbers(option)
    n = count if count is not None else draw(st.integers(1, 3)) if action.nargs == "+" else 1
    return [draw(one) for _ in range(n)]


@st.composite
def command_lines(draw, paths):
    words = draw(st.sampled_from(sorted(LEAVES)))
    sub = LEAVES[words]
    # most lines are mostly valid, so that the work behind the argument checks is reached too
    p_valid = draw(st.sampled_from([0.0, 0.9, 0.97, 1.0]))

    def valid() -> bool:
        return draw(st.floats(0, 1)) < p_valid

    argv = list(words)
    if words == ("collapse-check",):
        argv += TINY_COLLAPSE_CHECK
    optionals = []
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:  # positional: usually given, sometimes not
            if action.nargs == "?" and draw(st.booleans()):
                continue
            if p_valid < 1 and draw(st.integers(0, 9)) == 0:
                continue
            argv += _value(action, words, paths, draw, valid())
        elif draw(st.booleans()):
            optionals.append(action)
    for action in draw(st.permutations(optionals)):
        option = draw(st.sampled_from(action.option_strings))
        argv.append(option)
        if action.nargs != 0:
            argv += _value(action, words, paths, draw, valid())
    if p_valid < 1 and draw(st.integers(0, 19)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--bogus", "-x"])))
    return argv


def _run(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _check_contract(argv: list[str]) -> int:
    code, err = _run(argv)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1, (argv, err)
        assert "error:" in lines[0], (argv, err)
        assert "Traceback" not in err
    return code


def test_the_subcommands_are_found_by_introspection():
    assert set(LEAVES) == {("collapse-check",), ("rank",), ("templates", "export")}


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_command_line_ends_in_exit_0_or_one_line_and_exit_2(paths, data):
    _check_contract(data.draw(command_lines(paths)))


@pytest.mark.parametrize(
    "argv",
    [
        ["collapse-check", "--crop", "0"],
        ["collapse-check", "--phantom-cases", "-1"],
        ["collapse-check", "--phantom-cases", "1"],
        ["collapse-check", "--num-draws", "2"],
        ["collapse-check", "--patch-size", "-16"],
        ["collapse-check", "--crop", "99999999999999999999999"],
        ["collapse-check", "--seed", "-1"],
        ["collapse-check", "--seed", str(2**64)],
        ["collapse-check", "--reference-loss", "nan"],
        ["collapse-check", "--reference-loss", "-0.1"],
        ["collapse-check", "--max-cases", "-3"],
        ["collapse-check", "--modalities", "t7"],
        ["collapse-check", "--constant", "pixel"],
        ["collapse-check", *TINY_COLLAPSE_CHECK, "--modalities", "dwi"],
        ["collapse-check", *TINY_COLLAPSE_CHECK, "--modalities", "t1", "t1"],
        ["collapse-check", *TINY_COLLAPSE_CHECK, "--crop", "6"],
        ["collapse-check", *TINY_COLLAPSE_CHECK, "--mask", "random:1.5"],
        ["rank", "missing.pt"],
        ["rank", "{z}", "--plot", "missing_dir/x.png"],
        ["rank", "{z}", "--top", "-1"],
        ["rank", "{z}", "--key", "nope"],
        ["templates", "export", "{z}", "{root}/out"],
        ["templates", "export", "{ckpt}", "{root}/text.txt/out"],
        ["templates", "export", "{ckpt}", "{root}/out2", "--spacing", "1", "0", "1"],
        ["templates", "export", "{ckpt}", "{root}/out3", "--spacing", "1", "inf", "1"],
        ["templates", "export", "{ckpt}", "{root}/out4", "--prefix", "nope."],
        ["nonsense"],
    ],
)
def test_documented_user_errors_are_exit_2_and_one_line(paths, argv):
    filled = [
        a.format(z=paths / "z.pt", ckpt=paths / "ckpt.pt", root=paths).replace(
            "missing_dir", str(paths / "missing_dir")
        )
        for a in argv
    ]
    assert _check_contract(filled) == 2


def test_valid_tiny_runs_exit_0(paths):
    assert _check_contract(["collapse-check", *TINY_COLLAPSE_CHECK, "--json"]) == 0
    folder = ["collapse-check", str(paths / "cases"), *TINY_COLLAPSE_CHECK, "--json"]
    assert _check_contract(folder) == 0
    assert _check_contract(["rank", str(paths / "z.pt")]) == 0
    assert _check_contract(["templates", "export", str(paths / "ckpt.pt"), str(paths / "o")]) == 0
