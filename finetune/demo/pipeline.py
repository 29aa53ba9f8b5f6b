"""`python -m finetune.demo --out DIR`: train the demo MiniCPM-o end to end on the synthetic world, on CPU.

Stages (each under a wall-clock budget; `--minutes` scales them all):
1. speech units: espeak corpus -> S3 speech tokenizer (finetune.train_speech_tokenizer), then token2wav's flow +
   speaker encoder and HiFT vocoder (finetune.train_token2wav), so speech codes decode to audio;
2. data: synthetic duplex sessions (assistant speech encoded with the trained tokenizer) and scene questions;
3. questions: recipes/questions.yaml (turn_based, every parameter) - encoders + LLM learn the world;
4. duplex: recipes/duplex.yaml (duplex SFT with speech loss, joint_sft);
5. speech_decoder: recipes/speech_decoder.yaml (speech_pretrain: the decoder alone on the final LLM);
6. rehearsal: recipes/rehearsal.yaml, duplex sessions and scene questions together (duplex SFT alone makes the
   model forget turn-based chat);
7. export: bf16 safetensors + processor + voice reference + training_report.json in DIR.

The model and processor stay in memory from stage to stage; each recipe stage is an ordinary `finetune.sft`
trainer built from its YAML with the paths filled in.
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

from minicpmo.voices import MODEL_VOICE_FILE

from ..config import load_recipe
from ..sft import build_trainer, model_speech_tokenizer, recipe_training_data
from .budget import WallClockStop, fit_max_steps
from .data import write_duplex_sessions, write_scene_questions

RECIPES = Path(__file__).with_name("recipes")
REPORT_FILE = "training_report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Default minutes per stage (total ~81 with data and export on 2 cores).
STAGE_MINUTES = {
    "speech_tokenizer": 6.0,
    "flow": 8.0,
    "vocoder": 9.0,
    "questions": 14.0,
    "duplex": 28.0,
    "speech_decoder": 6.0,
    "rehearsal": 8.0,
}


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
    log: object = print
    stage_minutes: dict = field(default_factory=lambda: dict(STAGE_MINUTES))

    def budget_s(self, stage: str) -> float:
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
    steps = fit_max_steps(trainer, budget - (time.perf_counter() - started))
    settings.log(f"[{name}] {steps} steps planned in {budget / 60:.1f} min")
    result = trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    report[name] = {
        "budget_s": budget,
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


def train_speech_units(model, settings: DemoSettings, report: dict):
    """Stage 1: speech tokenizer, then flow + speaker encoder, then vocoder, all on one espeak corpus."""
    from ..speech_corpus import assistant_reference_clip, build_speech_corpus
    from ..train_speech_tokenizer import train_speech_tokenizer
    from ..train_token2wav import train_flow, train_vocoder

    started = time.perf_counter()
    clips = build_speech_corpus(settings.speech_clips, seed=settings.seed)
    report["speech_corpus"] = {"clips": len(clips), "seconds": time.perf_counter() - started}
    token2wav = model.token2wav
    report["speech_tokenizer"] = train_speech_tokenizer(
        token2wav.speech_tokenizer, clips, settings.budget_s("speech_tokenizer"), seed=settings.seed, log=settings.log)
    report["flow"] = train_flow(token2wav, clips, settings.budget_s("flow"), seed=settings.seed, log=settings.log)
    report["vocoder"] = train_vocoder(
        token2wav.hift_original, clips, settings.budget_s("vocoder"), seed=settings.seed, log=settings.log)
    return assistant_reference_clip()


def write_data(model, reference, settings: DemoSettings, report: dict) -> tuple[Path, Path]:
    started = time.perf_counter()
    data_dir = settings.work / "data"
    sessions = write_duplex_sessions(settings.sessions, settings.seed, data_dir,
                                     speech_tokenizer=model.token2wav.speech_tokenizer, voice_audio=reference.audio)
    questions = write_scene_questions(settings.questions, settings.seed, data_dir,
                                      speech_tokenizer=model.token2wav.speech_tokenizer, voice_audio=reference.audio)
    report["data"] = {"sessions": settings.sessions, "questions": settings.questions,
                      "seconds": time.perf_counter() - started}
    return sessions, questions


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

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    report: dict = {"settings": {"minutes_scale": settings.minutes_scale, "speech_clips": settings.speech_clips,
                                 "sessions": settings.sessions, "questions": settings.questions,
                                 "seed": settings.seed, "threads": settings.threads,
                                 "stage_minutes": settings.stage_minutes}}
    report["source"] = _source_revision()
    config = demo_config()
    model = MiniCPMOForConditionalGeneration(config)
    processor = build_processor(config)
    reference = train_speech_units(model, settings, report)
    model.token2wav.requires_grad_(False)
    sessions, questions = write_data(model, reference, settings, report)
    run_recipe("questions", model, processor, settings, questions, report)
    run_recipe("duplex", model, processor, settings, sessions, report)
    run_recipe("speech_decoder", model, processor, settings, sessions, report)
    run_rehearsal(model, processor, settings, sessions, questions, report)
    model.requires_grad_(True)
    report["total_minutes"] = (time.perf_counter() - started) / 60
    export(model.eval(), processor, reference, settings, report)
    settings.log(f"demo model written to {settings.out} in {report['total_minutes']:.1f} min "
                 f"({report['export']['total_mb']:.1f} MB of safetensors)")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m finetune.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="minicpmo/assets/demo_model", help="where the trained model goes")
    parser.add_argument("--work", default="runs/demo", help="data and trainer outputs")
    parser.add_argument("--minutes-scale", type=float, default=1.0, help="multiply every stage budget")
    parser.add_argument("--speech-clips", type=int, default=400)
    parser.add_argument("--sessions", type=int, default=600)
    parser.add_argument("--questions", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for name in ("minutes_scale", "speech_clips", "sessions", "questions", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    settings = DemoSettings(out=Path(args.out), work=Path(args.work), minutes_scale=args.minutes_scale,
                            speech_clips=args.speech_clips, sessions=args.sessions, questions=args.questions,
                            seed=args.seed, threads=args.threads)
    return build_demo_model(settings)


__all__ = ["DemoSettings", "STAGE_MINUTES", "build_demo_model", "build_processor", "main"]
