"""SpeechBrain's recipe consistency rules (``speechbrain_sllm.upstream.checks``): each
rule catches what upstream's CI catches, and this repository's recipes pass them."""

import glob
import os
import shlex

import pytest
import speechbrain as sb
from conftest import ROOT
from hyperpyyaml import load_hyperpyyaml
from test_recipes import HEADER, ROWS

from speechbrain_sllm.upstream import checks, export


def write(path, text):
    """Writes ``text`` to ``path`` (folders created); returns the path as a string."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
    return str(path)


def test_a_key_counts_as_used_only_when_named_by_the_script_or_a_later_ref(tmp_path):
    yaml = write(
        tmp_path / "train.yaml",
        "early: !ref <late>\n"  # a ref before the declaration does not count (upstream)
        "late: 3\n"
        "lr: 0.1\n"
        "seed: 1\n"
        "out: !ref results/<seed>\n"
        "__set: !apply:print [1]\n"
        "model: !new:torch.nn.Linear\n    in_features: 2\n    out_features: 2\n"
        "device: cpu\n",  # a run option
    )
    script = write(tmp_path / "train.py", 'x = hparams["lr"]\ny = self.hparams.model\n')
    assert checks.unused_yaml_keys(yaml, script) == ["early", "late", "out"]
    script = write(tmp_path / "other.py", 'a = hparams.get("late")\nb = hparams["out"]\n')
    assert checks.unused_yaml_keys(yaml, script) == ["early", "lr", "model"]


def test_modules_the_script_uses_must_be_declared_under_modules(tmp_path):
    yaml = write(tmp_path / "train.yaml", "modules:\n    model: !ref <m>\n    enc: null\n")
    script = write(
        tmp_path / "train.py",
        "self.modules.model(x)\nself.modules.adaptor(x)\nself.modules.eval()\n"
        'if hasattr(self.modules, "extra"):\n    self.modules.extra(x)\n',
    )
    assert checks.undeclared_modules(yaml, script) == ["adaptor"]


def test_every_recipe_yaml_must_be_a_csv_row_with_flags(tmp_path):
    recipe = tmp_path / "recipes" / "Data" / "Task"
    write(recipe / "hparams" / "train.yaml", "lr: 1\n")
    write(recipe / "hparams" / "inference.yaml", "lr: 1\n")
    write(recipe / "results" / "kept.yaml", "lr: 1\n")  # upstream's avoid list
    write(recipe / "train.py", '"""Doc."""\n')
    header = "Task,Dataset,Script_file,Hparam_file,Data_prep_file,Readme_file,test_debug_flags\n"
    row = "T,Data,recipes/Data/Task/train.py,recipes/Data/Task/hparams/train.yaml,,README.md,\n"
    write(tmp_path / "tests" / "recipes" / "Data.csv", header + row)
    assert checks.unlisted_recipe_yamls(str(tmp_path)) == [
        "recipes/Data/Task/hparams/inference.yaml"
    ]
    assert checks.recipe_row_problems(str(tmp_path)) == [
        "Data.csv row 0: no test_debug_flags",
        "Data.csv row 0: Readme_file README.md does not exist",
    ]


def test_functions_and_classes_need_a_docstring_by_upstreams_line_rule(tmp_path):
    source = write(
        tmp_path / "lib.py",
        '"""Module."""\n\n\n'
        "def documented(x):\n"
        '    """Yes."""\n\n\n'
        "def bare(x):\n    return x\n\n\n"
        "def _private(x):\n    return x\n\n\n"
        "def spread(\n    x,\n):\n    return x\n\n\n"  # upstream reads one-line defs only
        "class Thing:\n    x = 1\n",
    )
    assert checks.definitions_without_docstring(source) == [
        f"{source}: bare has no docstring",
        f"{source}: class Thing has no docstring",
    ]


@pytest.mark.parametrize(
    "row", list({r["Hparam_file"]: r for r in ROWS}.values()), ids=lambda row: row["Hparam_file"]
)
def test_each_recipe_yaml_passes_upstreams_yaml_vs_script_and_module_checks(row):
    hparam_file = os.path.join(ROOT, row["Hparam_file"])
    script_file = os.path.join(ROOT, row["Script_file"])
    assert checks.unused_yaml_keys(hparam_file, script_file) == []
    assert checks.undeclared_modules(hparam_file, script_file) == []


def test_every_recipe_yaml_is_listed_and_every_row_complete():
    assert checks.unlisted_recipe_yamls(ROOT) == []
    assert checks.recipe_row_problems(ROOT) == []


def test_package_and_recipes_pass_upstreams_docstring_rule():
    sources = glob.glob(os.path.join(ROOT, "speechbrain_sllm", "**", "*.py"), recursive=True)
    sources += glob.glob(os.path.join(ROOT, "recipes", "**", "*.py"), recursive=True)
    problems = []
    for path in sorted(sources):
        if "__" not in os.path.relpath(path, ROOT):  # upstream skips dunder files
            problems += checks.definitions_without_docstring(path)
    assert problems == []


def test_an_included_fragment_is_inlined_with_its_arguments_over_its_defaults(tmp_path):
    write(
        tmp_path / "hparams" / "lora.yaml",
        "# LoRA\n!new:speechbrain_sllm.strategies.LoRASettings\nrank: 8  # r\nalpha: !PLACEHOLDER\n",
    )
    recipe = write(
        tmp_path / "recipe" / "train.yaml",
        "lora: !include:../hparams/lora.yaml\n    alpha: 32\n    dropout: 0.1\nlr: 1\n",
    )
    assert export.inlined_yaml(recipe) == (
        "lora: !new:speechbrain_sllm.strategies.LoRASettings\n"
        "    rank: 8  # r\n    alpha: 32\n    dropout: 0.1\nlr: 1\n"
    )
    write(tmp_path / "recipe" / "bad.yaml", "lora: !include:../hparams/lora.yaml\n    rank: 4\n")
    with pytest.raises(ValueError, match="'lora' leaves \\['alpha'\\]"):
        export.inlined_yaml(str(tmp_path / "recipe" / "bad.yaml"))


RECIPES = sorted({os.path.dirname(os.path.dirname(row["Hparam_file"])) for row in ROWS})


def test_upstream_ready_copies_pass_upstreams_checks_in_a_speechbrain_layout(tmp_path):
    for recipe in RECIPES:
        export.export_recipe(recipe, str(tmp_path), root=ROOT)
    assert checks.yaml_vs_script_problems(str(tmp_path)) == []
    assert checks.recipe_row_problems(str(tmp_path)) == []
    assert checks.unlisted_recipe_yamls(str(tmp_path)) == []
    copied = glob.glob(str(tmp_path / "recipes" / "**" / "*.py"), recursive=True)
    assert {os.path.basename(path) for path in copied} >= {"train.py", "run_study.py"}
    assert all(checks.definitions_without_docstring(path) == [] for path in copied)
    for yaml in glob.glob(str(tmp_path / "recipes" / "**" / "*.yaml"), recursive=True):
        assert "!include" not in open(yaml).read(), yaml
    requirements = tmp_path / RECIPES[0] / "extra_requirements.txt"
    assert requirements.read_text().splitlines()[0] == export.PACKAGE_REQUIREMENT


def test_the_inlined_yaml_builds_what_the_included_one_builds(recipe_fixtures, tmp_path):
    row = next(r for r in ROWS if r["Dataset"] == "VoiceAssistant")
    export.export_recipe(os.path.dirname(os.path.dirname(row["Hparam_file"])), str(tmp_path), ROOT)
    flags = shlex.split(row["test_debug_flags"]) + ["--output_folder=unused", "--lora={rank: 4}"]
    built = []
    for hparam_file in (os.path.join(ROOT, row["Hparam_file"]), tmp_path / row["Hparam_file"]):
        _, _, overrides = sb.parse_arguments([str(hparam_file), *flags])
        cwd = os.getcwd()
        os.chdir(ROOT)  # the row's fixture paths are relative to the repository
        try:
            with open(hparam_file) as handle:
                built.append(load_hyperpyyaml(handle, overrides))
        finally:
            os.chdir(cwd)
    original, copy = built
    for key in ("lora", "layerwise_lr", "fsdp", "evaluation", "training_strategy"):
        assert vars(copy[key]) == vars(original[key]), key
    assert copy["lora"].rank == 4
    for key in ("llm", "encoder", "adaptor"):
        assert type(copy[key]) is type(original[key]), key
        assert [p.shape for p in copy[key].parameters()] == [
            p.shape for p in original[key].parameters()
        ], key
    assert copy["encoder"].window == original["encoder"].window
    assert copy["llm"].config.to_dict() == original["llm"].config.to_dict()


UPSTREAM_PREPARE = '''"""SpeechBrain's own LibriSpeech preparation (stand-in with its signature)."""


def prepare_librispeech(data_folder, save_folder, tr_splits=[], dev_splits=[], te_splits=[],
                        select_n_sentences=None, merge_lst=[], merge_name=None,
                        create_lexicon=False, skip_prep=False):
    """Writes ID, duration, wav, spk_id, wrd CSVs."""
'''


def test_the_upstream_copy_changes_no_file_of_the_checkout(tmp_path, capsys):
    from speechbrain_sllm.upstream.__main__ import main as upstream_main

    recipe = "recipes/LibriSpeech/ASR/speechllm"
    prepare = tmp_path / "recipes" / "LibriSpeech" / "librispeech_prepare.py"
    prepare.parent.mkdir(parents=True)
    prepare.write_text(UPSTREAM_PREPARE)
    readme = tmp_path / recipe / "README.md"
    readme.parent.mkdir(parents=True)
    readme.write_text("an upstream README of the same name\n")
    # another recipe's row whose files this partial checkout lacks
    rows = tmp_path / "tests" / "recipes"
    rows.mkdir(parents=True)
    (rows / "TIMIT.csv").write_text(
        ",".join(HEADER) + "\nASR,TIMIT,recipes/TIMIT/ASR/train.py,recipes/TIMIT/ASR/hparams/a.yaml"
        + ",,,,,--debug,,\n"
    )  # fmt: skip
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(
        export.ExistingFilesError,
        match=r"other versions of \['recipes/LibriSpeech/ASR/speechllm/README.md'\]",
    ):
        export.export_recipe(recipe, str(tmp_path), root=ROOT)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written
    assert upstream_main([recipe, str(tmp_path), "--beside"]) == 1  # TIMIT's files: reported
    out = capsys.readouterr().out
    assert "TIMIT.csv: a row names missing files ['recipes/TIMIT/ASR/train.py'" in out
    assert prepare.read_text() == UPSTREAM_PREPARE  # upstream's preparation, byte-identical
    assert readme.read_text() == "an upstream README of the same name\n"
    assert (tmp_path / (recipe + "/README.md.speechbrain_sllm")).is_file()
    assert (tmp_path / recipe / "train.py").is_file()
    assert "librispeech_prepare.py (kept: upstream's own)" in out
