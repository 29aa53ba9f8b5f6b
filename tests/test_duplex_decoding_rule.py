"""Duplex decoding rule (official §8, "Loop j = 0..19") on the tiny model, with the logits steered per fed input.

The first token of a unit is decoded like every other token: a raw draw that may return `<|chunk_eos|>`, then the
official forbidden mask (`<|tts_pad|>`, the 6965 `bad_token_ids`, `<|chunk_eos|>`), the repetition divide and the
`<|turn_eos|>` length penalty. `<|listen|>` first makes a listen unit; any other first token makes a speaking unit
and is fed, but is left out of the unit's text and speech condition. `restrict_decision` is the opt-in
listen/speak-only first token.
"""

import json
import types

import numpy as np
import pytest
import torch
from helpers import processor, tiny_model, tone

from minicpmo import DuplexConfig, MiniCPMOForConditionalGeneration
from minicpmo.processing.duplex_inputs_minicpmo import decoding_forbidden_ids
from minicpmo.processing import load_bad_token_ids
from minicpmo.processing.duplex_layout_minicpmo import DuplexTokens
from minicpmo.voices import load_voice

TOK = DuplexTokens()
PREFILL = "unit prefill"  # key of the logits read after a unit's input slots (the first token's logits)
MARGIN = 100.0  # far above the tiny model's logit spread: the favoured id is the argmax and takes all the mass
SAMPLING = [dict(do_sample=False)] + [dict(do_sample=True, seed=seed) for seed in (0, 1, 2)]


def text_ids(text="Hello there friend"):
    ids = processor().tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(set(ids)) == len(ids) and not set(ids) & set(load_bad_token_ids())
    return ids


def steer(monkeypatch, rule):
    """Raise one id to the top of the logits after each feed: `rule(key)` names it (None: leave the logits as
    they are). `key` is PREFILL after a unit's input embeddings, else the last id just fed."""
    real_feed = MiniCPMOForConditionalGeneration.duplex_feed

    def feed(model, context, input_ids=None, inputs_embeds=None, logits=True):
        hidden, logits = real_feed(model, context, input_ids=input_ids, inputs_embeds=inputs_embeds, logits=logits)
        favoured = rule(PREFILL if input_ids is None else int(input_ids[0, -1]))
        if favoured is not None and logits is not None:
            logits = logits.clone()
            logits[favoured] = logits.max() + MARGIN
        return hidden, logits

    monkeypatch.setattr(MiniCPMOForConditionalGeneration, "duplex_feed", feed)


def session(**controls):
    controls = {"generate_audio": False, "force_listen_count": 0, **controls}
    return tiny_model().duplex_session(processor(), record=True, **controls)


def chunks(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.05 * rng.standard_normal(16000)).astype(np.float32) + tone(1.0, 300 + 40 * k) for k in range(n)]


# (a) ----------------------------------------------------------------------------------------------------------------
def test_forbidden_ids_are_exactly_the_official_ones(shared_dir):
    official = json.loads((shared_dir / "tokenizer" / "tokenizer_config.json").read_text())["bad_token_ids"]
    assert len(set(official)) == 6965
    expected = set(official) | {TOK.tts_pad, TOK.chunk_eos}
    forbidden = session().runtime.forbidden_ids.tolist()
    assert sorted(forbidden) == forbidden and set(forbidden) == expected and len(forbidden) == 6967
    # Layout and decision tokens are not forbidden by the official loop, so they are not here either.
    assert not {TOK.listen, TOK.speak, TOK.turn_eos, TOK.chunk_tts_eos, TOK.unit_end, TOK.im_end} & set(forbidden)
    # A tokenizer that carries no bad_token_ids falls back to the bundled official list.
    bare = types.SimpleNamespace(init_kwargs={})
    assert set(decoding_forbidden_ids(bare, TOK)) == expected


# (b) ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("favoured", [load_bad_token_ids()[3000], load_bad_token_ids()[0], TOK.tts_pad],
                         ids=["bad_token", "first_bad_token", "tts_pad"])
@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "seed0", "seed1", "seed2"])
def test_a_favoured_forbidden_token_is_never_emitted(monkeypatch, favoured, sampling):
    steer(monkeypatch, lambda key: favoured)  # every logit vector the model produces puts it on top
    live = session(max_speak_tokens_per_unit=6, **sampling)
    outs = [live.step(chunk) for chunk in chunks(5)]
    forbidden = set(live.runtime.forbidden_ids.tolist())
    for out in outs:
        assert favoured not in out.token_ids
        # <|chunk_eos|> (itself forbidden after the raw draw) only ever appears as the unit's terminator.
        assert not forbidden & set(out.token_ids[:-1])
    assert favoured not in live.state.sequence_ids
    # Not vacuous: the units did decode text past their first token (the mask picked other tokens).
    assert sum(len(out.token_ids) > 2 for out in outs) >= 2


# (c) ----------------------------------------------------------------------------------------------------------------
def test_a_unit_opened_by_a_text_token_is_a_speaking_unit_without_that_token(monkeypatch):
    first, second, third = text_ids()
    plan = {PREFILL: first, first: second, second: third, third: TOK.chunk_eos}
    steer(monkeypatch, plan.get)
    conditioned = []

    def speak(model, decoded, tts_state, wav_state, tokens, turn_start, do_sample, seed):
        conditioned.append((list(decoded.text_ids), len(decoded.text_hidden), turn_start))
        return np.zeros(0, np.float32), tts_state, wav_state, {}

    monkeypatch.setattr(MiniCPMOForConditionalGeneration, "duplex_speak", speak)
    live = tiny_model().duplex_session(processor(), ref_audio=load_voice("en_dlc"), force_listen_count=0,
                                       record=True)
    out = live.step(chunks(1)[0])
    assert not out.is_listen and not out.interrupted and live.state.in_turn
    assert out.token_ids == [first, second, third, TOK.chunk_eos]
    # The first token was fed (it is in the KV layout) but is neither text nor speech condition.
    assert live.state.sequence_ids[-5:] == [first, second, third, TOK.chunk_eos, TOK.unit_end]
    assert out.text == processor().tokenizer.decode([second, third])
    assert conditioned == [([second, third], 2, True)]


# (d) ----------------------------------------------------------------------------------------------------------------
def test_listen_first_is_a_listen_unit_and_a_barge_in_inside_a_turn(monkeypatch):
    first, second, _ = text_ids()
    plan = {PREFILL: first, first: second, second: TOK.chunk_eos}
    steer(monkeypatch, lambda key: plan.get(key))
    live = session()
    speaking = live.step(chunks(1)[0])
    assert not speaking.is_listen and speaking.token_ids == [first, second, TOK.chunk_eos] and live.state.in_turn
    plan[PREFILL] = TOK.listen
    out = live.step(chunks(1, seed=1)[0])
    assert out.is_listen and out.token_ids == [TOK.listen] and out.text == "" and out.audio is None
    assert out.interrupted and out.end_of_turn and not live.state.in_turn
    assert live.state.sequence_ids[-2:] == [TOK.listen, TOK.unit_end]
    again = live.step(chunks(1, seed=2)[0])
    assert again.is_listen and not again.interrupted  # outside a turn a listen is just a listen


def test_listen_later_in_a_speaking_unit_becomes_tts_bos(monkeypatch):
    first, second, _ = text_ids()
    plan = {PREFILL: first, first: TOK.listen, TOK.tts_bos: second, second: TOK.chunk_eos}
    steer(monkeypatch, plan.get)
    out = session().step(chunks(1)[0])
    # Spec: <|listen|> sampled while the turn is open is replaced by <|tts_bos|>, which is fed; the unit goes on.
    assert not out.is_listen and out.token_ids == [first, TOK.tts_bos, second, TOK.chunk_eos]


# (e) ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "seed0", "seed1", "seed2"])
def test_restrict_decision_picks_only_listen_or_speak(monkeypatch, sampling):
    first, second, _ = text_ids()
    bad = load_bad_token_ids()[3000]
    # The first token's logits favour a text token, then a bad token, then <|chunk_eos|>: none may open a unit.
    favourites = iter([first, bad, TOK.chunk_eos, first, bad])
    steer(monkeypatch, lambda key: next(favourites, first) if key == PREFILL else None)
    assert DuplexConfig().restrict_decision is False
    live = session(restrict_decision=True, max_speak_tokens_per_unit=4, **sampling)
    outs = [live.step(chunk) for chunk in chunks(5)]
    assert all(out.token_ids[0] in (TOK.listen, TOK.speak) for out in outs)
    assert all(out.is_listen == (out.token_ids[0] == TOK.listen) for out in outs)


@pytest.mark.parametrize("restrict", [False, True], ids=["official", "restricted"])
def test_listen_bias_decides_in_both_modes(monkeypatch, restrict):
    first, _, _ = text_ids()
    steer(monkeypatch, lambda key: first if key == PREFILL else None)
    talk = session(restrict_decision=restrict, listen_bias=-1e9, max_speak_tokens_per_unit=3)
    assert not any(talk.step(chunk).is_listen for chunk in chunks(3))
    steer(monkeypatch, lambda key: TOK.listen if key == PREFILL else None)
    talk = session(restrict_decision=restrict, listen_bias=-1e9, max_speak_tokens_per_unit=3)
    assert not any(talk.step(chunk).is_listen for chunk in chunks(3))  # even when the model wants to listen
    steer(monkeypatch, lambda key: first if key == PREFILL else None)
    quiet = session(restrict_decision=restrict, listen_bias=1e9)
    assert all(quiet.step(chunk).token_ids == [TOK.listen] for chunk in chunks(3))


# (f) ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", SAMPLING[:2], ids=["greedy", "seed0"])
def test_a_raw_chunk_eos_ends_the_unit(monkeypatch, sampling):
    first, _, _ = text_ids()
    plan = {PREFILL: TOK.chunk_eos}
    steer(monkeypatch, plan.get)
    live = session(**sampling)
    out = live.step(chunks(1)[0])
    # First draw: the unit ends at once; not a listen, and it carries no text.
    assert out.token_ids == [TOK.chunk_eos] and not out.is_listen and out.text == ""
    assert live.state.sequence_ids[-3:] == [TOK.unk, TOK.chunk_eos, TOK.unit_end]
    plan.update({PREFILL: first, first: TOK.chunk_eos})
    out = live.step(chunks(1, seed=1)[0])
    assert out.token_ids == [first, TOK.chunk_eos] and not out.is_listen


def test_chunk_eos_only_wins_the_raw_draw(monkeypatch):
    bad = load_bad_token_ids()[3000]
    real_feed = MiniCPMOForConditionalGeneration.duplex_feed

    def feed(model, context, input_ids=None, inputs_embeds=None, logits=True):
        hidden, logits = real_feed(model, context, input_ids=input_ids, inputs_embeds=inputs_embeds, logits=logits)
        if logits is None:  # the system prefill and a unit's closing: no vocabulary head
            return hidden, None
        logits = logits.clone()
        top = logits.max()
        logits[bad] = top + 2 * MARGIN  # wins the raw draw, then masked
        logits[TOK.chunk_eos] = top + MARGIN  # runner-up of the raw draw: masked too, so it cannot end the unit
        return hidden, logits

    monkeypatch.setattr(MiniCPMOForConditionalGeneration, "duplex_feed", feed)
    live = session(max_speak_tokens_per_unit=5)
    out = live.step(chunks(1)[0])
    # Neither of the two top ids is decoded; the budget's forced <|chunk_eos|> is the only terminator.
    assert len(out.token_ids) == 5 and out.token_ids[-1] == TOK.chunk_eos
    assert not {bad, TOK.chunk_eos} & set(out.token_ids[:-1])
    assert not out.is_listen


def test_the_budget_still_forces_chunk_eos(monkeypatch):
    first, second, third = text_ids()
    cycle = {PREFILL: first, first: second, second: third, third: first}
    steer(monkeypatch, cycle.get)
    out = session(max_speak_tokens_per_unit=4, repetition_penalty=1.0).step(chunks(1)[0])
    assert out.token_ids == [first, second, third, TOK.chunk_eos]
    assert out.text == processor().tokenizer.decode([second, third])
    assert torch.is_tensor(session().runtime.forbidden_ids)
