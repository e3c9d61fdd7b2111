"""Any model: model.builder (chae, timm:NAME, module:function), its kwargs as knobs, costs on the meta
device, and cell hashes that follow the builder's code."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from chae_ablate import builders
from chae_ablate.config import ModelConfig, OtherModel
from chae_ablate.errors import ChaeError, ConfigError
from chae_ablate.plan import study_plan
from chae_ablate.study import load_study, study_from_dict

from conftest import STUDIES

PINNED = Path(__file__).with_name("pinned_cell_hashes.json")

SMALL_CNN = '''
from torch import nn


def build(num_classes, resolution, width=8, depth=2):
    layers, channels = [], 3
    for _ in range(depth):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * (resolution // 2 ** depth) ** 2, num_classes))


def linear(num_classes, resolution):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * resolution * resolution, num_classes))


def fails(num_classes, resolution, depth=1):
    if depth > 2:
        raise ValueError(f"depth {depth} is not supported")
    return linear(num_classes, resolution)


def no_resolution(num_classes, width=8):
    return linear(num_classes, 8)
'''


def user_study(tmp_path: Path, builder: str = "small_cnn:build", kwargs: dict | None = None,
               variants: dict | None = None, code: str = SMALL_CNN, **extra) -> Path:
    (tmp_path / "small_cnn.py").write_text(code)
    study = {"name": "own", "data": {"source": "synthetic", "synthetic_classes": 3, "synthetic_per_class": 12},
             "protocol": {"epochs": 1, "batch_size": 8, "seeds": [0, 1]},
             "model": {"builder": builder, "resolution": 16, "kwargs": kwargs or {}},
             "variants": variants or {"wide": {"set": {"model.kwargs.width": 16}}}, **extra}
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))
    return path


@pytest.mark.parametrize("name", ["paper11", "quickstart", "synthetic-tiny", "digits-control"])
def test_existing_chae_studies_keep_their_cell_hashes(name):
    """Pinned before the builder registry came: CHAE's ledgers, checkpoints and MLflow runs keep their cells."""
    pinned = json.loads(PINNED.read_text())[name]
    assert {c.label: c.cell_hash for c in load_study(STUDIES / f"{name}.yaml").cells()} == pinned


def test_builder_chae_written_out_is_the_default():
    written = study_from_dict({"name": "s", "model": {"builder": "chae", "resolution": 32}}, {})
    default = study_from_dict({"name": "s", "model": {"resolution": 32}}, {})
    assert isinstance(written.baseline.config.model, ModelConfig)
    assert [c.cell_hash for c in written.cells()] == [c.cell_hash for c in default.cells()]


def test_a_user_builder_beside_the_study_is_loaded_checked_and_costed(tmp_path):
    study = load_study(user_study(tmp_path, kwargs={"depth": 2}))
    model = study.baseline.config.model
    assert isinstance(model, OtherModel) and model.kwargs == {"width": 8, "depth": 2}  # defaults written out
    assert model.source_file == str((tmp_path / "small_cnn.py").resolve())
    table = study_plan(study).table.set_index("variant")
    # by hand: conv 3->w at 16x16, conv w->w at 8x8, linear w*4*4 -> 3; a multiply-add is 2 FLOPs
    for variant, w in (("baseline", 8), ("wide", 16)):
        params = (3 * 9 * w + w) + (w * 9 * w + w) + (w * 16 * 3 + 3)
        flops = 2 * (3 * 9 * w * 16 * 16 + w * 9 * w * 8 * 8 + w * 16 * 3)
        assert table.loc[variant, "params"] == params
        assert table.loc[variant, "mflops"] == pytest.approx(flops / 1e6)
    assert table["tokens"].isna().all() and list(table["changes"]) == ["-", "kwargs.width=16"]
    network = builders.build(model, 3)
    assert isinstance(network, nn.Sequential) and network(torch.zeros(2, 3, 16, 16)).shape == (2, 3)


def test_training_memory_is_weights_gradients_adam_state_and_saved_input(tmp_path):
    """By hand for Flatten -> Linear: float32 weights x (1 + 1 gradient + 2 Adam moments), plus the
    one activation autograd keeps, the flattened batch (the weight's transpose is not an activation)."""
    study = load_study(user_study(tmp_path, builder="small_cnn:linear", variants={"sgd": {"set": {"protocol.optimizer": "sgd"}}}))
    weights = (3 * 16 * 16 * 3 + 3) * 4
    batch = 8 * 3 * 16 * 16 * 4
    adam, sgd = (builders.training_memory(v.config.model, 3, 8, v.config.protocol.optimizer) for v in study.variants)
    assert (adam, sgd) == (weights * 4 + batch, weights * 3 + batch)


def test_naming_a_builder_default_is_the_baselines_cell(tmp_path):
    """A search trial or variant that names a default trains the baseline's cell, not a copy of it
    (seen: a search's top configuration was the baseline's with depth=2 written out, and was
    confirmed against itself as a new variant)."""
    with pytest.raises(ConfigError, match="^variants.same: the same configuration as baseline"):
        load_study(user_study(tmp_path, variants={"same": {"set": {"model.kwargs.depth": 2}}}))
    study = load_study(user_study(tmp_path))
    assert study.config_with({"model.kwargs.depth": 2}) == study.baseline.config


def test_an_importable_module_is_a_builder_too(tmp_path, monkeypatch):
    package = tmp_path / "lib" / "mymodels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cnn.py").write_text(SMALL_CNN)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    study = study_from_dict({"name": "s", "model": {"builder": "mymodels.cnn:build", "resolution": 16}}, {})
    assert study.baseline.config.model.source_file == str((package / "cnn.py").resolve())


@pytest.mark.parametrize("setting, message", [
    ({"variants": {"wide": {"set": {"model.kwargs.widht": 16}}}},
     "variants.wide.model.kwargs.widht: not an argument of small_cnn:build (did you mean 'width'?) "
     "(accepted: width, depth)"),
    ({"kwargs": {"num_classes": 4}}, "model.kwargs.num_classes: set by chae-ablate (it comes from the data)"),
    ({"builder": "small_cnn:no_resolution"},
     "model.builder: small_cnn:no_resolution must take num_classes and resolution as keyword arguments"),
    ({"builder": "small_cnn:buidl"}, "model.builder: small_cnn.py has no function 'buidl' (did you mean 'build'?)"),
    ({"builder": "nowhere:build"}, "model.builder: found neither "),
    ({"builder": "small cnn"}, "model.builder: 'small cnn' is not one of chae, timm:NAME, module:function"),
    ({"variants": {"k5": {"set": {"model.conv.stages.0.kernel": 5}}}},
     "variants.k5.model.conv: a knob of the chae builder; 'small_cnn:build' takes its knobs as "
     "variants.k5.model.kwargs.NAME"),
    ({"search": {"space": {"model.kwargs.dpth": [1, 2]}}},
     "search.space.model.kwargs.dpth: not an argument of small_cnn:build (did you mean 'depth'?)"),
])
def test_a_bad_builder_setting_is_one_line_naming_its_path(tmp_path, setting, message):
    args = {k: setting[k] for k in ("builder", "kwargs", "variants") if k in setting}
    path = user_study(tmp_path, **args, **{k: v for k, v in setting.items() if k == "search"})
    with pytest.raises(ConfigError) as error:
        load_study(path)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_chae_takes_no_kwargs():
    with pytest.raises(ConfigError, match="^model.kwargs: unknown key"):
        study_from_dict({"name": "s", "model": {"kwargs": {"width": 3}}}, {})


def test_a_builder_that_raises_is_one_line_naming_the_variant_in_plan(tmp_path):
    study = load_study(user_study(tmp_path, builder="small_cnn:fails", variants={"deep": {"set": {"model.kwargs.depth": 3}}}))
    with pytest.raises(ChaeError, match="^variant deep: builder small_cnn:fails failed at resolution 16: "
                                        "ValueError: depth 3 is not supported$"):
        study_plan(study)


def test_a_variant_may_switch_builder_and_keeps_the_resolution(tmp_path):
    (tmp_path / "small_cnn.py").write_text(SMALL_CNN)
    path = tmp_path / "mixed.yaml"
    path.write_text(json.dumps({"name": "mixed", "model": {"resolution": 16, "transformer": {"dim": 32, "heads": 2}},
                                "variants": {"cnn": {"set": {"model.builder": "small_cnn:build",
                                                             "model.kwargs.width": 4}}}}))
    baseline, cnn = load_study(path).variants
    assert isinstance(baseline.config.model, ModelConfig)
    assert cnn.config.model == OtherModel("small_cnn:build", 16, {"width": 4, "depth": 2}, cnn.config.model.source_sha,
                                          cnn.config.model.source_file)


def test_editing_the_builder_file_makes_new_cells_and_a_stale_process_refuses_to_build(tmp_path):
    path = user_study(tmp_path)
    before = [c.cell_hash for c in load_study(path).cells()]
    assert [c.cell_hash for c in load_study(path).cells()] == before  # the same file: the same cells
    model = load_study(path).baseline.config.model
    (tmp_path / "small_cnn.py").write_text(SMALL_CNN + "\n# a comment is an edit too\n")
    after = load_study(path).cells()
    assert not set(before) & {c.cell_hash for c in after}
    builders._FUNCTIONS.clear()  # a process (a spawned worker) that never loaded the old version
    with pytest.raises(ChaeError, match="small_cnn.py changed since the study was loaded"):
        builders.build(model, 3)
    assert builders.build(after[0].config.model, 3) is not None


timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'chae-ablate[timm]')")


def timm_study(name: str = "resnet10t", kwargs: dict | None = None, variants: dict | None = None):
    return study_from_dict({"name": "t", "data": {"source": "synthetic", "synthetic_classes": 3},
                            "model": {"builder": f"timm:{name}", "resolution": 16,
                                      "kwargs": kwargs or {"channels": [8, 8, 16, 16]}},
                            "variants": variants or {"deeper": {"set": {"model.kwargs.layers": [2, 1, 1, 1]}}}}, {})


def test_a_timm_model_at_tiny_size_plans_and_trains(tmp_path):
    study = timm_study()
    table = study_plan(study).table.set_index("variant")
    for v in study.variants:  # the counts equal timm's own model, built directly on the CPU
        direct = timm.create_model("resnet10t", pretrained=False, num_classes=3, **v.config.model.kwargs)
        assert table.loc[v.name, "params"] == sum(p.numel() for p in direct.parameters())
    assert table.loc["deeper", "mflops"] > table.loc["baseline", "mflops"] > 0
    from chae_ablate.data import load_dataset
    from chae_ablate.train import train_cell
    cell = study.cells()[0]
    data = load_dataset(cell.config.data, 16, tmp_path)
    result = train_cell(config=cell.config, seed=0, data=data, device=torch.device("cpu"))
    assert result.n_params == table.loc["baseline", "params"] and result.best_val_loss > 0


def test_a_vit_gets_the_resolution_as_its_image_size():
    model = timm_study("vit_tiny_patch16_224", kwargs={"depth": 1, "patch_size": 8},
                       variants={"wide": {"set": {"model.kwargs.embed_dim": 96}}}).baseline.config.model
    network = builders.build(model, 3)
    assert network.patch_embed.img_size == (16, 16) and network(torch.zeros(1, 3, 16, 16)).shape == (1, 3)


@pytest.mark.parametrize("kwargs, builder, message", [
    ({"chanels": [8, 8, 8, 8]}, "resnet10t",
     r"^model.kwargs.chanels: not an argument of timm:resnet10t \(did you mean 'channels'\?\) \(accepted: block, layers,"),
    ({"pretrained": True}, "resnet10t", r"^model.kwargs.pretrained: set by chae-ablate \(chae-ablate creates timm models untrained"),
    ({}, "resnet10", r"^model.builder: 'resnet10' is not a timm architecture \(did you mean 'resnet10t'\?\)"),
])
def test_a_bad_timm_setting_is_one_line(kwargs, builder, message):
    with pytest.raises(ConfigError, match=message):
        timm_study(builder, kwargs=kwargs or {"drop_rate": 0.1}, variants={"v": {"set": {"model.resolution": 32}}})


def test_a_builder_beside_the_study_imports_its_neighbours_and_replaces_no_module(tmp_path):
    """Its `import helpers` finds helpers.py beside it; a builder file named like a module already
    imported (here `json`) is run under a name of its own, never in that module's place."""
    (tmp_path / "layers.py").write_text("from torch import nn\n\ndef head(n, k):\n    return nn.Linear(n, k)\n")
    code = "from torch import nn\nimport layers\n\ndef build(num_classes, resolution):\n" \
           "    return nn.Sequential(nn.Flatten(), layers.head(3 * resolution ** 2, num_classes))\n"
    (tmp_path / "json.py").write_text(code)
    study = load_study(user_study(tmp_path, builder="json:build", variants={"r8": {"set": {"model.resolution": 8}}}))
    import sys
    assert sys.modules["json"] is json and json.dumps  # the standard library's json is untouched
    assert builders.build(study.variants[1].config.model, 4)(torch.zeros(1, 3, 8, 8)).shape == (1, 4)


def test_a_run_stops_before_training_when_a_builder_fails(tmp_path, monkeypatch):
    from conftest import chae_here
    path = user_study(tmp_path, builder="small_cnn:fails", variants={"deep": {"set": {"model.kwargs.depth": 3}}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = chae_here("run", str(path), "--no-report")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: variant deep: builder small_cnn:fails failed at resolution 16: ValueError: depth 3 is not supported"]
    assert not (tmp_path / "runs" / "checkpoints").exists()  # nothing trained


def test_the_shipped_studies_of_other_models_plan():
    """examples/own-model (the README's own model) and studies/timm-quickstart.yaml load and plan."""
    own = study_plan(load_study(STUDIES.parent / "examples" / "own-model" / "study.yaml")).table
    assert list(own["variant"]) == ["baseline", "wide", "deep"] and (own["params"] > 0).all()
    resnet = study_plan(load_study(STUDIES / "timm-quickstart.yaml")).table.set_index("variant")
    assert resnet.loc["narrow", "params"] < resnet.loc["baseline", "params"] < resnet.loc["deeper", "params"]
