"""HTML for the live tab: a listen/speak timeline strip (one cell per 1-s unit) and the running transcript."""

import html

from .live_sessions import LiveStats, UnitEvent

MAX_CELLS = 90
# Inline styles: gr.HTML output needs no launch(css=...) that way.
CELL_STYLE = ("display:inline-flex;width:16px;height:22px;margin:1px;border-radius:3px;font:11px monospace;"
              "color:#fff;align-items:center;justify-content:center;background:{color};{extra}")
COLORS = {"listen": "#9ca3af", "speak": "#16a34a", "interrupted": "#dc2626"}


def transcript_turns(events: list[UnitEvent]) -> list[str]:
    """Assistant speech grouped into turns (a turn ends at end_of_turn or a barge-in)."""
    turns, current = [], []
    for event in events:
        if event.action == "speak" and event.text:
            current.append(event.text)
        if (event.end_of_turn or event.interrupted) and current:
            turns.append("".join(current).strip())
            current = []
    if current:
        turns.append("".join(current).strip() + " …")
    return turns


def render_timeline(events: list[UnitEvent]) -> str:
    """The strip plus transcript; `data-*` attributes let tests read the counts."""
    speaking = sum(event.action == "speak" for event in events)
    cells = []
    for event in events[-MAX_CELLS:]:
        classes = ["mc-cell", f"mc-{event.action}"]
        if event.end_of_turn:
            classes.append("mc-eot")
        if event.interrupted:
            classes.append("mc-interrupted")
        title = html.escape(f"{event.time_s:.0f} s {event.action}: {event.text} ({event.step_s:.2f} s compute)")
        color = COLORS["interrupted" if event.interrupted else event.action]
        style = CELL_STYLE.format(color=color, extra="outline:2px solid #1d4ed8;" if event.end_of_turn else "")
        letter = "S" if event.action == "speak" else "L"
        cells.append(f'<span class="{" ".join(classes)}" style="{style}" title="{title}">{letter}</span>')
    lines = "\n".join(f"model: {html.escape(turn)}" for turn in transcript_turns(events)) or "(no speech yet)"
    return (f'<div class="mc-live" data-units="{len(events)}" data-speak="{speaking}">'
            f'<div class="mc-strip" style="margin-bottom:8px">{"".join(cells) or "<i>waiting for audio…</i>"}</div>'
            f'<div class="mc-transcript" style="white-space:pre-wrap;max-height:220px;overflow-y:auto">{lines}</div>'
            "</div>")


def render_status(stats: LiveStats, state: str) -> str:
    return (f"{state} · units in {stats.units_in}, processed {stats.units_done}, dropped {stats.units_dropped}"
            f" · speech {stats.speech_s:.1f} s · last step {stats.last_step_s:.2f} s")
