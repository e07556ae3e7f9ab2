from __future__ import annotations

import ast
import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mrissl.modalities as modalities_module
from mrissl.modalities import (
    MODALITIES,
    MODALITY_ALIASES,
    canonical_modalities,
    canonical_modality,
)

DATASET_SPELLINGS = {
    # BraTS 2021 / UCSF-PDGM / IXI / BraTS 2023 / BIDS
    "t1": ["t1", "T1", "t1n", "T1w", "t1_native"],
    "t1ce": ["t1ce", "T1CE", "t1c", "T1c", "t1gd", "T1-Gd", "t1_gd", "T1 Gd"],
    "t2": ["t2", "T2", "t2w", "T2w"],
    "flair": ["flair", "FLAIR", "t2f", "T2-FLAIR", "t2_flair"],
    "pd": ["pd", "PD", "PDw"],
    "dwi": ["dwi", "DWI"],
    "adc": ["adc", "ADC"],
    "mra": ["mra", "MRA"],
}


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [(s, c) for c, spellings in DATASET_SPELLINGS.items() for s in spellings],
)
def test_dataset_spellings_resolve_to_the_canonical_name(spelling, canonical):
    assert canonical_modality(spelling) == canonical


def test_every_canonical_name_is_its_own_alias():
    for name in MODALITIES:
        assert canonical_modality(name) == name
        assert MODALITY_ALIASES[name] == name


def test_aliases_point_only_to_canonical_names():
    assert set(MODALITY_ALIASES.values()) == set(MODALITIES)


@given(st.sampled_from(sorted(MODALITY_ALIASES)), st.lists(st.sampled_from("-_. "), max_size=3))
def test_case_and_separators_are_ignored(alias, seps):
    # insert separators after the first character and change the case
    spelled = alias[0].upper() + "".join(seps) + alias[1:]
    assert canonical_modality(spelled) == MODALITY_ALIASES[alias]


def test_unknown_name_error_lists_the_known_modalities():
    with pytest.raises(ValueError, match="unknown modality 'swi'") as info:
        canonical_modality("swi")
    for name in MODALITIES:
        assert name in str(info.value)


def test_non_string_name_is_a_type_error():
    with pytest.raises(TypeError, match="must be a str"):
        canonical_modality(1)  # type: ignore[arg-type]


def test_canonical_modalities_keeps_order_and_rejects_duplicates():
    assert canonical_modalities(["t2f", "T1n", "t1c"]) == ("flair", "t1", "t1ce")
    with pytest.raises(ValueError, match="same modality twice"):
        canonical_modalities(["t1c", "T1-Gd"])
    with pytest.raises(ValueError, match="at least one"):
        canonical_modalities([])
    with pytest.raises(TypeError, match="single string"):
        canonical_modalities("t1")


def test_module_imports_only_the_standard_library():
    tree = ast.parse(inspect.getsource(modalities_module))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "re", "collections", "types", "typing"}
