"""`drope demo`: the DroPE story end to end on a CPU, as resumable stages in one work folder.

    corpus    offline prose + sentencepiece tokenizer            WORK/corpus
    data      prose + retrieval mixture as indexed datasets      WORK/data
    rope      the RoPE model: the shipped checkpoint converted   WORK/rope
              (or, with --pretrain, recipes/demo-pretrain.yaml trained here)
    drope     RoPE dropped, recalibrated at the same context     WORK/drope/final
    eval      RoPE / PI / NTK / YaRN / DroPE at 1x-8x            WORK/eval
    export    the DroPE model as a Hugging Face folder           WORK/drope-hf
    report    WORK/report.md: stage times, tables, plots

A stage is reused when its output exists and it was made from the same inputs (its settings,
and the stage before it as it stands now), so a finished demo reruns in seconds and an
interrupted one continues (training resumes from its last checkpoint). Changed inputs (another
recipe, overrides, --smoke, --pretrain) rerun that stage and every one after it, from scratch.
Every stage but the first two is the `drope` command a user would type, run as a child process;
the report lists them.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from drope_megatron import atomic
from drope_megatron.config import ConfigError
from drope_megatron.data.corpus import build_corpus
from drope_megatron.demo import mixture

STAGES = ("corpus", "data", "rope", "drope", "eval", "export", "report")
SHIPPED = Path(__file__).parent / "pretrained"
# Inside the package, so that an installed (not editable) copy finds them; recipes/ links to them.
RECIPES = Path(__file__).parent / "recipes"
RETRIEVAL_SHARE = 0.3  # of training tokens; the rest is prose
# Tiny sizes for tests: every stage runs, for a few steps and a handful of samples.
SMOKE_RECAL = ["train.steps=3", "train.warmup_steps=1", "train.global_batch_size=4", "train.micro_batch_size=4"]
SMOKE_PRETRAIN = [*SMOKE_RECAL, "train.log_interval=1"]
SMOKE_CORPUS_CHARS = 300_000  # a slice of the corpus: seconds to build and tokenise
SMOKE_EVAL = ["--lengths", "1x,2x", "--tasks", "ppl,passkey", "--documents", "1", "--samples", "1",
              "--depths", "0,1"]


class StageFailed(ConfigError):
    """A stage's command failed; its exit status (3: training diverged) is the demo's too."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.exit_code = code


@dataclass
class Demo:
    work: Path
    recipe: Path = RECIPES / "demo-cpu.yaml"
    pretrain_recipe: Path = RECIPES / "demo-pretrain.yaml"
    pretrain: bool = False  # train the RoPE model here instead of converting the shipped one
    smoke: bool = False
    until: str = "report"
    overrides: list[str] = field(default_factory=list)  # dotted keys of the recipe: eval.* for eval, the rest drope
    # Per stage, kept across reruns: seconds, commands, the inputs it last started from, and when it
    # was last made (the next stage's inputs hold that time, so a remade stage remakes what follows).
    log: dict = field(default_factory=lambda: {"seconds": {}, "commands": {}, "inputs": {}, "made": {}})

    def run(self) -> Path | None:
        """Run or reuse the stages up to `until`; the report's path when that stage was reached."""
        if self.until not in STAGES:
            raise ConfigError(f"--until {self.until!r}: use one of {', '.join(STAGES)}")
        placed = [o for o in self.overrides if o.partition("=")[0] in ("train.init_from", "train.save_dir")]
        if placed:  # the stages chain through WORK: a run elsewhere would leave the next stage nothing
            raise ConfigError(f"demo override {placed[0]}: the demo places its runs in its work folder; "
                              "choose that with --work")
        self._eval_recipe_section()  # every override is checked now, not after the training
        self._recipe_model()
        self.work.mkdir(parents=True, exist_ok=True)
        log_path = self.work / "stages.json"
        if log_path.is_file():
            self.log = {"inputs": {}, "made": {}, **json.loads(log_path.read_text())}
        for stage in STAGES[: STAGES.index(self.until) + 1]:
            inputs = self._inputs(stage)
            done = self._done(stage, inputs)
            print(f"[demo] {stage}: {'reused' if done else 'running'}", flush=True)
            if not done:
                self._start(stage, inputs, log_path)
                start = time.perf_counter()
                getattr(self, f"_{stage}")()
                self.log["seconds"][stage] = round(time.perf_counter() - start, 1)
                self.log["made"][stage] = time.time()
                atomic.write_json(log_path, self.log)
        return self.work / "report.md" if self.until == "report" else None

    def _inputs(self, stage: str) -> dict:
        """What a stage's output depends on, besides code: its settings and the stage before it."""
        own = {"corpus": lambda: {"vocab": self._vocab(), "max_chars": SMOKE_CORPUS_CHARS if self.smoke else None},
               "data": lambda: {"tokenizer": str(self._tokenizer()), "seq_length": self._seq_length()},
               "rope": lambda: {"pretrain": _digest(self.pretrain_recipe) if self.pretrain else False,
                                "smoke": self.smoke and self.pretrain},
               "drope": lambda: {"recipe": _digest(self.recipe), "overrides": self._split()[0], "smoke": self.smoke},
               "eval": lambda: {"recipe": _digest(self.recipe), "smoke": self.smoke,
                                **({"overrides": self._split()[1]} if self._split()[1] else {})},
               "export": dict, "report": lambda: {"smoke": self.smoke, "pretrain": self.pretrain}}[stage]()
        before = STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else None
        return {**own, "after": self.log["made"].get(before)}

    def _start(self, stage: str, inputs: dict, log_path: Path) -> None:
        """Same inputs as the unfinished run before: continue it (training resumes). Other inputs:
        the training this demo ran before is removed, so that a resumed one never mixes two settings.
        A run folder the demo has no record of making (a user's own run, an older demo) is kept."""
        recorded = self.log["inputs"].get(stage)
        if recorded is not None and recorded != inputs:
            for folder in {"rope": ["pretrain"], "drope": ["drope"]}.get(stage, []):
                if (self.work / folder).exists():
                    print(f"[demo] {stage}: its inputs changed: removing the earlier run {self.work / folder}",
                          flush=True)
                    shutil.rmtree(self.work / folder)
        self._stage = stage
        self.log["commands"][stage] = []
        self.log["inputs"][stage] = inputs
        self.log["made"].pop(stage, None)  # until it finishes, whatever output it left is not this run's
        atomic.write_json(log_path, self.log)

    # Where each stage leaves its result; the stage is skipped when this exists.
    def _output(self, stage: str) -> Path:
        w = self.work
        return {"corpus": w / "corpus" / "corpus.json", "data": w / "data" / "mixture.json",
                "rope": w / "rope" / "drope_checkpoint.json", "drope": w / "drope" / "final" / "drope_checkpoint.json",
                "eval": w / "eval" / "results.json", "export": w / "drope-hf" / "config.json",
                "report": w / "report.md"}[stage]

    def _done(self, stage: str, inputs: dict) -> bool:
        if stage == "report":  # cheap: always rewritten from what the other stages left
            return False
        if stage not in self.log["made"] or self.log["inputs"].get(stage) != inputs:
            return False
        if stage == "data":  # rebuilt when the corpus or the mixture settings changed
            return mixture.is_built(self.work / "corpus", self._tokenizer(), self.work / "data", self._seq_length(),
                                    RETRIEVAL_SHARE)
        return self._output(stage).is_file()

    def _corpus(self) -> None:
        cap = SMOKE_CORPUS_CHARS if self.smoke else None
        build_corpus(self.work / "corpus", vocab_size=self._vocab(), max_chars=cap)

    def _data(self) -> None:
        mixture.build(self.work / "corpus", self._tokenizer(), self.work / "data", self._seq_length(), RETRIEVAL_SHARE,
                      progress=True)

    def _rope(self) -> None:
        if not self.pretrain:
            self._drope_cmd("convert", "hf-to-megatron", str(SHIPPED), str(self.work / "rope"), "--dtype",
                            "float32", "--overwrite")
            return
        run_dir = self.work / "pretrain"
        self._drope_cmd("pretrain", str(self.pretrain_recipe), *self._data_args(),
                        _setting("data.tokenizer", self._tokenizer()), _setting("train.save_dir", run_dir),
                        *(SMOKE_PRETRAIN if self.smoke else []))
        self._drope_cmd("convert", "megatron-to-hf", str(run_dir / "final"), str(self.work / "rope-hf"),
                        "--dtype", "bfloat16", "--overwrite", "--quiet")
        self._drope_cmd("convert", "hf-to-megatron", str(self.work / "rope-hf"), str(self.work / "rope"),
                        "--dtype", "float32", "--overwrite", "--quiet")

    def _drope(self) -> None:
        self._drope_cmd("recalibrate", str(self.recipe), *self._data_args(),
                        _setting("train.init_from", self.work / "rope"), _setting("train.save_dir", self.work / "drope"),
                        *(SMOKE_RECAL if self.smoke else []),
                        *self._split()[0])

    def _eval(self) -> None:
        self._drope_cmd("eval", *self._eval_args())

    def _eval_args(self) -> list[str]:
        recipe = self.recipe
        if self._split()[1]:  # drope eval reads a recipe's eval section: this one, with the overrides in it
            recipe = self.work / "eval-recipe.yaml"
            atomic.write_text(recipe, yaml.safe_dump({"eval": self._eval_recipe_section()}, sort_keys=False))
        # The corpus's held-out split, unless an eval.data override names other text (a flag would win).
        heldout = [] if "data" in self._eval_overridden() else ["--data", str(self.work / "corpus" / "heldout.jsonl")]
        return [f"RoPE={self.work / 'rope'}", f"DroPE={self.work / 'drope' / 'final'}", "--recipe", str(recipe),
                *heldout, "--out", str(self.work / "eval"), "--overwrite", *(self._smoke_eval() if self.smoke else [])]

    def _smoke_eval(self) -> list[str]:
        """The smoke sizes, less those an eval.* override sets (flags would win over the recipe)."""
        mine = self._eval_overridden()
        pairs = zip(SMOKE_EVAL[::2], SMOKE_EVAL[1::2])
        return [word for flag, value in pairs if flag.removeprefix("--") not in mine for word in (flag, value)]

    def _eval_overridden(self) -> set[str]:
        """The eval.* keys the overrides set (`data`, `lengths`, ...)."""
        return {o.partition("=")[0].removeprefix("eval.").split(".")[0] for o in self._split()[1]}

    def _export(self) -> None:
        self._drope_cmd("convert", "megatron-to-hf", str(self.work / "drope" / "final"), str(self.work / "drope-hf"),
                        "--overwrite", "--quiet")

    def _report(self) -> None:
        from drope_megatron.demo.summary import write_report

        write_report(self.work, self.log, smoke=self.smoke, pretrained_here=self.pretrain)

    def _data_args(self) -> list[str]:
        d = self.work / "data"
        # Recalibration takes the tokenizer of the checkpoint it starts from.
        return [_setting("data.paths", [str(d / "prose"), str(d / "retrieval")]), "data.format=megatron"]

    def _tokenizer(self) -> Path:
        """The RoPE model's tokenizer: the shipped one, or the corpus's when pretraining here."""
        return self.work / "corpus" / "tokenizer.model" if self.pretrain else SHIPPED / "tokenizer.model"

    def _drope_cmd(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "drope_megatron.cli", *args]
        line = "drope " + " ".join(shlex.quote(a) for a in args)
        self.log["commands"][self._stage].append(line)
        print(f"[demo] $ {line}", flush=True)
        code = subprocess.run(cmd).returncode
        if code == 2:  # the command refused its input: a rerun alone would fail the same way
            raise StageFailed(f"demo stage failed: drope {args[0]} refused its input (see above); fix that, then "
                              "rerun the demo to continue from here", code)
        if code != 0:  # killed by a signal (negative): the shell's 128 + its number
            raise StageFailed(f"demo stage failed: drope {args[0]} (see above); rerun the demo to continue from here",
                              code if code > 0 else 128 - code)

    def _split(self) -> tuple[list[str], list[str]]:
        """The overrides for the recalibration and those for the evaluation (eval.*): an eval
        setting changes the evaluation only, not the training before it."""
        evals = [o for o in self.overrides if o.startswith("eval.")]
        return [o for o in self.overrides if o not in evals], evals

    def _eval_recipe_section(self) -> dict:
        from drope_megatron.config import load_recipe

        return asdict(load_recipe(str(self.recipe), self._split()[1], resolve_init=False).eval)

    def _recipe_model(self):
        from drope_megatron.checkpoint import is_checkpoint
        from drope_megatron.config import load_recipe, raw_recipe, validate

        # As the recalibration will read it: from this demo's RoPE checkpoint.
        rope = self.work / "rope"
        overrides = [_setting("train.init_from", rope), *(SMOKE_RECAL if self.smoke else []), *self._split()[0]]
        recipe = load_recipe(str(self.recipe), overrides)
        if self.pretrain or is_checkpoint(rope):
            return recipe.model
        # A first run: WORK/rope will be the shipped model's; its overrides are checked against that now,
        # not after the stages before the recalibration.
        from drope_megatron.convert.hf_to_megatron import read_source
        from drope_megatron.init_from import resolve

        given = raw_recipe(str(self.recipe), overrides).get("model") or {}
        recipe.model = resolve(recipe.model, given, rope, stored=read_source(SHIPPED, False)[2])
        validate(recipe)
        return recipe.model

    def _vocab(self) -> int:
        # The corpus's tokenizer is the pretraining's (the shipped model's too): not resolved against
        # WORK/rope, which does not exist on a first run, so a rerun sees the same value.
        from drope_megatron.config import load_recipe

        return load_recipe(str(self.pretrain_recipe), resolve_init=False).model.vocab_size

    def _seq_length(self) -> int:
        return self._recipe_model().seq_length


def _setting(key: str, value) -> str:
    """An override whose value is read back exactly: bare where YAML reads it so (the commands the
    report lists stay plain), else JSON, which YAML reads exactly (a path holding ' #' or ', '
    would be read bare as a comment or a list)."""
    plain = [str(v) for v in value] if isinstance(value, list) else str(value)
    text = f"[{','.join(plain)}]" if isinstance(value, list) else plain
    try:
        exact = yaml.safe_load(text) == plain
    except yaml.YAMLError:
        exact = False
    return f"{key}={text if exact else json.dumps(plain)}"


def _digest(path: Path) -> str:
    """A recipe file's content, as a stage's input: an edited recipe is another input."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
