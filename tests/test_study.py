"""Study files: schema, base: inheritance, dotted overrides, cells and their hashes, and one-line
errors that name the key."""
from __future__ import annotations

import hashlib

import pytest

from chae_ablate.errors import ConfigError
from chae_ablate.study import cell_hash, load_study, parse_assignments, study_from_dict

from conftest import STUDIES

# quickstart's 36 cells as the code before base: inheritance and protocol.augment hashed them
# (commit 8f4d2fa, whose quickstart.yaml listed every variant and put augment under data).
QUICKSTART_HASHES = {
    "baseline/seed0": "cd6c4c817cfb", "baseline/seed1": "54bbda50b084", "baseline/seed2": "894bd1828d70",
    "kernel5/seed0": "b9ad6882f06d", "kernel5/seed1": "d15efff5e2d2", "kernel5/seed2": "7ec7bc794348",
    "extra_conv/seed0": "7faef84148c7", "extra_conv/seed1": "ade02eef8704", "extra_conv/seed2": "1d665142a4e2",
    "fewer_stages_avgpool/seed0": "58b5391d862f", "fewer_stages_avgpool/seed1": "8acb4eba54f7",
    "fewer_stages_avgpool/seed2": "d5ff58cf936e",
    "wider_stage3/seed0": "795cbeea88de", "wider_stage3/seed1": "6e727b966a37", "wider_stage3/seed2": "8da2ee3138be",
    "narrower_stage3/seed0": "1961b9092c14", "narrower_stage3/seed1": "b17a0328fce3",
    "narrower_stage3/seed2": "95b50019d198",
    "depth3/seed0": "89d3132e3c13", "depth3/seed1": "1a7069632b61", "depth3/seed2": "963a8830306c",
    "depth1/seed0": "051f13f4dd30", "depth1/seed1": "4f4bd1c22b67", "depth1/seed2": "9bb83932f56a",
    "heads4/seed0": "d16d317e7aa8", "heads4/seed1": "094ad489f650", "heads4/seed2": "469a8db623e4",
    "dim256/seed0": "e817a6a75512", "dim256/seed1": "bb61dbbf0e22", "dim256/seed2": "df8b13cd1eab",
    "dim64/seed0": "1c7befcd4c49", "dim64/seed1": "a127def31955", "dim64/seed2": "33b9ed88ed74",
    "res48/seed0": "975e239ef563", "res48/seed1": "e02669f8d3b9", "res48/seed2": "6e2993e9cc62",
}
# The other shipped studies at the same commit: (cells, sha256 of their sorted hashes, space-joined).
# paper11-full's variants were renamed there (kernel5_stage1 -> kernel5, ...), so its names differ.
OLD_HASH_SETS = {"paper11": (12, "a9e4eb4c143c2645"), "paper11-full": (75, "62f13b2133597bba"),
                 "synthetic-tiny": (4, "249d91961da60038")}


def make(variants=None, **sections):
    return study_from_dict({"name": "t", **sections, "variants": variants or {}}, {})


def error_of(call, *args, **kwargs) -> str:
    """The ConfigError message of call(*args, **kwargs), checked to be one line."""
    with pytest.raises(ConfigError) as err:
        call(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def write(folder, name, text):
    (folder / name).write_text(text)
    return folder / name


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_studies_validate(path):
    study = load_study(path)
    assert study.variants[0].name == "baseline"
    assert len({c.cell_hash for c in study.cells()}) == len(study.cells())


def test_paper11_has_the_papers_protocol_and_11_variants():
    study = load_study(STUDIES / "paper11.yaml")
    assert len(study.variants) == 12
    p = study.baseline.config.protocol
    assert (p.epochs, p.batch_size, p.optimizer, p.lr) == (20, 32, "adam", 1e-4)
    assert study.baseline.config.data.val_fraction == 0.05
    assert p.augment.copies == 4


def test_derived_studies_inherit_paper11s_variants_and_keep_their_cells():
    paper11 = [v.name for v in load_study(STUDIES / "paper11.yaml").variants]
    quickstart = load_study(STUDIES / "quickstart.yaml")
    assert [v.name for v in quickstart.variants] == [n for n in paper11 if n != "res384"] + ["res48", "lr_too_small"]
    assert quickstart.name == "quickstart" and quickstart.baseline.config.data.root is None
    cells = {c.label: c.cell_hash for c in quickstart.cells()}
    assert {k: v for k, v in cells.items() if not k.startswith("lr_too_small/")} == QUICKSTART_HASHES
    control = {c.label: c.cell_hash for c in load_study(STUDIES / "digits-control.yaml",
                                                        {"model.resolution": 32}).cells()}
    assert {k: v for k, v in cells.items() if k.startswith("lr_too_small/")} == \
        {k: v for k, v in control.items() if k.startswith("lr_too_small/") and k in cells}  # digits-control's, at 32 px
    full = [v.name for v in load_study(STUDIES / "paper11-full.yaml").variants]
    assert full[:len(paper11)] == paper11 and len(full) == 25
    for name, (n, digest) in OLD_HASH_SETS.items():
        hashes = sorted(c.cell_hash for c in load_study(STUDIES / f"{name}.yaml").cells())
        assert (len(hashes), hashlib.sha256(" ".join(hashes).encode()).hexdigest()[:16]) == (n, digest), name


def test_base_merges_deeply_and_null_drops_a_variant(tmp_path):
    write(tmp_path, "parent.yaml", """
name: parent
protocol: {epochs: 5, seeds: [0, 1], augment: {copies: 2, flip: false}}
model: {resolution: 64}
variants:
  d1: {set: {model.transformer.depth: 1}}
  d3: {set: {model.transformer.depth: 3}}
  h4: {set: {model.transformer.heads: 4}}
""")
    write(tmp_path, "child.yaml", """
base: parent.yaml
name: child
protocol: {augment: {copies: 1}}
variants:
  d3: null
  h4: {description: four heads, set: {model.transformer.heads: 4}}
  k5: {set: {model.conv.stages.0.kernel: 5}}
""")
    study = load_study(tmp_path / "child.yaml")
    assert [c.label for c in study.cells()] == [
        f"{v}/seed{s}" for v in ("baseline", "d1", "h4", "k5") for s in (0, 1)]
    augment = study.baseline.config.protocol.augment
    assert (study.name, study.baseline.config.protocol.epochs, augment.copies, augment.flip) == ("child", 5, 1, False)
    assert study.variants[2].description == "four heads"
    assert all(v.config.model.resolution == 64 for v in study.variants)


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "base: b.yaml\nname: a\n", "b.yaml": "base: a.yaml\nname: b\n"},
     "{d}/a.yaml: base: {d}/b.yaml: base: studies form a cycle (a.yaml -> b.yaml -> a.yaml); remove one base:"),
    ({"a.yaml": "base: a.yaml\nname: a\n"}, "{d}/a.yaml: base: studies form a cycle (a.yaml -> a.yaml)"),
    ({"a.yaml": "base: nowhere/missing.yaml\nname: a\n"},
     "{d}/a.yaml: base: {d}/nowhere/missing.yaml: study file not found"),
    ({"a.yaml": "base: [paper11.yaml]\nname: a\n"}, "{d}/a.yaml: base: expected a study file name"),
])
def test_bad_bases_are_one_line_errors(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path, name, text)
    assert error_of(load_study, tmp_path / "a.yaml").startswith(message.format(d=tmp_path))


@pytest.mark.parametrize("variants, message", [
    ({"k": {"set": {"model.conv.stages.0.kernal": 5}}},
     "variants.k.model.conv.stages.0.kernal: unknown key (did you mean 'kernel'?)"),
    ({"h": {"set": {"model.transformer.heads": 6}}},
     "variants.h.model.transformer.heads: 6 does not divide dim 128 (valid: 1, 2, 4, 8, 16, 32, 64, 128)"),
    ({"r": {"set": {"model.resolution": 250}}},
     "variants.r.model.resolution: 250 is not a multiple of the total stride 16; use e.g. 240 or 256"),
    ({"e": {"set": {"model.conv.stages": []}}}, "variants.e.model.conv.stages: is empty"),
    ({"n": {"set": {"model.transformer.dim": -4}}}, "variants.n.model.transformer.dim: -4 must be > 0"),
    ({"i": {"set": {"model.conv.stages.7.kernel": 5}}},
     "variants.i.model.conv.stages.7: no item '7'; valid indices are 0..3"),
    ({"z": {"set": {"model.conv.stages.00.kernel": 5}}}, "variants.z.model.conv.stages.00: no item '00'"),
    ({"t": {"set": {"model.transformer.depth": "three"}}},
     "variants.t.model.transformer.depth: expected int, got str 'three'"),
    ({"p": {"set": {"model.conv.stages.0.pool": "min"}}},
     "variants.p.model.conv.stages.0.pool: 'min' is not one of max, avg, none"),
    ({"v": {"set": {"model.resolution.x": 1}}}, "variants.v.model.resolution.x: variants.v.model.resolution is a value"),
    ({"o": {"set": {"model.transformer": {"depth": "x"}, "model.transformer.depth": 3}}},
     "variants.o.set: model.transformer and model.transformer.depth overlap"),
    ({"baseline": {"set": {"model.transformer.depth": 3}}}, "variants.baseline: 'baseline' is reserved"),
    ({"x": {"sett": {}}}, "variants.x: expected {description: ..., set: {dotted.path: value}}"),
    ({"d": {"set": {"model.transformer.depth": 3}, "descripton": "x"}},
     "variants.d.descripton: unknown key (did you mean 'description'?)"),
    ({1: {"set": {"model.transformer.depth": 3}}, "1": {"set": {"model.transformer.depth": 1}}},
     "variants.1: two variants have this name"),
    ({"a": {"set": {"model.transformer.depth": 3}}, "b": {"set": {"model.transformer.depth": 3}}},
     "variants.b: the same configuration as a (after overrides)"),
    ({"same": {"set": {"model.transformer.depth": 2}}}, "variants.same: the same configuration as baseline"),
])
def test_bad_variants_name_their_key(variants, message):
    assert error_of(make, variants).startswith(message)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "x" * 200, None, 1.5, True, "-a", "a b", "ü"])
def test_unsafe_names_are_refused(name):
    """Study and variant names become folder names and MLflow tags."""
    assert error_of(study_from_dict, {"name": name}, {}).startswith("name: ")
    variants = {name: {"set": {"model.transformer.depth": 3}}}
    assert error_of(study_from_dict, {"name": "t", "variants": variants}, {}).startswith("variants.")


@pytest.mark.parametrize("sections, message", [
    ({"model": {"resolution": 8}}, "model.resolution: 8 is not a multiple of the total stride 16"),
    ({"protocol": {"epoch": 3}}, "protocol.epoch: unknown key (did you mean 'epochs'?)"),
    ({"dat": {}}, "dat: unknown key (did you mean 'data'?)"),
    ({"data": {"source": "folder"}}, "data.root: is required when source is 'folder'"),
    ({"data": {"augment": {"copies": 1}}}, "data.augment: moved to protocol.augment"),
    ({"protocol": {"lr": "1e-3"}},
     "protocol.lr: expected float, got str '1e-3' (YAML reads '1e-3' as text; write it as 0.001)"),
    ({"protocol": {"lr": "1e-7"}},  # the fix it names is itself a YAML number: 1e-07 would be text again
     "protocol.lr: expected float, got str '1e-7' (YAML reads '1e-7' as text; write it as 1.0e-07)"),
    ({"protocol": {"lr": float("nan")}}, "protocol.lr: nan is not a finite number"),
    ({"protocol": {"lr": float("inf")}}, "protocol.lr: inf is not a finite number"),
    ({"protocol": {"seeds": [0, 2**63]}}, "protocol.seeds.1: 9223372036854775808 is out of range"),
    ({"protocol": {"seeds": [0, 2**31]}}, "protocol.seeds.1: 2147483648 is out of range; seeds are integers"),
    ({"protocol": {"seeds": [3, 1, 3]}}, "protocol.seeds: seed 3 appears 2 times"),
    ({"model": {"transformer": {"dim": 10**12, "heads": 7}}},
     "model.transformer.dim: 1000000000000 is larger than the supported maximum 4,096"),
    ({"model": {"resolution": -10**4000}}, "model.resolution: -4,001-digit integer is out of range"),
])
def test_bad_sections_name_their_key(sections, message):
    assert error_of(make, None, **sections).startswith(message)


@pytest.mark.parametrize("text, message", [
    ("name: t\nprotocol:\n  epochs: 2\n  epochs: 3\n", "line 4: duplicate key 'epochs'"),
    ("name: t\nprotocol: {lr: 1e-3}\n", "protocol.lr: expected float, got str '1e-3' (YAML reads"),
    ("name: t\nprotocol: {lr: .nan}\n", "protocol.lr: nan is not a finite number"),
    ("name: t\nprotocol: {lr: -.inf}\n", "protocol.lr: -inf is not a finite number"),
    ("name: t\nprotocol: {seeds: [9223372036854775808]}\n", "protocol.seeds.0: 9223372036854775808 is out of range"),
    ("name: t\ndata: {augment: {copies: 1}}\n", "data.augment: moved to protocol.augment"),
    ("name: t\nmodel: {resolution: !!int abc}\n", "line 2: 'abc' is not a valid int"),
    ("name: t\nmodel: {resolution: " + "9" * 5000 + "}\n", "is not a valid int (Exceeds the limit"),
    ("name: t\na: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefg", "bcdefgh")),
     "expands to more than 200,000 values"),
    ("name: t\nm0: &m0 {x: 1}\n" + "".join(f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}]}}\n" for i in range(1, 25)),
     "expands to more than 200,000 values"),
])
def test_bad_yaml_is_one_line_naming_the_file(tmp_path, text, message):
    path = write(tmp_path, "s.yaml", text)
    assert message in error_of(load_study, path)


def test_yaml_merge_keys_work(tmp_path):
    path = write(tmp_path, "s.yaml", "name: t\nvariants:\n  a: {set: &s {model.transformer.depth: 3}}\n"
                                     "  b: {set: {<<: *s, model.resolution: 64}}\n")
    b = load_study(path).variants[2].config.model
    assert (b.transformer.depth, b.resolution) == (3, 64)


def test_a_date_stays_text(tmp_path):
    assert load_study(write(tmp_path, "s.yaml", "name: t\ndescription: 2024-13-45\n")).description == "2024-13-45"


def test_a_variant_identical_after_set_is_refused_naming_both():
    assert error_of(load_study, STUDIES / "synthetic-tiny.yaml", parse_assignments(["model.transformer.depth=2"])) \
        .startswith("variants.depth2: the same configuration as baseline (after overrides)")


def test_overrides_merge_and_win():
    study = study_from_dict({"name": "t", "variants": {"d3": {"set": {"model.transformer.depth": 3}}}},
                            parse_assignments(["model.resolution=64", "protocol.epochs=2"]))
    for v in study.variants:
        assert v.config.model.resolution == 64 and v.config.protocol.epochs == 2
    assert study.variants[1].config.model.transformer.depth == 3
    assert error_of(study_from_dict, {"name": "t"}, parse_assignments(["model.resolutio=64"])) \
        .startswith("model.resolutio: unknown key")
    assert error_of(parse_assignments, ["model.resolution"]).startswith("--set model.resolution: expected key=value")
    assert error_of(parse_assignments, ["model.resolution=[1"]).startswith("--set model.resolution=[1: line 2 is not valid YAML")


def test_overrides_do_not_write_through_yaml_aliases(tmp_path):
    """A variant's set: that reuses the baseline's stages by alias keeps its own copy."""
    path = write(tmp_path, "s.yaml", """
name: t
model: {conv: {stages: &s [{channels: 32}, {channels: 32}, {channels: 64}, {channels: 128}]}}
variants:
  same_stages_k5: {set: {model.conv.stages: *s, model.conv.extra_pool: avg, model.resolution: 512}}
  k5: {set: {model.conv.stages.0.kernel: 5}}
""")
    study = load_study(path, parse_assignments(["model.conv.stages.1.kernel=7"]))
    assert [v.config.model.conv.stages[1].kernel for v in study.variants] == [7, 3, 7]
    assert study.variants[2].config.model.conv.stages[0].kernel == 5


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
    assert again.cells()[0].cell_hash == cells[2].cell_hash  # a cell's identity ignores the other seeds
    assert cell_hash(cells[0].config, 0) != cell_hash(cells[0].config, 1)


def test_plan_costs_each_distinct_model_once(monkeypatch):
    """A 999-row study whose variants change only the protocol builds two models, not 999; the
    meta-device counts equal a real model's."""
    from chae_ablate import plan
    from chae_ablate.builders import count_parameters
    from chae_ablate.model import build_model
    variants = {f"lr{i}": {"set": {"protocol.lr": (i + 2) * 1e-6 + 1e-7}} for i in range(997)}
    study = make({**variants, "d3": {"set": {"model.transformer.depth": 3}}}, model={"resolution": 32})
    built, real = [], plan.model_cost
    monkeypatch.setattr(plan, "model_cost", lambda config, *args: built.append(config) or real(config, *args))
    planned = plan.study_plan(study)
    table, footer = planned.table, planned.footer
    assert (len(table), len(built)) == (999, 2) and footer.startswith("999 variants x seeds = 999 cells")
    assert table["params"][0] == count_parameters(build_model(study.baseline.config.model, 10))
