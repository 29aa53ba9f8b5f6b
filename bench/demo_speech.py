"""How well the demo model's token2wav turns speech codes back into the speech they came from (run by hand).

    python bench/demo_speech.py [--model minicpmo/assets/demo_model] [--out out/demo_speech]

Held-out assistant sentences (text never in the training corpus) are spoken by espeak-ng, encoded with the
model's S3 tokenizer and decoded by its token2wav with the assistant reference (the model's `voice.wav`) as the prompt. Without an ASR model
here, intelligibility is measured by proxies (finetune.train_token2wav.evaluate_resynthesis): log-mel L1 to the
original, and whether the tokenizer gives the resynthesis the same codes as the original (content preserved),
next to the same numbers for an untrained token2wav of the same size and the chance level. Example wavs go to
--out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from finetune.speech_corpus import assistant_reference_clip, heldout_sentences, make_clip
    from finetune.train_token2wav import evaluate_resynthesis
    from minicpmo import MiniCPMOForConditionalGeneration
    from minicpmo.configuration.configuration_token2wav import Token2WavConfig
    from minicpmo.modeling.modeling_token2wav import MiniCPMOToken2Wav
    from minicpmo.synthetic.episodes import ASSISTANT_VOICE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minicpmo/assets/demo_model")
    parser.add_argument("--out", default="out/demo_speech")
    parser.add_argument("--sentences", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MiniCPMOForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    trained = model.token2wav
    untrained = MiniCPMOToken2Wav(Token2WavConfig.from_dict(trained.config.to_dict())).eval()
    heldout = [make_clip(text, ASSISTANT_VOICE) for text in heldout_sentences(args.sentences)]
    reference = assistant_reference_clip()  # the clip saved as the model's voice.wav
    rows = {
        "trained": evaluate_resynthesis(trained, heldout, reference, os.path.join(args.out, "trained")),
        "untrained": evaluate_resynthesis(untrained, heldout, reference, scorer=trained),
    }
    print(f"{len(heldout)} held-out sentences, {sum(c.duration_s for c in heldout):.1f} s of speech")
    print("| token2wav | log-mel L1 | code agreement | chance | FSQ digit agreement | digit chance |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['mel_l1']:.2f} | {row['code_agreement']:.3f} | {row['chance_agreement']:.3f} | "
              f"{row['digit_agreement']:.3f} | {row['digit_chance']:.3f} |")
    print(f"examples: {args.out}/trained")


if __name__ == "__main__":
    main()
