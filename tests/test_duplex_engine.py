"""The batched duplex engine: sessions stepped together give the outputs they give stepped alone."""

import numpy as np
import pytest
import torch
from helpers import image, processor, tiny_model, tone

from minicpmo.duplex.engine import DuplexEngine, DuplicateSessionError, UnknownSessionError
from minicpmo.modeling.modeling_duplex_batch import BatchedDuplexError, stack_contexts
from minicpmo.audio_utils import InvalidAudioError
from minicpmo.voices import load_voice

# Four sessions with different prompts, controls and inputs; "c" joins at tick 2, "b" leaves after tick 3.
SESSIONS = {
    "a": dict(system_prompt="You watch the scene.", listen_bias=-1e9, force_listen_count=0,
              max_speak_tokens_per_unit=6),
    "b": dict(force_listen_count=1),
    "c": dict(system_prompt="Answer briefly, in one short sentence please.", listen_bias=-1e9,
              force_listen_count=0, max_speak_tokens_per_unit=4),
    "d": dict(listen_bias=2.0, force_listen_count=0, max_speak_tokens_per_unit=8),
}
JOIN, LEAVE, TICKS = {"c": 2}, {"b": 3}, 6


def unit_input(name, tick):
    rng = np.random.default_rng([ord(name), tick])
    audio = (0.05 * rng.standard_normal(16000)).astype(np.float32) + tone(1.0, 200 + 40 * tick + 7 * ord(name))
    frame = image(320 + 32 * (ord(name) % 3), 240, seed=tick) if (tick + ord(name)) % 2 == 0 else None
    return audio, frame


def schedule(name):
    return range(JOIN.get(name, 0), min(LEAVE.get(name, TICKS - 1), TICKS - 1) + 1)


def controls(name, voice):
    extra = dict(ref_audio=voice) if name == "a" else dict(generate_audio=False)
    return {**SESSIONS[name], **extra}


def summary(out):
    return (out.is_listen, out.token_ids, out.text, out.end_of_turn, out.interrupted,
            None if out.audio is None else out.audio.shape)


@pytest.fixture(scope="module")
def runs():
    model, proc, voice = tiny_model(), processor(), load_voice("en_dlc")
    alone = {}
    for name in SESSIONS:
        session = model.duplex_session(proc, **controls(name, voice))
        alone[name] = [session.step(*unit_input(name, tick)) for tick in schedule(name)]
        session.close()
    engine = DuplexEngine(model, proc)
    batched = {name: [] for name in SESSIONS}
    sizes = []
    for tick in range(TICKS):
        for name, start in [(n, JOIN.get(n, 0)) for n in SESSIONS]:
            if start == tick:
                engine.open(name, **controls(name, voice))
        units = {name: unit_input(name, tick) for name in engine.sessions}
        sizes.append(len(units))
        for name, out in engine.step(units).items():
            batched[name].append(out)
        for name, end in LEAVE.items():
            if end == tick:
                engine.close(name)
    return alone, batched, sizes


def test_sessions_stepped_together_equal_each_session_stepped_alone(runs):
    alone, batched, sizes = runs
    assert sizes == [3, 3, 4, 4, 3, 3]  # a late join and an early leave change the batch between ticks
    for name in SESSIONS:
        assert [summary(o) for o in batched[name]] == [summary(o) for o in alone[name]], name
    speaking = [o for name in SESSIONS for o in batched[name] if not o.is_listen]
    assert speaking and any(len(o.token_ids) > 2 for o in speaking)  # decode ran, rows stopped at different steps


def test_batched_speech_equals_the_speech_of_the_session_alone(runs):
    alone, batched, _ = runs
    spoken = [(x.audio, y.audio) for x, y in zip(alone["a"], batched["a"]) if x.audio is not None]
    assert spoken
    for reference, got in spoken:
        np.testing.assert_allclose(got, reference, atol=1e-4)


def test_caches_after_batched_ticks_equal_the_caches_of_the_session_alone():
    model, proc = tiny_model(), processor()
    alone = model.duplex_session(proc, **SESSIONS["a"], generate_audio=False)
    engine = DuplexEngine(model, proc)
    engine.open("a", **SESSIONS["a"], generate_audio=False)
    engine.open("short", generate_audio=False)
    for tick in range(3):
        alone.step(*unit_input("a", tick))
        engine.step({"a": unit_input("a", tick), "short": unit_input("d", tick)})
    ours, theirs = engine.sessions["a"].state.llm, alone.state.llm
    assert ours.next_position == theirs.next_position and ours.unit_spans == theirs.unit_spans
    for mine, ref in zip(ours.cache.layers, theirs.cache.layers):
        torch.testing.assert_close(mine.keys, ref.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.values, ref.values, atol=1e-5, rtol=1e-4)


def test_bad_input_fails_only_its_own_session():
    model, proc = tiny_model(), processor()
    engine = DuplexEngine(model, proc)
    engine.open("good", generate_audio=False)
    engine.open("bad", generate_audio=False)
    out = engine.step({"good": unit_input("a", 0), "bad": np.zeros((2, 16000), np.float32),
                       "ghost": unit_input("a", 0)})
    assert out["good"].unit_index == 0
    assert isinstance(out["bad"], InvalidAudioError)
    assert isinstance(out["ghost"], UnknownSessionError)
    assert engine.step({"bad": unit_input("b", 0)})["bad"].unit_index == 0  # the failed unit did not count
    with pytest.raises(DuplicateSessionError, match="already open"):
        engine.open("good")
    engine.close("good")
    with pytest.raises(UnknownSessionError, match="good"):
        engine.close("good")


def test_recording_sessions_are_not_batched():
    model, proc = tiny_model(), processor()
    session = model.duplex_session(proc, record=True, generate_audio=False)
    with pytest.raises(BatchedDuplexError, match="record"):
        stack_contexts([session.state.llm], model.config)
