"""Label sets: the three classes, a subset of them, or merges (normal vs pneumonia).

A label set maps each fine label (normal, bacteria, virus) it keeps to the class it is trained as.
Written as a comma list: `normal,bacteria,virus` (the default), `normal,virus` (a subset),
`normal,pneumonia` (pneumonia = bacteria + virus), or explicit merges like `sick=bacteria+virus`.
"""

from __future__ import annotations

from .kermany import LABELS

MERGES = {"pneumonia": ("bacteria", "virus")}


class LabelSetError(ValueError):
    pass


def parse_classes(spec: str | list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """{fine label: class} for a label-set spec; the class order is the spec's order."""
    if spec is None:
        spec = list(LABELS)
    if isinstance(spec, dict):  # already a mapping (e.g. stored with a model): write it back as a spec
        spec = [f"{name}={'+'.join(k for k, v in spec.items() if v == name)}" for name in dict.fromkeys(spec.values())]
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    mapping: dict[str, str] = {}
    for item in items:
        name, sep, members = item.partition("=")
        name = name.strip().lower()
        fine = [m.strip().lower() for m in members.split("+")] if sep else list(MERGES.get(name, (name,)))
        for label in fine:
            if label not in LABELS:
                raise LabelSetError(
                    f"unknown class {label!r} in --classes {','.join(items)}: use normal, bacteria, virus, "
                    "pneumonia (= bacteria+virus) or name=a+b merges"
                )
            if label in mapping:
                raise LabelSetError(f"class {label!r} appears twice in --classes {','.join(items)}")
            mapping[label] = name
    if len(set(mapping.values())) < 2:
        raise LabelSetError(f"--classes {','.join(items)} gives fewer than two classes; a classifier needs two or more")
    return mapping


def class_names(mapping: dict[str, str]) -> list[str]:
    """The classes in spec order, without repeats."""
    return list(dict.fromkeys(mapping.values()))
