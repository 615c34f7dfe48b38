"""The codebook as a researcher browses it: variables, definitions, domains, flag sets.

    book = veil_client.codebook()
    book                       # every variable, flag set and derived dimension, one line each
    book["gender"]             # one item: definition, domain, what missing means
    book.search("recruit")     # items whose name, definition or labels mention the text
    book.to_pandas()           # one row per variable
    book.deployment            # k, beta, interval level, accounting, limits

Every object prints readably and shows as a table in Jupyter.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from client.display import html_table, shorten, text_table, wrap
from client.errors import InvalidQuery
from protos.veil.v1 import veil_pb2 as pb

_KINDS = {
    pb.VARIABLE_KIND_INTEGER: "integer",
    pb.VARIABLE_KIND_CATEGORY: "category",
    pb.VARIABLE_KIND_COUNTRY: "country",
    pb.VARIABLE_KIND_FLAG: "flag",
    pb.VARIABLE_KIND_CONCATENATED: "concatenated",
}
ACCOUNTING_NAMES = {
    pb.ACCOUNTING_PURE_DP: "pure_dp",
    pb.ACCOUNTING_ZCDP: "zcdp",
    pb.ACCOUNTING_UNSPECIFIED: "unspecified",
}
LOSS_SYMBOL = {"pure_dp": "epsilon", "zcdp": "rho"}

# Integer text as the server reads it: ASCII digits, short. int() also takes Arabic-Indic and
# fullwidth digits (sending a number nobody typed) and str.isdigit() takes superscripts, which
# int() then refuses with an error that names no variable.
_INTEGER_TEXT = re.compile(r"-?[0-9]{1,18}")


@dataclass(frozen=True)
class Category:
    code: str  # as written in queries and returned as a key
    label: str
    description: str = ""


@dataclass(frozen=True)
class Variable:
    name: str
    kind: str  # "integer", "category", "country", "flag" or "concatenated"
    definition: str
    number: int | None
    missing: str
    categories: tuple[Category, ...]
    low: int | None
    high: int | None
    unknown_code: str
    flag_set: str
    queryable: bool

    @classmethod
    def from_pb(cls, m: pb.Variable) -> Variable:
        return cls(
            name=m.name,
            kind=_KINDS.get(m.kind, "unspecified"),
            definition=m.definition,
            number=m.number if m.HasField("number") else None,
            missing=m.missing,
            categories=tuple(Category(c.code, c.label, c.description) for c in m.categories),
            low=m.low if m.HasField("low") else None,
            high=m.high if m.HasField("high") else None,
            unknown_code=m.unknown_code,
            flag_set=m.flag_set,
            queryable=m.queryable,
        )

    @property
    def codes(self) -> list[str | int]:
        """The values a filter on this variable may use (and its keys, when grouped by)."""
        if self.kind == "flag":
            return [0, 1]
        if self.kind == "integer" and self.low is not None and self.high is not None:
            return list(range(self.low, self.high + 1))
        return [c.code for c in self.categories]

    def domain(self, limit: int = 6) -> str:
        """A one-line summary of the domain."""
        if self.kind == "flag":
            return "0 or 1"
        if self.kind == "integer":
            return f"integers {self.low} to {self.high}"
        if self.kind == "country":
            unknown = f", {self.unknown_code} = unknown" if self.unknown_code else ""
            return f"{len(self.categories)} ISO 3166-1 codes{unknown}"
        if self.kind == "concatenated":
            return f"labels of flag set {self.flag_set} (not queryable)"
        codes = [c.code for c in self.categories]
        more = f", ... ({len(codes)} values)" if len(codes) > limit else ""
        return ", ".join(codes[:limit]) + more

    def __repr__(self) -> str:
        lines = [f"{self.name}  ({self.kind}{'' if self.queryable else ', not queryable'})"]
        if self.definition:
            lines.append(wrap(self.definition))
        if self.flag_set:
            lines.append(f"  flag set: {self.flag_set}")
        if self.kind in ("category", "country") and self.categories:
            rows = [[c.code, c.label if c.label != c.code else "", c.description]
                    for c in self.categories]
            table = text_table(["code", "label", "description"], rows, max_rows=40)
            lines.append("  " + table.replace("\n", "\n  "))
        else:
            lines.append(f"  values: {self.domain()}")
        if self.missing:
            lines.append(f"  missing: {self.missing}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = [[c.code, c.label, c.description] for c in self.categories]
        caption = f"{self.name} ({self.kind}): {self.definition}"
        footer = f"missing: {self.missing}" if self.missing else ""
        if not rows:
            rows = [["", self.domain(), ""]]
        return html_table(["code", "label", "description"], rows, caption=caption, footer=footer,
                          max_rows=60)


@dataclass(frozen=True)
class FlagSet:
    name: str
    label: str
    flags: tuple[str, ...]  # flag variable names, in release order
    definition: str

    @classmethod
    def from_pb(cls, m: pb.FlagSet) -> FlagSet:
        return cls(m.name, m.label, tuple(m.flags), m.definition)

    @property
    def kind(self) -> str:
        return "flag set"

    def __repr__(self) -> str:
        lines = [f"{self.name}  (flag set: {self.label or self.name}, {len(self.flags)} flags)"]
        if self.definition:
            lines.append(wrap(self.definition))
        lines.extend(f"  - {flag}" for flag in self.flags)
        lines.append(
            f"  use: veil_client.flag_counts({self.name!r}) or FLAG_COUNTS({self.name}) in SQL"
        )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return html_table(["flag"], [[f] for f in self.flags],
                          caption=f"{self.name} (flag set): {self.definition or self.label}")


@dataclass(frozen=True)
class DerivedDimension:
    name: str
    source: str
    kind: str  # "m49_region", "m49_subregion", "m49_intermediate_region" or "groups"
    definition: str
    groups: tuple[str, ...]
    group_of: dict[str, str] = field(hash=False)

    @classmethod
    def from_pb(cls, m: pb.DerivedDimension) -> DerivedDimension:
        return cls(m.name, m.source, m.kind, m.definition, tuple(m.groups), dict(m.group_of))

    @property
    def codes(self) -> list[str | int]:
        return list(self.groups)

    @property
    def members(self) -> dict[str, list[str]]:
        """Each group's codes of the source variable, in code order."""
        members: dict[str, list[str]] = {g: [] for g in self.groups}
        for code, group in sorted(self.group_of.items()):
            members.setdefault(group, []).append(code)
        return members

    def __repr__(self) -> str:
        lines = [f"{self.name}  (derived from {self.source}: {self.kind})"]
        if self.definition:
            lines.append(wrap(self.definition))
        # Which codes a group holds is what a filter or a roll-up by it means.
        for group, codes in self.members.items():
            lines.append(wrap(f"{group} ({len(codes)}): {', '.join(codes)}", indent="  "))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        members = self.members
        rows = [[g, shorten(", ".join(members.get(g, [])), 120)] for g in self.groups]
        return html_table(["group", f"{self.source} codes"], rows,
                          caption=f"{self.name} (derived from {self.source}): {self.definition}")


Item = Variable | FlagSet | DerivedDimension


@dataclass(frozen=True)
class Deployment:
    """The settings of this server that shape every release. Public."""

    accounting: str  # "pure_dp" (epsilon) or "zcdp" (rho)
    k: int  # minimum cell size
    beta: float  # largest chance that a cell below k is published
    confidence: float  # level of every interval
    max_cells: int
    max_dimensions: int
    max_filter_depth: int
    max_filter_terms: int
    data_version: str

    @classmethod
    def from_pb(cls, m: pb.Deployment) -> Deployment:
        return cls(
            accounting=ACCOUNTING_NAMES.get(m.accounting, "unspecified"),
            k=m.k, beta=m.beta, confidence=m.confidence, max_cells=m.max_cells,
            max_dimensions=m.max_dimensions, max_filter_depth=m.max_filter_depth,
            max_filter_terms=m.max_filter_terms, data_version=m.data_version,
        )

    @property
    def loss_name(self) -> str:
        """What the privacy loss is called here: "epsilon" or "rho"."""
        return LOSS_SYMBOL.get(self.accounting, "loss")

    def describe(self) -> str:
        """The settings in a sentence, as `veil codebook` prints them."""
        return (
            f"privacy loss: {self.loss_name} ({self.accounting}); a cell is suppressed when its "
            f"noisy count is below k = {self.k} plus a margin (beta {self.beta:g}); intervals at "
            f"{self.confidence:.0%}; at most {self.max_cells:,} cells and {self.max_dimensions} "
            f"dimensions a query; data version {self.data_version}"
        )

    def __repr__(self) -> str:
        return (
            f"Deployment(accounting={self.accounting} ({self.loss_name}), k={self.k}, "
            f"beta={self.beta}, confidence={self.confidence}, max_cells={self.max_cells}, "
            f"max_dimensions={self.max_dimensions}, data_version={self.data_version!r})"
        )


@dataclass(frozen=True)
class Codebook:
    name: str
    version: str
    title: str
    description: str
    privacy_unit: str
    min_cell_size: int
    variables: tuple[Variable, ...]
    flag_sets: tuple[FlagSet, ...]
    derived: tuple[DerivedDimension, ...]
    deployment: Deployment

    @classmethod
    def from_pb(cls, response: pb.GetCodebookResponse) -> Codebook:
        m = response.codebook
        return cls(
            name=m.name,
            version=m.version,
            title=m.title,
            description=m.description,
            privacy_unit=m.privacy_unit.description,
            min_cell_size=m.min_cell_size,
            variables=tuple(Variable.from_pb(v) for v in m.variables),
            flag_sets=tuple(FlagSet.from_pb(f) for f in m.flag_sets),
            derived=tuple(DerivedDimension.from_pb(d) for d in m.derived),
            deployment=Deployment.from_pb(response.deployment),
        )

    # -- lookup --
    def items(self) -> Iterator[Item]:
        yield from self.variables
        yield from self.flag_sets
        yield from self.derived

    def names(self) -> list[str]:
        return [item.name for item in self.items()]

    def __iter__(self) -> Iterator[Item]:
        return self.items()

    def __len__(self) -> int:
        return len(self.variables) + len(self.flag_sets) + len(self.derived)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    def find(self, name: str) -> Item | None:
        """The item with this name (exactly, or else ignoring case when that is unambiguous)."""
        if not isinstance(name, str):
            raise TypeError(
                f"a codebook name is text, such as 'gender', got {type(name).__name__} {name!r}"
            )
        index = self._index()
        if name in index:
            return index[name]
        folded = [item for key, item in index.items() if key.lower() == name.lower()]
        return folded[0] if len(folded) == 1 else None

    def __getitem__(self, name: str) -> Item:
        item = self.find(name)
        if item is None:
            raise KeyError(self.unknown(name))
        return item

    def suggest(self, name: str, n: int = 3) -> list[str]:
        """The codebook names closest to `name`, ignoring case as name lookups do."""
        by_folded: dict[str, list[str]] = {}
        for known in self.names():
            by_folded.setdefault(known.lower(), []).append(known)
        close = difflib.get_close_matches(name.lower(), list(by_folded), n=n, cutoff=0.6)
        return [known for folded in close for known in by_folded[folded]][:n]

    def unknown(self, name: str) -> str:
        """What to say of a name the codebook does not know (or knows twice, in two cases)."""
        twins = [known for known in self.names() if known.lower() == name.lower()]
        if len(twins) > 1:
            both = " and ".join(twins)
            return f"{name!r} matches {both} in codebook {self.name}; spell it exactly"
        close = self.suggest(name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return (f"{name!r} is not a variable, flag set or derived dimension of codebook "
                f"{self.name}{hint}")

    def _index(self) -> dict[str, Item]:
        cached: dict[str, Item] | None = self.__dict__.get("_cache")
        if cached is None:
            cached = {item.name: item for item in self.items()}
            object.__setattr__(self, "_cache", cached)
        return cached

    def resolve_name(self, name: str) -> str:
        """The codebook's spelling of `name`, or `name` itself when it is not known."""
        item = self.find(name)
        return name if item is None else item.name

    def coerce(self, name: str, value: str | int) -> str | int:
        """`value` in the type the codebook gives `name` (digits for a flag become an integer).

        Text for an integer or flag variable must be ASCII digits 0-9, with a leading minus for a
        negative number; other text raises InvalidQuery naming the variable.
        """
        item = self.find(name)
        if isinstance(item, Variable) and item.kind in ("integer", "flag"):
            if isinstance(value, str):
                if not _INTEGER_TEXT.fullmatch(value.strip()):
                    raise InvalidQuery(
                        f"{item.name}: {shorten(repr(value), 40)} is not an integer; write it "
                        "with the digits 0-9 (at most 18, and a leading - if negative)",
                        variable=item.name,
                    )
                return int(value.strip())
        elif isinstance(item, (DerivedDimension, Variable)) and isinstance(value, int):
            return str(value)
        return value

    def search(self, text: str) -> list[Item]:
        """Items whose name, label, definition or category labels mention `text` (any case)."""
        needle = text.lower()
        found: list[Item] = []
        for item in self.items():
            haystack = [item.name, item.definition]
            if isinstance(item, Variable):
                haystack += [c.label for c in item.categories] + [item.flag_set]
            elif isinstance(item, FlagSet):
                haystack += [item.label, *item.flags]
            if any(needle in h.lower() for h in haystack):
                found.append(item)
        return found

    # -- display --
    def rows(self) -> list[dict[str, Any]]:
        """One row per item: name, kind, domain, definition."""
        out: list[dict[str, Any]] = []
        for v in self.variables:
            out.append({"name": v.name, "kind": v.kind, "queryable": v.queryable,
                        "flag_set": v.flag_set or None, "domain": v.domain(),
                        "definition": v.definition})
        for f in self.flag_sets:
            out.append({"name": f.name, "kind": "flag set", "queryable": True,
                        "flag_set": f.name, "domain": f"{len(f.flags)} flags",
                        "definition": f.definition or f.label})
        for d in self.derived:
            out.append({"name": d.name, "kind": f"derived ({d.kind})", "queryable": True,
                        "flag_set": None, "domain": f"{len(d.groups)} groups from {d.source}",
                        "definition": d.definition})
        return out

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows())

    def header(self) -> str:
        return (
            f"{self.title or self.name} (codebook {self.name} {self.version}): "
            f"{len(self.variables)} variables, {len(self.flag_sets)} flag sets, "
            f"{len(self.derived)} derived dimensions; minimum cell size {self.min_cell_size}"
        )

    def __repr__(self) -> str:
        rows = [[r["name"], r["kind"], shorten(r["domain"], 40), shorten(r["definition"], 60)]
                for r in self.rows()]
        table = text_table(["name", "kind", "values", "definition"], rows)
        return f"{self.header()}\n{table}"

    def _repr_html_(self) -> str:
        rows = [[r["name"], r["kind"], r["domain"], r["definition"]] for r in self.rows()]
        return html_table(["name", "kind", "values", "definition"], rows, caption=self.header(),
                          footer=repr(self.deployment))


def item_from_pb(response: pb.DescribeVariableResponse) -> Item:
    which = response.WhichOneof("item")
    if which == "variable":
        return Variable.from_pb(response.variable)
    if which == "flag_set":
        return FlagSet.from_pb(response.flag_set)
    if which == "derived":
        return DerivedDimension.from_pb(response.derived)
    raise ValueError("the server described nothing")


__all__ = [
    "Category",
    "Codebook",
    "Deployment",
    "DerivedDimension",
    "FlagSet",
    "Item",
    "Variable",
    "item_from_pb",
]
