"""How command results are drawn: tables, notes and the lines that close a command. Only the
command modules use it; library code returns results and never prints."""

from __future__ import annotations

from mmret.cli import ui


def _modality(name: str):
    from mmret.modalities import get_modality

    return get_modality(name)


def say_run(run_dir, which: str, newest: bool) -> None:
    """On stderr: which run and checkpoint a command used, when either was not the user's own
    choice (the newest run) or could surprise (the best checkpoint of a run that stopped before it
    finished is not the best it would have reached)."""
    from mmret.runs.checkpoint import checkpoint_line

    line, finished = checkpoint_line(run_dir, which)
    if newest or not finished:
        ui.say(line + ("; the newest run (--run picks another)" if newest else ""))


def show_prepare(result) -> None:
    rows = []
    for split, c in result.counts.items():
        per = f"{c['captions'] / c['items']:.2f}" if c["items"] else "-"
        rows.append((split, c["items"], c["captions"], per, c["dropped items"]))
    items, one = _modality(result.modality).plural, _modality(result.modality).noun
    one = "image" if result.modality == "image" else one
    columns = ["split", items, "captions", f"captions/{one}", f"dropped {items}"]
    ui.console.print(ui.table(f"{result.name} ({result.source})", columns, rows))
    ui.console.print(f"splits: {result.split_note}", highlight=False)
    if result.problems:
        dropped = ", ".join(f"{n} {k}" for k, n in result.dropped.items())
        ui.console.print(f"dropped or fixed: {dropped}", highlight=False)
        for p in result.problems[:5]:
            ui.console.print(f"  {p.kind}: {p.item}: {p.reason}", highlight=False, soft_wrap=True)
        if len(result.problems) > 5:
            ui.console.print(f"  ... all {len(result.problems)} listed in {result.path / 'dataset.json'}",
                             highlight=False)
    ui.console.print(f"wrote {result.path} in {result.seconds:.1f}s", highlight=False)


def show_precompute(result) -> None:
    for name, shard in result.shards:
        index, count = shard.shard
        state = ("sealed the cache" if shard.sealed is not None and shard.encoded else
                 "the cache is complete" if shard.sealed is not None else
                 f"{len(shard.missing)} cache shards still to encode by other processes; the last one to finish "
                 "seals it (or run --finalize)")
        ui.console.print(f"{shard.which} · {name}: shard {index}/{count} encoded {len(shard.encoded)} cache shards "
                         f"({shard.stats.encoded:,} rows); {state}", highlight=False, soft_wrap=True)
    if not result.parts:
        return
    rows = []
    for name, feats in result.parts:
        s = feats.stats
        rate = f"{s.rows_per_second:,.1f}" if s.encoded else "-"
        tokens = str(tuple(feats.tokens.shape)) if feats.tokens is not None else "-"
        rows.append((feats.which, name, f"{s.encoded:,} / {s.reused:,}", str(tuple(feats.pooled.shape)),
                     tokens, s.precision or "-", ui.human_bytes(feats.disk_bytes), f"{s.seconds:.1f}s", rate))
    columns = ["rows", "tower", "new / reused", "pooled", "tokens", "precision", "disk", "time", "rows/s"]
    ui.console.print(ui.table(f"{result.dataset}: frozen features on {result.device}", columns, rows))
    for _, feats in result.parts:
        if feats.stats.precision_reason:
            ui.console.print(f"{feats.which} precision: {feats.stats.precision_reason}", highlight=False)
        if feats.failed:
            ui.print_note(f"{len(feats.failed)} {feats.which} could not be read (rows left NaN, valid=False):")
            for item, reason in list(feats.failed.items())[:5]:
                ui.console.print(f"  {item}: {reason}", highlight=False, soft_wrap=True)
        ui.console.print(f"{feats.which} cache: {feats.path}", highlight=False, soft_wrap=True)
    for note in result.notes:
        ui.print_note(note)
    ui.console.print(f"done in {result.seconds:.1f}s", highlight=False)


def show_dry_run(plan) -> None:
    import json

    rows = [(r.part, r.total, r.trainable, f"{r.percent_trainable:.2f}%") for r in plan.rows]
    ui.console.print(ui.table(f"parameters: {plan.method}", ["part", "parameters", "trainable", "% trainable"], rows))
    ui.console.print(json.dumps(plan.config, indent=2, sort_keys=True), highlight=False, soft_wrap=True)


def show_train(result) -> None:
    if result.rank != 0:  # one of several processes: the first one reports
        return
    import re

    recall = re.compile(r"(t2[a-z]+|[a-z]+2t)_r(1|5|10)")
    keys = sorted((k for k in result.best if recall.fullmatch(k)),
                  key=lambda k: (not k.startswith("t2"), int(k.split("_r")[1])))
    keys += ["mean_recall"] if "mean_recall" in result.best else []
    ui.console.print(ui.table("best validation", ["metric", "value"], [(k, f"{result.best[k]:.4f}") for k in keys]))
    ui.console.print(f"{result.stopped} after {result.epochs} epochs, {result.steps} steps, "
                     f"{result.seconds:.1f}s ({result.precision} on {result.device})", highlight=False)
    ui.console.print(f"run: {result.run_dir}", highlight=False)


def show_memory(report, given_flags: str = "") -> None:
    """The candidates' peaks (a narrow table on a narrow terminal: the best row's split follows it),
    and the `mmret train` command line that trains the recommended setting."""
    from mmret.memory import CATEGORIES, describe, needed

    gb = lambda n: f"{n / 2**30:.2f}" if n is not None else "OOM"  # noqa: E731
    wide, rows = ui.console.width >= 140, []
    for r in report.rows:
        c, m = r.candidate, r.step
        split = ([gb(getattr(m, k)) for k in CATEGORIES] if m else ["-"] * 5) if wide else []
        fits = "best" if r is report.best else "yes" if r.fits else "no"
        rows.append((c.micro_batch, c.precision, "on" if c.grad_checkpointing else "off", *split,
                     gb(m.total if m else None), gb(r.phases["eval"]), gb(r.phases["setup"]), r.phase, fits))
    columns = ["micro", "prec", "ckpt", *(CATEGORIES if wide else ()), "step", "eval", "setup", "peak in", "fits"]
    title = f"{report.method}, batch {report.batch_size}: peak training memory in GB against {report.vram:g} GB"
    ui.console.print(ui.table(title, columns, rows))
    best, tc = report.best, report.config.train
    if not wide:
        ui.console.print("best step's peak, GB: " + ", ".join(f"{k} {gb(getattr(best.step, k))}" for k in CATEGORIES),
                         highlight=False)
    ui.console.print(report.how, highlight=False, soft_wrap=True)
    for note in report.notes:
        ui.console.print(f"- {note}", highlight=False, soft_wrap=True)
    flags = f"--micro-batch {tc.micro_batch or tc.batch_size} --precision {tc.precision}"
    flags += " --grad-checkpointing" if tc.grad_checkpointing else ""
    ui.console.print(f"recommended: {describe(best.candidate, report.batch_size)}; peak {ui.human_bytes(best.peak)} "
                     f"({ui.human_bytes(needed(best.peak))} with the margin) of {ui.human_bytes(report.usable)} "
                     "usable:", highlight=False, soft_wrap=True)
    ui.console.print(f"  mmret train {given_flags + ' ' if given_flags else ''}{flags}", highlight=False,
                     soft_wrap=True)


def show_eval(results, format: str) -> None:
    import json

    if format == "json":
        ui.console.print_json(json.dumps([r.to_json() for r in results]))
        return
    first = results[0]
    columns = ["metric"] + [r.run for r in results]
    rows = []
    for key in first.headline:
        cells = [key]
        for r in results:
            whole = key == "rsum" or key.endswith("medr")  # a rank or a sum of percents, not a fraction
            cell = f"{r.metrics[key]:.1f}" if whole else f"{r.metrics[key]:.4f}"
            if r.ci:
                lo, hi = r.ci[key]
                cell += f" [{lo:.3f}, {hi:.3f}]" if not key.endswith(("medr", "rsum")) else f" [{lo:.0f}, {hi:.0f}]"
            if r.diffs and r.diffs[key].significant:
                cell += " *"
            cells.append(cell)
        rows.append(cells)
    rows.append([f"chance R@{'/'.join(map(str, first.ks))}"]
                + [" / ".join(f"{min(1, k / r.n_items):.3f}" for k in r.ks) for r in results])
    title = (f"{first.dataset} {first.split}: {first.n_items:,} {_modality(first.modality).plural}, "
             f"{first.n_captions:,} captions")
    _markdown_or_table(title, columns, rows, format)
    if any(r.diffs and any(d.significant for d in r.diffs.values()) for r in results):
        ui.console.print(f"* differs from {first.run} (paired bootstrap, 95%)", highlight=False)
    for r in results:
        if r.comparison:
            ui.console.print(r.comparison, highlight=False, soft_wrap=True)
    _seen_in_training(results)
    for r in results:
        ui.console.print(f"saved {r.path}", highlight=False)


def _seen_in_training(results) -> None:
    """A note for each run scored on items it trained on (its scores flatter it)."""
    for r in results:
        if r.train_overlap:
            ui.print_note(f"{r.run} trained on {r.train_overlap:,} of these {r.n_items:,} items: its scores flatter "
                          "it (score it on items it never saw: another split, or a dataset of other items)")


def show_eval_report(report, format: str) -> None:
    """Every task's results, then what was drawn and written."""
    import json

    if format == "clip-benchmark":
        records = [rec for _, rec in report.clip_benchmark]
        print(json.dumps(records[0] if len(records) == 1 else records, indent=2))
        for path, _ in report.clip_benchmark:
            ui.err_console.print(f"saved {path}", highlight=False)
        return
    if report.task == "retrieval":
        show_eval(report.results, format)
    elif format == "json":
        ui.console.print_json(json.dumps([r.to_json() for r in report.results]))
    elif report.task == "classification":
        show_classification(report.results, format)
    else:
        show_linear_probe(report.results, format)
    if report.map is not None:
        m = report.map
        ui.console.print(f"map ({m.method}, coloured by {m.colour_by}, {m.n_items:,} items, {m.n_captions:,} captions, "
                         f"{m.thumbnails} thumbnails): {m.path}", highlight=False, soft_wrap=True)
    if report.failures is not None:
        f = report.failures
        ranks = ", ".join(str(r.rank) for r in f.rows)
        ui.console.print(f"failure gallery (ranks {ranks} of the right item): {f.path} and {f.json_path.name}",
                         highlight=False, soft_wrap=True)


def _markdown_or_table(title: str, columns: list[str], rows: list[list[str]], format: str) -> None:
    if format == "markdown":
        print(f"**{title}**\n")
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        ui.console.print(ui.table(title, columns, rows))


def _cell(value: float, ci=None) -> str:
    if value != value:  # nan: top-5 of fewer than five classes
        return "-"
    return f"{value:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def show_classification(results, format: str) -> None:
    first = results[0]
    rows = [[key] + [_cell(r.metrics[key], (r.ci or {}).get(key)) for r in results]
            for key in ("acc1", "acc5", "mean_per_class_recall")]
    chance = first.chance
    rows.append(["chance top-1 / top-5", f"{chance['acc1']:.4f} / {chance['acc5']:.4f}"] + [""] * (len(results) - 1))
    rows.append(["largest class share", f"{chance['majority']:.4f}"] + [""] * (len(results) - 1))
    title = (f"{first.dataset} {first.split}: zero-shot classification of {first.n_items:,} items into "
             f"{len(first.labels)} classes, {first.templates} prompts each"
             + (" (the dataset's templates)" if first.templates_from == "dataset" else ""))
    _markdown_or_table(title, ["metric"] + [r.run for r in results], rows, format)
    _seen_in_training(results)
    for r in results:
        ui.console.print(f"saved {r.path}" + (f" and {r.confusion_png.name}" if r.confusion_png else ""),
                         highlight=False, soft_wrap=True)


def show_linear_probe(results, format: str) -> None:
    first = results[0]
    rows = [[key] + [_cell(r.metrics[key]) for r in results]
            for key in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall")]
    rows.append(["C (chosen on val)"] + [f"{r.C:.3g}" for r in results])
    rows.append(["val top-1 at C"] + [f"{r.val_acc1:.4f}" for r in results])
    c = len(first.labels)
    rows.append(["chance top-1 / top-5", f"{1 / c:.4f} / {min(1, 5 / c):.4f}"] + [""] * (len(results) - 1))
    sizes = first.sizes
    title = (f"{first.dataset}: linear probe on {sizes['train']:,} train + {sizes['val']:,} val items, scored on "
             f"{sizes['test']:,} test items, {c} classes")
    _markdown_or_table(title, ["metric"] + [r.run for r in results], rows, format)
    _seen_in_training(results)
    for r in results:
        ui.console.print(f"saved {r.path}", highlight=False, soft_wrap=True)


def show_search(result, grid) -> None:
    items = _modality(result.modality)
    for q in result.results:
        if q.unknown:
            words = ", ".join(repr(w) for w in dict.fromkeys(q.unknown))
            ui.print_note(f"{words} of {q.query!r} {'are' if len(q.unknown) > 1 else 'is'} in none of run "
                          f"{result.run}'s training captions, the only words a model trained from scratch has "
                          "learned: " + ("these scores mean little" if q.mostly_unknown else
                                         "it reads the query as if they were not there"))
        rows = [(f"{h.rank}{' ✓' if h.right else ''}", f"{h.score:.4f}", h.item_id, " | ".join(h.captions[:2]))
                for h in q.items]
        ui.console.print(ui.table(f"{q.query!r}: {items.plural}", ["#", "score", "id", "captions"], rows))
        if q.captions:
            rows = [(h.rank, f"{h.score:.4f}", h.captions[0], h.item_id) for h in q.captions]
            ui.console.print(ui.table(f"{q.query!r}: captions", ["#", "score", "caption", f"of {items.name}"], rows))
    ui.console.print(f"gallery: {result.dataset}-{result.split} of run {result.run}, {result.index} search "
                     "(--json gives every file's path)", highlight=False)
    if grid is not None:
        ui.console.print(f"{items.sheet_name}: {grid}", highlight=False)
