"""The HTML page is well-formed, self-contained and holds every character and value; terminal blocks."""

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from charrnn import render
from charrnn.cli.viz import terminal_blocks

TEXT = "if (a < b && c > \"d\") {\n  x = 'it''s';\n}\n\tend & <b>bold</b>?"  # no "/" in it: the page may hold none
VOID_ELEMENTS = {"meta", "br", "hr", "img", "input", "link"}


def unit_values(seed: int, scale: float) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-scale, scale, len(TEXT))


UNITS = {3: unit_values(0, 1.0), 17: unit_values(1, 4.0)}  # tanh-range h, and a c beyond [-1, 1]
PREDICTIONS = [[("e", 0.5), ("\n", 0.2), ("<", 0.1), ("&", 0.05), (" ", 0.01)] for _ in TEXT]


class PageReader(HTMLParser):
    """Checks that tags nest, and collects each unit row's text and values."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open_tags, self.problems = [], []
        self.row_text, self.row_values, self.scripts = {}, {}, []
        self.row = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in VOID_ELEMENTS:
            return
        self.open_tags.append(tag)
        if tag == "div" and "data-unit" in attrs:
            self.row = int(attrs["data-unit"])
            self.row_text[self.row], self.row_values[self.row] = "", []
        if tag == "span" and self.row is not None:
            self.row_values[self.row].append(attrs["data-v"])

    def handle_endtag(self, tag):
        if not self.open_tags or self.open_tags[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.open_tags[-1:] or 'nothing'}")
            return
        self.open_tags.pop()
        if tag == "div":
            self.row = None

    def handle_data(self, data):
        if self.row is not None:
            self.row_text[self.row] += data
        if self.open_tags and self.open_tags[-1] == "script":
            self.scripts.append(data)


def read_page(page: str) -> PageReader:
    reader = PageReader()
    reader.feed(page)
    reader.close()
    return reader


def test_page_is_well_formed_and_holds_every_character_and_value():
    page = render.html(TEXT, UNITS, PREDICTIONS, "layer 2 <h> & c")
    reader = read_page(page)
    assert reader.problems == [] and reader.open_tags == []
    assert sorted(reader.row_text) == [3, 17]
    for unit, values in UNITS.items():
        assert reader.row_text[unit] == TEXT
        assert reader.row_values[unit] == [render.format_value(value) for value in values]
    assert "<title>layer 2 &lt;h&gt; &amp; c</title>" in page
    # The heading gives each unit's colour scale: 1 for values within [-1, 1], else the largest |value|.
    assert "<h2>unit 3 <small>(colour scale \u00b11.00)</small></h2>" in page
    assert f"<h2>unit 17 <small>(colour scale \u00b1{np.max(np.abs(UNITS[17])):.2f})</small></h2>" in page


@pytest.mark.parametrize("length", [len(TEXT) - 1, len(TEXT) + 1])
def test_a_unit_with_a_value_too_few_or_too_many_is_refused(length):
    with pytest.raises(ValueError, match=f"unit 5 has {length} values for {len(TEXT)} characters"):
        render.html(TEXT, {3: UNITS[3], 5: np.zeros(length)}, None, "t")


def test_page_needs_nothing_from_outside():
    page = render.html(TEXT, UNITS, PREDICTIONS, "t")
    for outside in ("http:", "https:", "//", "<link", "src=", "@import", "url("):
        assert outside not in page


def script_guesses(predictions) -> list:
    """The PREDICTIONS array of the page's one script, as the browser reads it."""
    (script,) = read_page(render.html(TEXT, UNITS, predictions, "t")).scripts
    assert "</" not in script and "<!--" not in script
    return json.loads(script.split("const PREDICTIONS = ", 1)[1].split(";\n", 1)[0])


def test_predictions_reach_the_script_intact():
    guesses = script_guesses(PREDICTIONS)
    assert len(guesses) == len(TEXT)
    assert guesses[0] == [["e", 0.5], ["\\n", 0.2], ["<", 0.1], ["&", 0.05], ["\u2423", 0.01]]
    # A tab is labelled as one; probabilities keep four decimals (the tooltip shows one decimal of a percent).
    assert script_guesses([[("\t", 0.123456), ("\r", 0.00012)]])[0] == [["\\t", 0.1235], ["\u240d", 0.0001]]


def test_a_label_that_would_close_the_script_stays_inside_it():
    predictions = [[("</script><!--", 1.0)] for _ in TEXT]  # a label of a model whose symbols are tokens
    assert script_guesses(predictions)[0] == [["</script><!--", 1.0]]


def test_each_character_is_escaped_in_its_span():
    page = render.html(TEXT, UNITS, PREDICTIONS, "t")
    spans = re.findall(r'<span( class="nl")? data-i="(\d+)"[^>]*>([^<>]*)</span>', page)  # no raw < or > inside
    assert [html.unescape(text) for _, _, text in spans] == [render.shown(char) for char in TEXT] * len(UNITS)
    # Each span names its position (the tooltip's key into PREDICTIONS); newlines are marked to draw their ↵.
    assert [int(position) for _, position, _ in spans] == list(range(len(TEXT))) * len(UNITS)
    assert [bool(mark) for mark, _, _ in spans] == [char == "\n" for char in TEXT] * len(UNITS)


def test_colours_show_sign_and_scale():
    assert render.colours(np.array([0.0, 1.0, -1.0])) == ["#ffffff", "#d62728", "#1f77b4"]
    # Beyond [-1, 1] the unit is scaled by its largest |value|: 2 of 4 is half-way to red.
    assert render.colours(np.array([2.0, -4.0])) == ["#ea9394", "#1f77b4"]
    assert render.colours(np.array([0.5])) == render.colours(np.array([0.5, -1.0]))[:1]  # h is not rescaled


def test_terminal_blocks_colour_every_character():
    blocks = terminal_blocks(TEXT, UNITS)
    assert len(blocks) == 2
    for block, values in zip(blocks, UNITS.values()):
        assert block.plain.replace("\u21b5\n", "\n") == TEXT
        styled = [span for span in block.spans if span.style.bgcolor is not None]
        assert len(styled) == len(TEXT)
        assert [span.style.bgcolor.triplet.hex for span in styled] == render.colours(values)


def test_attention_page_has_a_row_per_written_symbol_and_the_end():
    weights = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [-0.2, 0.2, 1.3]])  # beyond [0, 1]: clipped colours
    page = render.attention_html("a <", ["x", "\t"], weights, "att & <b>")
    reader = read_page(page)
    assert reader.problems == [] and reader.open_tags == []
    rows = re.findall(r"<tr><th>([^<]*)</th>(.*?)</tr>", page)
    assert [html.unescape(label) for label, _ in rows] == ["", "x", "\\t", "\u2403"]  # header, symbols, end
    assert rows[0][1] == "<th>a</th><th>\u2423</th><th>&lt;</th>"
    cell = re.compile(r'<td style="background:(#[0-9a-f]{6})" title="([^"]*)">([^<]*)</td>')
    cells = [cell.findall(row) for _, row in rows[1:]]
    assert [[colour for colour, _, _ in row] for row in cells] == [
        ["#ea9394", "#ea9394", "#ffffff"], ["#ffffff", "#d62728", "#ffffff"], ["#ffffff", "#f7d4d4", "#d62728"]]
    assert cells[0][0][1:] == ("0.500", "0.50") and cells[2][0][1:] == ("-0.200", "-0.20")
    with pytest.raises(ValueError, match=r"\(3, 3\) wanted"):
        render.attention_html("a <", ["x", "\t"], weights[:2], "t")  # no row for the end symbol


def test_control_characters_are_shown_as_symbols():
    assert render.shown("\r") == "\u240d" and render.shown("\x7f") == "\u2421"
    assert render.shown("\n") == "\n" and render.shown("\t") == "\t" and render.shown("é") == "é"


CHROMIUM = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")


# Run after the page's own script: hover character 5 of unit 17, so the dumped DOM holds the tooltip.
HOVER = ('<script>document.querySelector("div[data-unit=\'17\'] span[data-i=\'5\']")'
         '.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));</script>')


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium")
def test_a_browser_shows_the_text_and_the_tooltip(tmp_path):
    page = tmp_path / "units.html"
    page.write_text(render.html(TEXT, UNITS, PREDICTIONS, "browser").replace("</body>", HOVER + "</body>"),
                    encoding="utf-8")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    reader = read_page(dom)
    assert reader.row_text == {3: TEXT, 17: TEXT}
    heading, *guesses = html.unescape(dom.split('<div id="tip">', 1)[1].split("</div>", 1)[0]).splitlines()
    assert heading == f"unit 17 = {render.format_value(UNITS[17][5])}   (character 5)"
    assert [line.split() for line in guesses] == [["e", "50.0%"], ["\\n", "20.0%"], ["<", "10.0%"], ["&", "5.0%"],
                                                  ["\u2423", "1.0%"]]
