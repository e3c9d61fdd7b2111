"""Study files: schema, dotted overrides, cells and their hashes, and errors that name the key."""
from __future__ import annotations

import pytest

from chae_ablate.errors import ConfigError
from chae_ablate.study import cell_hash, load_study, parse_assignments, study_from_dict

from conftest import STUDIES


def make(variants=None, **sections):
    return study_from_dict({"name": "t", **sections, "variants": variants or {}}, {})


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_studies_validate(path):
    study = load_study(path)
    assert study.variants[0].name == "baseline"
    assert len({c.hash for c in study.cells()}) == len(study.cells())


def test_paper11_has_the_papers_protocol_and_11_variants():
    study = load_study(STUDIES / "paper11.yaml")
    assert len(study.variants) == 12
    p = study.baseline.config.protocol
    assert (p.epochs, p.batch_size, p.optimizer, p.lr) == (20, 32, "adam", 1e-4)
    assert study.baseline.config.data.val_fraction == 0.05
    assert study.baseline.config.data.augment.copies == 4


@pytest.mark.parametrize("variants, message", [
    ({"k": {"set": {"model.conv.stages.0.kernal": 5}}},
     "variants.k.set.model.conv.stages.0.kernal: unknown key (did you mean 'kernel'?)"),
    ({"h": {"set": {"model.transformer.heads": 6}}},
     "variants.h: model.transformer.heads: 6 does not divide dim 128 (valid: 1, 2, 4, 8, 16, 32, 64, 128)"),
    ({"r": {"set": {"model.resolution": 250}}},
     "variants.r: model.resolution: 250 is not a multiple of the total stride 16; use e.g. 240 or 256"),
    ({"e": {"set": {"model.conv.stages": []}}}, "variants.e: model.conv.stages: is empty"),
    ({"n": {"set": {"model.transformer.dim": -4}}}, "variants.n: model.transformer.dim: -4 must be > 0"),
    ({"i": {"set": {"model.conv.stages.7.kernel": 5}}}, "variants.i.set.model.conv.stages.7: no item '7'"),
    ({"t": {"set": {"model.transformer.depth": "three"}}},
     "variants.t: model.transformer.depth: expected int, got str 'three'"),
    ({"p": {"set": {"model.conv.stages.0.pool": "min"}}},
     "variants.p: model.conv.stages.0.pool: 'min' is not one of max, avg, none"),
    ({"baseline": {"set": {"model.transformer.depth": 3}}}, "variants.baseline: 'baseline' is reserved"),
    ({"x": {"sett": {}}}, "variants.x: expected {description: ..., set: {dotted.path: value}}"),
])
def test_bad_variants_name_their_key(variants, message):
    with pytest.raises(ConfigError) as err:
        make(variants)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_pooling_away_to_nothing_is_refused():
    with pytest.raises(ConfigError, match="model.resolution: 8 is not a multiple of the total stride 16"):
        make(model={"resolution": 8})


def test_bad_sections_name_their_key():
    with pytest.raises(ConfigError, match=r"^protocol.epoch: unknown key \(did you mean 'epochs'\?\)"):
        make(protocol={"epoch": 3})
    with pytest.raises(ConfigError, match=r"^dat: unknown key \(did you mean 'data'\?\)"):
        study_from_dict({"name": "t", "dat": {}}, {})
    with pytest.raises(ConfigError, match="^data.root: is required when source is 'folder'"):
        make(data={"source": "folder"})


def test_overrides_merge_and_win():
    study = study_from_dict({"name": "t", "variants": {"d3": {"set": {"model.transformer.depth": 3}}}},
                            parse_assignments(["model.resolution=64", "protocol.epochs=2"]))
    for v in study.variants:
        assert v.config.model.resolution == 64 and v.config.protocol.epochs == 2
    assert study.variants[1].config.model.transformer.depth == 3
    with pytest.raises(ConfigError, match="^--set model.resolutio: unknown key"):
        study_from_dict({"name": "t"}, parse_assignments(["model.resolutio=64"]))
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_assignments(["model.resolution"])


def test_list_item_override_merges_into_the_stage():
    study = make({"k": {"set": {"model.conv.stages.1": {"kernel": 5}}}})
    stage = study.variants[1].config.model.conv.stages[1]
    assert (stage.channels, stage.kernel) == (32, 5)


def test_cells_expand_variants_by_seeds_with_stable_hashes():
    study = make({"d1": {"set": {"model.transformer.depth": 1}}}, protocol={"seeds": [0, 1, 2]})
    cells = study.cells()
    assert [(c.variant.name, c.seed) for c in cells] == [
        ("baseline", 0), ("baseline", 1), ("baseline", 2), ("d1", 0), ("d1", 1), ("d1", 2)]
    again = make({"d1": {"set": {"model.transformer.depth": 1}}}, protocol={"seeds": [2]})
    assert again.cells()[0].hash == cells[2].hash  # a cell's identity ignores the other seeds
    assert cell_hash(cells[0].config, 0) != cell_hash(cells[0].config, 1)
