"""Index a Kermany-style folder into a Parquet manifest.

    python -m jobs.prepare --data DIR --out FILE.parquet [--classes normal,virus] [--profile tiny]
                           [--labels FILE.csv]

Every image is decoded once; unreadable files are skipped and listed in FILE.report.json.
--labels lists the images of a folder whose names carry nothing: a CSV with a header
path,label[,patient_id] (paths relative to DIR; labels normal, bacteria, virus).
"""

import argparse

from pneumoray.cli import add_profile_args, profile_from, user_errors
from pneumoray.data import manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder in a Kermany layout")
    parser.add_argument("--out", required=True, help="manifest file to write (.parquet)")
    parser.add_argument("--classes", help="label set, e.g. normal,virus or normal,pneumonia (default: the profile's)")
    parser.add_argument("--labels", help="CSV path,label[,patient_id] listing the images (instead of their names)")
    add_profile_args(parser)
    args = parser.parse_args(argv)
    with user_errors():
        data_cfg = profile_from(args)["data"]
        frame, report = manifest.build(args.data, args.classes or data_cfg["classes"],
                                       **manifest.split_settings(data_cfg), labels=args.labels)
        out = manifest.write(frame, report, args.out)
    print(format_report(report))
    print(f"manifest: {out} ({len(frame)} images); report: {manifest.report_path(out)}")
    return report


def format_report(report: dict) -> str:
    counts = report["counts"]["split_class"]
    classes = report["classes"]
    splits = [s for s in ("train", "val", "test") if any(k.startswith(s + "/") for k in counts)]
    lines = [f"{'split':<6}" + "".join(f"{c:>10}" for c in classes) + f"{'total':>10}"]
    for s in splits:
        row = [counts.get(f"{s}/{c}", 0) for c in classes]
        lines.append(f"{s:<6}" + "".join(f"{n:>10}" for n in row) + f"{sum(row):>10}")
    lines.append(f"patients: {report['counts']['patients']}; sources: {report['counts']['source']}")
    if report.get("excluded_by_label_set"):
        lines.append(f"left out (outside the label set): {report['excluded_by_label_set']}")
    if report.get("dropped_patient_in_test"):
        lines.append(f"dropped from training (patient also in test): {report['dropped_patient_in_test']} "
                     "(data.drop_test_patients: false keeps them)")
    if report.get("kept_patient_in_test"):
        lines.append(f"kept in training although their patient is also in test: {report['kept_patient_in_test']} "
                     "(data.drop_test_patients: false)")
    if report.get("patient_id_fallback"):
        lines.append(f"warning: {report['patient_id_fallback']} image(s) have no patient id and are one patient each "
                     "(give --labels FILE.csv with patient_id)")
    skipped = report.get("skipped", [])
    lines.append(f"skipped {len(skipped)} unreadable or unlabelled file(s)" + (":" if skipped else ""))
    lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:20]]
    if len(skipped) > 20:
        lines.append(f"  ... {len(skipped) - 20} more in the report")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
