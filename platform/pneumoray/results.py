"""What the stages hand each other: small typed records instead of nested dicts read by deep keys.

Each record is a frozen dataclass that round-trips through JSON (`to_json` / `from_json`), which is
how the pipeline keeps a finished stage in DIR/stages/<stage>.json and reads it back on a rerun.
A manifest's frame and report travel as `data.manifest.Manifest`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field


def to_json(record) -> dict:
    return dataclasses.asdict(record)


def from_json(cls, doc: dict):
    """`cls` from `to_json`'s dict; nested records are rebuilt too (fields unknown to `cls` are an error)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in doc:
            continue
        # a record, or an optional one (`TrainedRun | None`)
        kinds = [k for k in (typing.get_args(hints[f.name]) or (hints[f.name],)) if dataclasses.is_dataclass(k)]
        value = doc[f.name]
        values[f.name] = from_json(kinds[0], value) if kinds and value is not None else value
    unknown = set(doc) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}: the record was written by another version")
    return cls(**values)


@dataclass(frozen=True)
class DataSource:
    """The images the pipeline runs on: a folder given, or the phantom set it generated."""

    root: str
    kind: str                  # "given" or "phantoms"
    patients: int | None = None
    seed: int | None = None
    size: int | None = None


@dataclass(frozen=True)
class ManifestRef:
    """A manifest written to disk, with what a person wants to know about it without opening it."""

    path: str
    images: int
    counts: dict               # per split/class, label and source (manifest.summarize)
    classes: list
    skipped: int


@dataclass(frozen=True)
class ModelRef:
    """A logged or registered model: its URI (a pinned version when registered), version and alias."""

    uri: str
    version: str | None = None
    alias: str | None = None


@dataclass(frozen=True)
class TrainedRun:
    """One Ray Train run (training.fit's or finetune.fit's): its MLflow run, model and score."""

    run_id: str
    run_name: str
    model: ModelRef
    score: float | None        # the metric its best checkpoint was chosen by (val macro-F1 for the CLIP)
    summary: dict = field(default_factory=dict)  # the whole summary, as jobs.train writes it

    @classmethod
    def of(cls, summary: dict, score: str | None = "val_macro_f1") -> TrainedRun:
        return cls(run_id=summary["run_id"], run_name=summary["run_name"],
                   model=ModelRef(summary["model_uri"], summary.get("version"), summary.get("alias")),
                   score=summary.get(score) if score else None, summary=summary)


@dataclass(frozen=True)
class SyntheticDecision:
    """Whether the synthetic images earned their place (synthetic_gate), and the run that was kept."""

    policy: str
    rule: str                  # the rule as applied, in words
    images: int                # synthetic images offered
    admitted: bool
    chosen: TrainedRun         # registered and promoted when the gate registers
    without_synthetic: TrainedRun | None = None  # both sides, under if_not_worse
    with_synthetic: TrainedRun | None = None
    margin: float | None = None

    def summary(self) -> dict:
        """The chosen run's summary with the decision under "synthetic" (what jobs.train writes)."""
        decision = {"policy": self.policy, "rule": self.rule, "images": self.images, "admitted": self.admitted}
        if self.with_synthetic is not None:
            decision.update(margin=self.margin, val_macro_f1_with=self.with_synthetic.score,
                            val_macro_f1_without=self.without_synthetic.score,
                            with_synthetic=self.with_synthetic.summary, without_synthetic=self.without_synthetic.summary)
        return {**self.chosen.summary, "synthetic": decision}


@dataclass
class SyntheticSet:
    """What the generate stage made: a folder with images/, manifest.parquet, summary.json, samples.png
    (not frozen: the stage fills in `quality` once the images are measured)."""

    out: str
    manifest: str
    planned: int
    made_now: int
    counts: dict            # images per class in the folder
    adapter: str            # the adapter's URI (a pinned registry version), or "none"
    adapter_version: str | None
    generate_s: float
    images_per_s: float | None
    quality: dict = field(default_factory=dict)  # per class: FD / KID (and base, floor), label fidelity

    def to_dict(self) -> dict:
        return to_json(self)


@dataclass(frozen=True)
class SearchResult:
    """The Ray Tune search's outcome, or `skipped` when the pipeline ran without one."""

    skipped: bool = False
    best_config: dict | None = None
    best_val_macro_f1: float | None = None
    trials: int = 0
    compute: dict | None = None
    parent_run_id: str | None = None


@dataclass(frozen=True)
class SplitEvaluation:
    """The test split, touched once: evaluation.evaluate's result for each side and zero-shot."""

    with_synthetic: dict
    without_synthetic: dict
    zero_shot: dict


@dataclass(frozen=True)
class EndpointCheck:
    """One real HTTP request to the served champion."""

    url: str
    image: str
    true_label: str
    answer: dict
    client_latency_ms: float
    curl: str
