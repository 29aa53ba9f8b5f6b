"""Write a flat Hub folder that loads with `trust_remote_code=True` where `minicpmo` is not installed.

    python -m minicpmo.export --tiny DIR          # small random model with every component, plus processor
    python -m minicpmo.export --from PATH DIR     # re-export a checkpoint (official or ours) with this code

transformers' dynamic modules only follow flat sibling imports (`from .x import y`), so the code files of
`minicpmo/{configuration,modeling,processing}` are copied side by side and their package-relative imports are
rewritten to sibling imports. Weights are written with the official key names.
"""

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

from .configuration.configuration_presets import tiny_config
from .modeling.modeling_minicpmo import MiniCPMOForConditionalGeneration
from .processing.processing_minicpmo import MiniCPMOProcessor

PACKAGE_ROOT = Path(__file__).resolve().parent
CODE_FOLDERS = ("configuration", "modeling", "processing")
# Leaf modules at the package root that the code folders import, and the duplex session the model opens.
EXTRA_CODE_FILES = ("audio_utils.py", "errors.py", "special_tokens.py", "duplex/duplex_config.py",
                    "duplex/duplex_session.py")
_RELATIVE_IMPORT = re.compile(r"^(\s*)from \.+(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*) import ", re.MULTILINE)

MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_minicpmo.MiniCPMOConfig",
    "AutoModel": "modeling_minicpmo.MiniCPMOForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_minicpmo.MiniCPMOForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_minicpmo.MiniCPMOForConditionalGeneration",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_minicpmo.MiniCPMOProcessor"}


def flatten_imports(source: str) -> str:
    """`from ..modeling.modeling_audio import X` -> `from .modeling_audio import X`."""
    return _RELATIVE_IMPORT.sub(lambda m: f"{m.group(1)}from .{m.group(2)} import ", source)


def _code_files() -> list[Path]:
    files = [path for folder in CODE_FOLDERS for path in sorted((PACKAGE_ROOT / folder).glob("*.py"))
             if path.name != "__init__.py"]
    return files + [PACKAGE_ROOT / name for name in EXTRA_CODE_FILES if (PACKAGE_ROOT / name).exists()]


def copy_code_flat(out_dir: Path) -> list[str]:
    written = []
    for path in _code_files():
        if path.name in written:
            raise RuntimeError(f"two code files share the basename {path.name}; the flat export needs unique names")
        (out_dir / path.name).write_text(flatten_imports(path.read_text()))
        written.append(path.name)
    for folder in CODE_FOLDERS:
        for data in (PACKAGE_ROOT / folder).glob("*.json"):
            shutil.copy(data, out_dir / data.name)
    return written


def _update_json(path: Path, update) -> None:
    data = json.loads(path.read_text())
    update(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_auto_maps(out_dir: Path) -> None:
    _update_json(out_dir / "config.json", lambda d: d.update(auto_map=dict(MODEL_AUTO_MAP)))
    processor_config = out_dir / "processor_config.json"
    if processor_config.exists():

        def add_processor_maps(d):
            d["auto_map"] = dict(PROCESSOR_AUTO_MAP)
            d["processor_class"] = "MiniCPMOProcessor"
            if isinstance(d.get("image_processor"), dict):
                d["image_processor"]["auto_map"] = {
                    "AutoImageProcessor": "image_processing_minicpmo.MiniCPMOImageProcessor"
                }
            if isinstance(d.get("feature_extractor"), dict):
                d["feature_extractor"]["auto_map"] = {
                    "AutoFeatureExtractor": "feature_extraction_minicpmo.MiniCPMOFeatureExtractor"
                }

        _update_json(processor_config, add_processor_maps)
    tokenizer_config = out_dir / "tokenizer_config.json"
    if tokenizer_config.exists():
        _update_json(tokenizer_config, lambda d: d.update(auto_map=dict(PROCESSOR_AUTO_MAP)))


def export(model: MiniCPMOForConditionalGeneration, processor: MiniCPMOProcessor, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    copy_code_flat(out_dir)
    write_auto_maps(out_dir)
    return out_dir


def build_tiny(seed: int = 0) -> MiniCPMOForConditionalGeneration:
    torch.manual_seed(seed)
    return MiniCPMOForConditionalGeneration(tiny_config()).eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minicpmo.export", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="export a small random model")
    source.add_argument("--from", dest="checkpoint", help="checkpoint folder to re-export")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny:
        model, processor = build_tiny(args.seed), MiniCPMOProcessor.from_defaults()
    else:
        model = MiniCPMOForConditionalGeneration.from_pretrained(args.checkpoint)
        try:
            processor = MiniCPMOProcessor.from_pretrained(args.checkpoint)
        except (OSError, ValueError):
            processor = MiniCPMOProcessor.from_defaults()
    out = export(model, processor, args.out_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
