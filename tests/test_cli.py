"""The CLI as a user drives it: plan, and one clean line for every bad input."""
from __future__ import annotations

from typer.testing import CliRunner

from chae_ablate.cli import app

from conftest import STUDIES

runner = CliRunner()


def test_plan_paper11_lists_12_variants_with_the_paper_params():
    result = runner.invoke(app, ["plan", str(STUDIES / "paper11.yaml")])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    rows = [line for line in lines[1:] if not line.startswith("12 variants")]
    assert len(rows) == 12
    baseline = next(r for r in rows if r.split()[0] == "baseline")
    assert "402,417" in baseline and " 257 " in baseline
    assert "12 cells" in lines[-1]


def test_plan_applies_overrides():
    result = runner.invoke(app, ["plan", str(STUDIES / "paper11.yaml"), "--seeds", "0,1,2",
                                 "--set", "model.resolution=64"])
    assert result.exit_code == 0, result.output
    assert "36 cells" in result.output


def write(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return str(path)


def test_misspelled_key_fails_with_one_line_and_no_traceback(tmp_path):
    study = write(tmp_path, "name: t\nvariants:\n  k5:\n    set: {model.conv.stages.0.kernal: 5}\n")
    result = runner.invoke(app, ["plan", study])
    assert result.exit_code == 1
    assert "variants.k5.model.conv.stages.0.kernal: unknown key (did you mean 'kernel'?)" in result.output
    assert "Traceback" not in result.output


def test_heads_that_do_not_divide_dim_fail_before_training(tmp_path):
    study = write(tmp_path, "name: t\nmodel: {transformer: {heads: 6}}\n")
    for command in ("plan", "run"):
        result = runner.invoke(app, [command, study])
        assert result.exit_code == 1
        assert "model.transformer.heads: 6 does not divide dim 128" in result.output
        assert "Traceback" not in result.output


def test_missing_and_invalid_files(tmp_path):
    result = runner.invoke(app, ["plan", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and "study file not found" in result.output
    result = runner.invoke(app, ["plan", write(tmp_path, "name: [unclosed\n")])
    assert result.exit_code == 1 and "is not valid YAML" in result.output
    result = runner.invoke(app, ["plan", str(STUDIES / "paper11.yaml"), "--seeds", "a,b"])
    assert result.exit_code == 1 and "--seeds 'a,b': expected integers" in result.output


def test_bad_analysis_settings_are_one_line_errors(tmp_path):
    for analysis, message in [("{margin: 0}", "analysis.margin: 0.0 must be > 0"),
                              ("{min_seeds: 6, max_seeds: 3}", "analysis.max_seeds: 3 must be between min_seeds (6)"),
                              ("{metric: val_acc}", "analysis.metric: 'val_acc' is not one of")]:
        result = runner.invoke(app, ["plan", write(tmp_path, f"name: t\nanalysis: {analysis}\n")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_adaptive_plan_shows_the_seed_range():
    result = runner.invoke(app, ["plan", str(STUDIES / "paper11.yaml"), "--set", "analysis.adaptive=true"])
    assert result.exit_code == 0, result.output
    assert "12 variants x seeds = 36 to 120 cells (adaptive seeds)" in result.output
