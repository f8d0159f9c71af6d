"""mistral.rs's topology files: per-layer in-situ quantization types (and devices), read from YAML.

The format and its meaning are mistral.rs's (mistralrs-core/src/topology/mod.rs, and
mistralrs-quant's `resolve_immediate_isq`):

    0-8:            # layers 0..7: START-END is half-open
      isq: Q4K
    12:             # one layer
      isq: Q8_0
      device: cpu   # cpu, cuda[N] or metal[N]
    '/lm_head\\..*/': # a regex (between slashes) searched in the weight's Hugging Face name
      isq: Q6K

Range selectors address the decoder layer of a weight (the N of `model.layers.N.`); overlapping
ranges are allowed: ranges are applied in order of their end (then of their declaration), so on
an overlap the range ending later wins, and of two ending together the later one. Regex entries
win over ranges, and of two matching regexes the later one. A matched entry without `isq` gives
the weight the Runner's `in_situ_quant`; a weight no entry matches gets `in_situ_quant` too; and
when that is None, such weights keep their stored type. Like mistral.rs's, only the linear weights
(mistral_ref.isq.linear_weights) are quantized: an entry matching a norm or the embedding does
nothing.

This engine runs the whole model on one device, so a `device` entry must name it ("cpu" on the cpu
and reference devices, "cuda[0]" on cuda); any other is refused. Every error is a
ModelSourceError naming the file and the entry.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from mistral_ref.checkpoint import hf_name
from mistral_ref.errors import ModelSourceError, QuantizeError
from mistral_ref.isq import isq_type

DEVICE_PATTERN = r"^(cpu|cuda\[(\d+)\]|metal\[(\d+)\])$"  # mistral.rs's
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|$)")  # mistralrs-quant's layer_index_from_prefix
RUN_DEVICES = {"cpu": "cpu", "reference": "cpu", "cuda": "cuda[0]"}  # Runner(device=...) -> its spelling
KEYS = ("isq", "device")
MAX_LAYERS = 10_000  # a range past this is a typo, not a model (the layer table is that long)


@dataclass(frozen=True)
class LayerTopology:
    """One entry's settings: an ISQ name and a device, each None when the entry has none."""

    isq: str | None = None
    device: str | None = None


@dataclass
class Topology:
    """A parsed topology file: `layers[i]` the entry of decoder layer i (None: no range covers it),
    `patterns` the regex entries in declaration order."""

    path: Path
    layers: list[LayerTopology | None] = field(default_factory=list)
    patterns: list[tuple[re.Pattern, LayerTopology]] = field(default_factory=list)

    def entry_for(self, name: str) -> LayerTopology | None:
        """The entry that decides the Hugging Face-named weight `name`: the last regex that
        matches, else the range holding its layer (entries with neither isq nor device are
        skipped, as mistral.rs's `immediate_overrides` does)."""
        for regex, entry in reversed(self.patterns):
            if (entry.isq or entry.device) and regex.search(name):
                return entry
        m = LAYER_INDEX.search(name)
        if m and int(m.group(1)) < len(self.layers):
            entry = self.layers[int(m.group(1))]
            if entry is not None and (entry.isq or entry.device):
                return entry
        return None

    def isq_plan(self, default: str | None) -> Callable[[str], str | None] | None:
        """For mistral_ref.isq.in_situ_quantize: GGUF tensor name -> the ISQ name its entry gives,
        else `default` (the Runner's in_situ_quant; None: keep the stored type). None when nothing
        would be quantized."""
        if default is not None:
            isq_type(default)
        if default is None and not any(e and e.isq for e in self.layers + [e for _, e in self.patterns]):
            return None

        def choose(gguf_name: str) -> str | None:
            entry = self.entry_for(hf_name(gguf_name))
            return entry.isq if entry is not None and entry.isq is not None else default
        return choose


def _usize(text: str) -> int | None:
    """Rust's `str::parse::<usize>`: an optional '+' and ASCII digits."""
    return int(text) if re.fullmatch(r"\+?[0-9]+", text) else None


def load_topology(path: str | os.PathLike, device: str = "cpu") -> Topology:
    """Read a topology file (relative paths: from the current directory) for a Runner on
    `device` ("cpu", "cuda" or "reference"). Raises ModelSourceError naming the file and the
    problem."""
    path = Path(path).expanduser()
    where = str(path)
    if not path.is_file():
        raise ModelSourceError(f"topology file {where!r} does not exist or is not a file (relative paths "
                               f"are read from the current directory, {os.getcwd()})")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"topology file {where}: not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not doc:
        got = "an empty file" if not doc else f"a {type(doc).__name__}"
        raise ModelSourceError(f"topology file {where}: expected a mapping of layer ranges ('0-8:') or "
                               f"regexes ('/pattern/:') to isq / device settings, got {got}")
    ranges: list[tuple[int, int, int, LayerTopology]] = []  # end, declaration index, start, entry
    topology = Topology(path)
    for index, (key, value) in enumerate(doc.items()):
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ModelSourceError(f"topology file {where}: entry {key!r}: a selector is a layer range "
                                   "START-END, a layer number or a /regex/")
        selector = str(key)
        what = f"topology file {where}: entry {selector!r}"
        entry = _entry(value, what, device)
        if len(selector) >= 2 and selector.startswith("/") and selector.endswith("/"):
            try:
                topology.patterns.append((re.compile(selector[1:-1]), entry))
            except re.error as e:
                raise ModelSourceError(f"{what}: invalid topology regex: {e}") from None
            continue
        if "-" in selector:
            start_text, end_text = selector.split("-", 1)
            start, end = _usize(start_text), _usize(end_text)
        else:
            start = _usize(selector)
            end = None if start is None else start + 1
        if start is None or end is None:
            raise ModelSourceError(f"{what}: a range must be START-END (layers START to END-1) or one layer "
                                   "number, with whole numbers >= 0 (or a /regex/ between slashes)")
        if end <= start:
            raise ModelSourceError(f"{what}: the range's end must be > its start (END is exclusive), "
                                   f"got {end} <= {start}")
        if end > MAX_LAYERS:
            raise ModelSourceError(f"{what}: layer {end - 1} is past any model's layers (at most {MAX_LAYERS})")
        ranges.append((end, index, start, entry))
    # mistral.rs sorts ranges by end, then declaration order, and lets each overwrite the earlier
    topology.layers = [None] * max((r[0] for r in ranges), default=0)
    for end, _, start, entry in sorted(ranges, key=lambda r: (r[0], r[1])):
        topology.layers[start:end] = [entry] * (end - start)
    return topology


def _entry(value: Any, what: str, device: str) -> LayerTopology:
    if value is None:
        return LayerTopology()
    if not isinstance(value, dict):
        raise ModelSourceError(f"{what}: expected a mapping with 'isq' and/or 'device', got {value!r}")
    unknown = [k for k in value if k not in KEYS]
    if unknown:
        raise ModelSourceError(f"{what}: unknown key {unknown[0]!r} (an entry has 'isq' and 'device')")
    isq = value.get("isq")
    if isq is not None:
        isq = str(isq)
        try:
            isq_type(isq, what=f"{what}: isq")
        except QuantizeError as e:
            raise ModelSourceError(str(e)) from None
    dev = value.get("device")
    if dev is not None:
        dev = str(dev)
        if not re.fullmatch(DEVICE_PATTERN, dev):
            raise ModelSourceError(f"{what}: device {dev!r} must match {DEVICE_PATTERN}, e.g. `cpu`, "
                                   "`cuda[ORD]`, `metal[ORD]`")
        ours = RUN_DEVICES.get(device, device)
        if dev != ours:
            raise ModelSourceError(f"{what}: device {dev!r} cannot be honoured: mistral-ref runs the whole "
                                   f"model on one device, here {ours!r} (Runner(device={device!r}))")
    return LayerTopology(isq, dev)
