"""Every ``bnnconvert ...`` command the documentation shows runs as written.

Where the commands come from (one test per source, the commands of a source in order):

- the examples of ``bnnconvert --help`` (the workflow) and of ``bnnconvert COMMAND --help``
  for every registered command (the click ``epilog``; a new command is picked up);
- README.md and docs/*.md: the lines of their shell code blocks (```bash, ```sh,
  ```console or no language) that start with ``bnnconvert``, backslash continuations
  joined, a trailing ``# comment`` dropped.

How they run: in-process through click's CliRunner, each source in a fresh empty folder
(a fresh clone knows no file but the package's bundled data), with:

1. the files of the workflow (``det.pt``, ``saliency.pt``, ``bayes.pt``, ``trained.pt``,
   ``metrics.json``): every reference page assumes the reader ran it. Other files must be
   written by a command of the same source; a command naming a file that a later command
   writes runs after that command;
2. small budgets (:func:`budget`): the options of :data:`BUDGET` capped, whether written
   or left at a larger default (``--epochs`` and ``--pretrain-epochs`` 1, ``--samples``
   and ``--batches`` 2), the batch of ``--input-shape`` at most 2 (FLOPs scale with it),
   ``demo`` with ``--quick`` instead of its default or ``--full`` budget, and
   ``demo:digits`` / ``demo:nuclei`` / ``demo:ood`` reading a stratified slice of the
   bundled data (:func:`tiny_demo_data`: 6 digits per class for training, 3 per class for
   validation and test, 30 photographs, 10/2/2 nuclei tiles);
3. a line naming a file only the reader has (their own data or checkpoint: listed in
   :data:`USER_FILES` with the reason, and written by no command of the same source) is
   not run, and in the docs it says so in a trailing comment that starts with ``# your``
   (checked); lines that need hardware this machine lacks (:func:`unmet_need`) are not
   run either. Each skipped line is printed by the test, none is dropped silently;
4. a command line already run, with the same budgeted arguments, on input files with the
   same bytes (the pages repeat the ``--help`` examples) is not run again: its output
   files are copied from that run. Commands are deterministic, so this changes nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import bnnconvert.data
from bnnconvert.cli import main

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
WORKFLOW = "bnnconvert --help"
WORKFLOW_FILES = ("det.pt", "saliency.pt", "bayes.pt", "trained.pt", "metrics.json")

USER_FILES = {
    "chestmnist.npz": "a MedMNIST file the reader downloads (medmnist.com); demo:digits "
    "is a bundled file of the same format",
    "weights.pt": "the reader's own state_dict checkpoint, of the architecture --arch builds",
    "unet_bayes.pt": "the reader's converted segmentation UNet",
    "nuclei/": "the reader's segmentation folder of images/ and masks/",
}
"""Files only the reader has: a command naming one is not run (its line says ``# your``)."""

SHELL_LANGUAGES = ("bash", "sh", "shell", "console", "")
FILE_TOKEN = re.compile(r"^[\w.\-/]+(\.(pt|npz|json|ckpt|csv|npy|png|md|nii|nii\.gz)|/)$")
OUTPUT_FLAGS = ("-o", "--output", "--out", "--plots", "--json")
BUDGET = {"--epochs": 1, "--pretrain-epochs": 1, "--samples": 2, "--batches": 2}
"""Flag -> the most a command may ask for in this test (written or by default)."""
SHAPE_BATCH = 2
"""The largest batch of ``--input-shape``."""


@dataclass
class Command:
    """One documented command line."""

    source: str
    text: str  # as written, continuations joined, with its comment
    argv: list[str] = field(init=False)  # after "bnnconvert", without the comment
    inputs: list[str] = field(init=False)
    outputs: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.argv = shlex.split(self.text, comments=True)[1:]
        self.outputs = [
            value
            for flag, value in zip(self.argv, self.argv[1:])
            if flag in OUTPUT_FLAGS and FILE_TOKEN.match(value)
        ]
        self.inputs = [
            token
            for token in self.argv
            if FILE_TOKEN.match(token) and not token.startswith("-") and token not in self.outputs
        ]

    @property
    def comment(self) -> str:
        """The trailing ``# ...`` comment of the line ("" if none)."""
        match = re.search(r"\s#\s*(.*)$", self.text)
        return match.group(1).strip() if match else ""


# --------------------------------------------------------------------------- extraction
def command_lines(text: str) -> list[str]:
    """The ``bnnconvert ...`` lines of a shell text, backslash continuations joined."""
    joined, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        current = f"{current} {line}" if current else line
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        if current.startswith("$ "):
            current = current[2:]
        if current == "bnnconvert" or current.startswith("bnnconvert "):
            joined.append(current)
        current = ""
    return joined


def shell_blocks(markdown: str) -> list[str]:
    """The texts of the fenced code blocks of :data:`SHELL_LANGUAGES`."""
    blocks, language, lines = [], None, []
    for line in markdown.splitlines():
        fence = line.strip().startswith("```")
        if fence and language is None:  # an opening fence
            language, lines = line.strip()[3:].strip(), []
        elif fence:
            if language in SHELL_LANGUAGES:
                blocks.append("\n".join(lines))
            language = None
        elif language is not None:
            lines.append(line)
    return blocks


def page_commands(path: Path) -> list[str]:
    """The commands of the shell code blocks of a markdown page."""
    blocks = shell_blocks(path.read_text(encoding="utf-8"))
    return [line for block in blocks for line in command_lines(block)]


def epilog_sources() -> dict[str, list[str]]:
    """{"bnnconvert [COMMAND] --help": its example commands}, the workflow first."""
    ctx = click.Context(main, info_name="bnnconvert")
    sources = {WORKFLOW: command_lines(main.epilog or "")}
    for name in main.list_commands(ctx):
        epilog = main.get_command(ctx, name).epilog or ""
        sources[f"bnnconvert {name} --help"] = command_lines(epilog)
    return sources


def all_sources() -> dict[str, list[Command]]:
    texts = epilog_sources()
    texts.update({path.relative_to(ROOT).as_posix(): page_commands(path) for path in PAGES})
    return {name: [Command(name, line) for line in lines] for name, lines in texts.items()}


SOURCES = all_sources()


# --------------------------------------------------------------------------- the rules
def _defaults(name: str) -> dict[str, object]:
    """{flag: default} of the options of command ``name`` ({} for an unknown command)."""
    command = main.get_command(click.Context(main, info_name="bnnconvert"), name)
    params = command.params if command is not None else []
    return {flag: p.default for p in params if isinstance(p, click.Option) for flag in p.opts}


def budget(argv: list[str]) -> list[str]:
    """``argv`` on a small budget (rule 2 of the module docstring)."""
    out = list(argv)
    for i, (flag, value) in enumerate(itertools.pairwise(argv)):
        if flag in BUDGET and value.isdigit():
            out[i + 1] = str(min(int(value), BUDGET[flag]))
        if flag == "--input-shape":
            batch, *rest = value.split(",")
            out[i + 1] = ",".join([str(min(int(batch), SHAPE_BATCH)), *rest])
    defaults = _defaults(argv[0]) if argv else {}
    for flag, cap in BUDGET.items():
        default = defaults.get(flag)
        if flag not in argv and isinstance(default, int) and default > cap:
            out += [flag, str(cap)]
    if out[:1] == ["demo"]:
        out = [a for a in out if a != "--full"]
        out += [] if "--quick" in out else ["--quick"]
    return out


def unmet_need(argv: list[str]) -> str | None:
    """Why this machine cannot run ``argv`` as written (GPUs), or None."""
    device = argv[argv.index("--device") + 1] if "--device" in argv else "auto"
    nproc = int(argv[argv.index("--nproc") + 1]) if "--nproc" in argv else 1
    if device.startswith("cuda"):
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < nproc:
            return f"needs {nproc} CUDA GPU(s), this machine has {gpus}"
    return None


def user_files(command: Command) -> list[str]:
    """The files of :data:`USER_FILES` that ``command`` reads and no command of its source
    writes."""
    written = {f for c in SOURCES[command.source] for f in c.outputs}
    return [f for f in command.inputs if f in USER_FILES and f not in written]


def _digest(path: Path) -> str:
    """The bytes of a file, or of every file under a folder with their names."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    hasher = hashlib.sha1()
    for file in files:
        hasher.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        hasher.update(file.read_bytes())
    return hasher.hexdigest()


DONE: dict[tuple, Path] = {}
"""(budgeted argv, input digests) -> the folder where that command ran (rule 4)."""


def _copy_outputs(command: Command, source: Path) -> None:
    for output in command.outputs:
        if (source / output).is_dir():
            shutil.copytree(source / output, output, dirs_exist_ok=True)
        else:
            shutil.copy(source / output, output)


def tiny_demo_data(root: Path) -> Path:
    """A copy of the bundled data folder with a stratified slice of each set."""
    src = bnnconvert.data.DEMO_DIR
    digits = np.load(src / "digits.npz")
    arrays = {}
    for split, per_class in (("train", 6), ("val", 3), ("test", 3)):
        labels = digits[f"{split}_labels"][:, 0]
        keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
        arrays[f"{split}_images"] = digits[f"{split}_images"][keep]
        arrays[f"{split}_labels"] = digits[f"{split}_labels"][keep]
    np.savez(root / "digits.npz", **arrays)
    ood = np.load(src / "ood_patches.npz")
    np.savez(
        root / "ood_patches.npz",
        test_images=ood["test_images"][:30],
        test_labels=ood["test_labels"][:30],
        label_names=ood["label_names"],
    )
    for split, tiles in (("train", 10), ("val", 2), ("test", 2)):
        for kind in ("images", "masks"):
            (root / "nuclei" / split / kind).mkdir(parents=True)
        for image in sorted((src / "nuclei" / split / "images").iterdir())[:tiles]:
            for kind in ("images", "masks"):
                shutil.copy(
                    src / "nuclei" / split / kind / image.name, root / "nuclei" / split / kind
                )
    return root


# --------------------------------------------------------------------------- running
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return tiny_demo_data(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture
def small_demo(tiny_data, monkeypatch) -> None:
    monkeypatch.setattr(bnnconvert.data, "DEMO_DIR", tiny_data)


def run_source(name: str, folder: Path, monkeypatch) -> list[str]:
    """Run the commands of source ``name`` in ``folder`` (see the module docstring);
    returns the lines not run, each with the reason."""
    skipped, pending = [], []
    for command in SOURCES[name]:
        reason = unmet_need(command.argv)
        if user_files(command):
            reason = "names the reader's " + ", ".join(user_files(command))
        if reason:
            skipped.append(f"{command.text}  [{reason}]")
        else:
            pending.append(command)
    monkeypatch.chdir(folder)
    while pending:
        ready = next((c for c in pending if all(Path(f).exists() for f in c.inputs)), None)
        if ready is None:
            missing = sorted({f for c in pending for f in c.inputs if not Path(f).exists()})
            pytest.fail(
                f"{name}: {pending[0].text!r} names {missing}, which no command of {name} "
                "writes: use demo:digits (or write the file first), or, for a file only the "
                "reader has, end the line with '# your ...' and add it to USER_FILES"
            )
        pending.remove(ready)
        argv = budget(ready.argv)
        key = (tuple(argv), tuple(_digest(Path(f)) for f in ready.inputs))
        if key in DONE:
            _copy_outputs(ready, DONE[key])
            continue
        result = CliRunner().invoke(main, ["--no-progress", *argv])
        assert result.exit_code == 0, (
            f"{name}: `{ready.text}` (run as `bnnconvert {' '.join(argv)}`) failed:\n"
            f"{result.output[-3000:]}"
        )
        DONE[key] = folder
        for output in ready.outputs:
            assert Path(output).exists(), f"{name}: `{ready.text}` did not write {output}"
    return skipped


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, tiny_data) -> tuple[Path, list[str]]:
    """The folder where the workflow of ``bnnconvert --help`` ran, and its skipped lines."""
    folder = tmp_path_factory.mktemp("workflow")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(bnnconvert.data, "DEMO_DIR", tiny_data)
        skipped = run_source(WORKFLOW, folder, monkeypatch)
    return folder, skipped


def test_the_workflow_writes_the_files_the_other_examples_use(workflow):
    folder, skipped = workflow
    assert not skipped, skipped
    for name in WORKFLOW_FILES:
        assert (folder / name).is_file(), f"the workflow of `bnnconvert --help` wrote no {name}"


@pytest.mark.parametrize("name", [n for n in SOURCES if n != WORKFLOW and SOURCES[n]])
def test_documented_commands_run(name, workflow, small_demo, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "clone"
    folder.mkdir()
    for file in WORKFLOW_FILES:
        shutil.copy(workflow[0] / file, folder / file)
    skipped = run_source(name, folder, monkeypatch)
    with capsys.disabled():
        for line in skipped:
            print(f"\n  not run ({name}): {line}", end="")


# --------------------------------------------------------------------------- the rules hold
def test_the_sources_are_found():
    assert len(SOURCES[WORKFLOW]) >= 5
    assert {"docs/cli.md", "docs/getting-started.md", "bnnconvert convert --help"} <= set(SOURCES)
    for name in ("docs/cli.md", "docs/getting-started.md"):
        assert SOURCES[name], f"no command found in {name}"
    joined = [c.text for c in SOURCES["docs/getting-started.md"] if "\\" not in c.text]
    assert any("--arch-kwargs num_classes=10,in_channels=1 --data demo:digits" in t for t in joined)


def test_every_line_naming_a_reader_file_says_so():
    used = set()
    for commands in SOURCES.values():
        for command in commands:
            names = user_files(command)
            used.update(names)
            if names and not command.source.startswith("bnnconvert "):
                assert command.comment.startswith("your "), (
                    f"{command.source}: `{command.text}` names {names}, files only the reader "
                    "has: end the line with a comment '# your ...' saying what they are"
                )
    assert used == set(USER_FILES), f"USER_FILES lists unused {sorted(set(USER_FILES) - used)}"


def test_extraction_and_budget_rules():
    page = "```python\nbnnconvert no\n```\n\n```bash\nbnnconvert yes\n```\n```\nbnnconvert b\n```"
    assert shell_blocks(page) == ["bnnconvert yes", "bnnconvert b"]
    text = "x\n$ bnnconvert a \\\n    --epochs 50 -o m.pt  # your note\nbnnconvert\npython y\n"
    assert command_lines(text) == ["bnnconvert a --epochs 50 -o m.pt  # your note", "bnnconvert"]
    command = Command("t", "bnnconvert train in.pt --data x.npz --epochs 50 -o out.pt  # your x")
    assert command.argv[-1] == "out.pt" and command.comment == "your x"
    assert command.inputs == ["in.pt", "x.npz"] and command.outputs == ["out.pt"]
    assert budget(command.argv)[command.argv.index("--epochs") + 1] == "1"
    assert budget(["demo", "--full"]) == ["demo", "--quick"]
    assert budget(["train", "--samples", "1"]) == ["train", "--samples", "1"]
    assert budget(["benchmark", "--data", "d"])[3:] == ["--epochs", "1", "--samples", "2"]
    assert budget(["flops", "m.pt", "--input-shape", "50,1,28,28"])[-1] == "2,1,28,28"
    assert unmet_need(["train", "--nproc", "64", "--device", "cuda"]) is not None
    assert unmet_need(["train", "--device", "cpu"]) is None
