"""``python -m reckoning_ray.data``: inspect data sources and write generated datasets.

    python -m reckoning_ray.data stats /path/to/meta-dev.jsonl
    python -m reckoning_ray.data stats /path/to/meta-dev.jsonl selection=paper   # before / after
    python -m reckoning_ray.data stats clutrr:/path/to/test.csv train_hops=2,3 test_hops=2,3,4,5
    python -m reckoning_ray.data stats generate:clutrr hops=2,3 n=500 distractors=2 seed=1
    python -m reckoning_ray.data generate generate:proofwriter hops=0 n=1024 --out data/onefact
    python -m reckoning_ray.data fetch proofwriter --to /data/proofwriter
    python -m reckoning_ray.data fetch clutrr-sg --archive clutrr.zip --to /data/clutrr-sg
    python -m reckoning_ray.data fetch authors owa_proof_3_hop --to /data/authors/owa_proof_3_hop

A source that cannot be read exits with status 2 and one line naming the file, the line and what
was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from reckoning_ray.core.schema import PROOFS, SELECTIONS, DataConfig
from reckoning_ray.core.data import fetch as fetching
from reckoning_ray.core.data.clutrr_sg import is_clutrr_sg
from reckoning_ray.core.data.errors import DataFormatError
from reckoning_ray.core.data.sources import filter_splits, read_records, to_dataset
from reckoning_ray.core.data.splits import SPLITS
from reckoning_ray.tracking.artifacts import AUTHORS_SETS, artifact_path, fetch_authors

SPEC_HELP = """\
SOURCE is one of
  PATH                      a ProofWriter .jsonl file, a CLUTRR .csv file, a CLUTRR-SG text file
                            (*_proof_1.k_{train,valid,test}_*.txt[.4000]), or a directory with
                            one file per split (meta-train/meta-dev/meta-test.jsonl,
                            train/valid/test.csv), of CLUTRR-SG files (levels 1.k picked by
                            hops=k) or written by save_to_disk; the kind is guessed from the names
  proofwriter:PATH          the same, kind given explicitly (also clutrr:PATH, hf:PATH_OR_HUB_ID)
  generate:proofwriter      the offline ProofWriter-style generator
  generate:clutrr           the offline CLUTRR-style generator

followed by any number of KEY=VALUE options (they fill reckoning_ray.core.config.DataConfig):
  hops=0,1,2      hop counts to keep / generate (default: all)
  train_hops=2,3  validation_hops=2,3  test_hops=2,3,4,5,6
                  hop counts of one split (default: hops=); train on short, test on long chains
  selection=qdep  which ProofWriter questions become tasks: qdep (all) or paper (the RECKONING
                  authors' data: proofs of >= 2 sentences, True/False resampled per theory to
                  the Unknown count, distractors drawn with replacement); stats prints the
                  tables before and after the selection
  balance=true    selection=paper: resample True/False per theory to the Unknown count (false:
                  keep every selected question once)
  proofs=shortest facts of a ProofWriter True/False question: shortest (one shortest proof)
                  or merged (all alternative proofs); stats on a ProofWriter source prints the
                  tasks and facts per task under each choice
  n=2000          training tasks (generated) or cap (files; 0 = all); also train=
  val=256         validation tasks / cap; also validation=
  test=256        test tasks / cap
  distractors=2   distractors per task (-1 = all a file has; generated default 2)
  seed=0          generator seed, split seed for single files
  labels=yes,no,none   ProofWriter-style labels       entities=8  attributes=8  rules=4
  holdout=true    hold out question pairs from training (ProofWriter-style)
  validation_fraction=0.1  test_fraction=0.1   split of a single file (by theory / story)

Examples
  python -m reckoning_ray.data stats ../shared/data/proofwriter-owa-natlang-dev.jsonl
  python -m reckoning_ray.data stats ../shared/data/proofwriter-owa-natlang-dev.jsonl selection=paper
  python -m reckoning_ray.data stats ../shared/data/clutrr-gen_train23_test2to10-test.csv \
      train_hops=2,3 validation_hops=2,3 test_hops=2,3,4,5,6,7,8,9,10
  python -m reckoning_ray.data stats generate:clutrr hops=2,3 n=500 distractors=2 seed=1
  python -m reckoning_ray.data generate generate:proofwriter hops=0 n=1024 --out data/onefact
  python -m reckoning_ray.train embedded data.source=hf data.path=data/onefact
"""

_KEYS = {
    "hops": "hops", "n": "num_train", "train": "num_train", "num_train": "num_train",
    "val": "num_validation", "validation": "num_validation", "num_validation": "num_validation",
    "test": "num_test", "num_test": "num_test", "distractors": "distractors", "seed": "seed",
    "validation_fraction": "validation_fraction", "test_fraction": "test_fraction",
    "labels": "generator.labels", "entities": "generator.num_entities",
    "num_entities": "generator.num_entities", "attributes": "generator.num_attributes",
    "num_attributes": "generator.num_attributes", "rules": "generator.num_rules",
    "num_rules": "generator.num_rules", "holdout": "generator.holdout_pairs",
    "holdout_pairs": "generator.holdout_pairs", "selection": "selection",
    "train_hops": "train_hops", "validation_hops": "validation_hops", "test_hops": "test_hops",
    "balance": "balance", "proofs": "proofs",
}
_HOP_KEYS = ("hops", "train_hops", "validation_hops", "test_hops")


class SpecError(ValueError):
    """A source spec or option the command line cannot use."""


def _guess_kind(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".jsonl":
            return "proofwriter"
        if path.suffix == ".csv" or is_clutrr_sg(path):
            return "clutrr"
        raise SpecError(f"cannot tell the kind of {str(path)!r} from its name: write proofwriter:PATH or clutrr:PATH")
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if "dataset_dict.json" in names:
            return "hf"
        if any(n.endswith(".jsonl") for n in names):
            return "proofwriter"
        if any(n.endswith(".csv") for n in names) or is_clutrr_sg(path):
            return "clutrr"
        raise SpecError(f"directory {str(path)!r} holds no .jsonl, .csv or save_to_disk files")
    raise SpecError(f"source {str(path)!r} is not a file, a directory or a spec like generate:proofwriter")


def _parse_value(key: str, text: str, current: Any) -> Any:
    if key in _HOP_KEYS:
        return [] if text in ("", "all") else [int(v) for v in text.split(",")]
    if key in ("selection", "proofs"):
        if text not in (SELECTIONS if key == "selection" else PROOFS):
            raise ValueError
        return text
    if key == "generator.labels":
        return [v.strip() for v in text.split(",") if v.strip()]
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError
        return text.lower() in ("true", "1", "yes")
    return type(current)(text)


def data_config_from_spec(source: str, options: Sequence[str]) -> DataConfig:
    """A DataConfig for a command-line source spec and its KEY=VALUE options (see ``--help``)."""
    cfg = DataConfig(hops=[])
    if source.startswith("generate:"):
        cfg.source = "generate"
        cfg.family = source.split(":", 1)[1]
        if cfg.family not in ("proofwriter", "clutrr"):
            raise SpecError(f"unknown generator {source!r}: use generate:proofwriter or generate:clutrr")
    else:
        kind, _, rest = source.partition(":")
        if kind in ("proofwriter", "clutrr", "hf") and rest:
            cfg.source, cfg.path = kind, rest
        else:
            cfg.source, cfg.path = _guess_kind(Path(source)), source
        if cfg.source != "hf" and not Path(cfg.path).exists():
            raise SpecError(f"data path {cfg.path!r} does not exist")
        cfg.family = "clutrr" if cfg.source == "clutrr" else "proofwriter"
        # File sources: keep everything unless asked otherwise.
        cfg.distractors, cfg.num_train, cfg.num_validation, cfg.num_test = -1, 0, 0, 0
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in _KEYS:
            raise SpecError(f"option {option!r} is not KEY=VALUE with KEY one of {sorted(set(_KEYS))}")
        target = _KEYS[key]
        owner = cfg.generator if target.startswith("generator.") else cfg
        name = target.split(".")[-1]
        try:
            setattr(owner, name, _parse_value(target, value, getattr(owner, name)))
        except ValueError:
            choices = {"selection": f" (choose one of {SELECTIONS})", "proofs": f" (choose one of {PROOFS})"}.get(target, "")
            raise SpecError(f"option {option!r}: cannot use {value!r} for {key}{choices}") from None
    return cfg


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in header]] + [[f"{v:,}" if isinstance(v, int) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_stats(splits: dict[str, list[dict[str, Any]]], title: str) -> str:
    """Readable tables: tasks by split, by hop count and by label (per split and in total)."""
    out = [title, ""]
    everything = [r for s in SPLITS for r in splits[s]]
    out.append(_table(["split", "tasks"], [[s, len(splits[s])] for s in SPLITS] + [["total", len(everything)]]))

    def by(key: str, name: str) -> str:
        counts = {s: Counter(r[key] for r in splits[s]) for s in SPLITS}
        total = Counter(r[key] for r in everything)
        values = sorted(total, key=lambda v: (-total[v], v) if key == "answer" else v)
        rows = [[v] + [counts[s][v] for s in SPLITS] + [total[v]] for v in values]
        return _table([name, *SPLITS, "total"], rows)

    out += ["", "tasks by hop count", by("hops", "hops"), "", "tasks by label", by("answer", "label")]
    labels = sorted({r["answer"] for r in everything})
    if len(labels) <= 6:
        cross = Counter((r["hops"], r["answer"]) for r in everything)
        hop_values = sorted({r["hops"] for r in everything})
        rows = [[h] + [cross[(h, a)] for a in labels] + [sum(cross[(h, a)] for a in labels)] for h in hop_values]
        rows.append(["all"] + [sum(cross[(h, a)] for h in hop_values) for a in labels] + [len(everything)])
        out += ["", "tasks by hop count and label (all splits)", _table(["hops", *labels, "total"], rows)]
    if everything:
        sizes = [len(r["knowledge"]) for r in everything]
        facts = [len(r["facts"]) for r in everything]
        distractors = [len(r["distractors"]) for r in everything]
        out += ["", _table(["sentences per task", "min", "mean", "max"], [
            ["knowledge", min(sizes), f"{statistics.fmean(sizes):.2f}", max(sizes)],
            ["relevant facts", min(facts), f"{statistics.fmean(facts):.2f}", max(facts)],
            ["distractors", min(distractors), f"{statistics.fmean(distractors):.2f}", max(distractors)],
        ])]
    return "\n".join(out)


def format_proofwriter_options(cfg: DataConfig) -> str:
    """Tasks and relevant facts per task of a ProofWriter source (all its splits, before any
    filtering) under each data.selection / data.balance / data.proofs choice; ``*`` marks ``cfg``'s."""
    rows = []
    for selection, balance in (("qdep", None), ("paper", True), ("paper", False)):
        for proofs in PROOFS:
            choice = dataclasses.replace(cfg, selection=selection, balance=cfg.balance if balance is None else balance,
                                         proofs=proofs)
            records = [r for split in read_records(choice).values() for r in split]
            labels = Counter(r["answer"] for r in records)
            facts = [len(r["facts"]) for r in records]
            mine = (selection == cfg.selection and proofs == cfg.proofs
                    and (balance is None or balance == cfg.balance))
            rows.append([selection, "-" if balance is None else str(balance).lower(), proofs, len(records),
                         labels["yes"], labels["no"], labels["none"], f"{statistics.fmean(facts):.2f}" if facts else "-",
                         max(facts, default=0), "*" if mine else ""])
    return "\n".join([
        f"ProofWriter options: tasks and relevant facts per task of {cfg.path} under each choice (all splits, "
        f"no filtering)",
        _table(["selection", "balance", "proofs", "tasks", "yes", "no", "none", "mean facts", "max facts", "this"], rows),
    ])


def _describe(cfg: DataConfig, source: str) -> str:
    if cfg.source == "generate":
        return (f"{source} (seed {cfg.seed}, hops {list(cfg.hops) or 'all'}, distractors {cfg.distractors})")
    if cfg.source == "proofwriter" and (cfg.selection != "qdep" or cfg.proofs != "shortest"):
        balance = f", balance={str(cfg.balance).lower()}" if cfg.selection == "paper" and not cfg.balance else ""
        proofs = f", proofs={cfg.proofs}" if cfg.proofs != "shortest" else ""
        return f"{cfg.path} ({cfg.source}, selection={cfg.selection}{balance}{proofs})"
    return f"{cfg.path} ({cfg.source})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reckoning_ray.data",
        description="Inspect reasoning data sources and write generated datasets for reckoning-ray.",
        epilog=SPEC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stats = commands.add_parser(
        "stats", help="print tasks by split, hop count and label",
        description="Print the number of tasks by split, by hop count and by label.",
        epilog=SPEC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stats.add_argument("source", metavar="SOURCE", help="file, directory or generator spec (see below)")
    stats.add_argument("options", nargs="*", metavar="KEY=VALUE", help="options of the source (see below)")
    generate = commands.add_parser(
        "generate", help="write a source's splits as a DatasetDict (save_to_disk)",
        description="Write train / validation / test of a source with DatasetDict.save_to_disk; "
                    "training reads it back with data.source=hf data.path=DIR.",
        epilog=SPEC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("source", metavar="SOURCE", help="generator spec, file or directory (see below)")
    generate.add_argument("options", nargs="*", metavar="KEY=VALUE", help="options of the source (see below)")
    generate.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist, or be empty)")
    generate.add_argument("--overwrite", action="store_true", help="replace DIR if it holds a dataset already")
    _add_fetch(commands)
    return parser


FETCH_HELP = f"""\
Each download resumes where a cut one stopped (the part is kept beside DIR as
DIR.<archive>.partial and continued with an HTTP Range request), is checked on the whole file,
and is unpacked into a temporary directory beside DIR that becomes DIR only when complete.
Without network each fetch exits with status 2 within seconds; pass the file fetched elsewhere
with --archive.

Examples
  python -m reckoning_ray.data fetch proofwriter --to /data/proofwriter
  python -m reckoning_ray.data fetch proofwriter --archive {fetching.PROOFWRITER_ARCHIVE} --to /data/proofwriter
  python -m reckoning_ray.train paper data.path=/data/proofwriter/depth-3 inner.steps=4
  python -m reckoning_ray.data fetch clutrr-sg --archive clutrr.zip --to /data/clutrr-sg
  python -m reckoning_ray.data fetch authors owa_proof_3_hop_dall --to /data/authors/owa_proof_3_hop_dall
"""


def _add_fetch(commands: Any) -> None:
    fetch = commands.add_parser(
        "fetch", help="download and unpack a public data release",
        description="Download a public data release, check it and unpack what the readers need into DIR.",
        epilog=FETCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    datasets = fetch.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    def common(sub: argparse.ArgumentParser, archive_help: str) -> None:
        sub.add_argument("--to", required=True, metavar="DIR", help="target directory (must not exist, or be empty)")
        sub.add_argument("--archive", metavar="FILE", help=archive_help)
        sub.add_argument("--overwrite", action="store_true", help="replace DIR if it holds files already")
        sub.add_argument("--timeout", type=float, default=fetching.DEFAULT_TIMEOUT, metavar="SECONDS",
                         help="network timeout (default %(default)s)")

    proofwriter = datasets.add_parser(
        "proofwriter", help="AllenAI's ProofWriter release: its OWA depth-D/meta-*.jsonl files",
        description=f"Download AllenAI's ProofWriter release {fetching.PROOFWRITER_ARCHIVE}, check its sha256 and "
                    f"unpack its open-world files OWA/depth-{{0,1,2,3,5}}/meta-{{train,dev,test}}.jsonl into "
                    f"DIR/depth-D/ (one data.path per depth).",
        epilog=FETCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(proofwriter, "the release zip fetched by hand: no network is used")
    proofwriter.add_argument("--url", default=fetching.PROOFWRITER_URL, help="a mirror (default: %(default)s)")
    proofwriter.add_argument("--sha256", default=fetching.PROOFWRITER_SHA256, metavar="HEX",
                             help="expected sha256 of the zip (default: the release's, %(default)s)")
    proofwriter.add_argument("--no-progress", action="store_true", help="no progress bar")
    clutrr = datasets.add_parser(
        "clutrr-sg", help="CLUTRR-SG's zip (--archive): its *_proof_1.k_*_facts_anon.txt files",
        description=f"Unpack CLUTRR-SG's text files {fetching.CLUTRR_SG_PATTERN} (at any depth of the zip; their "
                    f"directories are kept) into DIR. The release is a Google-Drive file ({fetching.CLUTRR_SG_PAGE}, "
                    f"from NicolasAG/SGinPG data/setup.sh): fetch it in a browser and pass --archive.",
        epilog=FETCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(clutrr, "the zip fetched by hand (the usual way: no network is used)")
    clutrr.add_argument("--url", default=fetching.CLUTRR_SG_URL, help="where to download the zip (default: %(default)s)")
    clutrr.add_argument("--sha256", default=None, metavar="HEX", help="expected sha256 of the zip (none is published)")
    clutrr.add_argument("--no-progress", action="store_true", help="no progress bar")
    authors = datasets.add_parser(
        "authors", help="the RECKONING authors' processed ProofWriter sets (W&B artifacts)",
        description="Download the W&B artifact epfl_nlp_phd/data-collection/NAME:latest (the RECKONING authors' "
                    "processed ProofWriter set; W&B needs `wandb login`) into DIR. "
                    "reckoning_ray.core.data.authors.read_authors reads it.",
        epilog=FETCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    authors.add_argument("name", metavar="NAME", choices=AUTHORS_SETS, help=f"one of {', '.join(AUTHORS_SETS)}")
    common(authors, "a copy fetched by hand: the directory `wandb artifact get` wrote, or a zip of it")


def _fetch(args: argparse.Namespace) -> int:
    progress = not getattr(args, "no_progress", False)
    if args.dataset == "proofwriter":
        done = fetching.fetch_proofwriter(args.to, url=args.url, archive=args.archive, sha256=args.sha256,
                                          overwrite=args.overwrite, timeout=args.timeout, progress=progress)
    elif args.dataset == "clutrr-sg":
        done = fetching.fetch_clutrr_sg(args.to, url=args.url, archive=args.archive, sha256=args.sha256,
                                        overwrite=args.overwrite, timeout=args.timeout, progress=progress)
    else:
        done = fetch_authors(args.name, args.to, archive=args.archive, overwrite=args.overwrite, timeout=args.timeout)
    where = done.directory
    verb = "already holds" if done.already else "now holds"
    checked = f" (archive sha256 {done.sha256})" if done.sha256 else ""
    if args.dataset == "proofwriter":
        depths = " ".join(f"depth-{d}/" for d in fetching.PROOFWRITER_DEPTHS)
        print(f"{where} {verb} the ProofWriter OWA files{checked}:\n"
              f"  {depths}  each with {', '.join(fetching.PROOFWRITER_FILES)}\n"
              f"data.path=<one depth directory>, e.g. data.path={where / 'depth-3'}; the paper's runs (Table 1):\n"
              f"  python -m reckoning_ray.train paper data.path={where / 'depth-2'} inner.steps=4\n"
              f"  python -m reckoning_ray.train paper data.path={where / 'depth-3'} inner.steps=4\n"
              f"  python -m reckoning_ray.train paper data.path={where / 'depth-5'} inner.steps=5")
        return 0
    folders = Counter(str(p.parent.relative_to(where)) for p in done.files)
    listing = "\n".join(f"  {where / d if d != '.' else where}/  ({n} files)" for d, n in sorted(folders.items()))
    if args.dataset == "clutrr-sg":
        print(f"{where} {verb} the CLUTRR-SG files{checked}:\n{listing}\n"
              f"data.path={where}, e.g.\n"
              f"  python -m reckoning_ray.train paper data.source=clutrr data.family=clutrr data.path={where}")
    else:
        print(f"{where} {verb} the W&B artifact {artifact_path(args.name)}:\n{listing}\n"
              f"read it with reckoning_ray.core.data.authors.read_authors({str(where)!r})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            return _fetch(args)
        cfg = data_config_from_spec(args.source, args.options)
        splits = filter_splits(read_records(cfg), cfg)
        if args.command == "stats":
            if cfg.selection == "paper" and cfg.source == "proofwriter":
                # The reading every question gets (selection=qdep), unfiltered, next to the
                # paper's selection with the options applied: compare with the paper's data.
                before = read_records(dataclasses.replace(cfg, selection="qdep"))
                print(format_stats(before, f"BEFORE selection: all questions of {cfg.path} "
                                           f"(selection=qdep, no filtering)"))
                print()
                print(format_stats(splits, f"AFTER selection=paper: tasks in {_describe(cfg, args.source)}"))
            else:
                print(format_stats(splits, f"tasks in {_describe(cfg, args.source)}"))
            if cfg.source == "proofwriter":
                print()
                print(format_proofwriter_options(cfg))
            return 0
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise SpecError(f"--out {str(out)!r} is not empty: choose a new directory or pass --overwrite")
        import datasets

        dataset = datasets.DatasetDict({s: to_dataset(splits[s]) for s in SPLITS})
        dataset.save_to_disk(str(out))
        counts = ", ".join(f"{s} {len(splits[s]):,}" for s in SPLITS)
        print(f"wrote {counts} tasks to {out} (read it with data.source=hf data.path={out})")
        return 0
    except (DataFormatError, SpecError, fetching.FetchError, ValueError, FileNotFoundError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
