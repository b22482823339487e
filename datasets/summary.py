"""A prepared dataset's manifest as a readable summary (`stoker data inspect`)."""

from stoker.datasets.manifest import SPLITS, Manifest


def describe(manifest: Manifest, path: str) -> str:
    lines = [
        f"dataset {path}",
        f"  source      {manifest.source} ({manifest.source_format}, {manifest.source_files} files)",
        f"  fingerprint {manifest.source_fingerprint}",
        f"  made by     stoker {manifest.stoker_version}",
        f"  task        {manifest.task} ({manifest.modality}); input shape {manifest.input_shape}"
        + (f"; vocabulary {manifest.vocab_size}" if manifest.vocab_size else ""),
    ]
    if manifest.classes is not None:
        shown = ", ".join(map(str, manifest.classes[:20])) + (f", ... ({len(manifest.classes) - 20} more)"
                                                               if len(manifest.classes) > 20 else "")
        lines.append(f"  classes     {manifest.num_classes}: {shown}")
    lines.append("splits")
    for name in SPLITS:
        info = manifest.splits.get(name)
        if info is None:
            continue
        balance = (manifest.report.get("class_balance") or {}).get(name)
        ratio = f"; imbalance {balance['imbalance_ratio']}" if balance and balance.get("imbalance_ratio") else ""
        lines.append(f"  {name:<11} {info['rows']:>10,} rows  {len(info['files'])} shards{ratio}")
        if info.get("class_counts"):
            items = list(info["class_counts"].items())
            counts = ", ".join(f"{c}={n}" for c, n in items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            lines.append(f"              {counts}")
    cleaning = {**manifest.dropped, **{f"rejected:{k}": v for k, v in manifest.rejected.items()}}
    lines.append("cleaning    " + (", ".join(f"{k} {v}" for k, v in cleaning.items()) if cleaning else "no rows dropped"))
    columns = manifest.report.get("columns") or {}
    if columns:
        # Every feature column (a one-hot group is one line: its raw column), each with its
        # missing count: a column hidden after the first twenty is where problems hide.
        lines.append(f"columns (training split, before transforms; {len(columns)} columns)")
        for name, stats in columns.items():
            missing = f"  missing {stats.get('missing', 0)}"
            if stats["kind"] == "numeric":
                lines.append(
                    f"  {name:<20} mean {_fmt(stats['mean'])}  std {_fmt(stats['std'])}  "
                    f"min {_fmt(stats['min'])}  median {_fmt(stats['median'])}  max {_fmt(stats['max'])}{missing}"
                )
            elif stats["kind"] == "categorical":
                top = ", ".join(f"{k}={v}" for k, v in list(stats["top"].items())[:5])
                lines.append(f"  {name:<20} {stats['distinct']} categories: {top}{missing}")
            else:
                lines.append(f"  {name:<20} text: {stats['words_mean']} words on average, "
                             f"{stats['truncated_rows']} rows truncated")
    if manifest.classes is not None:
        lines.append("bias report")
        lines += [f"  warning: {w}" for w in manifest.warnings] or [
            "  no class under-represented beyond the configured ratio"]
    else:
        lines += [f"warning: {w}" for w in manifest.warnings]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"
