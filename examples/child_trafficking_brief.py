"""The statistics of CTDC's child-trafficking brief ("Family members are involved in nearly half
of child trafficking cases"), asked of a veil server with the researcher client.

    veil serve --demo                     # prints a token for demo-researcher
    export VEIL_TOKEN=veil_...            # that token
    python examples/child_trafficking_brief.py [--server localhost:50051] [--plots DIR]

It releases, with their 95% intervals:
  1. the relationship to the recruiter, children and adults (flag counts), and the share of
     cases with a family member involved in recruitment;
  2. the type of exploitation of children, by gender (flag counts), and the share of children
     trafficked for sexual exploitation;
  3. the means of control, children and adults (flag counts).

Each table is priced first (a free dry run) and then released; running the script again costs
nothing, because a query already released comes back as stored. On the demo server's synthetic
records the numbers are not CTDC's; the published figures are printed beside them to show which
statistic each one is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import client  # noqa: E402
from client import Release  # noqa: E402

ADULTS_AND_CHILDREN = ["Minor", "Adult"]

# Published in the brief (seeds/004): children vs adults.
PUBLISHED = {
    "family": {"Minor": "almost half", "Adult": "9%"},
    "sexual": {"all children": "54%"},
}


def percent(cell: client.Cell) -> str:
    """A share, or why there is none: "suppressed" (under tau) or "empty" (by the query)."""
    return cell.status if cell.value is None else f"{100 * cell.value:.1f}%"


def interval(cell: client.Cell) -> str:
    if cell.suppressed or cell.ci_low is None or cell.ci_high is None:
        return ""
    return f"[{100 * cell.ci_low:.1f}%, {100 * cell.ci_high:.1f}%]"


def show(title: str, release: Release, charged: str) -> None:
    print(f"== {title}")
    print(release.to_text())
    print(f"   {release.summary()}")
    print(f"   charged now: {charged}\n")


def show_children_and_adults(title: str, release: Release, charged: str) -> None:
    """A flag-count release by majority status, one row per flag: children beside adults."""
    frame = release.to_pandas()  # keys, value, ci_low, ci_high, suppressed, status
    frame = frame[frame["majorityStatus"].isin(ADULTS_AND_CHILDREN)]

    def shown(row: Any) -> str:
        if row["status"] != "published":
            return str(row["status"])  # "suppressed", or "empty" by the query's own terms
        return f"{row['value']:,} [{row['ci_low']:,}, {row['ci_high']:,}]"

    frame = frame.assign(shown=frame.apply(shown, axis=1))
    wide = frame.pivot(index="flag", columns="majorityStatus", values="shown")
    wide = wide.reindex(index=list(dict.fromkeys(frame["flag"])), columns=ADULTS_AND_CHILDREN)
    wide.columns = ["children (95% CI)", "adults (95% CI)"]
    wide.index.name = None
    print(f"== {title}")
    print(wide.to_string())
    print(f"   {release.summary()}")
    print(f"   charged now: {charged}\n")


def priced_release(query: client.Query, epsilon: float) -> tuple[Release, str]:
    """Dry-run (free), then release; returns the release and what this run paid for it."""
    dry = query.dry_run(epsilon=epsilon)
    release = query.release(epsilon=epsilon)
    paid = "0 (already released: the stored table was returned)" if dry.already_released else (
        f"{dry.loss_name} {dry.loss}"
    )
    return release, paid


def run(veil_client: client.Client, *, plots: Path | None = None) -> int:
    book = veil_client.codebook()
    deployment = book.deployment
    print(f"{book.title} ({book.name} {book.version}); data {deployment.data_version}")
    print(f"k = {deployment.k}, beta = {deployment.beta}, intervals at "
          f"{100 * deployment.confidence:g}%, accounting {deployment.loss_name}")
    print(f"{veil_client.budget()!r}\n")
    releases: dict[str, Release] = {}

    # 1. Recruitment: who recruited children, and who adults.
    query = (veil_client.flag_counts("recruiterRelation").by("majorityStatus")
             .where(majorityStatus=ADULTS_AND_CHILDREN))
    releases["recruiter"], paid = priced_release(query, 0.4)
    show_children_and_adults("Relationship to the recruiter", releases["recruiter"], paid)

    query = (veil_client.proportion(recruiterRelationFamily=1).by("majorityStatus")
             .where(recruiterRelationUnknown=0, majorityStatus=ADULTS_AND_CHILDREN))
    family, paid = priced_release(query, 0.15)
    releases["family"] = family
    print("== Share of cases with a family member involved in recruitment "
          "(where the recruiter is known)")
    for status in ADULTS_AND_CHILDREN:
        cell = family.cell(majorityStatus=status)
        label = "children" if status == "Minor" else "adults"
        print(f"   {label:<9} {percent(cell):>10}  95% CI {interval(cell):<18} "
              f"published: {PUBLISHED['family'][status]}")
    print(f"   {family.summary()}\n   charged now: {paid}\n")

    # 2. Exploitation of children, by gender.
    query = (veil_client.flag_counts("exploitationType").by("gender")
             .where(majorityStatus="Minor"))
    releases["exploitation"], paid = priced_release(query, 0.4)
    show("Type of exploitation of children, by gender", releases["exploitation"], paid)

    query = (veil_client.proportion(isSexualExploit=1).by("gender")
             .where(majorityStatus="Minor"))
    sexual, paid = priced_release(query, 0.15)
    releases["sexual"] = sexual
    print("== Share of children trafficked for sexual exploitation, by gender "
          f"(published, all children: {PUBLISHED['sexual']['all children']})")
    for cell in sexual:
        gender = cell.keys["gender"] or "(missing)"
        print(f"   {gender:<27} {percent(cell):>10}  95% CI {interval(cell)}")
    print(f"   {sexual.summary()}\n   charged now: {paid}\n")

    # 3. Means of control, children vs adults.
    query = (veil_client.flag_counts("meansOfControl").by("majorityStatus")
             .where(majorityStatus=ADULTS_AND_CHILDREN))
    releases["control"], paid = priced_release(query, 0.4)
    show_children_and_adults("Means of control", releases["control"], paid)

    if plots is not None:
        save_plots(releases, plots)
    print(repr(veil_client.budget()))
    return 0


def save_plots(releases: dict[str, Release], directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    for name, release in releases.items():
        horizontal = release.metadata.measure == "FlagCounts"
        ax: Any = release.plot(horizontal=horizontal)
        path = directory / f"{name}.png"
        ax.figure.savefig(path, dpi=120)
        plt.close(ax.figure)
        print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="address (default $VEIL_SERVER, else localhost:50051)")
    parser.add_argument("--token", help="token (default $VEIL_TOKEN)")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="also save bar charts here")
    args = parser.parse_args(argv)
    try:
        with client.connect(args.server, token=args.token) as veil_client:
            return run(veil_client, plots=args.plots)
    except client.BudgetExhausted as error:
        print(f"budget exhausted: {error}", file=sys.stderr)
        return 3
    except client.VeilError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
