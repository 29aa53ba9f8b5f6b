"""Speech output for turn-based use: LLM text -> speech codes (speech decoder) -> 24 kHz audio (token2wav).

Two entry points, mixed into `MiniCPMOForConditionalGeneration`:
- `generate(**inputs, return_audio=True, ref_audio=...)`: the normal transformers `generate`, then the spoken span
  (after the last `<|tts_bos|>`, up to `<|tts_eos|>`) is re-read by the LLM to get the hidden state of every spoken
  token, which conditions the speech decoder (official turn-based path, §6).
- `chat(msgs, processor=..., generate_audio=..., stream=...)`: builds the prompt, and with `stream=True` decodes text
  in chunks of `text_chunk_tokens`, turning each chunk into speech codes and audio at once (official half-duplex
  streaming), so the first audio arrives long before the text is finished.
"""

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from transformers import DynamicCache
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..audio_utils import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, read_audio_file  # noqa: F401 (re-exported)
from ..errors import SpeechOutputError
from ..special_tokens import MiniCPMOSpecialTokens
from .modeling_speech_decoder import SpeechSamplingConfig

TTS_BOS_TOKEN_ID = MiniCPMOSpecialTokens.tts_bos
TTS_EOS_TOKEN_ID = MiniCPMOSpecialTokens.tts_eos
TEXT_STOP_TOKEN_IDS = (MiniCPMOSpecialTokens.im_end, MiniCPMOSpecialTokens.endoftext)


@dataclass
class MiniCPMOGenerateOutput:
    """`generate(..., return_audio=True)` result: text ids plus, per sample, speech codes and a 24 kHz waveform."""

    sequences: torch.LongTensor
    speech_codes: list[torch.LongTensor] = field(default_factory=list)
    waveforms: list[torch.Tensor] = field(default_factory=list)
    sample_rate: int = OUTPUT_SAMPLE_RATE


@dataclass
class ChatChunk:
    """One step of a streaming chat: new text and the audio (24 kHz float32, possibly empty) that goes with it."""

    text: str
    audio: np.ndarray
    sample_rate: int = OUTPUT_SAMPLE_RATE
    is_last: bool = False


def spoken_span(token_ids: list[int], prompt_length: int) -> tuple[int, int]:
    """[start, end) of the spoken text: after the last <|tts_bos|>, up to the first <|tts_eos|> or stop token."""
    starts = [i for i, t in enumerate(token_ids) if t == TTS_BOS_TOKEN_ID]
    start = starts[-1] + 1 if starts else prompt_length
    end = len(token_ids)
    for i in range(start, len(token_ids)):
        if token_ids[i] == TTS_EOS_TOKEN_ID or token_ids[i] in TEXT_STOP_TOKEN_IDS:
            end = i
            break
    return start, end


def text_logits_processors(do_sample: bool, temperature: float, top_p: float, top_k: int,
                           repetition_penalty: float | None = None) -> LogitsProcessorList:
    """transformers' penalty and warpers for hand-driven text decoding (chat streaming, duplex units)."""
    processors = LogitsProcessorList()
    if repetition_penalty and repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if do_sample:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


def find_reference_audio(msgs: list[dict]):
    """The voice to clone: an audio item of the system message, else the first audio in the conversation."""
    for wanted_roles in (("system",), ("user", "assistant")):
        for message in msgs:
            if message.get("role") not in wanted_roles or isinstance(message.get("content"), str):
                continue
            for item in message.get("content") or []:
                if isinstance(item, dict) and item.get("type") == "audio":
                    return item.get("audio", item.get("path"))
    return None


class MiniCPMOSpeechOutputMixin:
    """Adds `generate(return_audio=True)` and `chat()` to the model; needs `self.tts` and `self.token2wav`."""

    def _require_speech(self) -> None:
        if getattr(self, "tts", None) is None:
            raise SpeechOutputError("this model was built with init_tts=False; it has no speech decoder / token2wav")
        if getattr(self, "token2wav", None) is None:
            raise SpeechOutputError(
                "this model has no token2wav weights (the speech-code -> 24 kHz decoder; the official release ships "
                "them apart from the checkpoint): load them with model.load_token2wav(DIR), DIR a token2wav/ folder "
                "written by save_pretrained or by `python -m minicpmo.convert_token2wav`, or pass generate_audio=False"
            )

    def prepare_voice(self, ref_audio, sample_rate: int = INPUT_SAMPLE_RATE):
        """Reference clip (np.ndarray / tensor at `sample_rate`, or a path) -> the token2wav voice prompt."""
        self._require_speech()
        if ref_audio is None:
            raise SpeechOutputError(
                "speech output needs a reference voice: pass ref_audio=..., or put an audio item in the system "
                "message (bundled voices: minicpmo.voices.load_voice('en_dlc'))"
            )
        if isinstance(ref_audio, str):
            ref_audio, sample_rate = read_audio_file(ref_audio)
        return self.token2wav.prepare_voice(ref_audio, sample_rate)

    # --- generate(return_audio=True) ---------------------------------------------------------------------------
    def generate(self, *args, return_audio: bool = False, ref_audio=None, voice=None, speech_sampling=None,
                 n_timesteps: int | None = None, **kwargs):
        """transformers' `generate`; with `return_audio=True` also the speech codes and 24 kHz waveform per sample.

        Args:
            *args, **kwargs: what transformers' `generate` takes (the processor's output: `input_ids` or
                `inputs_embeds`, `attention_mask`, media tensors; generation settings).
            return_audio: also decode the answer's speech (needs a model built with `init_tts`).
            ref_audio: 16 kHz reference waveform of the voice; default: the audio item of the system message,
                which the processor hands through as `ref_audio` in its output.
            voice: a prepared voice (`prepare_voice(...)`), used instead of `ref_audio`.
            speech_sampling: how speech codes are drawn (`SpeechSamplingConfig`, official defaults).
            n_timesteps: token2wav ODE steps (default: the token2wav config's).

        Returns:
            What transformers' `generate` returns; with `return_audio=True` a `MiniCPMOGenerateOutput` with
            `sequences`, and per sample `speech_codes` and `waveforms` (float32, 24 kHz).
        """
        if not return_audio:
            return super().generate(*args, **kwargs)
        self._require_speech()
        voice = voice if voice is not None else self.prepare_voice(ref_audio)
        kwargs["return_dict_in_generate"] = False
        sequences = super().generate(*args, **kwargs)
        inputs = dict(kwargs)
        if args:
            inputs["input_ids"] = args[0]
        if inputs.get("input_ids") is None:  # generated from inputs_embeds: the output holds new tokens only
            return self._speech_from_embeddings(sequences, inputs, voice, speech_sampling, n_timesteps)
        prompt_length = inputs["input_ids"].shape[1]
        hidden = self._hidden_states_of(sequences, prompt_length, inputs)
        output = MiniCPMOGenerateOutput(sequences=sequences)
        for row in range(sequences.shape[0]):
            start, end = spoken_span(sequences[row].tolist(), prompt_length)
            self._append_speech(output, sequences[row, start:max(start, end)], hidden[row, start:max(start, end)],
                                voice, speech_sampling, n_timesteps)
        return output

    @torch.no_grad()
    def _speech_from_embeddings(self, new_tokens, inputs, voice, speech_sampling, n_timesteps):
        """Speech for a generation that started from `inputs_embeds`: the prompt stays embeddings, the new tokens
        are embedded and re-read with it to get their hidden states."""
        prompt = inputs["inputs_embeds"]
        prompt_mask = inputs.get("attention_mask")
        if prompt_mask is None:
            prompt_mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device)
        embeds = torch.cat([prompt, self.get_input_embeddings()(new_tokens).to(prompt.dtype)], dim=1)
        mask = torch.cat([prompt_mask, torch.ones_like(new_tokens)], dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                            use_cache=False).last_hidden_state[:, prompt.shape[1]:]
        output = MiniCPMOGenerateOutput(sequences=new_tokens)
        for row in range(new_tokens.shape[0]):
            start, end = spoken_span(new_tokens[row].tolist(), 0)
            self._append_speech(output, new_tokens[row, start:end], hidden[row, start:end], voice, speech_sampling,
                                n_timesteps)
        return output

    def _append_speech(self, output, text_ids, text_hidden, voice, speech_sampling, n_timesteps) -> None:
        if text_ids.numel() == 0:
            codes = torch.zeros(0, dtype=torch.long)
        else:
            codes = self.tts.generate_codes(text_ids, text_hidden, speech_sampling)
        output.speech_codes.append(codes.cpu())
        output.waveforms.append(self.token2wav.synthesize(codes, voice, n_timesteps=n_timesteps).cpu())

    @torch.no_grad()
    def _hidden_states_of(self, sequences: torch.LongTensor, prompt_length: int, inputs: dict) -> torch.Tensor:
        """Final-norm LLM hidden state at every position of prompt + generated text (positions as in generate)."""
        prompt_mask = inputs.get("attention_mask")
        if prompt_mask is None:
            prompt_mask = torch.ones(sequences.shape[0], prompt_length, dtype=torch.long, device=sequences.device)
        mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, prompt_length:])], dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        multimodal = {k: inputs[k] for k in ("pixel_values", "tgt_sizes", "input_features", "input_features_mask")
                      if inputs.get(k) is not None}
        out = self.model(input_ids=sequences, attention_mask=mask, position_ids=positions, use_cache=False, **multimodal)
        return out.last_hidden_state

    # --- chat ----------------------------------------------------------------------------------------------------
    def chat(self, msgs: list[dict], processor, generate_audio: bool = False, stream: bool = False, ref_audio=None,
             max_new_tokens: int = 512, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 0.7,
             top_p: float = 0.8, top_k: int = 100, repetition_penalty: float = 1.02, enable_thinking: bool = False,
             max_slice_nums: int | None = None, speech_sampling: SpeechSamplingConfig | None = None,
             n_timesteps: int | None = None, text_chunk_tokens: int = 10, max_codes_per_chunk: int = 500,
             seed: int | None = None, omni_mode: bool | None = None, use_tts_template: bool | None = None):
        """Turn-based chat, with the official chat() prompt and decoding defaults.

        `<|tts_bos|>` ends the prompt whenever the messages hold audio (or speech is generated), unless
        `use_tts_template` says otherwise; `omni_mode` joins a message's items with "" instead of "\n" (on by
        default for video). The repetition penalty sees generated tokens only.

        Args:
            msgs: chat messages (`{"role", "content"}`; content a string or a list of text/image/audio/video items).
            processor: the `MiniCPMOProcessor` that renders and encodes them.
            generate_audio: also speak the answer, in the voice of `ref_audio` or the first audio of `msgs`.
            stream: return an iterator of `ChatChunk` (text delta + 24 kHz audio chunk) instead.
            max_new_tokens, min_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, seed: LLM
                decoding (greedy with penalty 1.02 by default).
            enable_thinking: let the model write `<think>...</think>` first.
            max_slice_nums: image slices per image (default 9).
            speech_sampling, n_timesteps: speech-code sampling and token2wav ODE steps.
            text_chunk_tokens, max_codes_per_chunk: streaming granularity of speech.

        Returns:
            The answer text; `(text, waveform)` with `generate_audio`; an iterator of `ChatChunk` with `stream`.
        """
        voice = None
        if generate_audio:
            voice = self.prepare_voice(ref_audio if ref_audio is not None else find_reference_audio(msgs))
        template_kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                               enable_thinking=enable_thinking)
        if use_tts_template is not None or generate_audio:
            template_kwargs["use_tts_template"] = bool(use_tts_template if use_tts_template is not None else True)
        if omni_mode is not None:
            template_kwargs["omni_mode"] = bool(omni_mode)
        if max_slice_nums is not None:
            template_kwargs["max_slice_nums"] = max_slice_nums
        inputs = processor.apply_chat_template(msgs, **template_kwargs)
        inputs.pop("ref_audio", None)
        inputs = inputs.to(self.device)
        chunks = self._stream_chat(
            inputs, processor.tokenizer, voice, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, speech_sampling=speech_sampling, n_timesteps=n_timesteps,
            text_chunk_tokens=text_chunk_tokens, max_codes_per_chunk=max_codes_per_chunk, seed=seed,
        )
        if stream:
            return chunks
        parts = list(chunks)
        text = "".join(p.text for p in parts)
        if not generate_audio:
            return text
        return text, np.concatenate([p.audio for p in parts]) if parts else np.zeros(0, np.float32)

    @torch.no_grad()
    def _stream_chat(self, inputs, tokenizer, voice, *, max_new_tokens, min_new_tokens, do_sample, temperature, top_p,
                     top_k, repetition_penalty, speech_sampling, n_timesteps, text_chunk_tokens,
                     max_codes_per_chunk, seed) -> Iterator[ChatChunk]:
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        processors = text_logits_processors(do_sample, temperature, top_p, top_k, repetition_penalty)
        stop_ids = (TTS_EOS_TOKEN_ID, *TEXT_STOP_TOKEN_IDS)
        tts_state = self.tts.new_stream_state(seed) if voice is not None else None
        wav_state = self.token2wav.start_stream(voice, n_timesteps=n_timesteps) if voice is not None else None

        cache = DynamicCache(config=self.config)
        out = self(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        history = inputs["input_ids"][:, :0]  # the penalty sees generated tokens only, never the prompt
        next_position = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].shape[1]
        generated: list[int] = []
        chunk_ids: list[int] = []
        chunk_hidden: list[torch.Tensor] = []
        emitted_text = ""
        finished = False
        while not finished:
            scores = processors(history, logits.float())
            if len(generated) < min_new_tokens:
                scores[:, list(stop_ids)] = float("-inf")
            if do_sample:
                token = int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
            else:
                token = int(scores.argmax(-1))
            finished = token in stop_ids or len(generated) + 1 >= max_new_tokens
            if token not in stop_ids:
                generated.append(token)
                step_ids = torch.tensor([[token]], device=self.device)
                history = torch.cat([history, step_ids], dim=1)
                step = self.model(input_ids=step_ids, cache=cache, use_cache=True,
                                  position_ids=torch.tensor([[next_position]], device=self.device))
                next_position += 1
                hidden = step.last_hidden_state[:, -1]
                logits = self.lm_head(hidden)
                chunk_ids.append(token)
                chunk_hidden.append(hidden[0])
            if len(chunk_ids) >= text_chunk_tokens or (finished and (chunk_ids or wav_state is not None)):
                text = tokenizer.decode(generated, skip_special_tokens=True)
                delta, emitted_text = text[len(emitted_text):], text
                audio = np.zeros(0, dtype=np.float32)
                if voice is not None:
                    ids = torch.tensor(chunk_ids, dtype=torch.long, device=self.device)
                    hid = torch.stack(chunk_hidden) if chunk_hidden else torch.zeros(0, self.config.hidden_size,
                                                                                      device=self.device)
                    codes, tts_state = self.tts.step(ids, hid, tts_state, is_last_chunk=finished,
                                                     sampling=speech_sampling,
                                                     max_codes_per_chunk=max_codes_per_chunk)
                    wav, wav_state = self.token2wav.push(codes, wav_state, end_of_turn=finished)
                    audio = wav.detach().float().cpu().numpy()
                yield ChatChunk(text=delta, audio=audio, is_last=finished)
                chunk_ids, chunk_hidden = [], []
