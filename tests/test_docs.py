"""The README and docs/ as a newcomer reads them: every command shown composes with Hydra (and the
ones a newcomer runs first really run, debug-sized), every path shown exists where the docs say it
is, every link resolves, and measured numbers name their machine and commit."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from omegaconf import OmegaConf

from conftest import CONF, REPO, SMALL_DATA
from mdfnet_hydra.benchmarks.workload import bench_config
from mdfnet_hydra.config import validate_config

README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
DOCS = [README, *PAGES]
HYDRA_ENTRY_POINTS = {"train": "train", "bench": "bench", "evaluate": "evaluate", "prepare": "prepare"}
# commands the docs show that are not the project's: the first words, each with why it is not run here
OTHER_PROGRAMS = {
    "python3 -m venv": "Python's own",
    ".": "the shell's `source`",
    "pip": "installs (tests/test_install.py builds and installs the wheel offline)",
    "python -m pytest": "the test suite itself",
    "tensorboard": "TensorBoard's viewer",
    "optuna-dashboard": "Optuna's web dashboard (not a dependency; docs/sweeps.md says which release was checked)",
    "wget": "PhysioNet downloads (credentialed, online)",
    "unzip": "unpacking the reports download",
    "huggingface-cli": "hub downloads (online)",
    "U=<physionet_user>": "a shell variable",
    ".ci/gpu-check": "needs a GPU (its --dry-run runs in the slow suite: tests/test_slow.py)",
}
# a placeholder the docs write as <...> and a value that composes in its place
PLACEHOLDER_VALUES = {"<k>": "0", "<n>": "1"}


# ---------------------------------------------------------------- reading the docs
def fenced_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(language, content) of each fenced block, also those indented inside a list item."""
    for match in re.finditer(r"(?ms)^( *)```(\w*)\n(.*?)^ *```", text):
        yield match.group(2), textwrap.dedent(match.group(3))


def inline_code(text: str) -> list[str]:
    prose = re.sub(r"(?ms)^ *```.*?^ *```", "", text)
    return re.findall(r"`([^`\n]+)`", prose)


def shell_lines(block: str) -> Iterator[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, `&&` split."""
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                if command:
                    yield shlex.join(command)
                command = []
            else:
                command.append(word)


def shown_commands() -> list[tuple[str, str]]:
    """(page, command) for every command in a shell block and every inline one that runs a program
    (a placeholder such as `<sweep dir>` kept as one word)."""
    found = []
    for page in DOCS:
        text = re.sub(r"<([^<>\n]*)>", lambda m: "<" + m.group(1).replace(" ", "_") + ">", page.read_text())
        for lang, block in fenced_blocks(text):
            if lang in ("bash", "sh", "shell"):
                found += [(page.name, c) for c in shell_lines(block)]
        for span in inline_code(text):
            if re.match(r"(python|torchrun|srun|sbatch) ", span) and "mdfnet_hydra" in span:
                found.append((page.name, span))
    return found


def project_command(command: str) -> tuple[str, list[str]] | None:
    """(entry point, its arguments) when the command runs one of the project's modules: directly,
    through torchrun or srun, or inside `sbatch --wrap`; None for another program."""
    words = shlex.split(command)
    if words[0] == "sbatch":
        wrapped = [w for i, w in enumerate(words) if i and words[i - 1] == "--wrap"]
        return project_command(wrapped[0]) if wrapped else None
    if words[0] == "srun":  # and its own options
        words = words[1:]
        while words and words[0].startswith("-"):
            words = words[1:]
    if words[0] in ("python", "torchrun") and "-m" in words:
        module = words[words.index("-m") + 1]
        if module.startswith("mdfnet_hydra."):
            return module.removeprefix("mdfnet_hydra."), words[words.index("-m") + 2 :]
    return None


def other_program(command: str) -> str | None:
    command = command.strip("'")
    return next((p for p in OTHER_PROGRAMS if command == p or command.startswith(p + " ")), None)


def concrete(argument: str, tmp: Path) -> str:
    """A docs argument with its placeholders filled in: `<k>` a rank, `<dir>`-like names a path
    under tmp, `...` a value, a checkpoint an empty file under tmp."""
    for placeholder, value in PLACEHOLDER_VALUES.items():
        argument = argument.replace(placeholder, value)
    argument = re.sub(r"<([^>]*)>", lambda m: re.sub(r"\W+", "_", m.group(1)).strip("_") or "x", argument)
    key, _, value = argument.partition("=")
    if value == "...":
        return f"{key}={tmp / 'x'}"
    if value.endswith(".pth"):  # a checkpoint to start from: the job checks that the file is there
        checkpoint = tmp / value.lstrip("/")
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.touch()
        return f"{key}={checkpoint}"
    if value.startswith("/") and not value.startswith(str(tmp)):
        return f"{key}={tmp}{value}"
    return argument


# ---------------------------------------------------------------- composing a shown command
def compositions(arguments: list[str]) -> Iterator[list[str]]:
    """The overrides of one shown command, once per value of each sweep in it (`a,b,c`,
    `choice(...)`, `range(...)`; an `interval(...)` at its lower end): a multirun's jobs."""
    parsed = OverridesParser.create().parse_overrides(arguments)
    fixed, sweeps = [], []
    for override, text in zip(parsed, arguments):
        value = override.value()
        if isinstance(value, (ChoiceSweep, RangeSweep)):
            sweeps.append([f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()])
        elif isinstance(value, IntervalSweep):
            fixed.append(f"{override.get_key_element()}={value.start}")
        else:
            fixed.append(text)
    yield [*fixed, *(values[0] for values in sweeps)]
    for i, values in enumerate(sweeps):
        for value in values[1:]:
            yield [*fixed, *(v[0] for j, v in enumerate(sweeps) if j != i), value]


def compose_shown(entry: str, arguments: list[str], tmp: Path) -> int:
    """Compose the command's config as its entry point would and check it as the job would before
    any work. Returns how many configs were composed."""
    flags = [a for a in arguments if a.startswith("-")]
    # a lone `...` stands for "the rest as in the command above": the test composes what is shown
    overrides = [concrete(a, tmp) for a in arguments if not a.startswith("-") and a != "..."]
    assert set(flags) <= {"--multirun", "--cfg", "--resolve", "job"}, f"flags the test does not know: {flags}"
    overrides = [o for o in overrides if o not in ("job",)]
    count = 0
    with initialize_config_dir(config_dir=str(CONF)):
        for job in compositions(overrides):
            cfg = compose(HYDRA_ENTRY_POINTS[entry], overrides=job, return_hydra_config=True)
            assert cfg.hydra.runtime.choices is not None
            task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            if entry == "train":
                validate_config(task)
            elif entry == "bench":
                validate_config(bench_config(task, image_size=224))
            else:
                OmegaConf.to_container(task, resolve=True, throw_on_missing=True)
            count += 1
    return count


COMMANDS = shown_commands()


def test_the_docs_show_commands_and_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200, "the README is the newcomer's page; reference goes in docs/"
    entries = {project_command(c)[0] for _, c in COMMANDS if project_command(c)}
    assert {"train", "evaluate", "summary", "prepare", "bench", "benchmarks.modality_gap"} <= entries


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_shown_command_composes(page, command, tmp_path):
    shown = project_command(command)
    if shown is None:
        assert other_program(command), f"{page} shows a command the docs test does not know: {command}"
        return
    entry, arguments = shown
    if entry == "summary":
        assert len(arguments) == 1  # run for real in test_the_first_hour_runs_as_the_docs_say
    elif entry == "benchmarks.modality_gap":
        from mdfnet_hydra.benchmarks.modality_gap import parse_arguments, sweep_command

        args, overrides = parse_arguments([concrete(a, tmp_path) for a in arguments])
        command = sweep_command(args, overrides, tmp_path / "sweep")
        assert compose_shown("train", command[command.index("mdfnet_hydra.train") + 1 :], tmp_path) >= 4
    elif entry == "benchmarks.sweep_cost":
        from mdfnet_hydra.benchmarks.sweep_cost import parse_arguments, search_command

        args, overrides = parse_arguments([concrete(a, tmp_path) for a in arguments])
        for pruner in ("none", args.pruner):
            command = search_command(args, overrides, tmp_path / "cost", pruner)
            assert compose_shown("train", command[command.index("mdfnet_hydra.train") + 1 :], tmp_path) >= 1
    elif entry == "benchmarks.evaluation_cost":
        from mdfnet_hydra.benchmarks.evaluation_cost import parse_arguments

        parse_arguments([concrete(a, tmp_path) for a in arguments])  # run small in test_stats.py
    else:
        assert entry in HYDRA_ENTRY_POINTS, f"{page}: unknown entry point {entry}"
        assert compose_shown(entry, arguments, tmp_path) >= 1


# ---------------------------------------------------------------- paths and links
def repository_paths() -> list[tuple[str, str]]:
    """Paths into the checkout named in the docs: `conf/...`, `mdfnet_hydra/...`, `tests/...`,
    `.ci/...`, `docs/...`, and images."""
    found = []
    for page in DOCS:
        text = page.read_text()
        for span in inline_code(text) + re.findall(r"\]\(([^)#]+)", text):
            for word in span.split():
                word = word.rstrip(".,:;)")
                if re.match(r"(conf|mdfnet_hydra|tests|\.ci|docs)/[\w./-]*$", word) and "<" not in word:
                    base = page.parent if page.parent.name == "docs" and word.startswith(("images/",)) else REPO
                    found.append((page.name, str((base / word).relative_to(REPO))))
    return found


def test_every_path_into_the_checkout_exists():
    missing = [(page, path) for page, path in repository_paths() if not (REPO / path).exists()]
    assert not missing, missing
    assert len(repository_paths()) > 20


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_link_resolves():
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith("http"):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: link to {target}"
            if anchor:
                headings = re.findall(r"(?m)^#+ (.*)$", linked.read_text())
                assert anchor in {slug(h) for h in headings}, f"{page.name}: no heading for {target}"


def test_the_docs_speak_to_users_and_date_their_numbers():
    for page in DOCS:
        text = page.read_text()
        for phrase in ("next issue", "the issue", "measured here", "TRAINING_GUIDE", "this machine"):
            assert phrase not in text, f"{page.name} says {phrase!r}"
        for match in re.finditer(r"(?i)\b(measured|took|takes)\b[^.]{0,200}", text):
            sentence = match.group(0)
            if re.search(r"\d+(\.\d+)? ?(s|ms|GB|MB|samples/s|minutes)\b", sentence):
                context = text[max(0, match.start() - 400) : match.end() + 400]
                assert re.search(r"commit [0-9a-f]{7}", context) or "2026-" in context, (
                    f"{page.name}: a measured number without its commit: {sentence[:120]}"
                )


# ---------------------------------------------------------------- the first hour, for real
def run(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def tree_entries(block: str) -> list[tuple[str, str]]:
    """(path, description) of each entry of a `tree`-style block, the path joined from its parents."""
    entries, stack = [], []
    for line in block.splitlines():
        match = re.match(r"^([│ ]*)[├└]── (\S+)\s*(.*)$", line)
        if match:
            depth = len(match.group(1)) // 4
            stack[depth:] = [match.group(2).rstrip("/")]
            entries.append(("/".join(stack), match.group(3)))
    return entries


@pytest.mark.slow  # 40 s: several real jobs, end to end
def test_the_first_hour_runs_as_the_docs_say(tmp_path):
    """The README's debug command, the evaluation and the summary it points to, run as shown
    (debug-sized, outputs under a temporary root): every file the docs promise is there."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MDFNET_OUTPUT_ROOT": str(tmp_path / "outputs")}
    quick = [
        *SMALL_DATA,
        "modality=vision_clinical",
        "trainer.checkpoint.every_n_epochs=1",
        "evaluation.saliency_per_label=1",
        "evaluation.n_bootstrap=100",
    ]
    run("-m", "mdfnet_hydra.train", "debug=fast", *quick, cwd=tmp_path, env=env)
    (run_dir,) = (tmp_path / "outputs" / "runs").glob("*/*_vision_clinical_two_stage")
    outputs_page = (REPO / "docs" / "outputs.md").read_text()
    tree = next(b for _, b in fenced_blocks(outputs_page) if "├──" in b)
    promised = tree_entries(tree)
    assert len(promised) >= 12, promised
    for path, description in promised:
        for stage in ("stage1", "stage2"):
            where = run_dir / path.replace("stage1", stage)
            assert where.exists(), f"docs/outputs.md promises {path}"
            listed = re.findall(r"([\w]+\.(?:pth|npz))", description.split(":")[0])
            for name in listed:
                pattern = name.replace("NNN", "[0-9][0-9][0-9]")
                assert list(where.glob(pattern)), f"docs/outputs.md promises {path}/{name}"

    results = tmp_path / "results"
    run(
        "-m",
        "mdfnet_hydra.evaluate",
        f"experiments_dir={run_dir}",
        f"output_dir={results}",
        "evaluation.n_bootstrap=100",
        "evaluation.saliency_per_label=1",
        cwd=tmp_path,
        env=env,
    )
    table = outputs_page.split("What `output_dir` holds:")[1].split("\n\n")[1]
    for name in re.findall(r"^\| `([^`]+)`(?:, `([^`]+)`)? \|", table, flags=re.M):
        for file in filter(None, name):
            pattern = re.sub(r"<[^>]+>", "*", file)
            assert list(results.glob(pattern)), f"docs/outputs.md promises {file} in output_dir"
    for table in results.glob("*.csv"):  # no vision-only run here: comparisons.csv has no rows, but its header
        assert table.read_text().splitlines()[0].startswith("run,"), table.name

    run(
        "-m",
        "mdfnet_hydra.train",
        "--multirun",
        "debug=fast",
        *SMALL_DATA,
        "modality=clinical",
        "stage=stage1",
        "seed=1,2",
        cwd=tmp_path,
        env=env,
    )
    (sweep,) = (tmp_path / "outputs" / "multiruns").glob("*/*")
    run("-m", "mdfnet_hydra.summary", str(sweep), cwd=tmp_path, env=env)
    assert (sweep / "results_summary.csv").read_text().count("\n") == 3

    readme_tree = next(b for _, b in fenced_blocks(README.read_text()) if "├──" in b)
    for path, _ in tree_entries(readme_tree):
        top = path.split("/")[0]
        # sweeps/ and its optuna.db: tests/test_sweeps.py
        assert top == "sweeps" or (tmp_path / "outputs" / top).is_dir(), f"the README promises outputs/{top}"
    assert (run_dir / "evaluation" / "auroc_by_label.png").is_file(), "the README's picture is a run's figure"
