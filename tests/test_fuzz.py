"""Fuzzing `chae-ablate plan FILE` with hostile and mangled study files.

Every input must end in one of two ways: exit 0 with a well-formed plan, or exit 1 with exactly
one line `error: ...` (no traceback), in bounded time and memory. The inputs are hand-written
attacks (billion laughs, merge-key bombs, deep nesting, huge numbers, odd tags, bad bytes, base:
loops) and seeded random mutations of the shipped studies, made on their data (wrong types, huge,
negative and non-finite numbers, unicode, deletions and renames) and on their text (random bytes,
duplicated or broken lines, truncation, stray base: lines). A failure names the case to replay.
"""
from __future__ import annotations

import random
import re
import resource
import signal
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from chae_ablate import plan as plan_module
from chae_ablate.cli import app
from chae_ablate.studyfile import MAX_FILE_BYTES

from conftest import STUDIES

SEED = 20261126
RANDOM_CASES = 300
SECONDS_PER_CASE = 5.0  # asserted; a case is interrupted after twice this
MAX_RSS_GROWTH_MB = 500  # over the whole fuzz run, so no single case can exceed it either
SHIPPED = {p.name: p.read_text() for p in sorted(STUDIES.glob("*.yaml"))}
PLAN_FOOTER = re.compile(r"(\d+) variants x seeds = (\d+|\d+ to \d+) cells( \(adaptive seeds\))?, \d+ epochs each; "
                         r"classes: \d+ \(.*\)")


# --- running one case -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """A function that plans one case and returns what is wrong with the result ('' if nothing).

    Costs are memoised per model config (the real meta-device counts, computed once), so that the
    time goes to the loader under test, not to counting the same FLOPs hundreds of times."""
    patch = pytest.MonkeyPatch()
    patch.setattr(plan_module, "model_cost", _memoised(plan_module.model_cost))
    folder = tmp_path_factory.mktemp("fuzz")
    runner = CliRunner()
    _plan_case(runner, folder, "warm-up", {"case.yaml": SHIPPED["synthetic-tiny.yaml"].encode()})
    start_rss = _peak_rss_mb()

    def run(label: str, files: dict[str, bytes], target: str = "case.yaml", args: tuple = ()) -> str:
        problem = _plan_case(runner, folder, label, files, target, args)
        growth = _peak_rss_mb() - start_rss
        return problem or (f"{label}: peak RSS grew {growth:.0f} MB" if growth > MAX_RSS_GROWTH_MB else "")

    yield run
    patch.undo()


def _memoised(model_cost):
    """model_cost, computed once per model, class count, batch size and optimizer: what it reads of
    a cell's config. The cases mostly mutate other settings (data, seeds, lr), so a cache of whole
    configs would count 113 costs where 65 differ; the variant only names a failure, never cached."""
    costs = {}

    def cost(config, num_classes, *args, **kwargs):
        key = (config.model, num_classes, config.protocol.batch_size, config.protocol.optimizer)
        if key not in costs:
            costs[key] = model_cost(config, num_classes, *args, **kwargs)
        return costs[key]
    return cost


def _plan_case(runner, folder: Path, label: str, files: dict[str, bytes], target: str = "case.yaml",
               args: tuple = ()) -> str:
    """Write the shipped studies, then `files` over them, into `folder`; plan `target`; check it."""
    for name, text in SHIPPED.items():
        (folder / name).write_text(text)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    handler = signal.signal(signal.SIGALRM, _timeout)
    signal.setitimer(signal.ITIMER_REAL, 2 * SECONDS_PER_CASE)
    start = time.perf_counter()
    try:
        result = runner.invoke(app, ["plan", str(folder / target), *args])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)
    seconds = time.perf_counter() - start
    problem = _check(result)
    if not problem and seconds > SECONDS_PER_CASE:
        problem = f"took {seconds:.1f} s"
    if not problem:
        return ""
    kept = folder.parent / f"failed-{re.sub(r'[^A-Za-z0-9_-]', '_', label)}"
    kept.write_bytes(next(iter(files.values()), b""))  # the mutated file, to replay by hand
    return f"{label}: {problem} (input kept in {kept})"


def _timeout(signum, frame):
    raise TimeoutError(f"no result after {2 * SECONDS_PER_CASE} s")


def _check(result) -> str:
    """'' for a well-formed plan or a one-line error; otherwise what is wrong."""
    out = result.output
    lines = out.splitlines()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"raised {type(result.exception).__name__}: {str(result.exception)[:200]}"
    if "Traceback" in out:
        return "printed a traceback"
    if result.exit_code == 1:
        if len(lines) != 1 or not lines[0].startswith("error: ") or len(lines[0]) > 1000:
            return f"expected one short 'error:' line, got {len(lines)} lines: {out[:300]!r}"
        return ""
    if result.exit_code == 0:
        footer = PLAN_FOOTER.fullmatch(lines[-1]) if lines else None
        if not footer or not lines[0].lstrip().startswith("variant") or len(lines) != int(footer[1]) + 2:
            return f"exit 0 without a well-formed plan: {out[:300]!r}"
        return ""
    return f"exit code {result.exit_code}: {out[:300]!r}"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# --- hand-written attacks -----------------------------------------------------------------------

def _laughs(levels: int) -> str:
    """A flow list whose items define anchors l0..l{levels-1}, each ten aliases of the previous."""
    items = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


BOMB = _laughs(10)  # 10**10 values once expanded
MERGE_BOMB = "{m0: &m0 {x: 1}, " + ", ".join(f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}]}}" for i in range(1, 30)) + "}"
TINY = SHIPPED["synthetic-tiny.yaml"]

ATTACKS = {
    "laughs-in-description": f"name: x\ndescription: {BOMB}\n",
    "laughs-as-resolution": f"name: x\nmodel: {{resolution: {BOMB}}}\n",
    "laughs-as-source": f"name: x\ndata: {{source: {_laughs(5)}}}\n",  # 10**5: under the guard, repr'd short
    "laughs-as-variant-set": f"name: x\nvariants: {{v: {{set: {{model.transformer.mlp_hidden: {_laughs(5)}}}}}}}\n",
    "laughs-as-key": f"name: x\nvariants: {{v: {{set: {{model.x: 1}}, ? {_laughs(5)} : 1}}}}\n",
    "laughs-as-seeds": f"name: x\nprotocol: {{seeds: {_laughs(5)}}}\n",
    "merge-key-bomb": f"name: x\ndescription: {MERGE_BOMB}\n",
    "recursive-alias": "name: x\ndescription: &a [*a]\n",
    "recursive-mapping": "name: x\nmodel: &a {conv: *a}\n",
    "deep-flow-list": "name: x\ndescription: " + "[" * 5000 + "]" * 5000 + "\n",
    "deep-block-mapping": "name: x\nmodel:\n" + "".join("  " * i + f"  k{i}:\n" for i in range(300)),
    "deep-but-legal": "name: x\ndescription: " + "[" * 60 + "]" * 60 + "\n",
    "int-5000-digits": "name: x\nmodel: {resolution: " + "9" * 5000 + "}\n",
    "int-4000-digits": "name: x\nmodel: {resolution: -" + "9" * 4000 + "}\n",
    "int-4000-digit-seed": "name: x\nprotocol: {seeds: [" + "9" * 4000 + "]}\n",
    "int-4000-digit-key": "name: x\nvariants: {" + "9" * 4000 + ": {set: {model.transformer.depth: 3}}}\n",
    "float-overflow": "name: x\nprotocol: {lr: 1e999}\n",
    "nan-lr": "name: x\nprotocol: {lr: .nan}\n",
    "inf-dropout": "name: x\nmodel: {transformer: {mlp_dropout: -.inf}}\n",
    "huge-dim-bad-heads": "name: x\nmodel: {transformer: {dim: 1000000000000, heads: 7}}\n",
    "max-everything": "name: x\nmodel: {resolution: 2048, conv: {stages: [{channels: 4096, kernel: 31, layers: 16, pool: none}]},"
                      " transformer: {depth: 64, dim: 4096, heads: 4096, mlp_hidden: [16384, 16384]}}\n",
    "seed-2**63": "name: x\nprotocol: {seeds: [9223372036854775808]}\n",
    "10001-seeds": "name: x\nprotocol: {seeds: [" + ", ".join(map(str, range(10001))) + "]}\n",
    "dup-seeds": "name: x\nprotocol: {seeds: [" + ", ".join(["1"] * 10000) + "]}\n",
    "bad-date": "name: x\ndescription: 2024-13-45\n",
    "date-as-int": "name: x\nmodel: {resolution: 2024-01-01}\n",
    "tag-int-abc": "name: x\nmodel: {resolution: !!int abc}\n",
    "tag-int-empty": "name: x\nmodel: {resolution: !!int ''}\n",
    "tag-float-empty": "name: x\nprotocol: {lr: !!float ''}\n",
    "tag-bool-junk": "name: x\nmodel: {resolution: !!bool maybe}\n",
    "tag-int-sexagesimal": "name: x\nmodel: {resolution: !!int '1:x'}\n",
    "tag-timestamp-junk": "name: x\ndescription: !!timestamp 2024-99-99\n",
    "tag-binary-junk": "name: x\ndescription: !!binary '###'\n",
    "tag-binary": "name: x\ndata: {root: !!binary aGVsbG8=, source: folder}\n",
    "tag-set": "name: x\nmodel: !!set {a, b}\n",
    "tag-omap-bad": "name: x\nmodel: !!omap [1, 2]\n",
    "tag-python": "name: x\nmodel: !!python/object/apply:os.system [echo hi]\n",
    "tag-unknown": "name: x\nmodel: !custom {}\n",
    "dup-key": "name: x\nprotocol:\n  epochs: 1\n  epochs: 2\n",
    "dup-merge-key": "name: x\nmodel: {transformer: &a {depth: 3}, conv: {<<: *a, <<: *a}}\n",
    "merge-key": "name: x\nvariants: {a: {set: &s {model.transformer.depth: 3}}, b: {set: {<<: *s, model.resolution: 64}}}\n",
    "merge-key-not-mapping": "name: x\nmodel: {<<: 3}\n",
    "complex-key": "name: x\n? [a, b]\n: 1\n",
    "null-key": "name: x\n~: 1\n",
    "int-study-name": "name: 12\n",
    "name-dotdot": "name: ..\n",
    "name-slash": "name: a/b\n",
    "name-long": "name: " + "a" * 200 + "\n",
    "name-newline": 'name: "a\\nb"\n',
    "variant-name-newline": 'name: x\nvariants: {"a\\u2028b": {set: {model.transformer.depth: 3}}}\n',
    "path-newline": 'name: x\nvariants: {a: {set: {"model.\\ntransformer.depth": 3}}}\n',
    "path-many-parts": "name: x\nvariants: {a: {set: {? model." + ".".join(["x"] * 100000) + " : 1}}}\n",
    "path-superscript-index": 'name: x\nvariants: {a: {set: {"model.conv.stages.\\u00b2.kernel": 5}}}\n',
    "path-huge-index": "name: x\nvariants: {a: {set: {? model.conv.stages." + "9" * 5000 + ".kernel : 5}}}\n",
    "path-empty-parts": "name: x\nvariants: {a: {set: {model..transformer...depth: 3}}}\n",
    "path-not-str": "name: x\nvariants: {a: {set: {3: 1}}}\n",
    "overlapping-set": "name: x\nvariants: {a: {set: {model.transformer: {depth: !!binary aGk=}, model.transformer.depth: 3}}}\n",
    "one-and-quoted-one": "name: x\nvariants: {1: {set: {model.transformer.depth: 3}}, '1': {set: {model.transformer.depth: 1}}}\n",
    "1000-variants": "name: x\nvariants:\n" + "".join(f"  v{i}: {{set: {{protocol.lr: {i + 1}.0e-5}}}}\n" for i in range(1000)),
    "long-root": "name: x\ndata: {source: folder, root: " + "a" * 300 + "}\n",
    "root-nul": 'name: x\ndata: {source: folder, root: "a\\0b"}\n',
    "root-newline": 'name: x\ndata: {source: folder, root: "a\\nb"}\n',
    "lr-as-text": "name: x\nprotocol: {lr: 1e-3}\n",
    "lr-long-number-text": "name: x\nprotocol: {lr: '" + "1" * 3000 + "e-3'}\n",
    "long-pool-text": "name: x\nmodel: {conv: {stages: [{pool: " + "z" * 500000 + "}]}}\n",
    "data-augment": "name: x\ndata: {augment: {copies: 1}}\n",
    "empty-file": "",
    "only-comment": "# nothing here\n",
    "a-list": "- name: x\n",
    "a-scalar": "just text\n",
    "two-documents": "name: x\n---\nname: y\n",
    "tabs": "name: x\nmodel:\n\tresolution: 32\n",
    "bom": "\ufeffname: x\n",
    "control-chars": "name: x\ndescription: a\x07b\x1b[31m\n",
    "nul-byte": "name: x\x00\n",
    "unicode-everywhere": "name: x\ndescription: \u202eevil \U0001F600 \u0000\n",
    "base-self": "base: case.yaml\nname: x\n",
    "base-missing": "base: missing.yaml\nname: x\n",
    "base-folder": "base: .\nname: x\n",
    "base-parent-folder": "base: ..\nname: x\n",
    "base-empty": "base: ''\nname: x\n",
    "base-nul": 'base: "a\\0b"\nname: x\n',
    "base-newline": 'base: "a\\nb.yaml"\nname: x\n',
    "base-long": "base: " + "a" * 5000 + "\nname: x\n",
    "base-dev-null": "base: /dev/null\nname: x\n",
    "base-dev-zero": "base: /dev/zero\nname: x\n",
    "base-list": "base: [paper11.yaml]\nname: x\n",
    "base-paper11": "base: paper11.yaml\nname: x\nvariants: {res384: null, depth3: null, kernel5: null}\n",
    "base-drops-all": "base: paper11.yaml\nname: x\nvariants: {" + ", ".join(
        f"{v}: null" for v in yaml.safe_load(SHIPPED["paper11.yaml"])["variants"]) + "}\n",
    "tiny-identical-variant": TINY.replace("depth: 1", "depth: 2", 1),
}
ATTACK_BYTES = {
    "latin-1": "name: x\ndescription: caf\xe9\n".encode("latin-1"),
    "utf-16": "name: x\n".encode("utf-16"),
    "binary-junk": bytes(range(256)) * 4,
    "just-over-the-size-limit": b"name: x\ndescription: |\n  " + b"a" * MAX_FILE_BYTES + b"\n",
    "flat-list-at-the-size-limit": b"name: x\ndescription: [" + b",".join([b"1"] * (MAX_FILE_BYTES // 2 - 20)) + b"]\n",
}
SET_ATTACKS = {
    "set-laughs": ("synthetic-tiny.yaml", ["--set", f"model.resolution={BOMB}"]),
    "set-deep": ("synthetic-tiny.yaml", ["--set", "model.resolution=" + "[" * 3000]),
    "set-5000-digits": ("synthetic-tiny.yaml", ["--set", "model.resolution=" + "9" * 5000]),
    "set-not-utf8": ("synthetic-tiny.yaml", ["--set", "data.root=\udc80\udcfe"]),
    "set-surrogate-key": ("synthetic-tiny.yaml", ["--set", "data.\udcff=1"]),
    "set-no-equals": ("synthetic-tiny.yaml", ["--set", "model.resolution\n"]),
    "set-index-out": ("paper11.yaml", ["--set", "model.conv.stages.9.kernel=5"]),
    "set-identical": ("synthetic-tiny.yaml", ["--set", "model.transformer.depth=2"]),
}


@pytest.mark.parametrize("label", ATTACKS)
def test_attacks_end_in_a_plan_or_one_error_line(fuzz, label):
    assert fuzz(label, {"case.yaml": ATTACKS[label].encode("utf-8", "surrogatepass")}) == ""


@pytest.mark.parametrize("label", ATTACK_BYTES)
def test_bad_bytes_end_in_one_error_line(fuzz, label):
    assert fuzz(label, {"case.yaml": ATTACK_BYTES[label]}) == ""


@pytest.mark.parametrize("label", SET_ATTACKS)
def test_set_overrides_end_in_a_plan_or_one_error_line(fuzz, label):
    target, args = SET_ATTACKS[label]
    assert fuzz(label, {}, target, tuple(args)) == ""


def test_base_cycles_are_one_error_line(fuzz):
    cycle = {"a.yaml": b"base: b.yaml\nname: a\n", "b.yaml": b"base: c.yaml\nname: b\n", "c.yaml": b"base: a.yaml\nname: c\n"}
    assert fuzz("a->b->c->a", cycle, "a.yaml") == ""
    chain = {f"s{i}.yaml": f"base: s{i + 1}.yaml\nname: s{i}\n".encode() for i in range(40)}
    assert fuzz("40-deep-base-chain", chain, "s0.yaml") == ""


# --- seeded random mutations of the shipped studies ---------------------------------------------

def random_text(rng: random.Random) -> str:
    """Unicode that YAML can carry: letters, emoji, right-to-left and zero-width marks, line
    separators, control characters, quotes and YAML syntax."""
    pools = ["abcXYZ019_-.", "äöüßéçñ", "\u05d0\u05d1\u0627\u202e\u200b\u200d\ufeff", "\U0001F600\U0001F4A9",
             "\u2028\u2029\x85\n\r\t\x00\x07\x1b", "'\"{}[]:,&*!|>%@`#?-"]
    length = rng.choice([0, 1, 5, 40, 300, 5000])
    return "".join(rng.choice(rng.choice(pools)) for _ in range(length))


def random_value(rng: random.Random):
    """A value of the wrong type, size or sign for most settings."""
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice([None, True, False, "", [], {}, 0, -1, 1, 2, 3, 1.5, -0.0, 0.5, 0.999])
    if kind == 1:
        return rng.choice([1, -1]) * 10 ** rng.choice([3, 9, 18, 19, 40, 300])
    if kind == 2:
        return rng.choice([float("nan"), float("inf"), float("-inf"), 1e308, 5e-324, -1e-9])
    if kind == 3:
        return random_text(rng)
    if kind == 4:
        value = rng.choice([1, "x", None])
        for _ in range(rng.choice([1, 2, 10, 70, 200])):
            value = [value] if rng.random() < 0.5 else {"a": value}
        return value
    if kind == 5:
        return [rng.randint(-3, 300) for _ in range(rng.choice([1, 2, 9, 100, 20000]))]
    if kind == 6:  # strings that look like something else
        return rng.choice(["1e-3", "2024-01-01", "0x10", "1_000", "~", "yes", ".nan", "16", "max", "gelu", "folder"])
    return {random_text(rng)[:20] or "k": random_value(rng)}


def _paths(node, prefix=()):
    """Every (container, key) pair in nested data, as paths of keys/indices."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


PATH_PARTS = ["model", "conv", "stages", "0", "3", "9", "00", "-1", "kernel", "channels", "pool", "transformer",
              "depth", "heads", "dim", "mlp_hidden", "resolution", "protocol", "seeds", "augment", "zoom", "data",
              "root", "source", "", "x", "\u00b2"]


def random_setting(rng: random.Random, data: dict) -> None:
    """A new `set:` entry in a random variant: a dotted path of schema words, indices and junk."""
    variants = data.get("variants")
    if isinstance(variants, dict) and variants:
        spec = variants[rng.choice(list(variants))]
        if isinstance(spec, dict) and isinstance(spec.get("set"), dict):
            path = ".".join(rng.choice(PATH_PARTS) for _ in range(rng.randint(1, 6)))
            spec["set"][path] = rng.choice([random_value(rng), rng.randint(-2, 9), rng.choice([[], [1], [{}]])])


def mutate_data(rng: random.Random, data: dict) -> str:
    """One or a few random edits of the parsed study, dumped back to YAML."""
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if rng.random() < 0.2:
            random_setting(rng, data)
            continue
        paths = list(_paths(data))
        if not paths:
            break
        path = rng.choice(paths)
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key, op = path[-1], rng.randrange(5)
        if op <= 1 or not isinstance(parent, dict):
            parent[key] = random_value(rng)
        elif op == 2:
            del parent[key]
        elif op == 3:  # a typo or a different type of key
            new = rng.choice([str(key)[:-1], str(key) + "s", str(key).upper(), str(key).replace(".", ".."),
                              random_text(rng)[:30], 7, None, True, 1.5])
            parent[new] = parent.pop(key)
        else:
            parent[key] = rng.choice([v for v in parent.values()])  # another value of the same mapping
    return yaml.safe_dump(data, allow_unicode=rng.random() < 0.5, sort_keys=rng.random() < 0.3,
                          default_flow_style=rng.choice([None, True, False]), width=rng.choice([80, 10**6]))


JUNK_LINES = ["  <<: *nope", "&a", "*a", "? [a, b]\n: 1", "- x", "key: [unclosed", "\tkey: 1", "%YAML 1.1",
              "---", "...", "x: !!python/object/apply:os.system [ls]", "x: !!binary ###", "x: !!int x",
              "model: {resolution: 1e-3}", "variants: {a: {set: {model.conv.stages.99: 1}}}", "  :", "'",
              "base: paper11.yaml", "base: case.yaml", "base: missing.yaml", "name: ..", "name: a/b",
              f"description: {_laughs(9)}", f"laughs: {_laughs(4)}", "model: " + "[" * 80 + "]" * 80]
NUMBERS = re.compile(r"(?<![\w.])\d+(\.\d+)?(e-?\d+)?(?![\w.])")
NUMBER_SWAPS = [".nan", ".inf", "-.inf", "-1", "0", "9" * 30, "9" * 5000, "1e-3", "0x1F", "0o17", "1_0",
                "2024-02-30", "1:30", "3.0", "true", "~", "[]", "{}"]


def mutate_text(rng: random.Random, text: str) -> bytes:
    """One random edit of the study's text (bytes, since some edits are not valid UTF-8)."""
    lines, op = text.splitlines(), rng.randrange(9)
    at = rng.randrange(len(lines) + 1)
    if op == 0:
        lines.insert(at, rng.choice(JUNK_LINES))
    elif op == 1 and lines:
        lines.insert(at, lines[min(at, len(lines) - 1)])  # a duplicated line: often a duplicate key
    elif op == 2 and lines:
        del lines[min(at, len(lines) - 1): min(at, len(lines) - 1) + rng.choice([1, 3, 10])]
    elif op == 3:
        matches = list(NUMBERS.finditer(text))
        if matches:
            m = rng.choice(matches)
            return (text[: m.start()] + rng.choice(NUMBER_SWAPS) + text[m.end():]).encode()
    elif op == 4:
        return text.encode()[: rng.randrange(len(text) + 1)]
    elif op == 5:
        data = bytearray(text.encode())
        for _ in range(rng.choice([1, 3, 20])):
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        return bytes(data)
    elif op == 6 and lines:
        i = min(at, len(lines) - 1)
        lines[i] = rng.choice(["", "  ", "\t", " " * 7]) + lines[i]  # broken indentation
    elif op == 7:
        lines.insert(0, "base: " + rng.choice(["case.yaml", "missing.yaml", "paper11.yaml", ".", "..", "''",
                                                "quickstart.yaml", "/", "a" * 300]))
    else:
        lines.insert(at, f"{random_text(rng)[:40]}: {random_text(rng)[:40]}")
    return "\n".join(lines).encode("utf-8", "surrogatepass")


def random_case(rng: random.Random, index: int) -> tuple[str, dict[str, bytes], str]:
    """(label, files, target): a mutated shipped study, sometimes written over paper11.yaml so that
    quickstart.yaml (whose base it is) meets it through base:."""
    name = rng.choice(sorted(SHIPPED))
    by_data = rng.random() < 0.5
    if by_data:
        data = mutate_data(rng, yaml.safe_load(SHIPPED[name])).encode("utf-8", "surrogatepass")
    else:
        data = mutate_text(rng, SHIPPED[name])
    label = f"random-{index}-{name}-{'data' if by_data else 'text'}"
    if name == "paper11.yaml" and rng.random() < 0.3:
        return label + "-as-base", {"paper11.yaml": data}, "quickstart.yaml"
    return label, {"case.yaml": data}, "case.yaml"


def test_random_mutations_of_the_shipped_studies(fuzz):
    rng = random.Random(SEED)
    failures = [problem for i in range(RANDOM_CASES) if (problem := fuzz(*random_case(rng, i)))]
    assert not failures, f"{len(failures)} of {RANDOM_CASES} cases failed (seed {SEED}):\n" + "\n".join(failures)
