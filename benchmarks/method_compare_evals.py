"""method_compare.py's eval dirs: packed into one archive on the GPU host, unpacked and compared locally.

The GPU host's disk is lost after a session and only a few small files come back, so `--export DIR` packs every
finished eval (summary.json, samples.jsonl and the rest of each eval dir) into DIR/method_compare_<label>_evals.tar.xz
as <row>/eval-<set>/<file>; `--phase report --evals-archive FILE` unpacks it and runs `pipeline compare`'s
statistics over the rows (paired on the same problems), writing method_compare_<label>_compare.{md,png,json}.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path, PurePosixPath

RETURN_LIMIT = 16 * 2**20  # the GPU tool brings back files up to 16 MiB


def eval_dirs(res: dict, work: Path) -> dict[str, dict[str, Path]]:
    """row -> set -> the eval dir of every finished eval in the results (runs under `work`)."""
    out: dict[str, dict[str, Path]] = {}
    for e in res["eval"].values():
        if e.get("status") == "ok":
            out.setdefault(e["row"], {})[e["set"]] = work / e["job"] / f"eval-{e['set']}"
    return out


def export(res: dict, work: Path, archive: Path) -> list[str]:
    """Pack each finished eval dir into `archive` (tar.xz); returns the eval dirs that were missing on disk."""
    missing = []
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".partial")
    with tarfile.open(tmp, "w:xz") as tar:
        for row, sets in sorted(eval_dirs(res, work).items()):
            for set_name, d in sorted(sets.items()):
                if not (d / "summary.json").is_file():
                    missing.append(str(d))
                    continue
                for f in sorted(p for p in d.iterdir() if p.is_file()):
                    tar.add(f, arcname=f"{row}/eval-{set_name}/{f.name}", recursive=False)
    tmp.replace(archive)
    return missing


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack an export into `dest` (replaced), refusing anything but plain files at <row>/eval-<set>/<file>."""
    if not archive.is_file():
        raise SystemExit(f"--evals-archive {archive}: no such file (the --export output of the GPU run)")
    if dest.exists():
        shutil.rmtree(dest)
    with tarfile.open(archive, "r:*") as tar:
        for m in tar.getmembers():
            parts = PurePosixPath(m.name).parts
            if not m.isfile() or len(parts) != 3 or not parts[1].startswith("eval-") or ".." in parts \
                    or m.name.startswith("/"):
                raise SystemExit(f"{archive}: unexpected entry {m.name!r}; not an export of method_compare.py")
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return dest


def compare_rows(rows: dict[str, dict[str, Path]], out_dir: Path, stem: str, eval_task: dict[str, str]) -> dict:
    """`pipeline compare` over the rows (base first): one column per row, tasks named by eval set (gsm8k,
    math500), pairs on the same problems. Writes <stem>.{md,png,json} in out_dir."""
    from pipeline.compare import combine, compare, load_eval, write_outputs

    labels, evals = [], []
    for row, sets in rows.items():
        parts = []
        for set_name, d in sorted(sets.items()):
            e = load_eval(d)
            task = eval_task[set_name]
            if task not in e["summary"]["tasks"]:
                raise SystemExit(f"{d}: no {task} results in summary.json for eval set {set_name}")
            # one task per set: name it by the set (math500 and math are both graded as task math)
            e["summary"] = {**e["summary"], "tasks": {set_name: e["summary"]["tasks"][task]}}
            e["rows"] = {set_name: e["rows"].get(task, {})}
            parts.append(e)
        labels.append(row)
        evals.append(combine(parts))
    result = compare(evals, labels)
    write_outputs(out_dir, result, stem)
    return result


def size_note(path: Path) -> str:
    size = path.stat().st_size
    note = f"{path} ({size / 2**20:.1f} MiB)"
    if size > RETURN_LIMIT:
        note += f": larger than {RETURN_LIMIT // 2**20} MiB, the most a GPU call brings back; export fewer rows " \
                "or evaluate with --eval-limit"
    return note


def compare_evals(args, res: dict, work: Path, stem: Path, eval_task: dict[str, str]) -> None:
    """`pipeline compare` over the evaluated rows, from an --export archive or the eval dirs under --work."""
    if args.evals_archive:
        found = unpack(Path(args.evals_archive), work / f"evals-{args.label}")
        rows = {d.name: {s.name[len("eval-"):]: s for s in sorted(d.iterdir())} for d in sorted(found.iterdir())}
    else:
        rows = {row: {s: d for s, d in sets.items() if (d / "summary.json").is_file()}
                for row, sets in eval_dirs(res, work).items()}
    order = ["base", *res.get("selected", {})]  # the base model first: pairs read method minus base
    names = [r for r in order if rows.get(r)] + sorted(r for r in rows if r not in order and rows[r])
    rows = {r: rows[r] for r in names}
    if rows:
        compare_rows(rows, stem.parent, f"{stem.name}_compare", eval_task)
        print(f"paired comparison of {', '.join(rows)}: {stem}_compare.md")


def export_run(args, res: dict, work: Path, results: Path) -> None:
    """The eval dirs as one archive, and the results JSON, in --export DIR (a GPU call's $OUT)."""
    out = Path(args.export)
    archive = out / f"method_compare_{args.label}_evals.tar.xz"
    missing = export(res, work, archive)
    for d in missing:
        print(f"export: {d} has no summary.json; left out")
    copy = out / results.name
    if copy.resolve() != results.resolve():
        shutil.copyfile(results, copy)
    print(f"exported {size_note(archive)} and {copy}")

