"""Show activations on the text: a self-contained HTML page (the terminal view is in cli/viz.py).

Each character's background encodes one unit's value after reading it: white
at 0, red for positive, blue for negative. Values in [-1, 1] (h, tanh-bounded)
are shown as they are; a unit that goes beyond (an LSTM's c) is scaled by its
largest |value|.
"""

from __future__ import annotations

import html as html_lib
import json
from typing import Sequence

import numpy as np

_WHITE = np.array([255.0, 255.0, 255.0])
_RED = np.array([214.0, 39.0, 40.0])
_BLUE = np.array([31.0, 119.0, 180.0])
NEWLINE_MARK = "\u21b5"  # ↵, so that a newline's colour is visible

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #000; background: #fff; }
h1 { font-size: 1.2em; }
h2 { font-size: 1em; margin: 1.2em 0 0.3em; }
.legend { display: inline-block; width: 12em; height: 0.8em; vertical-align: middle;
          background: linear-gradient(to right, rgb(31,119,180), #fff, rgb(214,39,40)); }
.text { font-family: monospace; white-space: pre-wrap; line-height: 1.5; border: 1px solid #ddd; padding: 0.5em; }
.text span:hover { outline: 1px solid #000; }
.nl::before { content: "\\21b5"; color: #888; }
#tip { position: fixed; pointer-events: none; white-space: pre; font-family: monospace; font-size: 0.9em;
       background: #ffffe8; border: 1px solid #888; padding: 0.3em 0.5em; }
"""

# Tooltip: the value under the pointer and the model's guesses for the next character.
# No "//" comments: the page must hold no URL-like text at all.
_SCRIPT = """
const tip = document.getElementById("tip");
document.addEventListener("mouseover", (event) => {
  const span = event.target.closest ? event.target.closest("span[data-i]") : null;
  if (!span) { tip.hidden = true; return; }
  const position = Number(span.dataset.i);
  const lines = ["unit " + span.parentElement.dataset.unit + " = " + span.dataset.v + "   (character " + position + ")"];
  for (const [label, prob] of PREDICTIONS[position] || []) {
    lines.push(label.padEnd(4) + (100 * prob).toFixed(1).padStart(6) + "%");
  }
  tip.textContent = lines.join("\\n");
  tip.hidden = false;
});
document.addEventListener("mousemove", (event) => {
  tip.style.left = (event.clientX + 14) + "px";
  tip.style.top = (event.clientY + 14) + "px";
});
"""


def format_value(value: float) -> str:
    """A unit's value as the page and the tooltip show it."""
    return f"{value:+.3f}"


def colours(values: np.ndarray) -> list[str]:
    """Background colour "#rrggbb" of each value [N]: white at 0, red positive, blue negative."""
    values = np.asarray(values, np.float64)
    scale = max(1.0, float(np.max(np.abs(values), initial=0.0)))
    strength = np.clip(values / scale, -1.0, 1.0)[:, None]  # [N, 1]
    end = np.where(strength >= 0, _RED, _BLUE)  # [N, 3]
    rgb = np.rint(_WHITE + np.abs(strength) * (end - _WHITE)).astype(int)  # [N, 3]
    return [f"#{red:02x}{green:02x}{blue:02x}" for red, green, blue in rgb]


def shown(char: str) -> str:
    """A character as displayed: control characters other than newline and tab become their symbol (␍)."""
    code = ord(char)
    if char in "\n\t" or 32 <= code != 127:
        return char
    return chr(0x2421) if code == 127 else chr(0x2400 + code)


def _label(symbol: str) -> str:
    """A character (or a seq2seq target token) as a label, visible even when it is whitespace."""
    return {"\n": "\\n", "\t": "\\t", " ": "\u2423"}.get(symbol, "".join(map(shown, symbol)))


def _unit_block(text: str, unit: int, values: np.ndarray) -> str:
    spans = []
    for position, (char, value, colour) in enumerate(zip(text, values, colours(values))):
        mark = ' class="nl"' if char == "\n" else ""
        spans.append(f'<span{mark} data-i="{position}" data-v="{format_value(value)}" '
                     f'style="background:{colour}">{html_lib.escape(shown(char))}</span>')
    scale = max(1.0, float(np.max(np.abs(values), initial=0.0)))
    return (f'<section><h2>unit {unit} <small>(colour scale \u00b1{scale:.2f})</small></h2>'
            f'<div class="text" data-unit="{unit}">{"".join(spans)}</div></section>')


def _script_json(value) -> str:
    """JSON that cannot end the <script> element it sits in."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def html(text: str, units: dict[int, np.ndarray], predictions: list[list[tuple[str, float]]] | None,
         title: str) -> str:
    """One self-contained page: a block per unit, each character coloured by the unit's value after it.

    `predictions[i]` lists the (character, probability) guesses for the
    character after position i; hovering a character shows them with the value.
    """
    for unit, values in units.items():
        if len(values) != len(text):
            raise ValueError(f"unit {unit} has {len(values)} values for {len(text)} characters")
    predictions = predictions or []
    guesses = [[[_label(char), round(float(prob), 4)] for char, prob in position] for position in predictions]
    blocks = "\n".join(_unit_block(text, unit, np.asarray(values)) for unit, values in units.items())
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html_lib.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html_lib.escape(title)}</h1>\n"
        "<p>after each character: <span class=\"legend\"></span> blue negative, white 0, red positive; "
        "hover a character for its value and the model's next-character guesses</p>\n"
        f"{blocks}\n<div id=\"tip\" hidden></div>\n"
        f"<script>\nconst PREDICTIONS = {_script_json(guesses)};\n{_SCRIPT}</script>\n</body>\n</html>\n"
    )


_HEAT_STYLE = """
table.heat { border-collapse: collapse; font-family: monospace; }
table.heat td, table.heat th { width: 1.6em; height: 1.6em; text-align: center; font-weight: normal; }
table.heat td { border: 1px solid #eee; font-size: 0.7em; color: transparent; }
table.heat td:hover { color: #000; outline: 1px solid #000; }
"""


def _heat_colour(weight: float) -> str:
    """White at 0 to red at 1."""
    red, green, blue = np.rint(_WHITE + min(max(weight, 0.0), 1.0) * (_RED - _WHITE)).astype(int)
    return f"#{red:02x}{green:02x}{blue:02x}"


def attention_html(source: str, written: Sequence[str], weights: np.ndarray, title: str) -> str:
    """One self-contained page: a table with a row per written symbol (and the end symbol) and a
    column per source character, each cell coloured by the attention weight; hovering shows the number."""
    weights = np.asarray(weights, np.float64)
    rows_wanted = (len(written) + 1, len(source))
    if weights.shape != rows_wanted:
        raise ValueError(f"weights have shape {weights.shape}; {rows_wanted} wanted (output + end, source)")
    header = "".join(f"<th>{html_lib.escape(_label(char))}</th>" for char in source)
    rows = []
    for char, row in zip([*written, "\u2403"], weights):  # ␃ marks the end symbol
        cells = "".join(f'<td style="background:{_heat_colour(w)}" title="{w:.3f}">{w:.2f}</td>' for w in row)
        rows.append(f"<tr><th>{html_lib.escape(_label(char))}</th>{cells}</tr>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html_lib.escape(title)}</title>\n<style>{_STYLE}{_HEAT_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html_lib.escape(title)}</h1>\n"
        "<p>each row: where the decoder looked in the source (columns) while writing that symbol; "
        "white 0, red 1; each row sums to 1</p>\n"
        f"<table class=\"heat\">\n<tr><th></th>{header}</tr>\n" + "\n".join(rows) + "\n</table>\n</body>\n</html>\n"
    )
