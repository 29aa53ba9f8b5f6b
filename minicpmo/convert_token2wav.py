"""Convert the official token2wav weights (``flow.pt`` + HiFT ``.pt``) to ``model.safetensors`` + ``config.json``.

    python -m minicpmo.convert_token2wav ASSETS_DIR OUT_DIR [--config TOKEN2WAV_CONFIG.json]

``ASSETS_DIR`` is the official ``assets/token2wav/`` folder. The vocoder is the original CosyVoice2 HiFT:
``hift_original.pt`` when present (minicpmo-utils 1.0.7 ships the causal CosyVoice3 vocoder as
``hift.pt`` next to it), else ``hift.pt`` (1.0.5). Files are read with ``torch.load(weights_only=True)``,
which refuses arbitrary pickled objects. Keys get the ``flow.`` / ``hift_original.`` prefixes of
``token2wav_state_dict.tsv``; old-style weight-norm pairs (``weight_g`` / ``weight_v``) become the
parametrization names (``parametrizations.weight.original0`` / ``original1``). The result must match
``MiniCPMOToken2Wav`` built with ``voice_encoders=False`` exactly (names and shapes) or nothing is written.

The ONNX voice encoders (``campplus.onnx``, ``speech_tokenizer_v2_25hz.onnx``) are not converted here, so
the written ``config.json`` has ``voice_encoders: false``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import torch

from .configuration.configuration_token2wav import Token2WavConfig
from .errors import CheckpointError
from .modeling.modeling_token2wav import MiniCPMOToken2Wav

try:
    from safetensors.torch import save_file
except ImportError:  # pragma: no cover - safetensors comes with transformers
    save_file = None


class Token2WavConversionError(CheckpointError):
    """The official files are missing, unreadable, or do not match the expected token2wav layout."""


_WEIGHT_NORM_SUFFIXES = {
    ".weight_g": ".parametrizations.weight.original0",
    ".weight_v": ".parametrizations.weight.original1",
}


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` dict from a .pt file, loaded without unpickling arbitrary objects."""
    if not path.is_file():
        raise Token2WavConversionError(f"missing checkpoint file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as error:
        raise Token2WavConversionError(
            f"{path} is not a plain tensor checkpoint (torch.load weights_only=True refused it): {error}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise Token2WavConversionError(f"{path} must hold a dict of tensors (a state_dict)")
    return state


def rename_keys(state: dict[str, torch.Tensor], prefix: str, aliases: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Strip ``module.`` / alias prefixes, map old weight-norm names, then add ``prefix``."""
    renamed = {}
    for name, tensor in state.items():
        key = name[len("module.") :] if name.startswith("module.") else name
        for known in (prefix, *aliases):
            if key.startswith(known):
                key = key[len(known) :]
                break
        for old, new in _WEIGHT_NORM_SUFFIXES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        if prefix + key in renamed:
            raise Token2WavConversionError(f"two checkpoint keys map to {prefix + key}")
        renamed[prefix + key] = tensor
    return renamed


def check_against_model(tensors: dict[str, torch.Tensor], config: Token2WavConfig) -> None:
    """Strict comparison with the keys and shapes of ``MiniCPMOToken2Wav(config)`` (built on the meta device)."""
    with torch.device("meta"):
        model = MiniCPMOToken2Wav(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{name}: checkpoint {tuple(tensors[name].shape)} vs model {expected[name]}"
        for name in set(expected) & set(tensors)
        if tuple(tensors[name].shape) != expected[name]
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
    if wrong:
        problems.append(f"{len(wrong)} with a wrong shape (e.g. {wrong[:5]})")
    if problems:
        raise Token2WavConversionError("checkpoint does not match MiniCPMOToken2Wav: " + "; ".join(problems))


def convert_token2wav(assets_dir, out_dir, config: Token2WavConfig | None = None) -> Path:
    """Convert and write ``out_dir/model.safetensors`` + ``out_dir/config.json``; returns ``out_dir``."""
    if save_file is None:
        raise ImportError("writing model.safetensors needs the safetensors package")
    assets_dir, out_dir = Path(assets_dir), Path(out_dir)
    if not assets_dir.is_dir():
        raise Token2WavConversionError(f"assets folder not found: {assets_dir}")
    base = config if config is not None else Token2WavConfig()
    config = Token2WavConfig.from_dict({**base.to_dict(), "voice_encoders": False})

    hift_path = assets_dir / "hift_original.pt"
    if not hift_path.is_file():
        hift_path = assets_dir / "hift.pt"
    tensors = rename_keys(load_checkpoint(assets_dir / "flow.pt"), "flow.")
    tensors.update(rename_keys(load_checkpoint(hift_path), "hift_original.", aliases=("hift.",)))
    check_against_model(tensors, config)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().contiguous() for name, t in tensors.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("assets_dir", help="official assets/token2wav folder (flow.pt, hift.pt / hift_original.pt)")
    parser.add_argument("out_dir", help="where model.safetensors and config.json are written")
    parser.add_argument("--config", help="Token2WavConfig JSON for non-official sizes (default: official)")
    args = parser.parse_args(argv)
    config = None
    if args.config:
        config = Token2WavConfig.from_dict(json.loads(Path(args.config).read_text()))
    try:
        out = convert_token2wav(args.assets_dir, args.out_dir, config)
    except Token2WavConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
