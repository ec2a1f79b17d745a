"""The README and docs/ cannot drift: every command they show is run by a test, their Python examples run
(or, where they load a trained model from a file, call the API as it is), every relative link and anchor
resolves, and every repository path they name exists.

A command is a line of a ```bash block (continuation lines joined, its trailing comment dropped, a
``.venv/bin/`` prefix read as the bare script). Each has one row in ``COMMANDS`` saying how it runs:

- ``RunBy(test)``: an existing test runs it. The fast check finds that test function in tests/ and
  requires every argument of the command in the source the test reaches (its body, and the fixtures,
  module-level helpers and constants it names, followed through imports): a ``<placeholder>`` of the docs
  and a ``{field}`` of the test's f-strings match any value; ``swap`` lists the documented arguments the
  test runs with another value (doc argument -> test argument).
- ``Run(extra)``: ``test_documented_command_runs`` (slow) runs it here in an empty folder, with ``extra``
  (tiny-data settings) appended.
- ``Dry(why)``: it cannot run on a CI machine (``why``), so only its parsing and the checks before work
  are run (below; ``make`` targets with ``make -n``).

Besides, every documented ``mrl-train`` and ``mrl-eval`` command, whatever its row, is composed in-process
as its console script composes it (Hydra's override parser; with ``-m``, the basic sweeper's expansion of
comma lists into jobs) and passes the checks the script runs before any work (``mrl.preflight``), with
``<placeholders>`` filled with ``x``. Data the docs name under ``/data/`` is read from an empty temporary
folder, where robustness sets' folders are created empty (their contents are checked later, against the
checkpoint).
"""

from __future__ import annotations

import ast
import itertools
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
README = REPO / "README.md"
DOC_PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
# pages whose relative links are checked: the docs and the pages they link into
LINKED_PAGES = [*DOC_PAGES, REPO / "benchmarks" / "README.md", *sorted((REPO / "experiments").rglob("*.md"))]
README_MAX_LINES = 200  # a front page: the rest lives in docs/
PLACEHOLDER = re.compile(r"<[^<>\n]+>")
DATA_STAND_IN = "/data/"  # the docs' place for the user's data sets
REPOSITORY_PATH = r"(src|conf|tests|benchmarks|experiments|docs)/[\w./-]*"  # a code span naming a file


@dataclass(frozen=True)
class RunBy:
    """Run by an existing test (a function ``test_...`` somewhere in tests/)."""

    test: str
    swap: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """Run here by ``test_documented_command_runs`` with ``extra`` appended."""

    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dry:
    """Not runnable on a CI machine (``why``): parsed and checked only."""

    why: str


How = RunBy | Run | Dry
# the cheap evaluation tests/training/test_posthoc.py runs where the docs show evaluate={}
POSTHOC_CHEAP_EVAL = (
    "evaluate={methods: {adaptive_classification: false, adaptive_retrieval: false}, "
    "baselines: {interpolation: false, max_iter: 20, sizes: [1, 2, 4, 8]}, "
    "knn: {k: 3}, retrieval: {ks: [10]}}"
)
SETS_UP_A_MACHINE = "sets up .venv and the data; its jobs are those of the commands it runs"
COMMANDS: dict[str, How] = {
    # README.md, docs/development.md
    "make train": Dry(f"{SETS_UP_A_MACHINE} (mrl-train: test_default_job_reaches_91_percent_...)"),
    "make test": Dry(f"{SETS_UP_A_MACHINE} (the whole suite, this test among it)"),
    "make test-fast": Dry(f"{SETS_UP_A_MACHINE} (the fast suite)"),
    "make lint": Dry(f"{SETS_UP_A_MACHINE} (ruff, which CI does not run)"),
    'pip install ".[shards]"': RunBy("test_installing_mrl_keeps_the_users_torch"),
    'pip install -c constraints.txt ".[shards]"': RunBy(
        "test_wheel_installs_with_the_constraints_and_trains_outside_the_checkout"
    ),
    # docs/training.md
    "mrl-train head=mrl_e": RunBy("test_ema_and_compile_options_train"),
    "mrl-train head.nesting=[8,16,32,64,128,256] head.weights=[4,2,1,1,1,1] optim.lr=0.001 "
    "loss.label_smoothing=0.0": Run(extra=("debug=tiny",)),
    "mrl-train backbone.name=convnext_atto": RunBy("test_backbone_needing_larger_images_gets_resized_data"),
    "mrl-train callbacks=ema compile=true": RunBy("test_ema_and_compile_options_train"),
    "mrl-train experiment=smoke": RunBy(
        "test_wheel_installs_with_the_constraints_and_trains_outside_the_checkout"
    ),
    "mrl-train experiment=retrofit data.input_dir=/data/imagenet-shards "
    "backbone.pretrained_path=<weights.safetensors>": RunBy(
        "test_recipe_trains_a_few_steps", swap={"data.input_dir=/data/imagenet-shards": "data=synthetic"}
    ),
    "mrl-train experiment=retrofit data.input_dir=/data/imagenet-shards "
    "backbone.pretrained_path=<weights.safetensors> finetune.freeze_backbone=true "
    "finetune.train_last_stages=1 finetune.backbone_lr_mult=0.1": RunBy(
        "test_recipe_trains_a_few_steps", swap={"data.input_dir=/data/imagenet-shards": "data=synthetic"}
    ),
    "mrl-train debug=tiny backbone.pretrained_path=<weights.safetensors> finetune.freeze_backbone=true "
    "finetune.train_last_stages=1 finetune.unfreeze_at_epoch=1 finetune.backbone_lr_mult=0.1 "
    "trainer.max_epochs=2": RunBy("test_finetuning_from_a_weights_file_end_to_end"),
    "mrl-train debug=tiny head.sizes_per_step=1 head.depth_stages=[1,3] head.depth_weight=0.5": RunBy(
        "test_results_hold_every_size_the_drawn_fractions_and_the_stage_metrics"
    ),
    "torchrun --nnodes=2 --nproc_per_node=8 --node_rank=<0 or 1> --master_addr=<node 0> --master_port=29500 "
    "--no-python mrl-train trainer=ddp trainer.devices=8 trainer.num_nodes=2 data=shards "
    "data.input_dir=<shards> hydra.run.dir=<shared dir>/run1": RunBy(
        "test_torchrun_on_two_nodes_trains_one_run_and_resumes_after_a_kill",
        swap={
            "--nproc_per_node=8": "--nproc_per_node=1",
            "trainer=ddp": "trainer=ddp_cpu",
            "trainer.devices=8": "trainer.devices=1",
        },
    ),
    "srun mrl-train trainer=ddp trainer.devices=8 trainer.num_nodes=2 data=shards data.input_dir=<shards> "
    "hydra.run.dir=<shared dir>/run1": RunBy(
        "test_slurm_tasks_on_two_nodes_train_one_run",
        swap={"trainer=ddp": "trainer=ddp_cpu", "trainer.devices=8": "trainer.devices=1"},
    ),
    "mrl-train objective=supcon": RunBy("test_contrastive_training_end_to_end"),
    "mrl-train objective=infonce": RunBy("test_contrastive_training_end_to_end"),
    "mrl-train -m head=mrl,mrl_e,ff,standard head.dim=8": RunBy("test_every_head_trains_in_one_multirun"),
    "mrl-train -m head=ff head.dim=1,2,4,8,16,32,64,128,256": Dry(
        "nine training jobs, too long for CI (test_every_head_trains_in_one_multirun trains an ff job)"
    ),
    "mrl-train -m head=mrl,mrl_e seed=0,1": RunBy("test_sweep_report_offline_writes_the_spec_of_logged_keys"),
    "mrl-train -m hparams_search=optuna hydra.sweeper.n_trials=30": Dry("thirty training jobs"),
    "mrl-train trainer=gpu": Dry("needs a GPU"),
    "mrl-train trainer=ddp trainer.devices=4": Dry("needs 4 GPUs"),
    "mrl-train trainer=ddp_cpu": RunBy("test_ddp_cpu_matches_single_process"),
    "mrl-train data=shards data.input_dir=/data/imagenet-shards backbone=resnet50 trainer=ddp "
    "trainer.devices=8": Dry("needs 8 GPUs and ImageNet"),
    "mrl-train -m hydra/launcher=slurm trainer=ddp trainer.devices=4 hydra.launcher.partition=<partition> "
    "head=mrl,mrl_e": Dry("needs a SLURM cluster"),
    "mrl-train experiment=imagenet_r50_mrl data.input_dir=s3://bucket/imagenet-shards trainer.num_nodes=2 "
    "-m hydra/launcher=slurm": Dry("needs a SLURM cluster of GPU nodes and ImageNet on an object store"),
    "mrl-train resume=logs/train/runs/<date>_<time>_<id>": RunBy(
        "test_killed_run_resumes_into_same_wandb_run_and_matches_uninterrupted"
    ),
    "mrl-train resume=logs/train/runs/<date>_<time>_<id> trainer.max_epochs=20": RunBy(
        "test_resume_works_in_the_given_directory_and_leaves_the_original_alone",
        swap={"trainer.max_epochs=20": "trainer.max_epochs=2"},
    ),
    "mrl-dashboard --project mrl": RunBy("test_dashboard_offline_writes_the_workspace_spec_of_logged_keys"),
    "mrl-report logs/train/multiruns/<sweep> --wandb-report": RunBy(
        "test_sweep_report_offline_writes_the_spec_of_logged_keys"
    ),
    "mrl-dashboard --from-spec <spec.json>": RunBy("test_from_spec_offline_says_so"),
    # README.md, docs/posthoc.md
    "mrl-train -m source=logs/train/runs/<job>/checkpoints/last.ckpt head=mrl,csr evaluate={}": RunBy(
        "test_every_head_trains_on_the_frozen_source_in_one_multirun",
        swap={"head=mrl,csr": "head=mrl,mrl_e,ff,csr,adaptor", "evaluate={}": POSTHOC_CHEAP_EVAL},
    ),
    "mrl-train source=logs/train/runs/<job>/checkpoints/last.ckpt head=mrl": RunBy(
        "test_every_head_trains_on_the_frozen_source_in_one_multirun",
        swap={"head=mrl": "head=mrl,mrl_e,ff,csr,adaptor"},
    ),
    "mrl-train source=r50_mrl1_e0_ff2048.pt data=imagefolder data.root=/data/imagenet head=mrl_e": RunBy(
        "test_a_checkpoint_of_the_papers_repository_as_source"
    ),
    "mrl-train source=backbone backbone.name=<timm model> backbone.pretrained_path=<weights.safetensors> "
    "features.projection_dim=32 features.hidden=64": RunBy(
        "test_a_timm_backbone_with_a_weights_file_as_source"
    ),
    "mrl-train source=<model.safetensors> head=csr head.nesting=[8,32] head.expansion=2": RunBy(
        "test_an_export_of_the_source_trains_from_the_same_cache"
    ),
    "mrl-train source=<checkpoint> head=adaptor head.nesting=[4,16]": RunBy(
        "test_a_post_hoc_run_resumes_on_its_cached_features"
    ),
    # docs/data.md
    "python -m mrl.data.generate tree --classes 10 --train 50": Run(extra=("--width=64", "--height=48")),
    "mrl-prepare-data root=/data/imagenet output_dir=/data/imagenet-shards max_side=500": RunBy(
        "test_prepare_data_command_then_train", swap={"max_side=500": "max_side=64"}
    ),
    "mrl-prepare-data root=/data/imagenet output_dir=s3://bucket/imagenet-shards max_side=500": RunBy(
        "test_prepare_to_s3_then_train_kill_and_resume_from_it", swap={"max_side=500": "max_side=64"}
    ),
    "mrl-train data=shards data.input_dir=s3://bucket/imagenet-shards "
    "data.cache_dir=/scratch/shard-cache": RunBy("test_prepare_to_s3_then_train_kill_and_resume_from_it"),
    "mrl-train data=shards data.input_dir=/data/imagenet-shards backbone=resnet50 trainer=gpu "
    "data.img_size=224 data.batch_size=256": Dry("needs a GPU and ImageNet"),
    # docs/evaluation.md
    "mrl-eval ckpt_path=logs/train/runs/<job>/checkpoints/last.ckpt": RunBy(
        "test_eval_reports_every_section_at_every_size"
    ),
    "mrl-eval ckpt_path=<ckpt> sizes=[8,64,256] query_split=val embedding_dtype=float16": RunBy(
        "test_eval_float16_and_bad_sizes_and_split", swap={"sizes=[8,64,256]": "sizes=[4,16]"}
    ),
    "mrl-eval ckpt_path=<ckpt> +robustness.sets.sketch=/data/imagenet-sketch/sketch "
    "+robustness.sets.imagenet_a=/data/imagenet-a +robustness.sets.imagenet_r=/data/imagenet-r "
    "'+robustness.sets.v2={root:/data/imagenetv2-matched-frequency,folders:indices}'": Dry(
        "needs ImageNet-Sketch, -A, -R and -V2 and an ImageNet model"
    ),
    "python -m mrl.data.generate tree --classes 10 --train 40 --val 10 --width 96 --height 72": Run(),
    "mrl-train data=imagefolder data.root=tree data.img_size=32 data.batch_size=32 data.num_workers=0 "
    "trainer.max_epochs=3 threads=1 head.nesting=[2,4,8,16,32] backbone.embed_dim=32": RunBy(
        "test_eval_robustness_sets_end_to_end",
        swap={
            "data.batch_size=32": "data.batch_size=16",
            "trainer.max_epochs=3": "trainer.max_epochs=2",
            "head.nesting=[2,4,8,16,32]": "head.nesting=[2,4,8,16]",
            "backbone.embed_dim=32": "backbone.embed_dim=16",
        },
    ),
    "mrl-eval ckpt_path=logs/train/runs/<job>/checkpoints/last.ckpt threads=1 "
    "+robustness.sets.full=tree/val +robustness.sets.subset=subset": RunBy(
        "test_eval_robustness_sets_end_to_end"
    ),
    "mrl-report logs/train/multiruns/<sweep>": RunBy("test_report_of_a_three_job_sweep"),
    # docs/experiments.md
    "mrl-train experiment=fashion_mnist_compare": RunBy("test_recipe_trains_a_few_steps"),
    "mrl-train experiment=fashion_mnist_contrastive threads=1": RunBy(
        "test_recipe_trains_a_few_steps", swap={"threads=1": "threads=2"}
    ),
    # docs/deployment.md
    "mrl-eval ckpt_path=logs/train/runs/<job>/checkpoints/last.ckpt +data=imagefolder "
    "data.root=/data/imagenet embedding_dtype=float16": Dry(
        "needs a GPU and ImageNet; test_every_size_equals_its_own_search and "
        "test_neighbours_equal_faiss_per_size_on_a_float16_memmap check its search on the CPU"
    ),
    "mrl-eval ckpt_path=r50_mrl1_e0_ff2048.pt +data=imagefolder data.root=/data/imagenet": RunBy(
        "test_mrl_eval_on_a_paper_checkpoint"
    ),
    "mrl-eval ckpt_path=r50_mrl0_e0_ff256.pt +data=imagenet data.input_dir=/data/imagenet-shards "
    "data.eval_img_size=224": Dry("needs ImageNet and the paper's checkpoint"),
    "mrl-eval ckpt_path=my_copy.pt paper_head=mrl_e +data=imagefolder data.root=/data/imagenet": Dry(
        "needs ImageNet and the paper's checkpoint"
    ),
}


# ---------------------------------------------------------------- reading the docs


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def bash_lines(text: str) -> list[str]:
    """The lines of the page's ```bash blocks, continuation lines joined."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]


def split(command: str, fill: str | None = None) -> list[str]:
    """The command's arguments as the shell gives them, ``<placeholders>`` kept whole (or replaced by
    ``fill``)."""
    found: list[str] = []

    def mark(match: re.Match) -> str:
        found.append(match.group(0))
        return f"\x00{len(found) - 1}\x00"

    def unmark(match: re.Match) -> str:
        return found[int(match.group(1))] if fill is None else fill

    tokens = shlex.split(PLACEHOLDER.sub(mark, command), comments=True)
    return [re.sub(r"\x00(\d+)\x00", unmark, token) for token in tokens]


def command_of(line: str) -> str | None:
    """The command a ```bash line shows, as ``COMMANDS`` names it; None for a comment or blank line."""
    tokens = split(line)
    if not tokens:
        return None
    text = line.strip()
    for match in re.finditer(r"\s#", text):  # the comment starts at the first `#` the shell sees as one
        if split(text[: match.start()]) == tokens:
            text = text[: match.start()]
            break
    return " ".join(text.split()).removeprefix(".venv/bin/")


def documented_commands() -> dict[str, list[str]]:
    """Every command of the README and docs/, with the pages that show it."""
    found: dict[str, list[str]] = {}
    for page in DOC_PAGES:
        name = str(page.relative_to(REPO))
        for command in filter(None, map(command_of, bash_lines(page.read_text()))):
            if name not in found.setdefault(command, []):
                found[command].append(name)
    return found


# ---------------------------------------------------------------- what the tests run


class SuiteCode:
    """The test suite's code: functions, fixtures and constants by name, and what a test reaches."""

    def __init__(self, root: Path) -> None:
        self.trees = {path: ast.parse(path.read_text()) for path in sorted(root.rglob("*.py"))}
        self.root = root
        self.defs = {path: self._definitions(tree) for path, tree in self.trees.items()}
        self.conftests = [p for p in self.trees if p.name == "conftest.py"]

    @staticmethod
    def _definitions(tree: ast.Module) -> dict[str, ast.AST]:
        defs: dict[str, ast.AST] = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defs[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defs.update({t.id: node for t in targets if isinstance(t, ast.Name)})
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                defs.update({a.asname or a.name: node for a in node.names})
        return defs

    def find(self, name: str) -> list[tuple[Path, ast.AST]]:
        return [
            (path, defs[name])
            for path, defs in self.defs.items()
            if isinstance(defs.get(name), (ast.FunctionDef, ast.AsyncFunctionDef))
        ]

    def _lookup(self, path: Path, name: str) -> tuple[Path, ast.AST] | None:
        node = self.defs[path].get(name)
        if isinstance(node, ast.ImportFrom):  # a name imported from another module of the suite
            module = self.root / (node.module.replace(".", "/") + ".py")
            original = next(a.name for a in node.names if (a.asname or a.name) == name)
            return (module, self.defs[module][original]) if original in self.defs.get(module, {}) else None
        if node is not None:
            return path, node
        fixtures = [c for c in self.conftests if path.is_relative_to(c.parent) and name in self.defs[c]]
        return (fixtures[0], self.defs[fixtures[0]][name]) if fixtures else None

    def reached(self, path: Path, node: ast.AST) -> list[ast.AST]:
        """``node`` and every definition it names (fixtures by parameter), transitively."""
        seen: set[int] = set()
        queue, out = [(path, node)], []
        while queue:
            where, current = queue.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            out.append(current)
            names = {n.id for n in ast.walk(current) if isinstance(n, ast.Name)}
            names |= {a.arg for n in ast.walk(current) if isinstance(n, ast.arguments) for a in n.args}
            queue += [found for name in names if (found := self._lookup(where, name)) is not None]
        return out


def strings_of(nodes: list[ast.AST]) -> tuple[set[str], list[re.Pattern]]:
    """The string literals of ``nodes`` (modules they import included), and their f-strings as patterns
    in which each ``{field}`` matches anything."""
    literals: set[str] = set()
    patterns: list[re.Pattern] = []
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            literals.add(node.value)
        elif isinstance(node, ast.JoinedStr):
            parts = [re.escape(v.value) if isinstance(v, ast.Constant) else ".*" for v in node.values]
            patterns.append(re.compile("".join(parts), re.S))
        elif isinstance(node, ast.ImportFrom) and node.module:
            literals.add(node.module)
        elif isinstance(node, ast.Import):
            literals |= {a.name for a in node.names}
    return literals, patterns


def program_names(program: str) -> set[str]:
    """How a test may name a console script: ``mrl-eval`` or its module ``mrl.cli.eval``."""
    if program.startswith("mrl-"):
        return {program, "mrl.cli." + program.removeprefix("mrl-").replace("-", "_")}
    return {program}


def missing_arguments(command: str, swap: dict[str, str], literals: set[str], patterns) -> list[str]:
    program, *args = split(command)
    missing = [] if program_names(program) & literals or program == "python" else [program]
    for arg in (swap.get(a, a) for a in args):
        if PLACEHOLDER.search(arg) and "=" not in arg and not arg.startswith("-"):
            continue  # a path the test makes (the sweep dir, ...), given as a variable
        as_pattern = re.compile(".*".join(re.escape(p) for p in PLACEHOLDER.split(arg)), re.S)
        sample = PLACEHOLDER.sub("x", arg)
        if not any(as_pattern.fullmatch(s) for s in literals) and not any(
            p.fullmatch(sample) for p in patterns
        ):
            missing.append(arg)
    return missing


@pytest.fixture(scope="module")
def suite() -> SuiteCode:
    return SuiteCode(TESTS)


# ---------------------------------------------------------------- fast checks


def test_every_documented_command_has_one_row():
    documented = documented_commands()
    unregistered = [f"{c!r} ({', '.join(pages)})" for c, pages in documented.items() if c not in COMMANDS]
    stale = [c for c in COMMANDS if c not in documented]
    assert not unregistered, "shown in the docs, without a row in COMMANDS:\n" + "\n".join(unregistered)
    assert not stale, f"rows of COMMANDS for commands the docs no longer show: {stale}"


def test_commands_run_by_existing_tests_are_in_their_source(suite):
    problems = []
    for command, how in COMMANDS.items():
        if not isinstance(how, RunBy):
            continue
        stale = [a for a in how.swap if a not in split(command)]
        found = suite.find(how.test)
        if stale or len(found) != 1 or not how.test.startswith("test_"):
            where = [str(p.relative_to(REPO)) for p, _ in found] or "no module"
            problems.append(f"{command!r}: test function {how.test} in {where}; swaps of no argument {stale}")
            continue
        literals, patterns = strings_of(suite.reached(*found[0]))
        missing = missing_arguments(command, how.swap, literals, patterns)
        if missing:
            problems.append(f"{command!r}: {how.test} does not run it with {missing}")
    assert not problems, "\n".join(problems)


def jobs(args: list[str]) -> list[list[str]]:
    """The overrides of each job the command starts: one, or with ``-m`` the basic sweeper's product of
    its comma lists (a sweeper configured by the command, such as Optuna's, gets the overrides once)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    multirun = "-m" in args or "--multirun" in args
    sweeps = [o for o in parsed if o.is_sweep_override()]
    assert multirun or not sweeps, f"{[o.input_line for o in sweeps]} sweep without -m: Hydra refuses it"
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [line]
        for o, line in zip(parsed, overrides, strict=True)
    ]
    return [list(job) for job in itertools.product(*choices)]


def compose_and_check(program: str, args: list[str], out: Path) -> None:
    """What ``mrl-train`` / ``mrl-eval`` do with their command line before any work."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mrl.config_path import config_dir
    from mrl.preflight import check_eval, check_train, resolve
    from mrl.resolvers import register_resolvers

    register_resolvers()
    for job in jobs(args):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(program.removeprefix("mrl-"), overrides=[*job, f"paths.output_dir={out}"])
        resolved = resolve(cfg)
        for spec in (OmegaConf.select(resolved, "robustness.sets") or {}).values():
            Path(spec if isinstance(spec, str) else spec["root"]).mkdir(parents=True, exist_ok=True)
        (check_train if program == "mrl-train" else check_eval)(resolved)


# resume= is read before Hydra composes anything (mrl.cli.resume), and runs by its tests
HYDRA_COMMANDS = [c for c in COMMANDS if c.split()[0] in ("mrl-train", "mrl-eval") and "resume=" not in c]


@pytest.mark.parametrize("command", HYDRA_COMMANDS)
def test_documented_settings_compose_and_pass_the_checks(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    program, *args = split(command.replace(DATA_STAND_IN, f"{tmp_path}{DATA_STAND_IN}"), fill="x")
    compose_and_check(program, args, tmp_path / "job")


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("make ")])
def test_documented_make_targets_exist(command):
    proc = subprocess.run(["make", "-n", *split(command)[1:]], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_rows_are_commands_with_a_dry_form():
    """Only make targets and the Hydra commands have a dry form: any other command must run."""
    dry = [c for c, how in COMMANDS.items() if isinstance(how, Dry)]
    assert not [c for c in dry if c not in HYDRA_COMMANDS and not c.startswith("make ")]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", without_code_blocks(page.read_text()), flags=re.M)
    seen: dict[str, int] = {}
    out = set()
    for heading in headings:
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


def prose(page: Path) -> str:
    """The page's text outside code blocks and code spans."""
    return re.sub(r"`[^`\n]*`", "", without_code_blocks(page.read_text()))


def test_relative_links_and_anchors_resolve():
    broken = []
    for page in LINKED_PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"[a-z]+:", target):
                continue  # https://..., mailto:...
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in re.findall(r"\]\(([^)\s]+)\)", prose(README))}
    assert not [str(p.relative_to(REPO)) for p in DOC_PAGES[1:] if p.resolve() not in linked]


def test_repository_paths_named_in_the_docs_exist():
    spans = [re.findall(r"`([^`\n]+)`", without_code_blocks(page.read_text())) for page in DOC_PAGES]
    named = {s for s in itertools.chain(*spans) if re.fullmatch(REPOSITORY_PATH, s)}
    assert named and not sorted(s for s in named if not (REPO / s).exists())


def api_calls(tree: ast.Module) -> list[tuple[ast.Call, object, bool]]:
    """The block's calls of ``mrl.<name>(...)`` and of methods of the models ``mrl.load`` returned, as
    (the call, the callable it names, whether that is a method taking ``self``)."""
    import mrl

    models = {
        t.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and "mrl.load(" in ast.unparse(node.value)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        func = call.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            owner = {"mrl": mrl, **dict.fromkeys(models, mrl.MatryoshkaModel)}.get(func.value.id)
            if owner is not None:
                found.append((call, getattr(owner, func.attr, None), owner is not mrl))
    return found


def test_python_examples_run_or_call_the_api_as_it_is():
    """The docs' ```python blocks run, in order in one namespace per page; a block that loads a trained
    model from a file (``mrl.load``; its loading is run by tests/deploy/test_deploy.py) is checked
    instead: every ``mrl.<name>`` and model method it calls exists and takes the arguments it is given."""
    import inspect

    wrong = []
    for page in DOC_PAGES:
        namespace: dict = {}
        for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M):
            tree = ast.parse(block)
            calls = api_calls(tree)
            if not any(ast.unparse(call.func) == "mrl.load" for call, _, _ in calls):
                exec(compile(tree, str(page), "exec"), namespace)
            for call, target, method in calls:
                args = [None] * (len(call.args) + method)
                try:
                    inspect.signature(target).bind(*args, **{k.arg: None for k in call.keywords})
                except (TypeError, ValueError) as err:
                    wrong.append(f"{page.relative_to(REPO)}: {ast.unparse(call)} ({err})")
    assert not wrong, wrong


def test_the_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


# ---------------------------------------------------------------- slow: the commands no other test runs


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, how in COMMANDS.items() if isinstance(how, Run)])
def test_documented_command_runs(command, run_cli):
    program, *args = split(command)
    result = run_cli(program, *args, *COMMANDS[command].extra)
    assert result.returncode == 0, result.output[-3000:]
